"""Convert a PyTorch YOCO / CLSA checkpoint to an MLX folder (optionally quantized).

    python convert.py --torch-path CKPT_DIR_OR_HUB_ID --mlx-path OUT_DIR [-q --q-bits 4]

The same command is `clsa-convert` and `python -m clsa_mlx.convert` once installed.
"""

from clsa_mlx.convert import main

if __name__ == "__main__":
    main()
