"""CLSA routing and sparse attention: pure-MLX references and the dispatch the model calls.

Index lists are int32 `[B, L, k]`, ascending by position, padded with -1 where a row has
fewer than k visible positions. Row l of batch row b sees positions start[b] <= s <= offset + l:
`offset` is the chunk's first position in the cache buffer, `start` (optional, `[B]`) the
first valid one (mlx-lm's left padding of a batch cache).
"""

import functools
import logging
import threading

import mlx.core as mx

from . import kernels


def index_scores(q_idx: mx.array, k_idx: mx.array) -> mx.array:
    """Plain dot product of index queries `[B, L, d]` with index keys `[B, T, d]`, in fp32."""
    return q_idx.astype(mx.float32) @ k_idx.astype(mx.float32).swapaxes(-1, -2)


def score_keys(scores: mx.array) -> mx.array:
    """fp32 scores as int32 keys in the order the kernels select on (metal/common.h
    `score_key`, less 2^31): a > b <=> key(a) > key(b); -0 ties +0; every NaN is the
    lowest key, below -inf (which NaN a sum gives depends on the hardware)."""
    i = scores.view(mx.int32)
    lowest = -(2**31)  # the bits of -0, and the key of every NaN
    key = mx.where(i == lowest, 0, i ^ ((i >> 31) & 0x7FFFFFFF))
    return mx.where((i & 0x7FFFFFFF) > 0x7F800000, lowest, key)


def route_ref(q_idx: mx.array, k_idx: mx.array, k: int, offset: int, start=None) -> mx.array:
    """Exact causal top-k per query row; ties go to the lower position; never below start;
    NaN scores rank below every other (`score_keys`)."""
    if k < 1:
        raise ValueError(f"routing needs k >= 1, got {k}")
    B, L, _ = q_idx.shape
    T = k_idx.shape[1]
    pos = mx.arange(T)
    visible = pos[None, None] <= (offset + mx.arange(L))[None, :, None]
    if start is not None:
        visible = visible & (pos[None, None] >= start[:, None, None])
    keys = mx.where(visible, score_keys(index_scores(q_idx, k_idx)), -(2**31))
    # Threshold select: all keys above the k-th largest, then the lowest-position ties.
    kth = mx.topk(keys, min(k, T), axis=-1).min(axis=-1, keepdims=True)
    above = visible & (keys > kth)
    tie = visible & (keys == kth)
    need = min(k, T) - above.sum(axis=-1, keepdims=True)
    take = above | (tie & (mx.cumsum(tie, axis=-1) <= need))
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
    def gather(a):
        return mx.where(zero, 0, mx.take_along_axis(a, rows, axis=2)).astype(a.dtype)

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
# when one is available and the instantiation passed its self-test, else the references
# above. CLSA_MLX_REFERENCE=1 forces the references. Routing is a selection: no gradient
# flows through it (LoRA below the indexer trains). The attention kernel's gradients go
# through its reference.


def _routing_trusted(name: str, be, q_idx, k_idx, k: int, **inst) -> bool:
    """Every library variant the call builds passed its self-test (`kernels.route_variants`)."""
    if be is None or not kernels.route_supported(q_idx, k_idx, k):
        return False
    (B, L, D), T = q_idx.shape, k_idx.shape[1]
    inst = dict(qt=q_idx.dtype, kt=k_idx.dtype, D=D, **inst)
    return all(
        _trusted(name, be, **inst, fused=fused, start_constant=small)
        for fused, small in sorted(kernels.route_variants(B, L, T))
    )


def route(q_idx, k_idx, k: int, offset: int, start=None) -> mx.array:
    q_idx, k_idx = mx.stop_gradient(q_idx), mx.stop_gradient(k_idx)
    be = kernels.backend()
    if not _routing_trusted("route", be, q_idx, k_idx, k):
        return route_ref(q_idx, k_idx, k, offset, start)
    return kernels.route(q_idx, k_idx, k, offset, be, start)


def select_kv(q_idx, k_idx, keys, values, k: int, start=None):
    be = kernels.backend()
    if not _routing_trusted("select_kv", be, q_idx[:, -1:], k_idx, k, dt=keys.dtype, HD=keys.shape[-1]):
        return select_kv_ref(q_idx, k_idx, keys, values, k, start)
    return kernels.select_kv(q_idx, k_idx, keys, values, k, be, start)


