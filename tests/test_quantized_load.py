"""A model stored quantized (for its bytes) loads dequantized where quantized matmuls are slow
(MLX's CPU backend), with the logits of the quantized model it stands for."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import clsa_mlx
from clsa_mlx.model import Model
from clsa_mlx.tiny import make_tiny_folder, tiny_args


@pytest.mark.skipif(mx.default_device() == mx.gpu, reason="on a GPU the quantized matmuls run as stored")
@pytest.mark.parametrize("bits", [8, 4])
def test_a_quantized_folder_loads_dequantized_on_the_cpu(tmp_path, bits):
    folder = make_tiny_folder(tmp_path / "m", seed=3)
    reference = Model(tiny_args())
    reference.load_weights(str(folder / "model.safetensors"))
    nn.quantize(reference, group_size=32, bits=bits)
    mx.eval(reference.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(reference.parameters())))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization": dict(group_size=32, bits=bits)}))

    model, _ = clsa_mlx.load(folder)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert not {k for k in kinds if k.startswith("Quantized")}, kinds
    ids = mx.array(np.random.default_rng(0).integers(0, config["vocab_size"], (2, 40)))
    got, want = model(ids), reference(ids)
    assert np.allclose(np.array(got), np.array(want), atol=1e-4), float(mx.abs(got - want).max())
