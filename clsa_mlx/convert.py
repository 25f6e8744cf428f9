"""PyTorch YOCO / CLSA checkpoints -> an mlx-lm-style MLX folder (optionally quantized).

Inputs (a local folder, a checkpoint file inside one, or a Hugging Face hub id):
- official YOCO: `checkpoint.pth` (flat state dict) + `params.json`;
- fairseq training checkpoint: `{"model": {"decoder.model.<name>": ...}, ...}` + `params.json`;
- Hugging Face style: `model*.safetensors` or `pytorch_model*.bin`, single or sharded with an
  index JSON, plus `config.json` (FLA `YOCOConfig` or our own ModelArgs names); tensor names
  either official or FLA's (`model.self_layers.0.attn.q_proj.weight` ...);
- CLSA: any of the above plus `cross_decoder.indexer.{q,k}_proj.weight` and QK-norm weights.

`.pth` / `.bin` files are read by `torch_pickle` (no torch, no pickled code is run).
Reading is `checkpoint` (files) and `layouts` (names, configs); this module builds the model and
writes `config.json` (ModelArgs + mlx-lm's `quantization` block), `model*.safetensors`
(+ `model.safetensors.index.json`, mlx-lm's `save_model`), tokenizer files and `README.md`, in a
temporary folder next to the destination, renamed into place at the end.
"""

import os
import shutil
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import click
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config, save_model

from . import torch_pickle
from .checkpoint import DTYPES, inside, log, read_source, resolve_source
from .config import ModelArgs
from .layouts import ConvertError
from .loading import add_model_file, check_vocab, one_line

# mlx quantization modes -> the (group size, bits) each non-affine mode fixes (affine: defaults 64, 4)
Q_MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
TOKENIZER_PATTERNS = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "*.tiktoken",
)


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
    from .models import phi4flash

    phi = args.model_type == "phi4flash"
    model = (phi4flash.Model if phi else Model)(args)  # lazily initialized: the random init is never evaluated
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
        a = a.astype(mx.float32 if phi and phi4flash.full_precision(k) else target)
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
    progress: bool = True,
    allow_non_finite: bool = False,
    quant_recipe: Optional[str] = None,
) -> Path:
    dst = Path(mlx_path).expanduser()
    _remove_stale_partials(dst)
    if dst.exists() or dst.is_symlink():
        raise ConvertError(f"{dst}: already exists; remove it or choose another --mlx-path")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    if not quantize and (q_bits is not None or q_group_size is not None or q_mode != "affine" or quant_recipe):
        raise ConvertError("--q-bits / --q-group-size / --q-mode / --quant-predicate need -q/--quantize")
    if q_mode not in Q_MODES:
        raise ConvertError(f"--q-mode {q_mode}: not one of {', '.join(Q_MODES)}")
    if q_mode != "affine":
        gs, bits = Q_MODES[q_mode]
        if q_group_size not in (None, gs) or q_bits not in (None, bits):
            raise ConvertError(f"--q-mode {q_mode} means {bits} bits in groups of {gs}")

    src = resolve_source(str(torch_path), revision)
    args, weights, origin, kind, extra = read_source(src)
    where = str(src)
    if args.model_type == "phi4flash":
        log(f"[INFO] {kind}: {args.num_hidden_layers} layers, width {args.hidden_size}")
    else:
        log(f"[INFO] {kind}: {args.self_decoder} self-decoder, {args.n_layers} layers, dim {args.dim}, "
            f"{'CLSA top-' + str(args.index_topk) if args.sparse else 'dense YOCO'}")
    if quant_recipe and args.model_type != "phi4flash":
        raise ConvertError(f"--quant-predicate {quant_recipe}: mixed recipes are for phi4flash checkpoints")
    config_dtype = extra.pop("_dtype", None)
    dtype = dtype or config_dtype or _source_dtype(weights)
    log(f"[INFO] Using dtype: {dtype}")
    model = build_model(args, weights, origin, where, dtype, progress, allow_non_finite)
    del weights

    config = {**asdict(args), **extra}
    if quantize:
        from mlx_lm.utils import quantize_model

        log("[INFO] Quantizing")
        predicate = model.quant_predicate if args.model_type == "phi4flash" else quant_predicate(quantize_indexer)
        if quant_recipe:
            from .models.phi4flash import mixed_quant_predicate

            predicate = mixed_quant_predicate(quant_recipe, args.num_hidden_layers, q_group_size or 64)
        model, config = quantize_model(model, config, q_group_size, q_bits, mode=q_mode, quant_predicate=predicate)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(tmp, model, donate_model=True)  # mlx-lm's shards (5 GB) and index
        n_shards = len(list(tmp.glob("model*.safetensors")))
        save_config(config, tmp / "config.json")
        add_model_file(tmp)
        tok_src = src
        if tokenizer is not None:
            tok_src = resolve_source(tokenizer, None, patterns=[*TOKENIZER_PATTERNS])
        copied = copy_tokenizer(tok_src, tmp)
        if not copied:
            log("[WARN] No tokenizer files found; pass --tokenizer to include them (clsa_mlx.load needs one)")
        else:
            _check_tokenizer(tmp, tok_src, args.vocab_size)
        _write_card(tmp, str(torch_path) if not Path(torch_path).expanduser().exists() else None)
        if dst.exists() or dst.is_symlink():
            raise ConvertError(f"{dst}: appeared while converting; not overwriting it")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[INFO] Wrote {dst} ({n_shards} safetensors file(s){', tokenizer: ' + ', '.join(copied) if copied else ''})")
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
            log(f"[INFO] Removed {p}, left by an interrupted conversion")
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


