"""PyTorch YOCO / CLSA checkpoints -> an mlx-lm-style MLX folder (optionally quantized).

Inputs (a local folder, a checkpoint file inside one, or a Hugging Face hub id):
- official YOCO: `checkpoint.pth` (flat state dict) + `params.json`;
- fairseq training checkpoint: `{"model": {"decoder.model.<name>": ...}, ...}` + `params.json`;
- Hugging Face style: `model*.safetensors` or `pytorch_model*.bin`, single or sharded with an
  index JSON, plus `config.json` (FLA `YOCOConfig` or our own ModelArgs names); tensor names
  either official or FLA's (`model.self_layers.0.attn.q_proj.weight` ...);
- CLSA: any of the above plus `cross_decoder.indexer.{q,k}_proj.weight` and QK-norm weights.

`.pth` / `.bin` files are read by `torch_pickle` (no torch, no pickled code is run).
Output: `config.json` (ModelArgs + mlx-lm's `quantization` block), `model*.safetensors`
(+ `model.safetensors.index.json`), tokenizer files, `README.md`; written in a temporary
folder next to the destination and renamed into place at the end.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import torch_pickle
from .config import ModelArgs
from .loading import add_model_file, check_vocab, one_line, safetensors_header

MAX_SHARD_GB = 5.0  # mlx-lm's MAX_FILE_SIZE_GB
DTYPES = ("float16", "bfloat16", "float32")
# mlx quantization modes -> the (group size, bits) each non-affine mode fixes (affine: defaults 64, 4)
Q_MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")

# official runtime fields of params.json that do not describe the model (yoco-official-code.md §2.1)
OFFICIAL_RUNTIME_KEYS = ("max_batch_size", "model_parallel_size", "load_checkpoint")
REQUIRED_KEYS = ("dim", "n_layers", "hidden_dim", "n_self_heads", "n_attn_heads", "n_attn_kv_heads", "vocab_size")
MODEL_ARG_NAMES = tuple(f.name for f in fields(ModelArgs))

TOKENIZER_PATTERNS = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "*.tiktoken",
)
SOURCE_PATTERNS = [
    "*.json", "*.pth", "*.pt", "*.bin", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja",
]
# tensors some exporters persist that are not weights
IGNORED_SUFFIXES = (".rotary.inv_freq", ".rotary_emb.inv_freq")
FAIRSEQ_PREFIX = "decoder.model."


class ConvertError(Exception):
    """A conversion problem, with a one-line message naming the file or key."""


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# tensor sources: shape + dtype known up front, values on demand


class _SafetensorsTensor:
    """One tensor of a safetensors file; the file is loaded (once) by mx.load when needed."""

    _DTYPES = {
        "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
        "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }

    def __init__(self, file: "_SafetensorsFile", key: str, dtype: str, shape):
        self.file, self.key, self.shape = file, key, tuple(shape)
        self.dtype = self._DTYPES.get(dtype, dtype)

    def to_mlx(self):
        return self.file.arrays()[self.key]


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        self._arrays = None
        try:
            header = safetensors_header(path)
        except ValueError as e:
            raise ConvertError(str(e)) from None
        self.tensors = {k: _SafetensorsTensor(self, k, dtype, shape) for k, (dtype, shape) in header.items()}

    def arrays(self):
        if self._arrays is None:
            try:
                self._arrays = mx.load(str(self.path))
            except Exception as e:  # mlx reports these as RuntimeError/ValueError
                raise ConvertError(f"{self.path}: cannot read safetensors file ({e})") from None
        return self._arrays


def _read_safetensors(path: Path) -> dict:
    return dict(_SafetensorsFile(path).tensors)


def _read_torch(path: Path) -> dict:
    try:
        obj = torch_pickle.load(path)
    except torch_pickle.TorchFormatError as e:
        raise ConvertError(str(e)) from None
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):  # fairseq training checkpoints, lightning-style
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch_pickle.TensorData):
            raise ConvertError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = v
    return out


def _read_files(files, reader, index_file: Optional[Path] = None) -> dict:
    weights = {}
    for f in files:
        for k, v in reader(f).items():
            if k in weights:
                raise ConvertError(f"{f}: tensor {k} also appears in another shard")
            weights[k] = v
    if index_file is not None:
        with open(index_file) as fh:
            try:
                weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConvertError(f"{index_file}: not a valid weight index") from None
        for k, shard in weight_map.items():
            if k not in weights:
                raise ConvertError(f"{index_file}: tensor {k} is listed in {shard} but not found there")
    return weights


def _root(folder: Path) -> Path:
    """What a source folder's files must resolve into: the folder, or for a hub snapshot its
    repository cache (a snapshot's files are links into the cache's blobs/)."""
    folder = folder.resolve()
    hub = folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")
    return folder.parent.parent if hub else folder


def inside(folder: Path, path: Path, what: str) -> Path:
    """`path`, if it resolves inside `folder` (no `..`, absolute names or links out of it)."""
    if not path.resolve().is_relative_to(_root(folder)):
        raise ConvertError(f"{folder}: {what} {str(path)[:200]} resolves outside the folder; refusing to read it")
    return path


def _sharded(folder: Path, index_name: str, pattern: str):
    index = folder / index_name
    if index.is_file():
        try:
            with open(index) as fh:
                names = sorted(set(json.load(fh)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConvertError(f"{index}: not a valid weight index") from None
        files = [inside(folder, folder / str(n), f"{index_name} names shard") for n in names]
        for f in files:
            if not f.is_file():
                raise ConvertError(f"{index}: shard {f.name} is missing")
        return files, index
    return sorted(inside(folder, Path(p), "weight file") for p in glob.glob(str(folder / pattern))), None


# --------------------------------------------------------------------------------------
# names


def _fla_layer(rest: str) -> str:
    for a, b in (
        ("attn_norm.", "mixer_layer_norm."), ("mlp_norm.", "final_layer_norm."),
        ("attn.o_proj.", "mixer.out_proj."), ("attn.gk_proj.", "mixer.gt_proj."), ("attn.", "mixer."),
        ("mlp.gate_proj.", "ffn.fc1."), ("mlp.up_proj.", "ffn.gate."), ("mlp.down_proj.", "ffn.fc2."),
    ):
        if rest.startswith(a):
            return b + rest[len(a):]
    return rest


def fla_to_official(name: str) -> str:
    """FLA/HF-style YOCO name -> official name (yoco-official-code.md §2.4); unknown names are kept."""
    if name.startswith("model.embeddings."):
        return "embed_tokens." + name[len("model.embeddings."):]
    if name.startswith("lm_head."):
        return "output_projection." + name[len("lm_head."):]
    if name.startswith("model.norm."):
        return "layer_norm." + name[len("model.norm."):]
    m = re.match(r"model\.(self|cross)_layers\.(\d+)\.(.*)$", name)
    if m:
        return f"{m[1]}_decoder.layers.{m[2]}.{_fla_layer(m[3])}"
    if name.startswith("model.shared_kv_builder.kv_norm."):
        return "cross_decoder.kv_layer_norm." + name[len("model.shared_kv_builder.kv_norm."):]
    if name.startswith("model.shared_kv_builder."):
        return "cross_decoder." + name[len("model.shared_kv_builder."):]
    return name


_FLA_LAYER_INV = (
    ("mixer_layer_norm.", "attn_norm."), ("final_layer_norm.", "mlp_norm."), ("mixer.out_proj.", "attn.o_proj."),
    ("mixer.gt_proj.", "attn.gk_proj."), ("mixer.", "attn."), ("ffn.fc1.", "mlp.gate_proj."),
    ("ffn.gate.", "mlp.up_proj."), ("ffn.fc2.", "mlp.down_proj."),
)


def official_to_fla(name: str) -> str:
    """The inverse of fla_to_official (used to name a missing tensor the way the source names it)."""
    for a, b in (("embed_tokens.", "model.embeddings."), ("output_projection.", "lm_head."),
                 ("layer_norm.", "model.norm."), ("cross_decoder.kv_layer_norm.", "model.shared_kv_builder.kv_norm.")):
        if name.startswith(a):
            return b + name[len(a):]
    m = re.match(r"(self|cross)_decoder\.layers\.(\d+)\.(.*)$", name)
    if m:
        rest = m[3]
        for a, b in _FLA_LAYER_INV:
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        return f"model.{m[1]}_layers.{m[2]}.{rest}"
    if name.startswith("cross_decoder."):
        return "model.shared_kv_builder." + name[len("cross_decoder."):]
    return name


def _normalize_names(weights: dict, where: str):
    """-> (weights under official names, {official name: name in the file}).

    The origin map also names *expected* tensors the way the source would (FLA names for an FLA
    checkpoint, with the `decoder.model.` prefix for a fairseq one), for error messages."""
    weights = {k: v for k, v in weights.items() if not k.endswith(IGNORED_SUFFIXES) and k != "decoder.version"}
    if any(k.startswith(FAIRSEQ_PREFIX) for k in weights):
        origin = {k.removeprefix(FAIRSEQ_PREFIX): k for k in weights}
        weights = {k.removeprefix(FAIRSEQ_PREFIX): v for k, v in weights.items()}
    else:
        origin = {k: k for k in weights}
    if any(k.startswith(("model.", "lm_head.")) for k in weights):
        mapped, morigin = {}, {}
        for k, v in weights.items():
            new = fla_to_official(k)
            if new in mapped:
                raise ConvertError(f"{where}: tensors {morigin[new]} and {origin[k]} both map to {new}")
            mapped[new], morigin[new] = v, origin[k]
        weights, origin = mapped, morigin
        origin = _NamesInSource(origin, official_to_fla)
    elif any(o.startswith(FAIRSEQ_PREFIX) for o in origin.values()):
        origin = _NamesInSource(origin, lambda k: FAIRSEQ_PREFIX + k)
    return weights, origin


class _NamesInSource(dict):
    def __init__(self, known, guess):
        super().__init__(known)
        self.guess = guess

    def get(self, key, default=None):
        return self[key] if key in self else self.guess(key)


# --------------------------------------------------------------------------------------
# configs


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, RecursionError) as e:  # JSON or UTF-8 errors, nesting too deep
        raise ConvertError(f"{path}: not valid JSON ({one_line(e, 120)})") from None
    if not isinstance(d, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return d


def _make_args(kw: dict, where: str) -> ModelArgs:
    missing = [k for k in REQUIRED_KEYS if k not in kw]
    if missing:
        raise ConvertError(f"{where}: missing {', '.join(missing)}")
    try:
        return ModelArgs(**kw)
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{where}: {e}") from None


def params_to_args(params: dict, where: str, strict: bool = True) -> ModelArgs:
    """Official params.json (plus our CLSA keys), or a config.json written with our names."""
    kw = {}
    for k, v in params.items():
        if k in MODEL_ARG_NAMES:
            kw[k] = v
        elif strict and k not in OFFICIAL_RUNTIME_KEYS:
            raise ConvertError(f"{where}: unknown key {k!r}")
    return _make_args(kw, where)


def fla_config_to_args(cfg: dict, weights: dict, where: str) -> ModelArgs:
    """FLA `YOCOConfig` (config.json, model_type 'yoco') -> ModelArgs.

        hidden_size -> dim;  num_hidden_layers -> n_layers (must be 2 x num_self_decoder_layers);
        intermediate_size -> hidden_dim (or read off mlp.gate_proj when null);  vocab_size;
        norm_eps (FLA default 1e-6);  self_decoder_attn.type -> self_decoder (gated_retention | swa;
        gated_deltanet refused);  .num_heads -> n_self_heads;  .num_v_heads -> n_self_kv_heads (swa);
        .window_size -> sliding_window;  .gate_logit_normalizer;  .rope_theta -> rope_theta (must equal
        cross_decoder_attn.rope_theta);  cross_decoder_attn.num_heads / num_kv_heads -> n_attn_heads /
        n_attn_kv_heads;  .qk_norm -> cross_qk_norm.
        RoPE: gated_retention needs rope_inv_freq 'yoco' (interleaved, official frequencies) ->
        rope_style 'yoco'; FLA's swa layer uses Llama-style RoPE -> rope_style 'standard'. FLA always
        rotates the cross path (interleaved), which we express only when it matches the self-decoder's
        style ('yoco'), or drop with cross_rope: false.
        Refused: qkv_bias, attnres_block_size, hidden_act other than swish/silu.
        Our CLSA keys may sit at the top level and win: index_topk, index_head_dim, qk_norm,
        cross_qk_norm, cross_rope, rope_style, embed_scale, n_self_kv_heads, max_seq_len.
        tie_word_embeddings with no lm_head in the file: the head is a copy of the embedding.
    """
    sd = dict(cfg.get("self_decoder_attn") or {})
    cd = dict(cfg.get("cross_decoder_attn") or {})
    kind = sd.get("type", "gated_deltanet")
    if kind not in ("gated_retention", "swa"):
        raise ConvertError(f"{where}: self_decoder_attn.type {kind!r} is not supported (gated_retention or swa)")
    n_self, n_all = cfg.get("num_self_decoder_layers", 10), cfg.get("num_hidden_layers", 21)
    if n_all != 2 * n_self:
        raise ConvertError(
            f"{where}: num_hidden_layers {n_all} must be 2 x num_self_decoder_layers {n_self} (half self, half cross)"
        )
    if sd.get("qkv_bias") or cd.get("qkv_bias"):
        raise ConvertError(f"{where}: qkv_bias is not supported (the model has no biases)")
    if cfg.get("attnres_block_size") is not None:
        raise ConvertError(f"{where}: attnres_block_size is not supported")
    if cfg.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ConvertError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (swish)")
    theta_self, theta_cross = sd.get("rope_theta", 10000.0), cd.get("rope_theta", 10000.0)
    if theta_self != theta_cross:
        raise ConvertError(f"{where}: self and cross rope_theta differ ({theta_self} vs {theta_cross})")
    dim = cfg.get("hidden_size", 2048)
    hidden = cfg.get("intermediate_size")
    if hidden is None:
        w = weights.get("self_decoder.layers.0.ffn.fc1.weight")
        if w is None:
            raise ConvertError(f"{where}: no intermediate_size and no FFN weight to infer it from")
        hidden = w.shape[0]
    kw = dict(
        dim=dim, n_layers=n_all, hidden_dim=hidden, vocab_size=cfg.get("vocab_size", 32000),
        norm_eps=cfg.get("norm_eps", 1e-6), rope_theta=theta_self, self_decoder=kind,
        n_self_heads=sd.get("num_heads", 6), n_attn_heads=cd.get("num_heads", 32),
        gate_logit_normalizer=sd.get("gate_logit_normalizer", 16.0),
        cross_qk_norm=bool(cd.get("qk_norm", False)),
        model_type="clsa" if cfg.get("index_topk") else "yoco",
    )
    kw["n_attn_kv_heads"] = cd.get("num_kv_heads", kw["n_attn_heads"])
    if kind == "swa":
        kw["sliding_window"] = sd.get("window_size")
        kw["n_self_kv_heads"] = sd.get("num_v_heads", kw["n_self_heads"])
        kw["rope_style"] = "standard"  # FLA's SWA layer is fla.layers.attn.Attention: Llama-style RoPE
    else:
        if sd.get("rope_inv_freq", "fla") != "yoco":
            raise ConvertError(
                f"{where}: self_decoder_attn.rope_inv_freq {sd.get('rope_inv_freq', 'fla')!r} is not supported; "
                "official YOCO weights need 'yoco'"
            )
        kw["rope_style"] = "yoco"
    # our extension keys (CLSA) may sit at the top level of config.json and win
    for k in ("index_topk", "index_head_dim", "qk_norm", "cross_qk_norm", "cross_rope", "rope_style",
              "embed_scale", "n_self_kv_heads", "max_seq_len"):
        if k in cfg:
            kw[k] = cfg[k]
    kw.setdefault("cross_rope", True)
    if kw["cross_rope"]:
        cross_style = "yoco" if cd.get("rope_inv_freq", "fla") == "yoco" else None
        if cross_style is None or cross_style != kw["rope_style"]:
            raise ConvertError(
                f"{where}: the cross-decoder RoPE (interleaved, rope_inv_freq {cd.get('rope_inv_freq', 'fla')!r}) "
                f"does not match the self-decoder's ({kw['rope_style']}); set cross_rope false or use 'yoco' in both"
            )
    return _make_args(kw, where)


# --------------------------------------------------------------------------------------
# reading a source folder


def resolve_source(src: str, revision: Optional[str] = None, patterns=None) -> Path:
    """Local folder (or a file inside one) or a hub id; hub ids come through the local HF cache
    (or the network unless HF_HUB_OFFLINE=1)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise ConvertError(f"{src}: no such file or folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, revision=revision, allow_patterns=patterns or SOURCE_PATTERNS))
    except Exception as e:  # huggingface_hub has many error types; all mean "not available"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{src}: not a local path, and the hub id could not be resolved ({first})") from None


NOT_WEIGHTS = ("optimizer.pt", "scheduler.pt", "rng_state", "training_args")  # HF Trainer side files


def _find_checkpoint(src: Path):
    """-> (kind, files, index file or None). kind: 'pth', 'safetensors' or 'bin'."""
    if src.is_file():
        kind = {".pth": "pth", ".pt": "pth", ".safetensors": "safetensors", ".bin": "bin"}.get(src.suffix)
        if kind is None:
            raise ConvertError(f"{src}: not a checkpoint file (.pth, .pt, .bin or .safetensors)")
        return kind, [src], None
    if (src / "checkpoint.pth").is_file():  # the official release layout
        return "pth", [inside(src, src / "checkpoint.pth", "checkpoint")], None
    files, index = _sharded(src, "model.safetensors.index.json", "*.safetensors")
    if files:
        return "safetensors", files, index
    files, index = _sharded(src, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if files:
        return "bin", files, index
    pths = sorted(p for p in [*src.glob("*.pth"), *src.glob("*.pt")] if not p.name.startswith(NOT_WEIGHTS))
    if len(pths) > 1:
        raise ConvertError(f"{src}: several checkpoints ({', '.join(p.name for p in pths)}); pass the one to convert")
    if pths:
        return "pth", [inside(src, p, "checkpoint") for p in pths], None
    raise ConvertError(f"{src}: no checkpoint found (checkpoint.pth + params.json, *.safetensors or pytorch_model*.bin)")


def read_source(src: Path):
    """-> (ModelArgs, {official name: tensor}, {official name: name in file}, description, extra config)."""
    kind, files, index = _find_checkpoint(src)
    folder = src.parent if src.is_file() else src
    params, config = folder / "params.json", folder / "config.json"
    if kind == "pth":
        if not params.is_file() and not config.is_file():
            raise ConvertError(f"{params}: missing (an official YOCO checkpoint needs its params.json)")
    elif not config.is_file():
        raise ConvertError(f"{config}: missing (a Hugging Face-style checkpoint needs its config.json)")
    if len(files) > 1 or files[0].stat().st_size > 1 << 30:
        _log(f"[INFO] Reading {len(files)} weight file(s) from {folder}")
    reader = _read_safetensors if kind == "safetensors" else _read_torch
    weights = _read_files(files, reader, index)
    weights, origin = _normalize_names(weights, str(files[0] if len(files) == 1 else folder))
    if kind == "pth" and params.is_file():
        return params_to_args(_load_json(params), str(params)), weights, origin, f"checkpoint {files[0].name}", {}
    args, extra = _config_json_args(config, weights, origin)
    style = "FLA-style" if extra.pop("_fla") else "Hugging Face-style"
    return args, weights, origin, f"{style} {files[0].suffix[1:]} ({len(files)} file(s))", extra


def _config_json_args(config: Path, weights: dict, origin: dict):
    """config.json: FLA's YOCOConfig (hidden_size, ...) or our own names (dim, ...)."""
    cfg = _load_json(config)
    if "quantization" in cfg or "quantization_config" in cfg:
        raise ConvertError(f"{config}: the checkpoint is already quantized; convert the full-precision one")
    extra = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    if dtype in DTYPES:
        extra["_dtype"] = dtype  # mlx-lm's default when --dtype is not given
    extra["_fla"] = "hidden_size" in cfg and "dim" not in cfg
    if extra["_fla"]:
        args = fla_config_to_args(cfg, weights, str(config))
        if "output_projection.weight" not in weights and cfg.get("tie_word_embeddings") and "embed_tokens.weight" in weights:
            weights["output_projection.weight"] = weights["embed_tokens.weight"]  # our model is untied
            origin["output_projection.weight"] = origin["embed_tokens.weight"]
    else:
        args = params_to_args(cfg, str(config), strict=False)
    return args, extra


# --------------------------------------------------------------------------------------
# checking and building the model


def check_weights(model, weights: dict, origin: dict, where: str):
    expected = dict(tree_flatten(model.parameters()))
    for k in expected:
        if k not in weights:
            name = origin.get(k, k)
            raise ConvertError(f"{where}: missing tensor {name}" + (f" ({k})" if name != k else ""))
    for k in weights:
        if k not in expected:
            raise ConvertError(f"{where}: unexpected tensor {origin.get(k, k)}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConvertError(
                f"{where}: tensor {origin.get(k, k)} has shape {list(v.shape)}, expected {list(expected[k].shape)}"
            )
        if v.dtype not in FLOAT_DTYPES:
            raise ConvertError(f"{where}: tensor {origin.get(k, k)} has unsupported dtype {v.dtype}")


def _source_dtype(weights: dict) -> str:
    counts = {}
    for v in weights.values():
        counts[v.dtype] = counts.get(v.dtype, 0) + 1
    dtype = max(sorted(counts), key=counts.get)
    return "float32" if dtype == "float64" else dtype


def build_model(args: ModelArgs, weights: dict, origin: dict, where: str, dtype: str, progress: bool = True,
                allow_non_finite: bool = False):
    from .model import Model

    model = Model(args)  # lazily initialized: the random init is never evaluated
    check_weights(model, weights, origin, where)
    target = getattr(mx, dtype)
    n = len(weights)
    tty = sys.stderr.isatty()
    show = progress and (tty or n > 64)
    every = 1 if tty else max(1, n // 10)
    loaded = []
    for i, k in enumerate(sorted(weights)):
        try:
            a = weights[k].to_mlx()
        except torch_pickle.TorchFormatError as e:
            raise ConvertError(str(e)) from None
        a = a.astype(target)
        mx.eval(a)
        if not allow_non_finite and not mx.isfinite(a).all().item():
            raise ConvertError(f"{where}: tensor {origin.get(k, k)} holds NaN or Inf values "
                               "(a broken checkpoint; --allow-non-finite converts it anyway)")
        loaded.append((k, a))
        if show and (i + 1 == n or (i + 1) % every == 0):
            msg = f"[INFO] Converted {i + 1}/{n} tensors"
            print("\r" + msg if tty else msg, end="\n" if (i + 1 == n or not tty) else "", file=sys.stderr, flush=True)
    model.load_weights(loaded, strict=True)
    model.eval()
    return model


def quant_predicate(quantize_indexer: bool = False) -> Callable:
    """mlx-lm's default (every Linear and the Embedding whose input dim splits into groups),
    except the CLSA indexer projections unless asked."""

    def predicate(path, module):
        return quantize_indexer or "indexer" not in path

    return predicate


# --------------------------------------------------------------------------------------
# writing


def save_weights(folder: Path, model, max_shard_bytes: int):
    """mlx-lm's save_model layout (model.safetensors or model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json), with a byte threshold so that small tests can shard."""
    from mlx_lm.utils import get_total_parameters

    weights = dict(tree_flatten(model.parameters()))
    shards, size = [], 0
    for k, v in weights.items():
        if not shards or size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        name = fmt.format(i + 1, len(shards))
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values()),
                     "total_parameters": get_total_parameters(model)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return len(shards)


def copy_tokenizer(src: Path, dst: Path) -> list:
    """Copy the tokenizer files of a folder (or one tokenizer file) into dst."""
    if src.is_file():
        if src.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            src = src.parent
        else:
            shutil.copyfile(src, dst / src.name)
            return [src.name]
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.is_file() and p.name not in copied:
                shutil.copyfile(inside(src, p, "tokenizer file"), dst / p.name)
                copied.append(p.name)
    return copied


def convert(
    torch_path: str,
    mlx_path: str = "mlx_model",
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    tokenizer: Optional[str] = None,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    quantize_indexer: bool = False,
    max_shard_gb: float = MAX_SHARD_GB,
    progress: bool = True,
    allow_non_finite: bool = False,
) -> Path:
    dst = Path(mlx_path).expanduser()
    _remove_stale_partials(dst)
    if dst.exists() or dst.is_symlink():
        raise ConvertError(f"{dst}: already exists; remove it or choose another --mlx-path")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    if not quantize and (q_bits is not None or q_group_size is not None or q_mode != "affine"):
        raise ConvertError("--q-bits / --q-group-size / --q-mode need -q/--quantize")
    if q_mode not in Q_MODES:
        raise ConvertError(f"--q-mode {q_mode}: not one of {', '.join(Q_MODES)}")
    if q_mode != "affine":
        gs, bits = Q_MODES[q_mode]
        if q_group_size not in (None, gs) or q_bits not in (None, bits):
            raise ConvertError(f"--q-mode {q_mode} means {bits} bits in groups of {gs}")

    src = resolve_source(str(torch_path), revision)
    args, weights, origin, kind, extra = read_source(src)
    where = str(src)
    _log(f"[INFO] {kind}: {args.self_decoder} self-decoder, {args.n_layers} layers, dim {args.dim}, "
         f"{'CLSA top-' + str(args.index_topk) if args.sparse else 'dense YOCO'}")
    config_dtype = extra.pop("_dtype", None)
    dtype = dtype or config_dtype or _source_dtype(weights)
    _log(f"[INFO] Using dtype: {dtype}")
    model = build_model(args, weights, origin, where, dtype, progress, allow_non_finite)
    del weights

    config = {**asdict(args), **extra}
    if quantize:
        from mlx_lm.utils import quantize_model

        _log("[INFO] Quantizing")
        model, config = quantize_model(model, config, q_group_size, q_bits, mode=q_mode,
                                       quant_predicate=quant_predicate(quantize_indexer))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        from mlx_lm.utils import save_config

        n_shards = save_weights(tmp, model, int(max_shard_gb * (1 << 30)))
        save_config(config, tmp / "config.json")
        add_model_file(tmp)
        tok_src = src
        if tokenizer is not None:
            tok_src = resolve_source(tokenizer, None, patterns=[*TOKENIZER_PATTERNS])
        copied = copy_tokenizer(tok_src, tmp)
        if not copied:
            _log("[WARN] No tokenizer files found; pass --tokenizer to include them (clsa_mlx.load needs one)")
        else:
            _check_tokenizer(tmp, tok_src, args.vocab_size)
        _write_card(tmp, str(torch_path) if not Path(torch_path).expanduser().exists() else None)
        if dst.exists() or dst.is_symlink():
            raise ConvertError(f"{dst}: appeared while converting; not overwriting it")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"[INFO] Wrote {dst} ({n_shards} safetensors file(s){', tokenizer: ' + ', '.join(copied) if copied else ''})")
    if upload_repo:
        from mlx_lm.utils import upload_to_hub

        upload_to_hub(str(dst), upload_repo)
    return dst


def _remove_stale_partials(dst: Path):
    """Partial folders that conversions killed before they could clean up (kill -9) left."""
    for p in dst.parent.glob(f".{dst.name}.partial-*") if dst.parent.is_dir() else ():
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
            _log(f"[INFO] Removed {p}, left by an interrupted conversion")
        except PermissionError:  # alive, someone else's
            pass


def _check_tokenizer(folder: Path, src: Path, vocab_size: int):
    from mlx_lm.utils import load_tokenizer

    try:
        check_vocab(load_tokenizer(folder), vocab_size, src)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    except Exception as e:  # transformers' many error types: the files do not make a tokenizer
        raise ConvertError(f"{src}: the tokenizer files do not load ({one_line(e)})") from None


def _write_card(folder: Path, hub_id: Optional[str]):
    """A minimal model card (mlx-lm's upload_to_hub reads README.md); no dates, so outputs repeat."""
    lines = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags:", "- mlx", "- clsa-mlx"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines += ["---", "", "Converted with clsa-mlx `convert.py`. Load with `clsa_mlx.load(path)`.", ""]
    (folder / "README.md").write_text("\n".join(lines))
