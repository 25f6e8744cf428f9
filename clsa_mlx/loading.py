"""Find and load model folders (config.json + model*.safetensors + tokenizer), local or on the hub."""

import json
import logging
import os
import shutil
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlx.core as mx
from huggingface_hub import snapshot_download
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, dequantize_model, load_tokenizer, save_config
from mlx_lm.utils import load_model as _mlx_lm_load_model

from .config import ModelArgs, check_adapter, check_weights
from .model import Model

MODEL_TYPES = ("clsa", "yoco")
FAMILY_TYPES = (*MODEL_TYPES, "phi4flash")  # with the other architectures (clsa_mlx.models)
SHIPPED = Path(__file__).parent / "shipped"
MODEL_FILE = "clsa_mlx_model.py"  # mlx-lm's `model_file` in the folders we write


class _OwnModelTypes(logging.Filter):
    """transformers warns, whenever mlx-lm reads our config for a tokenizer, that `clsa` / `yoco`
    is none of its model types; that is expected, so the warning is dropped (only that one)."""

    def filter(self, record):
        return not record.getMessage().startswith(tuple(f"You are using a model of type `{t}`" for t in FAMILY_TYPES))


logging.getLogger("transformers.configuration_utils").addFilter(_OwnModelTypes())


def shipped_model() -> Path:
    """The small CLSA model that ships inside the package (the chat default)."""
    if not (SHIPPED / "config.json").is_file():
        raise FileNotFoundError(f"{SHIPPED}: no model is shipped in this install; pass --model")
    return SHIPPED


def add_model_file(folder) -> Path:
    """Write mlx-lm's `model_file` (our `model_file.py`) into a model folder and name it in
    config.json, so every mlx-lm command runs the folder with `--trust-remote-code`."""
    folder = Path(folder)
    config = read_config(folder / "config.json")
    # each written beside its place and renamed over it: never through a link, never half-written
    for name, write in ((MODEL_FILE, lambda p: shutil.copyfile(Path(__file__).with_name("model_file.py"), p)),
                        ("config.json", lambda p: save_config({**config, "model_file": MODEL_FILE}, p))):
        tmp = folder / f".{name}.partial"
        tmp.unlink(missing_ok=True)
        write(tmp)
        os.replace(tmp, folder / name)
    return folder


def read_config(path: Path) -> dict:
    """A config.json as a dict; a missing, unreadable or malformed file is named in one line."""
    try:
        config = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({one_line(e, 120)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object (a {type(config).__name__})")
    return config


BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text, keep: str = "") -> str:
    """`text` safe for a terminal: control characters (escape sequences), line separators and bidi
    overrides escaped, but those in `keep`."""
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if (unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI) and c not in keep else c
                   for c in str(text))


class OneLineError(Exception):
    """A problem for the user, in one line, its control characters escaped; a message grown long by a
    name from a file is cut in the middle, keeping where and why."""

    def __init__(self, message: str):
        message = printable(" ".join(str(message).split()))
        if len(message) > 600:
            message = f"{message[:400]} ...({len(message) - 600} characters cut)... {message[-200:]}"
        super().__init__(message)


def one_line(e: BaseException, n: int = 300) -> str:
    text = printable(" ".join(str(e).split())) or type(e).__name__
    return text if len(text) <= n else text[:n] + "..."


def safetensors_header(path: Path) -> dict:
    """{name: (dtype, shape)} of a safetensors file, its header checked by the safetensors
    package (offsets in range, no overlap, the data fully covered, sizes that fit)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({one_line(e, 160)})") from None


def check_vocab(tokenizer, vocab_size: int, where) -> None:
    """Every id the tokenizer can produce must have a row in the embedding: the largest id of any
    piece, added or special token (a count of pieces misses a sparse or shifted vocabulary)."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    ids = list(tok.get_vocab().values()) + list(getattr(tok, "all_special_ids", []))
    top = max([len(tok) - 1] + [i for i in ids if isinstance(i, int)])
    if top >= vocab_size:
        raise ValueError(f"{where}: the tokenizer hands out ids up to {top} but the model's vocab_size is {vocab_size} "
                         f"(ids {vocab_size} and up have no embedding); wrong tokenizer for this model?")


def get_model_classes(config: dict):
    model_type = config.get("model_type")
    if model_type == "phi4flash":
        from .models import phi4flash

        return phi4flash.Model, phi4flash.ModelArgs
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json: model_type {model_type!r} is not one of {FAMILY_TYPES}")
    return Model, ModelArgs


def _our_classes(model_config: Optional[dict]) -> dict:
    # Build from this package, never by running the folder's `model_file` (that is for mlx-lm).
    return {**(model_config or {}), "model_file": None}


