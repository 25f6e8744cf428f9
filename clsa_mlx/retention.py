"""Gated retention, the official YOCO self-decoder mixer, in fp32.

S_t = exp(a_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t  (k already scaled by d^-0.5).
"""

import mlx.core as mx

CHUNK = 256


def _retention_chunk(q, k, v, a, state):
    L = q.shape[2]
    G = mx.cumsum(a, axis=-1)
    causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    # exp of -inf above the diagonal, so no overflow reaches the product.
    decay = mx.exp(mx.where(causal, G[..., :, None] - G[..., None, :], -mx.inf))
    o = ((q @ k.swapaxes(-1, -2)) * decay) @ v + (q * mx.exp(G)[..., None]) @ state
    g_last = G[..., -1:]
    state = state * mx.exp(g_last)[..., None] + (
        k * mx.exp(g_last - G)[..., None]
    ).swapaxes(-1, -2) @ v
    return o, state


def gated_retention(q, k, v, a, state, chunk: int = CHUNK):
    """q, k, v `[B, H, L, d]` fp32, log-decay a `[B, H, L]`, state `[B, H, d, d]` fp32.
    Parallel within chunks of `chunk` tokens, recurrent across them; L == 1 is the decode step."""
    outs = []
    for s in range(0, q.shape[2], chunk):
        e = s + chunk
        o, state = _retention_chunk(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], a[:, :, s:e], state)
        outs.append(o)
    return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)), state
