"""Phi-4-mini-flash-reasoning ("SambaY", model_type phi4flash) in MLX, with the names of its
Hugging Face checkpoint. Layers i < L/2: Mamba-1 (even) and sliding-window differential attention
(odd); layer L/2: Mamba-1 whose scan output (before its gate) is the memory of the Gated Memory
Units; layer L/2 + 1: full differential attention whose K/V is the one cache every cross layer
reads; then GMU (even) and cross differential attention (odd). No positional encoding.

Caches (`make_cache()`, in layer order up to L/2 + 1): `ArraysCache(2)` (conv, SSM state) per Mamba
layer, `RotatingKVCache(window)` per sliding layer, one `KVCache` for the shared K/V. The GMU and
cross layers keep nothing: their memory and K/V come from this call's layers L/2 and L/2 + 1.
The K/V caches hold head pairs: row [k_2p | k_2p+1] of 2 * head_dim per pair (`pair_attention`)."""

import math
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from types import SimpleNamespace
from typing import Any, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import ArraysCache, KVCache

from ..cache import RotatingKVCache, refuse_max_kv_size
from ..model import floating_weights, vocabulary_ids
from ..window import window_attention


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "phi4flash"
    vocab_size: int = 200064
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 40
    num_key_value_heads: int = 20
    sliding_window: Union[int, List[Optional[int]], None] = 512
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    mb_per_layer: int = 2
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: Union[int, str] = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False

    def __post_init__(self):
        if isinstance(self.sliding_window, list):  # the per-layer list the remote config class writes
            sizes = {w for w in self.sliding_window if w is not None}
            if len(sizes) != 1:
                raise ValueError(f"config.json: sliding_window {self.sliding_window!r} must name one window size")
            self.sliding_window = sizes.pop()
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        problems = []
        L, H, Hkv = self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads
        if L < 4 or L % 4:
            problems.append(f"num_hidden_layers {L} must be a multiple of 4")
        if self.mb_per_layer != 2:
            problems.append(f"mb_per_layer {self.mb_per_layer} is not supported (2: Mamba on even layers)")
        if self.hidden_size % H or H % 2 or Hkv % 2 or H % Hkv:
            problems.append(f"hidden_size {self.hidden_size}, {H} heads, {Hkv} K/V heads: heads must divide the "
                            "width, both head counts be even and K/V heads divide the heads")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
            problems.append(f"sliding_window {self.sliding_window!r} must be a positive integer")
        if self.mamba_d_conv < 2 or self.mamba_d_state < 1 or self.mamba_dt_rank < 1 or self.mamba_expand < 1:
            problems.append("mamba_d_conv must be >= 2 and mamba_d_state, mamba_dt_rank, mamba_expand >= 1")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (silu)")
        if problems:
            raise ValueError("config.json: " + "; ".join(problems))

    @property
    def max_seq_len(self):
        return self.max_position_embeddings

    @property
    def dim(self):
        return self.hidden_size

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    sparse = False  # no CLSA indexer: the chat's memory count has no index keys
    index_head_dim = 0


def full_precision(name: str) -> bool:
    """Kept in fp32 whatever the model's dtype, never quantized: the decay rates, skip weights
    and lambdas (a few thousand numbers per layer that every token's output depends on)."""
    return name.endswith((".A_log", ".D")) or ".lambda_" in name


MIXED_BITS = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}


def mixed_quant_predicate(recipe: str, n_layers: int, group_size: int = 64):
    """mlx-lm's mixed recipes (after llama.cpp's Q4_K_M) on this model's names: the embedding, which
    is also the output head, and in the first and last eighths of the layers and every third layer
    between, the attention projections and the MLP's down projection, at the high bits."""
    low, high = MIXED_BITS[recipe]

    def predicate(path, module):
        if path.endswith(("x_proj", "dt_proj")):
            return False
        parts = path.split(".")
        i = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        more = i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2
        high_here = "embed_tokens" in path or "lm_head" in path or more and path.endswith(("Wqkv", "fc2"))
        return {"group_size": group_size, "bits": high if high_here else low, "mode": "affine"}

    return predicate


def lambda_init(depth: int) -> float:
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def pairs(x, n_heads):
    """[B, L, n * hd] -> [B, n / 2, L, 2 hd]: head pair (2p, 2p + 1) as one row [even | odd]."""
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads // 2, -1).transpose(0, 2, 1, 3)


