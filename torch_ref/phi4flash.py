"""Phi-4-mini-flash-reasoning (SambaY) in plain PyTorch, fp32, no cache: every call runs the whole
sequence. Written from the model's public remote code (`modeling_phi4flash.py`) and vLLM's
`phi4flash.py`, with these choices where they differ:
- the memory the GMUs read is layer L/2's scan output before its gate (CUDA-kernel path, vLLM);
- a sliding window of W holds W keys including the current one, at every prompt length;
- the output head is the embedding when `tie_word_embeddings`, else `lm_head`.
Parameter names are the checkpoint's."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def lambda_init(depth):
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


class RMSNorm(nn.Module):
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class DiffAttention(nn.Module):
    def __init__(self, head_dim, depth):
        super().__init__()
        self.head_dim, self.lambda_init = head_dim, lambda_init(depth)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.zeros(head_dim).normal_(0, 0.1)))
        self.subln = RMSNorm(2 * head_dim)

    def forward(self, q, k, v, allowed):
        """q [B, H, L, hd], k/v [B, Hkv, S, hd] in the checkpoint's head order; allowed [L, S]."""
        rep = q.shape[1] // k.shape[1]
        q1, q2 = q[:, 0::2], q[:, 1::2]
        k1, k2 = k[:, 0::2].repeat_interleave(rep, 1), k[:, 1::2].repeat_interleave(rep, 1)
        v1, v2 = v[:, 0::2].repeat_interleave(rep, 1), v[:, 1::2].repeat_interleave(rep, 1)

        def softmax(q, k):
            s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)

        w1, w2 = softmax(q1, k1), softmax(q2, k2)
        a1 = torch.cat([w1 @ v1, w1 @ v2], dim=-1)
        a2 = torch.cat([w2 @ v1, w2 @ v2], dim=-1)
        lam = (torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1))
               - torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2)) + self.lambda_init)
        o = self.subln(a1 - lam * a2) * (1 - self.lambda_init)
        B, P, L, _ = o.shape
        return o.transpose(1, 2).reshape(B, L, P * 2 * self.head_dim)


class Attention(nn.Module):
    def __init__(self, cfg, depth, cross):
        super().__init__()
        self.H, self.Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd, self.cross = cfg["hidden_size"] // self.H, cross
        out = self.H * self.hd if cross else (self.H + 2 * self.Hkv) * self.hd
        self.Wqkv = nn.Linear(cfg["hidden_size"], out, bias=True)
        self.out_proj = nn.Linear(self.H * self.hd, cfg["hidden_size"], bias=True)
        self.inner_cross_attn = DiffAttention(self.hd, depth)

    def forward(self, x, allowed, kv=None):
        B, L, _ = x.shape
        qkv = self.Wqkv(x)
        if self.cross:
            q, (k, v) = qkv, kv
        else:
            q, k, v = qkv.split([self.H * self.hd, self.Hkv * self.hd, self.Hkv * self.hd], dim=-1)
            k = k.view(B, L, self.Hkv, self.hd).transpose(1, 2)
            v = v.view(B, L, self.Hkv, self.hd).transpose(1, 2)
        q = q.view(B, L, self.H, self.hd).transpose(1, 2)
        return self.out_proj(self.inner_cross_attn(q, k, v, allowed)), (k, v)


class Mamba(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg["hidden_size"]
        self.d_inner, self.N = cfg["mamba_expand"] * D, cfg["mamba_d_state"]
        self.r, self.K = cfg["mamba_dt_rank"], cfg["mamba_d_conv"]
        self.in_proj = nn.Linear(D, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.K, groups=self.d_inner, padding=self.K - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.r + 2 * self.N, bias=False)
        self.dt_proj = nn.Linear(self.r, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.N + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, D, bias=False)

    def forward(self, x):
        L = x.shape[1]
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(self.conv1d(xs.transpose(1, 2))[..., :L]).transpose(1, 2)
        dt, Bm, C = self.x_proj(xs).split([self.r, self.N, self.N], dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log)
        h = x.new_zeros(x.shape[0], self.d_inner, self.N)
        ys = []
        for t in range(L):
            h = h * torch.exp(dt[:, t, :, None] * A) + (dt[:, t] * xs[:, t])[..., None] * Bm[:, t, None, :]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]) + self.D * xs[:, t])
        y = torch.stack(ys, dim=1)
        return self.out_proj(y * F.silu(z)), y


class GMU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d_inner = cfg["mamba_expand"] * cfg["hidden_size"]
        self.in_proj = nn.Linear(cfg["hidden_size"], d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, cfg["hidden_size"], bias=False)

    def forward(self, x, memory):
        return self.out_proj(memory * F.silu(self.in_proj(x)))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg["hidden_size"], 2 * cfg["intermediate_size"], bias=False)
        self.fc2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=False)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(up * F.silu(gate))


class Layer(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        half = cfg["num_hidden_layers"] // 2
        self.kind = ("mamba" if i <= half else "gmu") if i % 2 == 0 else ("attn" if i <= half + 1 else "cross")
        self.window = cfg["sliding_window"] if i < half and i % 2 else None
        D = cfg["hidden_size"]
        self.input_layernorm = nn.LayerNorm(D, eps=cfg["layer_norm_eps"])
        self.post_attention_layernorm = nn.LayerNorm(D, eps=cfg["layer_norm_eps"])
        self.mlp = MLP(cfg)
        self.attn = {"mamba": lambda: Mamba(cfg), "gmu": lambda: GMU(cfg)}.get(
            self.kind, lambda: Attention(cfg, i, self.kind == "cross"))()


class Phi4Flash(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg = dict(cfg)
        cfg.setdefault("mamba_d_state", 16)
        cfg.setdefault("mamba_d_conv", 4)
        cfg.setdefault("mamba_expand", 2)
        if cfg.get("mamba_dt_rank", "auto") == "auto":
            cfg["mamba_dt_rank"] = math.ceil(cfg["hidden_size"] / 16)
        cfg.setdefault("layer_norm_eps", 1e-5)
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.model.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg["num_hidden_layers"])])
        self.model.final_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])
        if not cfg.get("tie_word_embeddings", True):
            self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, ids):
        L = ids.shape[1]
        pos = torch.arange(L)
        causal = pos[:, None] >= pos[None]
        x = self.model.embed_tokens(ids)
        memory = shared = None
        for layer in self.model.layers:
            h = layer.input_layernorm(x)
            if layer.kind == "mamba":
                out, memory = layer.attn(h)
            elif layer.kind == "gmu":
                out = layer.attn(h, memory)
            else:
                allowed = causal if layer.window is None else causal & (pos[:, None] - pos[None] < layer.window)
                out, kv = layer.attn(h, allowed, shared)
                if layer.kind == "attn" and layer.window is None:
                    shared = kv
            x = x + out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.model.final_layernorm(x)
        return self.lm_head(x) if hasattr(self, "lm_head") else x @ self.model.embed_tokens.weight.T


def randomize(model, seed=0):
    """Random weights that keep every path of the model busy (unit-scale activations, varied
    lambdas, decays and time steps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 15 + 0.5))
            elif name.endswith("dt_proj.bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 4 - 5)
            elif "lambda_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("norm.weight") or name.endswith("subln.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                fan_in = p.shape[1] * (p.shape[2] if p.ndim == 3 else 1)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model
