"""An MLX model folder (ours, quantized or not) back to an official checkpoint, to train on from
it: numpy, safetensors and torch, no MLX, so it runs on the GPU box's torch as well as here.

  python training/from_mlx.py MLX_FOLDER OUT_FOLDER
"""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def dequantize(weights: dict, group_size: int, bits: int) -> dict:
    """MLX's affine quantization undone: w = q * scale + bias per group (8-bit: q is the bytes
    of the packed uint32 words, lowest first)."""
    assert bits == 8, "only 8-bit folders"
    out = {}
    for name, w in weights.items():
        base = name.removesuffix(".weight")
        if name.endswith(".weight") and base + ".scales" in weights:
            q = w.view(np.uint8).astype(np.float32)
            scales, biases = (weights[f"{base}.{k}"].astype(np.float32)[..., None] for k in ("scales", "biases"))
            out[name] = (q.reshape(*scales.shape[:-1], group_size) * scales + biases).reshape(q.shape)
        elif not name.endswith((".scales", ".biases")):
            out[name] = w.astype(np.float32)
    return out


def main(src, out):
    import torch
    from safetensors.numpy import load_file

    from torch_ref.model import Model, ModelArgs, save_official

    src = pathlib.Path(src)
    config = json.loads((src / "config.json").read_text())
    weights = {}
    for f in sorted(src.glob("model*.safetensors")):
        weights.update(load_file(f))
    if "quantization" in config:
        weights = dequantize(weights, config["quantization"]["group_size"], config["quantization"]["bits"])
    args = ModelArgs(**{k: v for k, v in config.items() if k in ModelArgs.__dataclass_fields__})
    model = Model(args)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    save_official(model, args, out)
    print(f"{src} -> {out}: {sum(v.size for v in weights.values()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main(*sys.argv[1:])
