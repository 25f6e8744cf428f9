"""PyTorch reference of YOCO (arXiv 2405.05254) and CLSA (arXiv 2606.06467).

One file, full-sequence forward only (no caches): the test oracle for the MLX port, the
writer of official-format checkpoints for the converter, and the training model.
Parameter names are the official YOCO ones (microsoft/unilm, yoco/).
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    # Same names and defaults as clsa_mlx/config.py.
    model_type: str = "clsa"
    dim: int = 256
    n_layers: int = 4
    hidden_dim: int = 768
    n_self_heads: int = 4
    n_attn_heads: int = 4
    n_attn_kv_heads: int = 2
    vocab_size: int = 256
    max_seq_len: int = -1
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    sliding_window: Optional[int] = None
    self_decoder: Optional[str] = None
    n_self_kv_heads: Optional[int] = None
    gate_logit_normalizer: float = 16.0
    rope_style: str = "yoco"
    cross_rope: bool = True
    qk_norm: bool = False
    cross_qk_norm: bool = False
    embed_scale: Optional[float] = None
    index_topk: int = 0
    index_head_dim: int = 128

    def __post_init__(self):
        if self.self_decoder is None:
            self.self_decoder = "gated_retention" if self.sliding_window is None else "swa"
        if self.n_self_kv_heads is None:
            self.n_self_kv_heads = self.n_self_heads
        if self.embed_scale is None:
            self.embed_scale = self.dim**0.5
        assert self.self_decoder in ("swa", "gated_retention"), self.self_decoder
        assert self.self_decoder != "swa" or (self.sliding_window or 0) > 0, "swa needs sliding_window"
        assert self.self_decoder != "gated_retention" or self.n_self_kv_heads == self.n_self_heads
        assert self.rope_style in ("yoco", "standard"), self.rope_style
        assert self.n_layers >= 2 and self.n_layers % 2 == 0, "n_layers: even, half self half cross"
        for h, kv in ((self.n_self_heads, self.n_self_kv_heads), (self.n_attn_heads, self.n_attn_kv_heads)):
            assert self.dim % h == 0 and h % kv == 0, (self.dim, h, kv)
        assert self.index_topk >= 0

    @classmethod
    def from_dict(cls, d):
        # Drops keys we don't model (official runtime fields such as max_batch_size).
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def head_dim(self):
        return self.dim // self.n_attn_heads

    @property
    def self_head_dim(self):
        return self.dim // self.n_self_heads


def tiny_args(**overrides) -> ModelArgs:
    """A small config for random-weight tests."""
    base = dict(dim=64, n_layers=4, hidden_dim=160, n_self_heads=4, n_attn_heads=4,
                n_attn_kv_heads=2, vocab_size=97, index_head_dim=16)
    return ModelArgs(**{**base, **overrides})


# ---------------------------------------------------------------------------------------
# building blocks


def up(x):
    """At least fp32 (fp64 stays fp64, so a float64 model is a tight oracle)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (up(x) * torch.rsqrt(up(x).pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False)  # SiLU branch (HF gate_proj)
        self.gate = nn.Linear(dim, hidden_dim, bias=False)  # linear branch (HF up_proj)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)) * self.gate(x))


def rope_freqs(head_dim, theta, style):
    """Angular frequency per rotated pair, fp32."""
    if style == "yoco":  # RetNet/torchscale: exponent 0..1 inclusive
        return 1.0 / (theta ** torch.linspace(0, 1, head_dim // 2))
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def apply_rope(x, pos, theta, style):
    """x [..., T, hd], pos [T] absolute positions. 'yoco' rotates interleaved pairs (2i, 2i+1);
    'standard' rotates (i, i + hd/2). Angles in fp32 as in the official code; rotation in at
    least fp32, returned in x's dtype."""
    hd = x.shape[-1]
    ang = pos.float()[:, None] * rope_freqs(hd, theta, style).to(x.device)
    cos, sin = ang.cos(), ang.sin()
    xf = up(x)
    if style == "yoco":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, -1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    return out.type_as(x)


def repeat_kv(k, n_heads):
    # GQA, consecutive groups: query head h reads kv head h // (Hq / Hkv).
    return k.repeat_interleave(n_heads // k.shape[1], dim=1)


def attend(q, k, v, mask):
    """q [B, Hq, T, hd], k/v [B, Hkv, S, hd], mask bool (True = attend) broadcastable to
    [B, Hq, T, S]. Scale 1/sqrt(hd)."""
    return F.scaled_dot_product_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), attn_mask=mask)


def causal_mask(T, S=None, device=None, window=None):
    """[T, S] bool; query t sits at absolute position t + S - T and sees s <= that (and
    s > that - window, if a window is given)."""
    S = T if S is None else S
    t = torch.arange(S - T, S, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    m = s <= t
    return m if window is None else m & (s > t - window)


# ---------------------------------------------------------------------------------------
# self-decoder mixers


def retention_parallel(q, k, v, a):
    """Gated retention over a full sequence, masked decay-matrix form.
    q, k, v [B, H, T, d] (k already scaled by d^-0.5), a [B, H, T] log-decay.
    o_t = sum_{s<=t} (q_t . k_s) exp(sum_{r=s+1..t} a_r) v_s. Use fp32 or fp64."""
    G = a.cumsum(-1)
    T = a.shape[-1]
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal_mask(T, device=a.device), -math.inf).exp()
    return ((q @ k.transpose(-1, -2)) * decay) @ v


def retention_step(q, k, v, a, state):
    """One token: q, k, v [B, H, d], a [B, H], state [B, H, d, d] -> (o [B, H, d], state)."""
    state = a.exp()[..., None, None] * state + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ state)[..., 0, :], state


def retention_recurrent(q, k, v, a):
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    out = []
    for t in range(q.shape[2]):
        o, state = retention_step(q[:, :, t], k[:, :, t], v[:, :, t], a[:, :, t], state)
        out.append(o)
    return torch.stack(out, 2)


class GatedRetention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, self.n_heads = args.dim, args.n_self_heads
        self.args = args
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.g_proj = nn.Linear(D, D, bias=False)
        self.gt_proj = nn.Linear(D, self.n_heads, bias=False)
        self.out_proj = nn.Linear(D, D, bias=False)

    def forward(self, x, pos, recurrent=False):
        B, T, D = x.shape
        H, d, a_ = self.n_heads, D // self.n_heads, self.args
        q = self.q_proj(x).view(B, T, H, d).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, d).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, d).transpose(1, 2)
        q, k = apply_rope(q, pos, a_.rope_theta, a_.rope_style), apply_rope(k, pos, a_.rope_theta, a_.rope_style)
        a = F.logsigmoid(up(self.gt_proj(x))).transpose(1, 2) / a_.gate_logit_normalizer
        # The recurrence runs in at least fp32 whatever the model dtype (the state is a long sum).
        f = retention_recurrent if recurrent else retention_parallel
        o = f(up(q), up(k) * d**-0.5, up(v), a)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + a_.norm_eps)  # subln: no weight
        o = o.transpose(1, 2).reshape(B, T, D).to(x.dtype)
        return self.out_proj(F.silu(self.g_proj(x)) * o)


class SlidingWindowAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D, hd = args.dim, args.self_head_dim
        self.args = args
        self.q_proj = nn.Linear(D, args.n_self_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, args.n_self_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, args.n_self_kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(args.n_self_heads * hd, D, bias=False)
        if args.qk_norm:
            self.q_norm = RMSNorm(hd, args.norm_eps)
            self.k_norm = RMSNorm(hd, args.norm_eps)

    def forward(self, x, pos):
        B, T, _ = x.shape
        a_, hd = self.args, self.args.self_head_dim
        q = self.q_proj(x).view(B, T, a_.n_self_heads, hd)
        k = self.k_proj(x).view(B, T, a_.n_self_kv_heads, hd)
        v = self.v_proj(x).view(B, T, a_.n_self_kv_heads, hd).transpose(1, 2)
        if a_.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), pos, a_.rope_theta, a_.rope_style)
        k = apply_rope(k.transpose(1, 2), pos, a_.rope_theta, a_.rope_style)
        o = attend(q, k, v, causal_mask(T, device=x.device, window=a_.sliding_window))
        return self.out_proj(o.transpose(1, 2).reshape(B, T, -1))


# ---------------------------------------------------------------------------------------
# cross-decoder


def topk_mask(scores, k):
    """Boolean [..., T, S] selection of the top-k scores per query row among the causally
    visible positions (query t sits at t + S - T). Ties go to the lower position; rows with
    fewer than k visible positions select all of them."""
    T, S = scores.shape[-2:]
    visible = causal_mask(T, S, device=scores.device)
    scores = up(scores).masked_fill(~visible, -math.inf)
    # A stable descending sort keeps equal scores in position order.
    idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, idx, True) & visible