def sparse_attention(q, keys, values, idx, scale: float) -> mx.array:
    be = kernels.backend()
    if (
        be is None
        or not kernels.sparse_attention_supported(q, keys, values)
        or min(idx.size, q.size) < 8  # MLX would pass it in constant memory: a library never probed
        or not _trusted("sparse_attention", be, dt=q.dtype, HD=q.shape[-1], G=q.shape[1] // keys.shape[1])
    ):
        return sparse_attention_ref(q, keys, values, idx, scale)
    return _attention_kernel(be, float(scale))(q, keys, values, idx)


@functools.lru_cache(maxsize=None)
def _attention_kernel(be: str, scale: float):
    """The kernel forward, its gradients through the reference (LoRA trains on a GPU)."""

    @mx.custom_function
    def attention(q, keys, values, idx):
        return kernels.sparse_attention(q, keys, values, idx, scale, be)

    @attention.vjp
    def attention_vjp(primals, cotangent, _):
        q, keys, values, idx = primals
        ref = lambda q, k, v: sparse_attention_ref(q, k, v, idx, scale)  # noqa: E731
        _, grads = mx.vjp(ref, [q, keys, values], [cotangent])
        return (*grads, mx.zeros_like(idx))

    return attention


# Self-test: a kernel that fails to build on this machine (a Metal compiler we never ran),
# exceeds its pipeline's thread limit, or answers wrong must not end the chat. The first use
# of each instantiation in a process runs it on a tiny input against its reference, in its
# own eval; on any failure that instantiation uses the reference for the rest of the process.

_verdicts: dict = {}  # (kernel, backend, template values...) -> None (passed) or the reason
_lock = threading.Lock()
log = logging.getLogger("clsa_mlx")


def fallbacks() -> dict:
    """Instantiations that failed their self-test in this process, with the reason."""
    return {key: why for key, why in _verdicts.items() if why is not None}


def _trusted(name: str, be: str, **inst) -> bool:
    key = (name, be, tuple(inst.items()))
    if key not in _verdicts:
        with _lock:
            if key not in _verdicts:
                _verdicts[key] = _self_test(name, be, **inst)
                if _verdicts[key] is not None:
                    what = ", ".join(f"{n}={str(v).removeprefix('mlx.core.')}" for n, v in inst.items())
                    log.warning(
                        f"clsa_mlx: kernel {name} ({be}, {what}) failed its self-test and falls back "
                        f"to the MLX reference: {_verdicts[key]}"
                    )
    return _verdicts[key] is None


def prepare(index_dtype, index_dim: int, kv_dtype, head_dim: int, groups: int, batch: int = 1) -> dict:
    """Builds (through their self-tests) the kernel libraries a model of these dims uses, so
    the seconds of MLX's first compile of each fall before the first token, not in the first
    reply: routing with scores in the kernel and from a matmul, with `start` in constant memory
    (and in device memory from 8 batch rows on), the decode gather and sparse attention.
    Returns `fallbacks()`."""
    be = kernels.backend()
    if be is None:
        return {}
    inst = dict(qt=index_dtype, kt=index_dtype, D=index_dim)
    for small in (True, False) if batch >= 8 else (True,):
        for fused in (True, False):
            _trusted("route", be, **inst, fused=fused, start_constant=small)
        _trusted("select_kv", be, **inst, dt=kv_dtype, HD=head_dim, fused=True, start_constant=small)
    if kernels.attention_warps(groups, head_dim):
        _trusted("sparse_attention", be, dt=kv_dtype, HD=head_dim, G=groups)
    return fallbacks()


def _self_test(name: str, be: str, **inst):
    try:
        return _PROBES[name](be, **inst)
    except Exception as e:  # build errors, thread limits: whatever MLX raises at eval
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"


def _ints(shape, dtype, seed: int):
    # Small integers: exact in every dtype, so scores tie often and compare exactly.
    return mx.random.randint(-3, 4, shape, key=mx.random.key(seed)).astype(dtype)


def _probe_start(B: int, T: int, L: int) -> mx.array:
    # Row 1 is left-padded down to fewer than k positions, row 2 to none.
    return mx.array([0, T - L - 5, T] + [3] * (B - 3), mx.int32)


def _probe_route(be, qt, kt, D, fused, start_constant):
    L = 1 if fused else kernels._FUSED_MAX_L + 1
    B, T, k = 4 if start_constant else 8, 300 + L, 16  # two chunks a row at most
    start = _probe_start(B, T, L)
    q, kk = _ints((B, L, D), qt, 1), _ints((B, T, D), kt, 2)
    got, want = kernels.route(q, kk, k, T - L, be, start), route_ref(q, kk, k, T - L, start)
    mx.eval(got, want)
    return None if mx.array_equal(got, want) else "index lists differ from the reference"


def _probe_select_kv(be, qt, kt, D, dt, HD, fused, start_constant):
    B, H, T, k = 4 if start_constant else 8, 2, 300, 16
    start = _probe_start(B, T, 1)
    q, kk = _ints((B, 1, D), qt, 3), _ints((B, T, D), kt, 4)
    keys, values = _ints((B, H, T, HD), dt, 5), _ints((B, H, T, HD), dt, 6)
    got = kernels.select_kv(q, kk, keys, values, k, be, start)
    want = select_kv_ref(q, kk, keys, values, k, start)
    mx.eval(got, want)
    same = all(mx.array_equal(a, b) for a, b in zip(got, want))
    return None if same else "gathered rows differ from the reference"


_ATTENTION_TOL = {mx.float32: 5e-3, mx.float16: 2e-2, mx.bfloat16: 1.5e-1}  # fp32: a GPU reference may use TF32


def _probe_sparse_attention(be, dt, HD, G):
    B, H, L, T, k = 1, 2, 3, 40, 8
    shapes = [(B, H * G, L, HD), (B, H, T, HD), (B, H, T, HD)]
    q, keys, values = (mx.random.normal(s, key=mx.random.key(7 + i)).astype(dt) for i, s in enumerate(shapes))
    start = mx.array([T - L - 2])  # query row 0 sees 3 positions: -1 slots
    idx = route_ref(_ints((B, L, 4), mx.float32, 10), _ints((B, T, 4), mx.float32, 11), k, T - L, start)
    got = kernels.sparse_attention(q, keys, values, idx, HD**-0.5, be).astype(mx.float32)
    with mx.stream(mx.cpu):  # fp32 on the CPU: GPU matmuls may use TF32
        want = sparse_attention_ref(*(a.astype(mx.float32) for a in (q, keys, values)), idx, HD**-0.5)
    err = float(mx.abs(got - want).max())
    return None if err <= _ATTENTION_TOL.get(dt, 1e-3) else f"max error {err:.3g} against the reference"


_PROBES = {
    "route": _probe_route,
    "select_kv": _probe_select_kv,
    "sparse_attention": _probe_sparse_attention,
}
