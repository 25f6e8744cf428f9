"""Sliding-window attention of a prompt chunk: the reference (one SDPA call with mlx-lm's band
mask) and the same result in query blocks. Keys arrive in temporal order: the chunk's L keys
after at most `window - 1` earlier ones, as mlx-lm's RotatingKVCache returns them.
CLSA_MLX_WINDOW_BLOCKS=0 in the environment forces the reference.
"""

import os

import mlx.core as mx


def window_attention_ref(q, k, v, scale: float, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def window_attention_blocks(q, k, v, scale: float, window: int):
    """Query blocks of `window` rows, each over its own 2 * window - 1 keys: L * (2w - 1) scores
    instead of L * (L + w - 1) (2.5x fewer for 2048-token chunks and w = 512)."""
    B, H, L, hd = q.shape
    w, n = window, -(-L // window)
    front = w - 1 - (k.shape[2] - L)  # earlier keys short of a full window (start of the text)

    def pad(a, before, after):
        return mx.pad(a, [(0, 0), (0, 0), (before, after), (0, 0)])

    def spans(a):  # block b reads padded keys [b*w, b*w + 2w - 1)
        a = pad(a, front, n * w - L)
        return mx.stack([a[:, :, b * w : b * w + 2 * w - 1] for b in range(n)], axis=1).reshape(B * n, -1, 2 * w - 1, hd)

    q = pad(q, 0, n * w - L).reshape(B, H, n, w, hd).transpose(0, 2, 1, 3, 4).reshape(B * n, H, w, hd)
    r, t = mx.arange(w)[:, None], mx.arange(2 * w - 1)[None]
    valid = (mx.arange(n)[:, None, None] * w + t) >= front
    mask = mx.broadcast_to(((t >= r) & (t < r + w) & valid)[None, :, None], (B, n, 1, w, 2 * w - 1))
    o = mx.fast.scaled_dot_product_attention(q, spans(k), spans(v), scale=scale, mask=mask.reshape(B * n, 1, w, -1))
    return o.reshape(B, n, H, w, hd).transpose(0, 2, 1, 3, 4).reshape(B, H, n * w, hd)[:, :, :L]


# One fused graph per chunk shape: the blocks' padding, spans and mask are ~20 small ops that
# otherwise launch one by one (whole 128K prompt 1.09x on the H200, results/prefill_parts.jsonl).
window_attention_blocks_compiled = mx.compile(window_attention_blocks)


def window_attention(q, k, v, scale: float, window: int, mask):
    """`mask` is mlx-lm's for the chunk: None (one row), "causal" (the chunk and its past fit one
    window), the band array, or a batch's `[B, 1, L, S]` band with its padding; only the band of
    one sequence goes to blocks, and only past one window of rows."""
    if isinstance(mask, mx.array) and mask.ndim == 2 and q.shape[2] > window and os.environ.get("CLSA_MLX_WINDOW_BLOCKS", "1") != "0":
        return window_attention_blocks_compiled(q, k, v, scale, window)
    return window_attention_ref(q, k, v, scale, mask)
