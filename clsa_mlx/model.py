import copy
import sys
from typing import Any, List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import create_attention_mask, create_ssm_mask
from mlx_lm.models.cache import ArraysCache, BatchKVCache, KVCache

from .cache import RotatingKVCache, refuse_max_kv_size
from .config import ModelArgs
from .retention import gated_retention
from .sparse import route, select_kv, sparse_attention
from .window import window_attention


class RoPE(nn.Module):
    """'yoco': angles 1/theta**linspace(0, 1, d/2) on interleaved pairs (official YOCO).
    'standard': angles theta**(-2i/d) on the two halves (Llama)."""

    def __init__(self, dims: int, theta: float, style: str):
        super().__init__()
        self.dims = dims
        self.traditional = style == "yoco"
        self.base = None if self.traditional else theta
        self._freqs = theta ** mx.linspace(0, 1, dims // 2) if self.traditional else None

    def __call__(self, x, offset: int = 0):
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=self.base,
            scale=1.0, offset=offset, freqs=self._freqs,
        )


def stack_linears(module: nn.Module, names, fused_name: str):
    """Replace projections of one input by one layer with their output rows stacked (and,
    quantized, their scales and biases): a decode step then launches one matmul, not several.
    Left alone unless all are the same kind of layer with the same quantization, parameters
    and dtype, every parameter one row per output."""
    if fused_name in module or not all(n in module for n in names):
        return
    parts = [module[n] for n in names]
    if not all(isinstance(p.get("weight"), mx.array) for p in parts):  # e.g. mlx-lm's LoRA layers
        return

    def kind(p):
        arrays = {k: v for k, v in p.items() if isinstance(v, mx.array)}
        rows = {v.shape[0] for v in arrays.values()}
        return (type(p), getattr(p, "bits", None), getattr(p, "group_size", None), getattr(p, "mode", None),
                p.weight.dtype, tuple(sorted(arrays)), len(rows) == 1)

    kinds = {kind(p) for p in parts}
    if len(kinds) != 1 or not next(iter(kinds))[-1]:
        return
    fused = copy.copy(parts[0])
    for key, value in parts[0].items():
        if isinstance(value, mx.array):
            fused[key] = mx.concatenate([p[key] for p in parts])
    for n in names:
        del module[n]
    module[fused_name] = fused


def shard_linears(module: nn.Module, group, into=(), out=(), segments=None):
    """mlx-lm's tensor parallel: each `into` projection keeps this rank's share of its output
    rows (its heads), each `out` projection the same share of its input columns and sums the
    group's partial outputs. `segments` names stacked projections (`stack_projections`): each part splits alone."""
    N = group.size()
    for name in out:
        p = module[name]
        cols = p.weight.shape[1] * 32 // p.bits if hasattr(p, "bits") else p.weight.shape[1]
        if hasattr(p, "group_size") and cols // N % p.group_size:
            raise ValueError(f"cannot shard over {N} ranks: {name} has {cols} input columns, {cols // N} per rank "
                             f"is not a multiple of the quantization group size {p.group_size}")
    for name in into:
        if name in module:
            module[name] = shard_linear(module[name], "all-to-sharded", segments=(segments or {}).get(name, 1), group=group)
    for name in out:
        module[name] = shard_linear(module[name], "sharded-to-all", group=group)


class FeedForwardNetwork(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.gate = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.fc2 = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def __call__(self, x):
        if "fc1_gate" in self:
            return self.fc2(swiglu(*mx.split(self.fc1_gate(x), 2, axis=-1)))
        return self.fc2(swiglu(self.fc1(x), self.gate(x)))

    def stack_projections(self):
        stack_linears(self, ("fc1", "gate"), "fc1_gate")

    def shard(self, group):
        shard_linears(self, group, ("fc1", "gate", "fc1_gate"), ("fc2",), {"fc1_gate": 2})


def split_heads(x, n_heads):
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1)


def merge_heads(x):
    B, _, L, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, -1)


class SlidingWindowAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = hd = args.self_head_dim
        self.n_heads, self.n_kv_heads = args.n_self_heads, args.n_self_kv_heads
        self.window = args.sliding_window
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(args.dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.dim, bias=False)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.rope = RoPE(hd, args.rope_theta, args.rope_style)

    def __call__(self, x, mask, cache, offset: int):
        if "qkv_proj" in self:
            q_end, k_end = self.n_heads * self.head_dim, (self.n_heads + self.n_kv_heads) * self.head_dim
            q, k, v = mx.split(self.qkv_proj(x), (q_end, k_end), axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = split_heads(q, self.n_heads)
        k = split_heads(k, self.n_kv_heads)
        v = split_heads(v, self.n_kv_heads).transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q.transpose(0, 2, 1, 3), offset)
        k = self.rope(k.transpose(0, 2, 1, 3), offset)
        k, v = cache.update_and_fetch(k, v)
        o = window_attention(q, k, v, self.scale, self.window, mask)
        return self.out_proj(merge_heads(o))

    def stack_projections(self):
        stack_linears(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj")

    def shard(self, group):
        q, k = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shard_linears(self, group, ("q_proj", "k_proj", "v_proj", "qkv_proj"), ("out_proj",), {"qkv_proj": [q, q + k]})
        self.n_heads //= group.size()
        self.n_kv_heads //= group.size()


class GateRetention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, self.n_heads = args.dim, args.n_self_heads
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.g_proj = nn.Linear(D, D, bias=False)
        self.gt_proj = nn.Linear(D, self.n_heads, bias=False)
        self.out_proj = nn.Linear(D, D, bias=False)
        self.scale = args.self_head_dim**-0.5
        self.gate_logit_normalizer = args.gate_logit_normalizer
        self.eps = args.norm_eps
        self.rope = RoPE(args.self_head_dim, args.rope_theta, args.rope_style)

    def __call__(self, x, mask, cache, offset: int):
        B, L, _ = x.shape
        f32 = mx.float32
        q = self.rope(split_heads(self.q_proj(x), self.n_heads).transpose(0, 2, 1, 3), offset)
        k = self.rope(split_heads(self.k_proj(x), self.n_heads).transpose(0, 2, 1, 3), offset)
        v = split_heads(self.v_proj(x), self.n_heads).transpose(0, 2, 1, 3)
        a = nn.log_sigmoid(self.gt_proj(x).astype(f32)).transpose(0, 2, 1) / self.gate_logit_normalizer
        k = k.astype(f32) * self.scale
        if mask is not None:  # a padded slot of a batch neither decays nor writes the state
            a = mx.where(mask[:, None], a, 0)
            k = mx.where(mask[:, None, :, None], k, 0)
        state = cache[0]
        if state is None:
            state = mx.zeros((B, self.n_heads, q.shape[-1], v.shape[-1]), dtype=f32)
        o, cache[0] = gated_retention(q.astype(f32), k, v.astype(f32), a, state)
        cache.advance(L)
        o = merge_heads(mx.fast.rms_norm(o, None, self.eps)).astype(x.dtype)
        return self.out_proj(nn.silu(self.g_proj(x)) * o)

    def shard(self, group):
        shard_linears(self, group, ("q_proj", "k_proj", "v_proj", "g_proj", "gt_proj"), ("out_proj",))
        self.n_heads //= group.size()


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, mixer: nn.Module):
        super().__init__()
        self.mixer_layer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mixer = mixer
        self.final_layer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn = FeedForwardNetwork(args)

    def __call__(self, x, *mixer_args):
        h = x + self.mixer(self.mixer_layer_norm(x), *mixer_args)
        return h + self.ffn(self.final_layer_norm(h))


class SelfDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.window = args.sliding_window if args.self_decoder == "swa" else None
        mixer = SlidingWindowAttention if self.window else GateRetention
        self.layers = [DecoderLayer(args, mixer(args)) for _ in range(args.n_layers // 2)]

    def __call__(self, x, caches, offset):
        if self.window:
            mask = create_attention_mask(x, caches[0], window_size=self.window)
        else:
            mask = create_ssm_mask(x, caches[0])
        for layer, cache in zip(self.layers, caches):
            x = layer(x, mask, cache, offset)
        return x


class Memory(NamedTuple):
    """The one global K/V every cross layer reads, and how to read it."""

    keys: mx.array
    values: mx.array
    mask: Any = None
    index: Optional[mx.array] = None
    offset: Any = 0


class CrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, hd = args.n_attn_heads, args.head_dim
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(args.dim, self.n_heads * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, args.dim, bias=False)
        self.qk_norm = args.cross_qk_norm
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.rope = RoPE(hd, args.rope_theta, args.rope_style) if args.cross_rope else None

    def __call__(self, x, memory: Memory):
        q = split_heads(self.q_proj(x), self.n_heads)
        if self.qk_norm:
            q = self.q_norm(q)
        q = q.transpose(0, 2, 1, 3)
        if self.rope is not None:
            q = self.rope(q, memory.offset)
        if memory.index is not None:
            o = sparse_attention(q, memory.keys, memory.values, memory.index, self.scale)
        else:
            o = mx.fast.scaled_dot_product_attention(
                q, memory.keys, memory.values, scale=self.scale, mask=memory.mask
            )
        return self.out_proj(merge_heads(o))

    def shard(self, group):
        shard_linears(self, group, ("q_proj",), ("out_proj",))
        self.n_heads //= group.size()


class Indexer(nn.Module):
    """CLSA's single-head router. It reads H (after kv_layer_norm), has no RoPE, and its
    plain dot-product scores pick one top-k set per token for every cross layer."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.q_proj = nn.Linear(args.dim, args.index_head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.index_head_dim, bias=False)


class CrossDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_kv_heads, hd = args.n_attn_kv_heads, args.head_dim
        self.topk = args.index_topk
        self.kv_layer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * hd, bias=False)
        self.qk_norm = args.cross_qk_norm
        if self.qk_norm:
            self.k_norm = nn.RMSNorm(hd, eps=args.norm_eps)
        self.rope = RoPE(hd, args.rope_theta, args.rope_style) if args.cross_rope else None
        if self.topk:
            self.indexer = Indexer(args)
        self.layers = [DecoderLayer(args, CrossAttention(args)) for _ in range(args.n_layers // 2)]

    def memory(self, x, kv_cache, index_cache, offset) -> Memory:
        """Write this chunk's shared K/V (and index keys) once; decide what cross layers read.
        `offset` is the position for RoPE (per row in a batch); routing works in buffer rows,
        from each row's first valid one (a batch cache's left padding) to the chunk's end."""
        H = self.kv_layer_norm(x)
        k = split_heads(self.k_proj(H), self.n_kv_heads)
        if self.qk_norm:
            k = self.k_norm(k)
        k = k.transpose(0, 2, 1, 3)
        if self.rope is not None:
            k = self.rope(k, offset)
        v = split_heads(self.v_proj(H), self.n_kv_heads).transpose(0, 2, 1, 3)
        mask = create_attention_mask(x, kv_cache)
        keys, values = kv_cache.update_and_fetch(k, v)
        if not self.topk:
            return Memory(keys, values, mask, offset=offset)

        B, L, _ = x.shape
        k_idx = self.indexer.k_proj(H)[:, None]
        k_idx, _ = index_cache.update_and_fetch(k_idx, mx.zeros((B, 1, L, 0), k_idx.dtype))
        if keys.shape[2] <= self.topk:
            return Memory(keys, values, mask, offset=offset)
        q_idx, k_idx = self.indexer.q_proj(H), k_idx[:, 0]
        start = kv_cache.left_padding if isinstance(kv_cache, BatchKVCache) else None
        if L == 1:
            keys, values, idx = select_kv(q_idx, k_idx, keys, values, self.topk, start)
            mask = None if start is None else (idx >= 0)[:, None, None, :]
            return Memory(keys, values, mask, offset=offset)
        index = route(q_idx, k_idx, self.topk, keys.shape[2] - L, start)
        return Memory(keys, values, index=index, offset=offset)

    def __call__(self, x, kv_cache, index_cache, offset):
        return self.attend(x, self.memory(x, kv_cache, index_cache, offset))

    def attend(self, x, memory: Memory):
        for layer in self.layers:
            x = layer(x, memory)
        return x

    def shard(self, group):
        """Each rank writes and reads only its KV heads of the one global K/V. The indexer stays
        whole: every rank routes from the same H, so all pick the same tokens without a message."""
        shard_linears(self, group, ("k_proj", "v_proj"))
        self.n_kv_heads //= group.size()


def _resize(c, B, heads, size, kd, vd, dtype):
    """A global cache's buffers as `size` rows, its first `c.offset` copied (new buffers, so
    the old ones are freed)."""
    keys, values = mx.zeros((B, heads, size, kd), dtype), mx.zeros((B, heads, size, vd), dtype)
    if c.offset:
        keys[..., : c.offset, :] = c.keys[..., : c.offset, :]
        values[..., : c.offset, :] = c.values[..., : c.offset, :]
    c.keys, c.values = keys, values


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.self_decoder = SelfDecoder(args)
        self.cross_decoder = CrossDecoder(args)
        self.layer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output_projection = nn.Linear(args.dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Optional[List[Any]] = None, input_embeddings=None):
        if cache is None:
            cache = self.make_cache()
        n = len(self.self_decoder.layers)
        kv_cache = cache[n]
        if input_embeddings is None:
            input_embeddings = self.embed_tokens(vocabulary_ids(inputs, self.args.vocab_size, kv_cache.keys is None)) * self.args.embed_scale
        index_cache = cache[n + 1] if self.args.sparse else None
        offset = kv_cache.offset
        x = self.self_decoder(input_embeddings, cache[:n], offset)
        x = self.cross_decoder(x, kv_cache, index_cache, offset)
        return self.output_projection(self.layer_norm(x))

    @property
    def layers(self):
        return self.self_decoder.layers + self.cross_decoder.layers

    def stack_projections(self, materialize: bool = True):
        """For inference after loading: stack the projections that read one input (q/k/v of
        the window attention, fc1/gate of every FFN). Layer by layer, so loading holds at
        most one layer twice. Saved checkpoints keep the separate names."""
        for layer in self.layers:
            layer.ffn.stack_projections()
            if isinstance(layer.mixer, SlidingWindowAttention):
                layer.mixer.stack_projections()
            if materialize:
                mx.eval(layer.parameters())
        return self

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Tensor parallel over `group` (mlx-lm's `shard`): every layer's heads and FFN columns
        split over the ranks, one all-reduce after each mixer and each FFN; the embedding, the
        norms, the indexer and the output head stay whole. Stacked projections (`stack_projections`) split too."""
        group = group or mx.distributed.init()
        N = group.size()
        if N == 1:
            return self
        a = self.args
        counts = dict(n_self_heads=a.n_self_heads, n_self_kv_heads=a.n_self_kv_heads, n_attn_heads=a.n_attn_heads,
                      n_attn_kv_heads=a.n_attn_kv_heads, hidden_dim=a.hidden_dim)
        bad = [f"{name} {n}" for name, n in counts.items() if n % N]
        if bad:
            raise ValueError(f"cannot shard over {N} ranks: {', '.join(bad)} not divisible by {N}")
        for layer in self.layers:
            layer.mixer.shard(group)
            layer.ffn.shard(group)
        self.cross_decoder.shard(group)
        return self

    def make_cache(self):
        """Per self layer a window (trimmable past it: `clsa_mlx.cache`) or retention state; one
        global K/V; one index-key cache. A max_kv_size given to mlx-lm is refused."""
        refuse_max_kv_size(sys._getframe(1))
        window = self.self_decoder.window
        caches = [
            RotatingKVCache(max_size=window) if window else ArraysCache(size=1)
            for _ in self.self_decoder.layers
        ]
        caches.append(KVCache())
        if self.args.sparse:
            caches.append(KVCache())
        return caches

    def cache_shapes(self):
        """Per cache of `make_cache()`: (heads, key dim, value dim) of its rows on this rank,
        or for a retention state (heads, d, d)."""
        a = self.args
        self_heads = self.self_decoder.layers[0].mixer
        self_heads = self_heads.n_kv_heads if self.self_decoder.window else self_heads.n_heads
        shapes = [(self_heads, a.self_head_dim, a.self_head_dim)] * len(self.self_decoder.layers)
        shapes.append((self.cross_decoder.n_kv_heads, a.head_dim, a.head_dim))
        return shapes + [(1, a.index_head_dim, 0)] if a.sparse else shapes

    def reserve(self, cache, n_tokens: int, batch_size: int = 1):
        """Size the global K/V and index caches for `n_tokens` more tokens at once. mlx-lm's
        KVCache grows by each chunk, which copies the whole cache per prefill chunk and holds
        two copies at the peak; a long prompt should allocate once. Rows come in mlx-lm's steps
        of 256: MLX CUDA's decode attention ran 5x slower over 131136 rows than over 131328."""
        n = len(self.self_decoder.layers)
        dtype = self.cross_decoder.kv_layer_norm.weight.dtype
        for c, (heads, kd, vd) in zip(cache[n:], self.cache_shapes()[n:]):
            size = -(-(c.offset + n_tokens) // c.step) * c.step
            if c.keys is not None and c.keys.shape[2] >= size:
                continue
            _resize(c, batch_size if c.keys is None else c.keys.shape[0], heads, size, kd, vd, dtype)

    def release(self, cache):
        """Give back the global K/V and index rows past the offset (to mlx-lm's step of 256) that
        `reserve` took for tokens that never came, e.g. of an interrupted prefill."""
        for c in cache[len(self.self_decoder.layers):]:
            size = -(-c.offset // c.step) * c.step
            if c.keys is None or c.keys.shape[2] <= size:
                continue
            if size == 0:
                c.keys = c.values = None
                continue
            B, heads, _, kd = c.keys.shape
            _resize(c, B, heads, size, kd, c.values.shape[3], c.keys.dtype)

    def sanitize(self, weights: dict) -> dict:
        return floating_weights(weights)

    @property
    def quant_predicate(self):
        # The router is tiny and decides what every cross layer sees: keep it exact.
        return lambda path, module: "indexer" not in path


def floating_weights(weights: dict) -> dict:
    """mlx-lm calls `sanitize` on a folder's arrays before loading them: every tensor is floating
    point, but a quantized layer's packed weight and (mxfp) scales."""
    for k, v in weights.items():
        base = k.rsplit(".", 1)[0]
        packed = f"{base}.scales" in weights and k.endswith((".weight", ".scales"))
        if not (mx.issubdtype(v.dtype, mx.floating) or packed and v.dtype in (mx.uint32, mx.uint8)):
            raise ValueError(f"tensor {k} has dtype {v.dtype}, not a floating-point type")
    return weights


def vocabulary_ids(inputs, V: int, first_call: bool):
    """An id outside the vocabulary reads outside the embedding (a segfault on the CPU).
    Prompt chunks and first calls (host lists in mlx-lm) are checked, one sync each; decode
    steps feed sampled ids and are clamped only, as is everything under mx.compile."""
    if inputs.shape[-1] > 1 or first_call:
        bad = (inputs < 0) | (inputs >= V)
        try:
            found = bad.any().item()
        except ValueError:  # traced (mlx-lm's compiled training step): no eval allowed
            found = False
        if found:
            first = inputs.reshape(-1)[mx.argmax(bad.reshape(-1))].item()
            raise ValueError(f"token id {first} is outside the vocabulary (0..{V - 1})")
    return mx.clip(inputs, 0, V - 1)