# --------------------------------------------------------------------------------------
# the command line: clsa-convert, python -m clsa_mlx.convert, python convert.py


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--torch-path", "--hf-path", "--model", "torch_path", required=True,
              help="Checkpoint folder (official checkpoint.pth + params.json, or Hugging Face-style "
                   "*.safetensors / pytorch_model*.bin + config.json), a checkpoint file, or a hub id.")
@click.option("--mlx-path", default="mlx_model", show_default=True, help="Output folder (must not exist).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="dtype of the saved (non-quantized) weights. Default: config.json's torch_dtype, else the checkpoint's.")
@click.option("-q", "--quantize", is_flag=True, help="Quantize (mlx-lm format).")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None,
              help="Bits per weight [default: 4].")
@click.option("--q-group-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Quantization group size [default: 64].")
@click.option("--q-mode", type=click.Choice(["affine", "mxfp4", "nvfp4", "mxfp8"]), default="affine",
              show_default=True, help="Quantization mode (as mlx-lm's).")
@click.option("--quant-predicate", "quant_recipe", default=None,
              type=click.Choice(["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]),
              help="Mixed bits, mlx-lm's recipes (phi4flash): the output head and some layers' attention and "
                   "down projections at the high bits, the rest at the low.")
@click.option("--quantize-indexer", is_flag=True,
              help="Also quantize the CLSA indexer projections (kept in --dtype by default).")
@click.option("--tokenizer", default=None,
              help="Folder, file or hub id to take the tokenizer files from (default: the checkpoint folder).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of a hub id.")
@click.option("--upload-repo", default=None, help="Hugging Face repo to upload the converted folder to.")
@click.option("--allow-non-finite", is_flag=True, help="Convert weights that hold NaN or Inf (refused by default).")
@click.option("-v", "--verbose", is_flag=True, help="Show the full traceback on errors.")
def main(torch_path, mlx_path, dtype, quantize, q_bits, q_group_size, q_mode, quant_recipe, quantize_indexer,
         tokenizer, revision, upload_repo, allow_non_finite, verbose):
    """Convert a PyTorch YOCO / CLSA checkpoint to an MLX folder for clsa_mlx and mlx-lm."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does

    try:
        convert(
            torch_path, mlx_path, dtype=dtype, quantize=quantize,
            q_bits=int(q_bits) if q_bits else None, q_group_size=int(q_group_size) if q_group_size else None,
            q_mode=q_mode,
            tokenizer=tokenizer, upload_repo=upload_repo, revision=revision,
            quantize_indexer=quantize_indexer, allow_non_finite=allow_non_finite, quant_recipe=quant_recipe,
        )
    except ConvertError as e:
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception as e:  # an unforeseen failure: still one line unless --verbose
        if verbose:
            traceback.print_exc()
        click.echo(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
