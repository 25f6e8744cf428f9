import math
import re
from dataclasses import dataclass
from typing import Optional

from mlx_lm.models.base import BaseModelArgs

# Any one size past this is no model's, and past 2**31 MLX overflows while building a layer.
MAX_SIZE = 1 << 24


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
            if not integer(v) or not 0 < v <= MAX_SIZE:
                problems.append(f"{name} must be an integer from 1 to {MAX_SIZE}, got {repr(v)[:40]}")
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


def check_weights(args: ModelArgs, shapes: dict) -> None:
    """The sizes in a config checked against the weights' shapes ({name: (dtype, shape)} from the
    files' headers) before the model is built: a config of 20,000 layers beside 4 layers' weights
    would otherwise build every layer before a missing one is noticed."""
    problems = []
    for part in ("self_decoder", "cross_decoder"):
        found = {int(m.group(1)) for k in shapes if (m := re.match(rf"{part}\.layers\.(\d+)\.", k))}
        if len(found) != args.n_layers // 2 or (found and max(found) + 1 != len(found)):
            problems.append(f"n_layers {args.n_layers} means {args.n_layers // 2} {part} layers, the weights hold "
                            f"{len(found)}")
    for key, name, axis in (("dim", "layer_norm.weight", 0), ("vocab_size", "output_projection.weight", 0),
                            ("vocab_size", "embed_tokens.weight", 0),
                            ("index_head_dim", "cross_decoder.indexer.q_proj.weight", 0),
                            ("index_head_dim", "cross_decoder.indexer.k_proj.weight", 0),
                            ("hidden_dim", "self_decoder.layers.0.ffn.fc1.weight", 0)):
        shape = shapes.get(name, (None, None))[1]
        if shape is not None and (len(shape) <= axis or shape[axis] != getattr(args, key)):
            problems.append(f"{key} {getattr(args, key)}, but {name} has shape {tuple(shape)}")
    if problems:
        raise ValueError("config.json does not fit the weights: " + "; ".join(problems))


LORA_TYPES = ("lora", "dora", "full")
FLOAT_DTYPES = ("F16", "BF16", "F32")


def check_adapter(config, shapes: dict, args: ModelArgs) -> None:
    """An mlx-lm adapter_config.json (`config`) and its adapters.safetensors ({name: (dtype,
    shape)}) checked before mlx-lm builds LoRA layers of that rank: a rank past the layers' size
    or weights that are not floats never reach the model."""
    if not isinstance(config, dict):
        raise ValueError(f"adapter_config.json: not a JSON object (a {type(config).__name__})")
    kind = config.get("fine_tune_type", "lora")
    if kind not in LORA_TYPES:
        raise ValueError(f"adapter_config.json: fine_tune_type {repr(kind)[:40]} is not one of {LORA_TYPES}")
    if kind != "full":
        n = config.get("num_layers")
        if not isinstance(n, int) or isinstance(n, bool) or not -1 <= n <= args.n_layers:
            raise ValueError(f"adapter_config.json: num_layers must be an integer from -1 to {args.n_layers}, "
                             f"got {repr(n)[:40]}")
        lora = config.get("lora_parameters")
        if not isinstance(lora, dict):
            raise ValueError("adapter_config.json: lora_parameters must be an object")
        rank, scale, dropout = lora.get("rank"), lora.get("scale"), lora.get("dropout", 0.0)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max(args.dim, args.hidden_dim):
            raise ValueError(f"adapter_config.json: lora_parameters.rank must be an integer from 1 to the layers' "
                             f"size {max(args.dim, args.hidden_dim)}, got {repr(rank)[:40]}")
        for key, v, low, high in (("scale", scale, -1e6, 1e6), ("dropout", dropout, 0.0, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ValueError(f"adapter_config.json: lora_parameters.{key} must be a number from {low} to "
                                 f"{high}, got {repr(v)[:40]}")
        keys = lora.get("keys") or []
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ValueError("adapter_config.json: lora_parameters.keys must be a list of names")
    for name, (dtype, _) in shapes.items():
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"adapters.safetensors: {name[:80]} is {dtype}; adapter weights are floats "
                             f"({', '.join(FLOAT_DTYPES)})")
