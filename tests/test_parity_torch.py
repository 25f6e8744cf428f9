"""The MLX model against the PyTorch reference (torch_ref), same weights, every position."""

from dataclasses import asdict

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from clsa_mlx import Model, ModelArgs  # noqa: E402
from torch_ref.model import Model as TorchModel  # noqa: E402
from torch_ref.model import ModelArgs as TorchArgs  # noqa: E402

BASE = dict(dim=64, n_layers=4, hidden_dim=96, n_self_heads=4, n_attn_heads=4, n_attn_kv_heads=2,
            vocab_size=101, index_head_dim=16)
CASES = {
    "official-yoco-retention": dict(),
    "official-yoco-swa": dict(sliding_window=6),
    "clsa-paper": dict(sliding_window=6, n_self_kv_heads=2, qk_norm=True, cross_rope=False, index_topk=5),
    "clsa-retention-standard-rope": dict(index_topk=7, rope_style="standard", cross_qk_norm=True),
    "clsa-swa-crossrope-qknorm": dict(sliding_window=3, index_topk=4, cross_qk_norm=True, qk_norm=True,
                                      rope_theta=500.0, norm_eps=1e-6),
}


def pair(case, seed=0):
    torch.manual_seed(seed)
    targs = TorchArgs(**BASE, **CASES[case])
    tmodel = TorchModel(targs).double().eval()
    model = Model(ModelArgs(**asdict(targs)))
    model.load_weights([(k, mx.array(v.float().numpy())) for k, v in tmodel.state_dict().items()])
    return tmodel, model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(case):
    tmodel, model = pair(case)
    toks = np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, 29))
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(toks)).numpy()
    ours = np.array(model(mx.array(toks)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_yoco_rope_matches_the_written_out_formula():
    from clsa_mlx.model import RoPE

    hd, theta, pos = 8, 10000.0, 5
    x = np.random.default_rng(1).standard_normal((1, 1, 1, hd)).astype(np.float32)
    angle = pos / theta ** np.linspace(0, 1, hd // 2)
    c, s = np.cos(angle), np.sin(angle)
    expect = np.empty_like(x)
    expect[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    expect[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
    got = np.array(RoPE(hd, theta, "yoco")(mx.array(x), offset=pos))
    np.testing.assert_allclose(got, expect, atol=1e-5)
