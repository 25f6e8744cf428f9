"""Reading a YOCO / CLSA source: a local folder, a checkpoint file inside one, or a hub id;
safetensors and torch pickles (`torch_pickle`: no torch, no pickled code run), single or
sharded; every file must resolve inside the source folder. -> ModelArgs and lazy tensors
under official names (`layouts`)."""

import glob
import json
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx

from . import torch_pickle
from .layouts import ConvertError, fla_config_to_args, normalize_names, params_to_args
from .loading import one_line, safetensors_header

DTYPES = ("float16", "bfloat16", "float32")
SOURCE_PATTERNS = [
    "*.json", "*.pth", "*.pt", "*.bin", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja",
]


def log(msg: str):
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
    except torch_pickle.UnsafePickleError as e:  # raised where the pickle names it: the file is added here
        raise ConvertError(f"{path}: refused ({e}); only tensors and plain containers are read") from None
    except torch_pickle.TorchFormatError as e:
        raise ConvertError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
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


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (ValueError, RecursionError) as e:  # JSON or UTF-8 errors, nesting too deep
        raise ConvertError(f"{path}: not valid JSON ({one_line(e, 120)})") from None
    if not isinstance(d, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return d



# --------------------------------------------------------------------------------------
# a source folder


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
        log(f"[INFO] Reading {len(files)} weight file(s) from {folder}")
    reader = _read_safetensors if kind == "safetensors" else _read_torch
    weights = _read_files(files, reader, index)
    if not weights:
        raise ConvertError(f"{files[0] if len(files) == 1 else folder}: the checkpoint holds no tensors")
    if config.is_file() and _load_json(config).get("model_type") == "phi4flash":
        return _phi4flash_source(config, weights, f"Hugging Face phi4flash ({len(files)} file(s))")
    weights, origin = normalize_names(weights, str(files[0] if len(files) == 1 else folder))
    if kind == "pth" and params.is_file():
        return params_to_args(_load_json(params), str(params)), weights, origin, f"checkpoint {files[0].name}", {}
    args, extra = _config_json_args(config, weights, origin)
    style = "FLA-style" if extra.pop("_fla") else "Hugging Face-style"
    return args, weights, origin, f"{style} {files[0].suffix[1:]} ({len(files)} file(s))", extra


def _phi4flash_source(config: Path, weights: dict, kind: str):
    """Phi-4-mini-flash as published: the checkpoint's own names; a tied head is the embedding."""
    from .models.phi4flash import ModelArgs as Phi4FlashArgs

    cfg = _load_json(config)
    try:
        args = Phi4FlashArgs.from_dict(cfg)
    except (ValueError, TypeError) as e:
        raise ConvertError(f"{config}: {one_line(e)}") from None
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    extra = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    if cfg.get("torch_dtype", cfg.get("dtype")) in DTYPES:
        extra["_dtype"] = cfg.get("torch_dtype", cfg.get("dtype"))
    return args, weights, {k: k for k in weights}, kind, extra


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