def resolve(path_or_hf_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder, or a hub id `owner/name` fetched (or found in the local cache)."""
    path = Path(path_or_hf_repo).expanduser()
    if not path.exists():
        looks_like_repo = str(path_or_hf_repo).count("/") == 1 and not str(path_or_hf_repo).startswith((".", "/", "~"))
        if not looks_like_repo:
            raise FileNotFoundError(f"{path_or_hf_repo}: no such model folder")
        path = Path(snapshot_download(path_or_hf_repo, revision=revision, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a converted model folder)")
    return path


def _load_model(path: Path, lazy: bool, strict: bool, model_config, fuse: bool, group, adapter_path=None):
    """mlx-lm's loader with our classes; sharded like `mlx_lm.utils.sharded_load` when `group`
    has more than one rank: lazily, so each rank reads only its share into memory. LoRA
    adapters (mlx-lm's `load_adapters`) go on before the projections are stacked."""
    sharded = group is not None and group.size() > 1
    shapes = {}
    for f in sorted(path.glob("model*.safetensors")):
        shapes.update(safetensors_header(f))
    config = {**read_config(path / "config.json"), **(model_config or {})}
    if config.get("model_type") in MODEL_TYPES:  # sizes against the weights before anything is built
        try:
            args = ModelArgs.from_dict(config)
            if strict:
                check_weights(args, shapes)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path / 'config.json'}: {one_line(e)}") from None
        if adapter_path is not None:
            adapters = Path(adapter_path)
            try:
                check_adapter(read_config(adapters / "adapter_config.json"),
                              safetensors_header(adapters / "adapters.safetensors"), args)
            except ValueError as e:
                raise ValueError(str(e) if str(adapters) in str(e) else f"{adapters}: {e}") from None
    try:
        model, config = _mlx_lm_load_model(path, lazy or sharded, strict, _our_classes(model_config),
                                           get_model_classes=get_model_classes)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:  # config.json or weights
        raise ValueError(f"{path}: {one_line(e)}") from None
    if config.get("quantization") and mx.default_device() != mx.gpu:
        # Stored quantized for its bytes; MLX's CPU backend runs quantized matmuls far slower than fp16.
        model = dequantize_model(model)
    if sharded:
        if adapter_path is not None:
            raise ValueError("adapters are not supported on a sharded model (as in mlx-lm); fuse them first")
        model.shard(group)
        if not lazy:
            mx.eval(model.parameters())
    if adapter_path is not None:
        from mlx_lm.tuner.utils import load_adapters

        try:
            model = load_adapters(model, str(adapter_path))
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:  # shapes, names, missing keys
            raise ValueError(f"{adapter_path}: {one_line(e)}") from None
        model.eval()
    if fuse:
        model.stack_projections(materialize=not lazy)
    return model, config


def load_model(path_or_hf_repo, lazy: bool = False, strict: bool = True, model_config=None,
               fuse: bool = True, group=None) -> Model:
    """Weights and config only; no tokenizer needed. `fuse=False` keeps the checkpoint's
    separate projections (to copy weights by name); `group` shards the model over its ranks."""
    return _load_model(resolve(str(path_or_hf_repo)), lazy, strict, model_config, fuse, group)[0]


@contextmanager
def _quiet_transformers():
    # transformers warns that it does not know model_type "clsa" while it reads the tokenizer.
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _load_tokenizer(path: Path, tokenizer_config, eos_token_ids):
    """mlx-lm's tokenizer of `path`; a missing or broken tokenizer file is named in one line."""
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ValueError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        try:
            if (path / name).is_file() and not isinstance(json.loads((path / name).read_bytes()), dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as e:
            raise ValueError(f"{path / name}: not a valid tokenizer file ({one_line(e, 120)})") from None
    try:
        with _quiet_transformers():
            return load_tokenizer(path, tokenizer_config, eos_token_ids=eos_token_ids)
    except Exception as e:
        raise ValueError(f"{path}: the tokenizer files do not load ({type(e).__name__}: {one_line(e, 160)})") from None


def load(path_or_hf_repo, tokenizer_config=None, model_config=None, adapter_path=None, lazy: bool = False,
         return_config: bool = False, revision: Optional[str] = None, fuse: bool = True, group=None):
    """Returns `(model, tokenizer)`, the tokenizer wrapped by mlx-lm (streaming detokenizer, chat
    template). The model's stacked projections (`Model.stack_projections`) unless `fuse=False`; with a
    distributed `group` of several ranks, this rank's shard (`Model.shard`); `adapter_path`: an
    mlx-lm LoRA adapter folder (`mlx_lm.lora`'s output)."""
    path = resolve(str(path_or_hf_repo), revision)
    model, config = _load_model(path, lazy, True, model_config, fuse, group, adapter_path)
    tokenizer = _load_tokenizer(path, tokenizer_config, config.get("eos_token_id"))
    check_vocab(tokenizer, model.args.vocab_size, path)
    return (model, tokenizer, config) if return_config else (model, tokenizer)