def indexer_kd_loss(index_scores, abar):
    """CLSA multi-layer distillation: mean over rows t (and batch) of KL(abar_t || softmax(I_t)).
    index_scores [B, T, T] with -inf where s > t; abar [B, T, T], treated as a constant."""
    abar = up(abar.detach())
    logp = F.log_softmax(up(index_scores), -1)
    logp = logp.masked_fill(abar == 0, 0.0)  # 0 * -inf would be nan; those terms are 0
    return (torch.xlogy(abar, abar) - abar * logp).sum(-1).mean()


class Indexer(nn.Module):
    """CLSA single-head indexer on H (after kv_layer_norm): no RoPE, no scaling, no activation."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.q_proj = nn.Linear(args.dim, args.index_head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.index_head_dim, bias=False)

    def forward(self, h):
        return up(self.q_proj(h)) @ up(self.k_proj(h)).transpose(-1, -2)


class CrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.q_proj = nn.Linear(args.dim, args.n_attn_heads * args.head_dim, bias=False)
        self.out_proj = nn.Linear(args.n_attn_heads * args.head_dim, args.dim, bias=False)
        if args.cross_qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x, pos, k, v, mask, teacher=None):
        B, T, _ = x.shape
        a_ = self.args
        q = self.q_proj(x).view(B, T, a_.n_attn_heads, a_.head_dim)
        if a_.cross_qk_norm:
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        if a_.cross_rope:
            q = apply_rope(q, pos, a_.rope_theta, a_.rope_style)
        if teacher is not None:  # dense probabilities of this layer, mean over heads
            with torch.no_grad():
                s = up(q) @ up(repeat_kv(k, q.shape[1])).transpose(-1, -2) * a_.head_dim**-0.5
                s = s.masked_fill(~causal_mask(T, device=x.device), -math.inf)
                teacher += s.softmax(-1).mean(1)
        o = attend(q, k, v, mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, mixer: nn.Module):
        super().__init__()
        self.mixer_layer_norm = RMSNorm(args.dim, args.norm_eps)
        self.mixer = mixer
        self.final_layer_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, *mixer_args):
        x = x + self.mixer(self.mixer_layer_norm(x), *mixer_args)
        return x + self.ffn(self.final_layer_norm(x))


class SelfDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mixer = GatedRetention if args.self_decoder == "gated_retention" else SlidingWindowAttention
        self.layers = nn.ModuleList(DecoderLayer(args, mixer(args)) for _ in range(args.n_layers // 2))

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        for layer in self.layers:
            x = layer(x, pos)
        return x


class CrossDecoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        kv_dim = args.n_attn_kv_heads * args.head_dim
        self.kv_layer_norm = RMSNorm(args.dim, args.norm_eps)
        self.k_proj = nn.Linear(args.dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, kv_dim, bias=False)
        if args.cross_qk_norm:
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        if args.index_topk > 0:
            self.indexer = Indexer(args)
        self.layers = nn.ModuleList(DecoderLayer(args, CrossAttention(args)) for _ in range(args.n_layers // 2))

    def forward(self, x, sparse=False, return_aux=False):
        B, T, _ = x.shape
        a_ = self.args
        pos = torch.arange(T, device=x.device)
        h = self.kv_layer_norm(x)
        k = self.k_proj(h).view(B, T, a_.n_attn_kv_heads, a_.head_dim)
        if a_.cross_qk_norm:
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        if a_.cross_rope:
            k = apply_rope(k, pos, a_.rope_theta, a_.rope_style)
        v = self.v_proj(h).view(B, T, a_.n_attn_kv_heads, a_.head_dim).transpose(1, 2)

        causal = causal_mask(T, device=x.device)
        scores = None
        if a_.index_topk > 0 and (sparse or return_aux):
            scores = self.indexer(h).masked_fill(~causal, -math.inf)
        # One selection for the whole stack; dense YOCO is the causal mask itself.
        mask = topk_mask(scores, a_.index_topk)[:, None] if sparse else causal
        teacher = up(x.new_zeros(B, T, T)) if return_aux else None
        for layer in self.layers:
            x = layer(x, pos, k, v, mask, teacher)
        if not return_aux:
            return x, None
        aux = dict(index_scores=scores, abar=teacher / len(self.layers), mask=mask[:, 0] if sparse else None)
        return x, aux


class Model(nn.Module):
    def __init__(self, args):
        super().__init__()
        if isinstance(args, dict):
            args = ModelArgs.from_dict(args)
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.self_decoder = SelfDecoder(args)
        self.cross_decoder = CrossDecoder(args)
        self.layer_norm = RMSNorm(args.dim, args.norm_eps)
        self.output_projection = nn.Linear(args.dim, args.vocab_size, bias=False)  # untied
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # Official model_parallel_init (roughly): small xavier on self-mixer projections,
        # xavier 2^-1 on the retention output, torch's default (kaiming a=sqrt 5) elsewhere.
        nn.init.normal_(self.embed_tokens.weight, std=self.args.dim**-0.5)
        for layer in self.self_decoder.layers:
            m = layer.mixer
            for name in ("q_proj", "k_proj", "v_proj", "g_proj", "gt_proj"):
                if hasattr(m, name):
                    nn.init.xavier_uniform_(getattr(m, name).weight, gain=2**-2.5)
            if isinstance(m, GatedRetention):
                nn.init.xavier_uniform_(m.out_proj.weight, gain=2**-1)

    def embed(self, tokens):
        return self.embed_tokens(tokens) * self.args.embed_scale

    def forward(self, tokens, sparse=None, return_aux=False):
        """tokens [B, T] -> logits [B, T, V]; with return_aux also a dict:
        index_scores [B, T, T] fp32 or wider (-inf where s > t; None without an indexer),
        abar [B, T, T] fp32 or wider: dense cross-attention probabilities averaged over cross layers and
        query heads (no grad; in sparse mode from the sparse pass's own queries),
        mask [B, T, T] bool: the shared top-k selection (None in dense mode)."""
        sparse = self.args.index_topk > 0 if sparse is None else sparse
        assert not sparse or self.args.index_topk > 0, "sparse mode needs index_topk > 0"
        x = self.self_decoder(self.embed(tokens))
        x, aux = self.cross_decoder(x, sparse, return_aux)
        logits = self.output_projection(self.layer_norm(x))
        return (logits, aux) if return_aux else logits


# ---------------------------------------------------------------------------------------
# official checkpoint format: folder/checkpoint.pth (flat state dict) + folder/params.json

OFFICIAL_PARAMS = ("dim", "n_layers", "hidden_dim", "n_self_heads", "n_attn_heads", "n_attn_kv_heads",
                   "vocab_size", "max_batch_size", "max_seq_len", "model_parallel_size", "load_checkpoint",
                   "rope_theta", "norm_eps", "sliding_window")
EXTRA_PARAMS = ("self_decoder", "n_self_kv_heads", "rope_style", "cross_rope", "qk_norm", "cross_qk_norm",
                "embed_scale", "index_topk", "index_head_dim", "gate_logit_normalizer", "model_type")


def save_official(model: Model, args: ModelArgs, folder):
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, os.path.join(folder, "checkpoint.pth"))
    a = asdict(args)
    params = {**dict(max_batch_size=0, model_parallel_size=1, load_checkpoint=False), **a}
    # The official loader (YOCOArgs(**params)) would reject the extra keys; our converter reads them.
    params = {k: params[k] for k in OFFICIAL_PARAMS + EXTRA_PARAMS}
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f, indent=2)


def load_official(folder, device="cpu"):
    """-> (model, args). Weights keep the checkpoint's dtype. Accepts a fairseq training
    checkpoint too ({'model': ...} with 'decoder.model.' prefixes)."""
    with open(os.path.join(folder, "params.json")) as f:
        args = ModelArgs.from_dict(json.load(f))
    sd = torch.load(os.path.join(folder, "checkpoint.pth"), map_location=device, weights_only=True, mmap=True)
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    sd = {k.removeprefix("decoder.model."): v for k, v in sd.items()}
    with torch.device("meta"):
        model = Model(args)
    model.load_state_dict(sd, strict=True, assign=True)
    return model, args
