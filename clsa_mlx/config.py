import math
from dataclasses import dataclass
from typing import Optional

from mlx_lm.models.base import BaseModelArgs


@dataclass
class ModelArgs(BaseModelArgs):
    """Official YOCO `params.json` names, plus the self-decoder kind and the CLSA settings."""

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
        self._check_values()
        if self.embed_scale is None:
            self.embed_scale = self.dim**0.5
        self._check()

    def _check(self):
        problems = []
        if self.self_decoder not in ("swa", "gated_retention"):
            problems.append(f"self_decoder must be 'swa' or 'gated_retention', got {self.self_decoder!r}")
        if self.self_decoder == "swa" and not (self.sliding_window and self.sliding_window > 0):
            problems.append("self_decoder 'swa' needs a positive sliding_window")
        if self.self_decoder == "gated_retention" and self.n_self_kv_heads != self.n_self_heads:
            problems.append("gated_retention has no GQA: n_self_kv_heads must equal n_self_heads")
        if self.rope_style not in ("yoco", "standard"):
            problems.append(f"rope_style must be 'yoco' or 'standard', got {self.rope_style!r}")
        if self.n_layers < 2 or self.n_layers % 2:
            problems.append(f"n_layers must be even and >= 2 (half self, half cross), got {self.n_layers}")
        for heads, kv in ((self.n_self_heads, self.n_self_kv_heads), (self.n_attn_heads, self.n_attn_kv_heads)):
            if self.dim % heads or heads % kv:
                problems.append(f"dim {self.dim} must split into {heads} heads, and {heads} heads into {kv} groups")
        if self.index_topk < 0:
            problems.append(f"index_topk must be >= 0 (0 = dense YOCO), got {self.index_topk}")
        if problems:
            raise ValueError("bad model config: " + "; ".join(problems))

    def _check_values(self):
        """Types and ranges first, so that a bad value is named, not met as a ZeroDivisionError."""
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return integer(v) or (isinstance(v, float) and math.isfinite(v))

        problems = []
        if self.model_type not in ("clsa", "yoco"):
            problems.append(f"model_type must be 'clsa' or 'yoco', got {repr(self.model_type)[:40]}")
        for name in ("dim", "n_layers", "hidden_dim", "n_self_heads", "n_attn_heads", "n_attn_kv_heads", "vocab_size",
                     "n_self_kv_heads", "index_head_dim"):
            v = getattr(self, name)
            if not integer(v) or v <= 0:
                problems.append(f"{name} must be a positive integer, got {repr(v)[:40]}")
        for name in ("max_seq_len", "index_topk"):
            if not integer(getattr(self, name)):
                problems.append(f"{name} must be an integer, got {repr(getattr(self, name))[:40]}")
        if self.sliding_window is not None and (not integer(self.sliding_window) or self.sliding_window <= 0):
            problems.append(f"sliding_window must be a positive integer or null, got {repr(self.sliding_window)[:40]}")
        for name in ("rope_theta", "norm_eps", "gate_logit_normalizer", "embed_scale"):
            v = getattr(self, name)
            if (v is not None or name != "embed_scale") and (not number(v) or v <= 0):
                problems.append(f"{name} must be a positive finite number, got {repr(v)[:40]}")
        for name in ("cross_rope", "qk_norm", "cross_qk_norm"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {repr(getattr(self, name))[:40]}")
        if problems:
            raise ValueError("bad model config: " + "; ".join(problems))

    @property
    def head_dim(self):
        return self.dim // self.n_attn_heads

    @property
    def self_head_dim(self):
        return self.dim // self.n_self_heads

    @property
    def sparse(self):
        return self.index_topk > 0