def pair_attention(q, k, v, scale, mask, window=None):
    """Both softmax maps of every head pair over the pair's values [v1 | v2], in one fused attention
    call that reads each K/V row once: the rows are the pairs [k1 | k2] and [v1 | v2], and the even
    query meets k1 as [q1 | 0], the odd one k2 as [0 | q2]. q, k, v: pairs (`pairs`); returns the
    two maps' outputs a1, a2 [B, H/2, L, 2 hd]. A sliding layer's prompt chunk goes in query blocks
    of `window` rows (`clsa_mlx.window`)."""
    B, P, L, d = q.shape
    G = k.shape[1]
    if window:
        o = window_attention(_pair_queries(q, G), k, v, scale, window, mask)
    else:
        o = mx.fast.scaled_dot_product_attention(_pair_queries(q, G), k, v, scale=scale, mask=mask)
    o = o.reshape(B, G, 2, -1, L, d)
    return o[:, :, 0].reshape(B, P, L, d), o[:, :, 1].reshape(B, P, L, d)


@mx.compile
def _pair_queries(q, G):
    B, P, L, d = q.shape
    z = mx.zeros((B, P, L, d // 2), q.dtype)
    q1, q2 = mx.concatenate([q[..., : d // 2], z], axis=-1), mx.concatenate([z, q[..., d // 2:]], axis=-1)
    return mx.stack([q1.reshape(B, G, -1, L, d), q2.reshape(B, G, -1, L, d)], axis=2).reshape(B, 2 * P, L, d)


@lru_cache(maxsize=None)
def _constant(value: float):
    return mx.array(value, mx.float32)


@partial(mx.compile, shapeless=True)
def _differential(a1, a2, lq1, lk1, lq2, lk2, w, init):
    """subln(a1 - lambda a2) * (1 - lambda_init), lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init."""
    f32 = mx.float32
    lam = mx.exp(mx.sum(lq1.astype(f32) * lk1.astype(f32))) - mx.exp(mx.sum(lq2.astype(f32) * lk2.astype(f32)))
    return mx.fast.rms_norm(a1 - (lam + init).astype(a1.dtype) * a2, w, 1e-5) * (1 - init)


class DiffAttention(nn.Module):
    """Two softmax maps per head pair, both over the pair's values [v1 | v2]:
    subln(a1 - lambda a2) * (1 - lambda_init)."""

    def __init__(self, head_dim: int, depth: int):
        super().__init__()
        self.lambda_init = lambda_init(depth)
        self.lambda_q1 = mx.zeros((head_dim,))
        self.lambda_k1 = mx.zeros((head_dim,))
        self.lambda_q2 = mx.zeros((head_dim,))
        self.lambda_k2 = mx.zeros((head_dim,))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)
        self.scale = head_dim**-0.5

    def __call__(self, q, k, v, mask, window=None):
        a1, a2 = pair_attention(q, k, v, self.scale, mask, window)
        o = _differential(a1, a2, self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.subln.weight,
                          _constant(self.lambda_init))
        B, _, L, _ = o.shape
        return o.transpose(0, 2, 1, 3).reshape(B, L, -1)  # pair p = [head 2p | head 2p + 1]


class Attention(nn.Module):
    """Self attention (sliding or full: it writes its K/V) or, with `cross`, queries only,
    reading the shared K/V."""

    def __init__(self, args: ModelArgs, depth: int, cross: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = hd = args.hidden_size // self.n_heads
        self.cross = cross
        out = self.n_heads * hd if cross else (self.n_heads + 2 * self.n_kv_heads) * hd
        self.Wqkv = nn.Linear(args.hidden_size, out, bias=True)
        self.out_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=True)
        self.inner_cross_attn = DiffAttention(hd, depth)
        self.window = args.sliding_window if depth < args.num_hidden_layers // 2 else None

    def __call__(self, x, mask, cache=None, shared=None):
        """Returns the output and the K/V this layer read (the shared cache for layer L/2 + 1)."""
        qkv = self.Wqkv(x)
        if self.cross:
            k, v = shared
            q = qkv
        else:
            q_end, k_end = self.n_heads * self.head_dim, (self.n_heads + self.n_kv_heads) * self.head_dim
            q, k, v = mx.split(qkv, (q_end, k_end), axis=-1)
            k, v = cache.update_and_fetch(pairs(k, self.n_kv_heads), pairs(v, self.n_kv_heads))
        o = self.inner_cross_attn(pairs(q, self.n_heads), k, v, mask, self.window)
        return self.out_proj(o), (k, v)


def ssm_step(h, x, dt, A, Bm, C, D):
    """One token of the selective scan: h [B, D, N]; x, dt [B, D]; Bm, C [B, N] (fp32)."""
    h = h * mx.exp(dt[..., None] * A) + (dt * x)[..., None] * Bm[:, None, :]
    return (h @ C[..., None])[..., 0] + D * x, h


ssm_step_compiled = mx.compile(ssm_step)


def ssm_scan_ref(x, dt, A, Bm, C, D, h):
    """Token by token: x, dt [B, L, D]; Bm, C [B, L, N]; h [B, D, N]. Returns y [B, L, D] and h."""
    ys = []
    for t in range(x.shape[1]):
        y, h = ssm_step(h, x[:, t], dt[:, t], A, Bm[:, t], C[:, t], D)
        ys.append(y)
    return mx.stack(ys, axis=1), h


def _chunk_ends(x, dt, A, Bm):
    """State at each chunk's end from a zero start, and each chunk's total decay (log)."""
    s = mx.zeros((*x.shape[:2], *A.shape), mx.float32)
    for t in range(x.shape[2]):
        s = s * mx.exp(dt[:, :, t, :, None] * A) + (dt[:, :, t] * x[:, :, t])[..., None] * Bm[:, :, t, None, :]
    return s, dt.sum(axis=2)[..., None] * A


def _chunk_outputs(x, dt, A, Bm, C, D, s):
    ys = []
    for t in range(x.shape[2]):
        s = s * mx.exp(dt[:, :, t, :, None] * A) + (dt[:, :, t] * x[:, :, t])[..., None] * Bm[:, :, t, None, :]
        ys.append((s @ C[:, :, t, :, None])[..., 0] + D * x[:, :, t])
    return mx.stack(ys, axis=2)


_chunk_ends_compiled = mx.compile(_chunk_ends)
_chunk_outputs_compiled = mx.compile(_chunk_outputs)


def ssm_scan(x, dt, A, Bm, C, D, h):
    """The same scan in about sqrt(2L) chunks of c tokens: every chunk's end state from a zero
    start (c steps over all chunks at once), the true start states chunk by chunk, then the
    outputs from those (c steps again). 2c + L/c small steps instead of L; no [L, D, N] tensor."""
    B, L, Dn = x.shape
    if L == 1:
        y, h = ssm_step_compiled(h, x[:, 0], dt[:, 0], A, Bm[:, 0], C[:, 0], D)
        return y[:, None], h
    c = max(1, round(math.sqrt(L / 2)))
    n = -(-L // c)
    pad = [(0, 0), (0, n * c - L), (0, 0)]  # padded steps: dt = 0, no decay and no input

    def chunks(a):
        return mx.pad(a, pad).reshape(B, n, c, a.shape[-1])

    x, dt, Bm, C = chunks(x), chunks(dt), chunks(Bm), chunks(C)
    ends, decay = _chunk_ends_compiled(x, dt, A, Bm)
    starts = []
    for i in range(n):
        starts.append(h)
        h = h * mx.exp(decay[:, i]) + ends[:, i]
    y = _chunk_outputs_compiled(x, dt, A, Bm, C, D, mx.stack(starts, axis=1))
    return y.reshape(B, n * c, Dn)[:, :L], h


@mx.compile
def _conv_silu(x_full, weight, bias):
    """silu(depthwise causal conv) of the L = len(x_full) - width + 1 newest inputs."""
    K = weight.shape[-1]
    L = x_full.shape[1] - K + 1
    w = weight[:, 0].T
    y = sum(x_full[:, k:k + L] * w[k] for k in range(K))
    return nn.silu(y if bias is None else y + bias)


@mx.compile
def _ssm_decode(h, x, dt, Bm, C, A_log, D, z):
    """One token of a Mamba layer from its projections: the scan step (fp32), its output (the GMU
    memory) and the gated output."""
    f32 = mx.float32
    y, h = ssm_step(h, x.astype(f32), nn.softplus(dt.astype(f32)), -mx.exp(A_log.astype(f32)), Bm.astype(f32),
                    C.astype(f32), D.astype(f32))
    y = y.astype(x.dtype)
    return y, y * nn.silu(z), h


class Conv(nn.Module):
    """Depthwise causal convolution's weights ([channels, 1, width] as in the checkpoint): `_conv_silu`."""

    def __init__(self, channels: int, width: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((channels, 1, width))
        if bias:
            self.bias = mx.zeros((channels,))



class Mamba(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, self.d_inner = args.hidden_size, args.mamba_expand * args.hidden_size
        self.d_state, self.dt_rank, self.d_conv = args.mamba_d_state, args.mamba_dt_rank, args.mamba_d_conv
        self.in_proj = nn.Linear(D, 2 * self.d_inner, bias=args.mamba_proj_bias)
        self.conv1d = Conv(self.d_inner, self.d_conv, args.mamba_conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        A = mx.arange(1, self.d_state + 1, dtype=mx.float32)
        self.A_log = mx.log(mx.broadcast_to(A, (self.d_inner, self.d_state)))
        self.D = mx.ones((self.d_inner,))
        self.out_proj = nn.Linear(self.d_inner, D, bias=args.mamba_proj_bias)

    def __call__(self, x, mask, cache):
        """Returns the output and the scan's output before the gate (the GMU memory)."""
        B, L, _ = x.shape
        f32 = mx.float32
        xs, z = mx.split(self.in_proj(x), 2, axis=-1)
        if mask is not None:  # a batch's padding: no input, and (dt = 0 below) no decay
            xs = mx.where(mask[..., None], xs, 0)
        conv_state = cache[0] if cache[0] is not None else mx.zeros((B, self.d_conv - 1, self.d_inner), xs.dtype)
        x_full = mx.concatenate([conv_state, xs], axis=1)
        keep = self.d_conv - 1
        if cache.lengths is not None:  # a right-padded prompt chunk: the last inputs of each row
            ends = mx.clip(cache.lengths, 0, L)
            cache[0] = mx.take_along_axis(x_full, (ends[:, None] + mx.arange(keep))[..., None], axis=1)
        else:
            cache[0] = x_full[:, -keep:]
        xs = _conv_silu(x_full, self.conv1d.weight, self.conv1d.get("bias"))
        dt, Bm, C = mx.split(self.x_proj(xs), (self.dt_rank, self.dt_rank + self.d_state), axis=-1)
        dt = self.dt_proj(dt)
        h = cache[1] if cache[1] is not None else mx.zeros((B, self.d_inner, self.d_state), f32)
        if L == 1 and mask is None:
            memory, gated, cache[1] = _ssm_decode(h, xs[:, 0], dt[:, 0], Bm[:, 0], C[:, 0], self.A_log, self.D, z[:, 0])
            memory, gated = memory[:, None], gated[:, None]
        else:
            dt, xs = nn.softplus(dt.astype(f32)), xs.astype(f32)
            if mask is not None:
                dt, xs = mx.where(mask[..., None], dt, 0), mx.where(mask[..., None], xs, 0)
            A = -mx.exp(self.A_log.astype(f32))
            y, cache[1] = ssm_scan(xs, dt, A, Bm.astype(f32), C.astype(f32), self.D.astype(f32), h)
            memory = y.astype(x.dtype)
            gated = memory * nn.silu(z)
        cache.advance(L)
        return self.out_proj(gated), memory


class GMU(nn.Module):
    """Gated Memory Unit: out_proj(silu(in_proj(x)) * memory)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d_inner = args.mamba_expand * args.hidden_size
        self.in_proj = nn.Linear(args.hidden_size, d_inner, bias=args.mamba_proj_bias)
        self.out_proj = nn.Linear(d_inner, args.hidden_size, bias=args.mamba_proj_bias)

    def __call__(self, x, memory):
        return self.out_proj(nn.silu(self.in_proj(x)) * memory)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def __call__(self, x):
        gate, up = mx.split(self.fc1(x), 2, axis=-1)
        return self.fc2(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        half = args.num_hidden_layers // 2
        self.kind = ("mamba" if i <= half else "gmu") if i % 2 == 0 else ("attn" if i <= half + 1 else "cross")
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args)
        if self.kind == "mamba":
            self.attn = Mamba(args)
        elif self.kind == "gmu":
            self.attn = GMU(args)
        else:
            self.attn = Attention(args, i, cross=self.kind == "cross")

    def __call__(self, x, mixer_out):
        h = x + mixer_out
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi4FlashModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, x, cache):
        half, W = self.args.num_hidden_layers // 2, self.args.sliding_window
        ssm_mask = create_ssm_mask(x, cache[0])
        window_mask = create_attention_mask(x, cache[1], window_size=W)
        full_mask = create_attention_mask(x, cache[half + 1])
        memory = shared = None
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            if layer.kind == "mamba":
                out, memory = layer.attn(h, ssm_mask, cache[i])
            elif layer.kind == "gmu":
                out = layer.attn(h, memory)
            elif layer.kind == "cross":
                out, _ = layer.attn(h, full_mask, shared=shared)
            elif i == half + 1:
                out, shared = layer.attn(h, full_mask, cache[i])
            else:
                out, _ = layer.attn(h, window_mask, cache[i])
            x = layer(x, out)
        return self.final_layernorm(x)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Phi4FlashModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.lm_head_bias)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, input_embeddings=None):
        """Logits of every position of the call. Prompt chunks whose logits are never evaluated
        run only the layers whose caches they write (MLX is lazy): up to layer L/2 + 1."""
        if cache is None:
            cache = self.make_cache()
        if input_embeddings is None:
            input_embeddings = self.model.embed_tokens(vocabulary_ids(inputs, self.args.vocab_size, cache[-1].keys is None))
        x = self.model(input_embeddings, cache)
        return self.lm_head(x) if "lm_head" in self else self.model.embed_tokens.as_linear(x)

    @property
    def layers(self):
        return self.model.layers

    @property
    def self_decoder(self):
        """The layers with a cache of their own but the shared K/V's (the chat and `generate`
        find the shared K/V right after them)."""
        return SimpleNamespace(layers=self.model.layers[: self.args.num_hidden_layers // 2 + 1])

    @property
    def cross_decoder(self):
        """What the chat reads of the shared K/V: its heads and dtype."""
        return SimpleNamespace(n_kv_heads=self.args.num_key_value_heads,
                               kv_layer_norm=self.model.layers[self.args.num_hidden_layers // 2 + 1].input_layernorm)

    def make_cache(self):
        refuse_max_kv_size(sys._getframe(1))
        caches = []
        for layer in self.model.layers[: self.args.num_hidden_layers // 2 + 2]:
            if layer.kind == "mamba":
                caches.append(ArraysCache(size=2))
            elif layer is self.model.layers[self.args.num_hidden_layers // 2 + 1]:
                caches.append(KVCache())
            else:
                caches.append(RotatingKVCache(max_size=self.args.sliding_window))
        return caches

    def reserve(self, cache, n_tokens: int, batch_size: int = 1):
        """Size the shared K/V for `n_tokens` more tokens at once (mlx-lm's KVCache would copy
        itself at every prompt chunk)."""
        c = cache[-1]
        size = -(-(c.offset + n_tokens) // c.step) * c.step
        if c.keys is not None and c.keys.shape[2] >= size:
            return
        self._resize(c, batch_size if c.keys is None else c.keys.shape[0], size)

    def release(self, cache):
        c = cache[-1]
        size = -(-c.offset // c.step) * c.step
        if c.keys is None or c.keys.shape[2] <= size:
            return
        if size == 0:
            c.keys = c.values = None
            return
        self._resize(c, c.keys.shape[0], size)

    def _resize(self, c, B, size):
        a = self.args
        hd = a.hidden_size // a.num_attention_heads
        dtype = self.model.final_layernorm.weight.dtype
        keys = mx.zeros((B, a.num_key_value_heads // 2, size, 2 * hd), dtype)
        values = mx.zeros((B, a.num_key_value_heads // 2, size, 2 * hd), dtype)
        if c.offset:
            keys[..., : c.offset, :] = c.keys[..., : c.offset, :]
            values[..., : c.offset, :] = c.values[..., : c.offset, :]
        c.keys, c.values = keys, values

    def stack_projections(self, materialize: bool = True):
        """The checkpoint's projections are already stacked (Wqkv, fc1, in_proj)."""
        if materialize:
            mx.eval(self.parameters())
        return self

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)  # a tied model reads the embedding
        return floating_weights(weights)

    @property
    def quant_predicate(self):
        # The selective scan's input-dependent step and B/C projections stay exact.
        return lambda path, module: not path.endswith(("x_proj", "dt_proj"))
