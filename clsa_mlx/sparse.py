"""CLSA routing and sparse attention: pure-MLX references and the dispatch the model calls.

Index lists are int32 `[B, L, k]`, ascending by position, padded with -1 where a row has
fewer than k visible positions. Row l of batch row b sees positions start[b] <= s <= offset + l:
`offset` is the chunk's first position in the cache buffer, `start` (optional, `[B]`) the
first valid one (mlx-lm's left padding of a batch cache).
"""

import mlx.core as mx

from . import kernels


def index_scores(q_idx: mx.array, k_idx: mx.array) -> mx.array:
    """Plain dot product of index queries `[B, L, d]` with index keys `[B, T, d]`, in fp32."""
    return q_idx.astype(mx.float32) @ k_idx.astype(mx.float32).swapaxes(-1, -2)


def route_ref(q_idx: mx.array, k_idx: mx.array, k: int, offset: int, start=None) -> mx.array:
    """Exact causal top-k per query row; ties go to the lower position; never below start."""
    B, L, _ = q_idx.shape
    T = k_idx.shape[1]
    pos = mx.arange(T)
    visible = pos[None, None] <= (offset + mx.arange(L))[None, :, None]
    if start is not None:
        visible = visible & (pos[None, None] >= start[:, None, None])
    scores = mx.where(visible, index_scores(q_idx, k_idx), -mx.inf)
    # Threshold select: all scores above the k-th largest, then the lowest-position ties.
    kth = mx.topk(scores, min(k, T), axis=-1).min(axis=-1, keepdims=True)
    above = scores > kth
    tie = scores == kth
    need = min(k, T) - above.sum(axis=-1, keepdims=True)
    take = visible & (above | (tie & (mx.cumsum(tie, axis=-1) <= need)))
    slot = mx.where(take, mx.cumsum(take, axis=-1) - 1, k)
    out = mx.full((B, L, k + 1), -1, dtype=mx.int32)
    out = mx.put_along_axis(out, slot, mx.broadcast_to(pos.astype(mx.int32), slot.shape), axis=-1)
    return out[..., :k]


def select_kv_ref(q_idx, k_idx, keys, values, k: int, start=None):
    """Decode: route the newest token over all T > k cached positions and gather its
    k keys and values `[B, Hkv, k, hd]` once, for every cross layer to attend over.
    Also returns the index list `[B, k]`: -1 slots (a batch row with fewer than k valid
    positions) gather zeros that the caller masks."""
    T = k_idx.shape[1]
    idx = route_ref(q_idx[:, -1:], k_idx, k, T - 1, start)[:, 0]
    if start is None:  # T > k: every slot is filled
        rows = idx[:, None, :, None]
        return mx.take_along_axis(keys, rows, axis=2), mx.take_along_axis(values, rows, axis=2), idx
    rows = mx.maximum(idx, 0)[:, None, :, None]
    zero = (idx < 0)[:, None, :, None]
    gather = lambda a: mx.where(zero, 0, mx.take_along_axis(a, rows, axis=2)).astype(a.dtype)
    return gather(keys), gather(values), idx


def sparse_attention_ref(q, keys, values, idx, scale: float) -> mx.array:
    """Each query row attends only to its own index list.
    q `[B, Hq, L, hd]`, keys/values `[B, Hkv, T, hd]`, idx `[B, L, k]` -> `[B, Hq, L, hd]`."""
    B, L, _ = idx.shape
    T = keys.shape[2]
    mask = mx.zeros((B, L, T + 1), dtype=mx.bool_)
    mask = mx.put_along_axis(mask, mx.where(idx < 0, T, idx), mx.array(True), axis=-1)
    return mx.fast.scaled_dot_product_attention(
        q, keys, values, scale=scale, mask=mask[:, None, :, :T]
    )


# Dispatch: the GPU kernels of `kernels.py` (Metal, or CUDA through MLX's CUDA backend)
# when one is available, else the references above. CLSA_MLX_REFERENCE=1 forces the
# references. Routing is a selection: no gradient flows through it (LoRA below the indexer
# trains). The attention kernel has no VJP: on a GPU, training must force the references.


def route(q_idx, k_idx, k: int, offset: int, start=None) -> mx.array:
    q_idx, k_idx = mx.stop_gradient(q_idx), mx.stop_gradient(k_idx)
    be = kernels.backend()
    if be is None:
        return route_ref(q_idx, k_idx, k, offset, start)
    return kernels.route(q_idx, k_idx, k, offset, be, start)


def select_kv(q_idx, k_idx, keys, values, k: int, start=None):
    be = kernels.backend()
    if be is None:
        return select_kv_ref(q_idx, k_idx, keys, values, k, start)
    return kernels.select_kv(q_idx, k_idx, keys, values, k, be, start)


def sparse_attention(q, keys, values, idx, scale: float) -> mx.array:
    be = kernels.backend()
    if be is None or not kernels.sparse_attention_supported(q, keys, values):
        return sparse_attention_ref(q, keys, values, idx, scale)
    return kernels.sparse_attention(q, keys, values, idx, scale, be)
