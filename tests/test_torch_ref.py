"""Tests of the PyTorch reference model (torch_ref). CPU, seeded, a few seconds."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from torch_ref import (
    Model,
    ModelArgs,
    apply_rope,
    attend,
    indexer_kd_loss,
    load_official,
    retention_parallel,
    retention_recurrent,
    save_official,
    tiny_args,
    topk_mask,
)
from torch_ref.model import EXTRA_PARAMS, OFFICIAL_PARAMS

CONFIGS = {
    "yoco_retention": dict(),
    "yoco_swa": dict(sliding_window=4),
    "clsa_retention": dict(index_topk=3),
    "clsa_swa_paper": dict(sliding_window=4, n_self_kv_heads=2, qk_norm=True, cross_qk_norm=True,
                           cross_rope=False, rope_style="standard", index_topk=3),
}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return Model(tiny_args(**kw)).eval()


def tokens(B=2, T=12, seed=1, vocab=97):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def official_keys(n_layers, self_decoder):
    """The exact key set of the official YOCO state dict."""
    keys = {"embed_tokens.weight", "output_projection.weight", "layer_norm.weight",
            "cross_decoder.kv_layer_norm.weight", "cross_decoder.k_proj.weight", "cross_decoder.v_proj.weight"}
    mix = ["q_proj", "k_proj", "v_proj", "out_proj"] + (["g_proj", "gt_proj"] if self_decoder == "gated_retention" else [])
    common = ["mixer_layer_norm", "final_layer_norm", "ffn.fc1", "ffn.gate", "ffn.fc2"]
    for i in range(n_layers // 2):
        keys |= {f"self_decoder.layers.{i}.{n}.weight" for n in common + [f"mixer.{m}" for m in mix]}
        keys |= {f"cross_decoder.layers.{i}.{n}.weight" for n in common + ["mixer.q_proj", "mixer.out_proj"]}
    return keys


# ---------------------------------------------------------------------------------------


def test_args_resolution_and_mlx_parity():
    a = ModelArgs(dim=64, sliding_window=8)
    assert a.self_decoder == "swa" and a.n_self_kv_heads == a.n_self_heads and a.embed_scale == 8.0
    assert ModelArgs().self_decoder == "gated_retention"
    a = ModelArgs.from_dict({"dim": 64, "max_batch_size": 3, "model_parallel_size": 1, "load_checkpoint": False})
    assert a.dim == 64
    assert Model(dataclasses.asdict(tiny_args())).args == tiny_args()
    pytest.importorskip("mlx_lm")
    from clsa_mlx.config import ModelArgs as MLXArgs

    ours = {f.name: f.default for f in dataclasses.fields(ModelArgs)}
    theirs = {f.name: f.default for f in dataclasses.fields(MLXArgs)}
    assert ours == theirs


def test_yoco_rope_matches_hand_formula():
    hd, theta, p = 8, 10000.0, 5
    x = torch.randn(hd, dtype=torch.float64)
    out = apply_rope(x[None].float(), torch.tensor([p]), theta, "yoco")[0].double()
    want = torch.empty(hd, dtype=torch.float64)
    for i in range(hd // 2):
        ang = p / theta ** (i / (hd // 2 - 1))  # exponent linspace(0, 1, hd/2): last pair 1/theta
        c, s = math.cos(ang), math.sin(ang)
        want[2 * i] = x[2 * i] * c - x[2 * i + 1] * s
        want[2 * i + 1] = x[2 * i + 1] * c + x[2 * i] * s
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)

    out = apply_rope(x[None].float(), torch.tensor([p]), theta, "standard")[0].double()
    h = hd // 2
    for i in range(h):
        ang = p * theta ** (-2 * i / hd)
        c, s = math.cos(ang), math.sin(ang)
        want[i] = x[i] * c - x[i + h] * s
        want[i + h] = x[i + h] * c + x[i] * s
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_retention_parallel_equals_recurrent():
    g = torch.Generator().manual_seed(0)
    B, H, T, d = 2, 3, 17, 8
    q, k, v = (torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    a = F.logsigmoid(3 * torch.randn(B, H, T, generator=g, dtype=torch.float64)) / 16
    a[0, 0, 5] = -30.0  # a near-reset: the decay matrix must not overflow or mix in the future
    torch.testing.assert_close(retention_parallel(q, k, v, a), retention_recurrent(q, k, v, a), atol=1e-10, rtol=1e-10)

    # The whole mixer (RoPE, decay gate, subln, swish gate): fp64 stays fp64; fp32 is close.
    m = make()
    mixer = m.self_decoder.layers[0].mixer
    x = torch.randn(2, 13, 64)
    pos = torch.arange(13)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x, pos), mixer(x, pos, recurrent=True), atol=2e-5, rtol=1e-4)
        mixer.double()
        x = x.double()
        torch.testing.assert_close(mixer(x, pos), mixer(x, pos, recurrent=True), atol=1e-10, rtol=1e-10)


def test_attend_gqa_consecutive_groups():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 5, 4, generator=g)
    k, v = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    out = attend(q, k, v, mask)
    for h in range(6):
        s = (q[0, h] @ k[0, h // 3].T / 2).masked_fill(~mask, -math.inf)
        torch.testing.assert_close(out[0, h], s.softmax(-1) @ v[0, h // 3])


@pytest.mark.parametrize("n_layers", [2, 4])
def test_swa_window_respected(n_layers):
    W, t = 4, 11
    m = make(n_layers=n_layers, sliding_window=W, n_self_kv_heads=2, qk_norm=True)
    reach = (n_layers // 2) * (W - 1)  # receptive field of the stacked windows
    tok = tokens(B=1, T=14)

    def self_out(tk):
        with torch.no_grad():
            return m.self_decoder(m.embed(tk))[0, t]

    base = self_out(tok)
    far, near = tok.clone(), tok.clone()
    far[0, t - reach - 1] = (far[0, t - reach - 1] + 1) % 97
    near[0, t - reach] = (near[0, t - reach] + 1) % 97
    assert torch.equal(self_out(far), base)
    assert not torch.allclose(self_out(near), base)


@pytest.mark.parametrize("name", ["clsa_retention", "clsa_swa_paper"])
def test_dense_equals_sparse_when_topk_covers_sequence(name):
    T = 12
    for k in (T, T + 5):
        m = make(**{**CONFIGS[name], "index_topk": k})
        with torch.no_grad():
            assert torch.equal(m(tokens(T=T), sparse=False), m(tokens(T=T), sparse=True))


def test_sparse_rows_shorter_than_k_match_dense_and_later_rows_differ():
    k = 3
    m = make(**CONFIGS["clsa_swa_paper"])
    with torch.no_grad():
        dense, (sparse, aux) = m(tokens(), sparse=False), m(tokens(), return_aux=True)
    torch.testing.assert_close(sparse[:, :k], dense[:, :k], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sparse[:, k:], dense[:, k:], atol=1e-3)
    T = dense.shape[1]
    assert torch.equal(aux["mask"].sum(-1), torch.arange(1, T + 1).clamp(max=k).expand(2, T))


def _topk_brute(scores, k):
    T, S = scores.shape
    out = torch.zeros(T, S, dtype=torch.bool)
    for t in range(T):
        vis = list(range(t + S - T + 1))
        for s in sorted(vis, key=lambda s: (-scores[t, s].item(), s))[:k]:
            out[t, s] = True
    return out


def test_topk_mask_ties_and_short_rows():
    # All scores equal: every row picks its k lowest positions.
    m = topk_mask(torch.zeros(6, 6), 2)
    want = torch.zeros(6, 6, dtype=torch.bool)
    want[0, 0] = True
    want[1:, :2] = True
    assert torch.equal(m, want)
    # One row with ties at the threshold.
    row = torch.tensor([[3.0, 5.0, 1.0, 5.0, 5.0]])
    assert topk_mask(row, 2)[0].tolist() == [False, True, False, True, False]
    # Rows with t + 1 <= k select everything visible; nothing above the diagonal.
    m = topk_mask(torch.randn(7, 7), 4)
    assert torch.equal(m[:4], torch.ones(4, 7, dtype=torch.bool).tril())
    assert not m.triu(1).any()
    # Many ties, batched, and queries aligned to the last T of S keys.
    g = torch.Generator().manual_seed(0)
    for T, S, k in ((9, 9, 3), (4, 10, 5), (6, 6, 1)):
        sc = torch.randint(0, 3, (2, T, S), generator=g).float()
        got = topk_mask(sc, k)
        for b in range(2):
            assert torch.equal(got[b], _topk_brute(sc[b], k))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
    m = make(**CONFIGS[name])
    tok = tokens(T=12)
    p = 6
    other = tok.clone()
    other[:, p + 1:] = (other[:, p + 1:] * 7 + 3) % 97
    modes = [False, True] if m.args.index_topk else [False]
    with torch.no_grad():
        for sparse in modes:
            a, b = m(tok, sparse=sparse), m(other, sparse=sparse)
            torch.testing.assert_close(a[:, : p + 1], b[:, : p + 1], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(a[:, p + 1:], b[:, p + 1:], atol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_official_roundtrip(name, tmp_path):
    m = make(**CONFIGS[name])
    args = m.args
    save_official(m, args, tmp_path)
    sd = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    want = official_keys(args.n_layers, args.self_decoder)
    if args.index_topk:
        want |= {"cross_decoder.indexer.q_proj.weight", "cross_decoder.indexer.k_proj.weight"}
    for i in range(args.n_layers // 2):
        if args.qk_norm:
            want |= {f"self_decoder.layers.{i}.mixer.q_norm.weight", f"self_decoder.layers.{i}.mixer.k_norm.weight"}
        if args.cross_qk_norm:
            want |= {f"cross_decoder.layers.{i}.mixer.q_norm.weight"}
    if args.cross_qk_norm:
        want |= {"cross_decoder.k_norm.weight"}
    assert set(sd) == want
    D, hd, kv = args.dim, args.head_dim, args.n_attn_kv_heads
    assert sd["cross_decoder.k_proj.weight"].shape == (kv * hd, D)
    assert sd["output_projection.weight"].data_ptr() != sd["embed_tokens.weight"].data_ptr()
    if args.self_decoder == "gated_retention":
        assert sd["self_decoder.layers.0.mixer.gt_proj.weight"].shape == (args.n_self_heads, D)
    if args.index_topk:
        assert sd["cross_decoder.indexer.q_proj.weight"].shape == (args.index_head_dim, D)

    params = json.loads((tmp_path / "params.json").read_text())
    assert set(params) == set(OFFICIAL_PARAMS) | set(EXTRA_PARAMS)

    m2, args2 = load_official(tmp_path)
    assert args2 == args
    with torch.no_grad():
        assert torch.equal(m(tokens()), m2(tokens()))


def test_load_keeps_dtype(tmp_path):
    m = make(**CONFIGS["clsa_swa_paper"]).to(torch.bfloat16)
    save_official(m, m.args, tmp_path)
    m2, _ = load_official(tmp_path)
    assert m2.output_projection.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(m(tokens()), m2(tokens()))


def test_abar_is_mean_dense_attention_and_kd_loss():
    # One cross layer, no cross RoPE: Abar written out by hand.
    m = make(n_layers=2, cross_rope=False, index_topk=3)
    tok = tokens()
    with torch.no_grad():
        _, aux = m(tok, return_aux=True)
        x = m.self_decoder(m.embed(tok))
        cd, layer = m.cross_decoder, m.cross_decoder.layers[0]
        K = cd.k_proj(cd.kv_layer_norm(x)).view(2, 12, 2, 16)
        q = layer.mixer.q_proj(layer.mixer_layer_norm(x)).view(2, 12, 4, 16)
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        want = sum(((q[:, :, h] @ K[:, :, h // 2].transpose(1, 2)) / 4).masked_fill(~causal, -math.inf).softmax(-1)
                   for h in range(4)) / 4
    torch.testing.assert_close(aux["abar"], want, atol=1e-6, rtol=1e-5)

    m = make(**CONFIGS["clsa_swa_paper"])
    logits, aux = m(tok, return_aux=True)
    abar, scores = aux["abar"], aux["index_scores"]
    assert not abar.requires_grad and torch.all(abar.triu(1) == 0)
    torch.testing.assert_close(abar.sum(-1), torch.ones(2, 12))
    assert torch.isinf(scores.triu(1)[scores.triu(1) != 0]).all() and torch.isfinite(scores.tril()).all()
    loss = indexer_kd_loss(scores, abar)
    assert loss.item() > 0
    loss.backward()
    g = m.cross_decoder.indexer.q_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # Index scores that reproduce abar exactly give zero loss.
    perfect = torch.log(abar).masked_fill(abar == 0, -math.inf)
    assert abs(indexer_kd_loss(perfect, abar).item()) < 1e-6


@pytest.mark.parametrize("name", ["clsa_retention", "clsa_swa_paper"])
def test_trainable_lm_plus_kd(name):
    m = make(**CONFIGS[name]).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    tok = tokens(B=2, T=13)
    losses = []
    for _ in range(12):
        logits, aux = m(tok[:, :-1], return_aux=True)
        lm = F.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
        loss = lm + 0.1 * indexer_kd_loss(aux["index_scores"], aux["abar"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_float64_model_stays_float64():
    m = make(**CONFIGS["clsa_swa_paper"]).double()
    logits, aux = m(tokens(), return_aux=True)
    assert logits.dtype == aux["abar"].dtype == aux["index_scores"].dtype == torch.float64


def test_bf16_forward_backward():
    m = make(**CONFIGS["clsa_retention"]).to(torch.bfloat16)
    logits, aux = m(tokens(), return_aux=True)
    assert logits.dtype == torch.bfloat16 and aux["abar"].dtype == torch.float32
    (logits.float().logsumexp(-1).mean() + indexer_kd_loss(aux["index_scores"], aux["abar"])).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    for name in ("clsa_retention", "clsa_swa_paper"):
        m = make(**CONFIGS[name])
        tok = tokens()
        with torch.no_grad():
            cpu, aux_cpu = m(tok, return_aux=True)
            m.cuda()
            gpu, aux_gpu = m(tok.cuda(), return_aux=True)
        assert torch.equal(aux_cpu["mask"], aux_gpu["mask"].cpu())
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(aux_gpu["abar"].cpu(), aux_cpu["abar"], atol=1e-5, rtol=1e-4)
        m.to(torch.bfloat16)
        logits, aux = m(tok.cuda(), return_aux=True)
        (logits.float().logsumexp(-1).mean() + indexer_kd_loss(aux["index_scores"], aux["abar"])).backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        save_official(m, m.args, tmp_path / name)
        m2, _ = load_official(tmp_path / name, device="cuda")
        with torch.no_grad():
            assert torch.equal(m(tok.cuda()), m2(tok.cuda()))
