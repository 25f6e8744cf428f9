"""Convert a PyTorch YOCO / CLSA checkpoint to an MLX folder (optionally quantized).

    python convert.py --torch-path CKPT_DIR_OR_HUB_ID --mlx-path OUT_DIR [-q --q-bits 4]

The logic lives in clsa_mlx/convert.py; this is the command line.
"""

import signal
import sys
import traceback

import click


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
@click.option("--quantize-indexer", is_flag=True,
              help="Also quantize the CLSA indexer projections (kept in --dtype by default).")
@click.option("--tokenizer", default=None,
              help="Folder, file or hub id to take the tokenizer files from (default: the checkpoint folder).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of a hub id.")
@click.option("--upload-repo", default=None, help="Hugging Face repo to upload the converted folder to.")
@click.option("--allow-non-finite", is_flag=True, help="Convert weights that hold NaN or Inf (refused by default).")
@click.option("-v", "--verbose", is_flag=True, help="Show the full traceback on errors.")
def main(torch_path, mlx_path, dtype, quantize, q_bits, q_group_size, q_mode, quantize_indexer, tokenizer,
         revision, upload_repo, allow_non_finite, verbose):
    """Convert a PyTorch YOCO / CLSA checkpoint to an MLX folder for clsa_mlx and mlx-lm."""
    from clsa_mlx.convert import ConvertError, convert

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up as Ctrl-C does

    try:
        convert(
            torch_path, mlx_path, dtype=dtype, quantize=quantize,
            q_bits=int(q_bits) if q_bits else None, q_group_size=int(q_group_size) if q_group_size else None,
            q_mode=q_mode,
            tokenizer=tokenizer, upload_repo=upload_repo, revision=revision,
            quantize_indexer=quantize_indexer, allow_non_finite=allow_non_finite,
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
