import copy
import io

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from clsa_mlx import Model
from clsa_mlx.retention import gated_retention
from clsa_mlx.tiny import tiny_args

VARIANTS = {
    "swa-clsa": dict(sliding_window=5, index_topk=6),
    "swa-dense": dict(sliding_window=5, index_topk=0),
    "swa-clsa-gqa-crossrope": dict(sliding_window=7, index_topk=6, n_self_kv_heads=2, cross_rope=True,
                                   cross_qk_norm=True, rope_style="standard"),
    "retention-clsa": dict(sliding_window=None, self_decoder="gated_retention", qk_norm=False, index_topk=6),
    "retention-dense-yoco": dict(sliding_window=None, qk_norm=False, index_topk=0, cross_rope=True),
}


def make_model(seed=0, dtype=mx.float32, **overrides):
    mx.random.seed(seed)
    model = Model(tiny_args(**overrides))
    if dtype != mx.float32:
        model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def tokens(T, B=1, seed=1, vocab=200):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, (B, T)))


def incremental(model, toks, chunks, reserve=0):
    """Prefill in the given chunk sizes, then decode the rest one token at a time."""
    cache, outs, pos = model.make_cache(), [], 0
    if reserve:
        model.reserve(cache, reserve, batch_size=toks.shape[0])
    for c in chunks:
        outs.append(model(toks[:, pos:pos + c], cache))
        pos += c
    while pos < toks.shape[1]:
        outs.append(model(toks[:, pos:pos + 1], cache))
        pos += 1
    return mx.concatenate(outs, axis=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-4), (mx.bfloat16, 0.15), (mx.float16, 0.05)])
def test_cached_equals_uncached(variant, dtype, tol):
    model = make_model(dtype=dtype, **VARIANTS[variant])
    toks = tokens(23, B=2)
    full = model(toks)
    assert full.shape == (2, 23, model.args.vocab_size) and full.dtype == dtype
    for chunks, reserve in (([1], 0), ([4, 3], 0), ([11], 23), ([6, 9], 10)):
        inc = incremental(model, toks, chunks, reserve)
        err = mx.abs(full.astype(mx.float32) - inc.astype(mx.float32)).max().item()
        assert err <= tol, (chunks, err)


def test_reserve_allocates_the_global_caches_once():
    model = make_model()
    n = len(model.self_decoder.layers)
    toks = tokens(40)
    cache = model.make_cache()
    model(toks[:, :8], cache)
    model.reserve(cache, 700)
    kv, index = cache[n], cache[n + 1]
    # 708 rows, rounded up to mlx-lm's step of 256 (MLX CUDA is sensitive to buffer shapes)
    assert kv.keys.shape[2] == index.keys.shape[2] == 768 and index.values.shape[-1] == 0
    for s in range(8, 40, 8):
        model(toks[:, s:s + 8], cache)
        assert kv.keys.shape[2] == 768 and kv.offset == s + 8  # written in place, never regrown
    model.reserve(cache, 768 - 40)
    assert kv.keys.shape[2] == 768  # fits: left alone
    kept = mx.array(kv.keys[..., :40, :])
    model.reserve(cache, 768 - 39)
    assert kv.keys.shape[2] == 1024 and mx.array_equal(kv.keys[..., :40, :], kept)
    reference = model(toks)
    again = model.make_cache()
    model(toks[:, :39], again)
    assert mx.allclose(model(toks[:, 39:], again), reference[:, 39:], atol=1e-4)


def test_retention_chunking_is_exact():
    rng = np.random.default_rng(0)
    B, H, L, d = 2, 3, 37, 8
    q, k, v = (mx.array(rng.standard_normal((B, H, L, d)), dtype=mx.float32) for _ in range(3))
    a = mx.array(np.log(rng.uniform(0.5, 1.0, (B, H, L))), dtype=mx.float32)
    s0 = mx.array(rng.standard_normal((B, H, d, d)), dtype=mx.float32)
    o_one, s_one = gated_retention(q, k, v, a, s0, chunk=L)
    o_chunked, s_chunked = gated_retention(q, k, v, a, s0, chunk=5)
    # the recurrence written out token by token, in float64
    qn, kn, vn, an = (np.array(x, dtype=np.float64) for x in (q, k, v, a))
    S = np.array(s0, dtype=np.float64)
    o_ref = np.zeros_like(qn)
    for t in range(L):
        S = np.exp(an[:, :, t])[..., None, None] * S + kn[:, :, t, :, None] * vn[:, :, t, None, :]
        o_ref[:, :, t] = np.einsum("bhd,bhde->bhe", qn[:, :, t], S)
    for o, s in ((o_one, s_one), (o_chunked, s_chunked)):
        np.testing.assert_allclose(np.array(o), o_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(s), S, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["swa-clsa", "retention-clsa"])
def test_sparse_with_k_at_least_context_equals_dense(variant):
    T = 19
    sparse = make_model(**{**VARIANTS[variant], "index_topk": T})
    dense = make_model(**{**VARIANTS[variant], "index_topk": 0})
    dense.load_weights([(k, v) for k, v in tree_flatten(sparse.parameters()) if "indexer" not in k])
    toks = tokens(T)
    assert mx.array_equal(sparse(toks), dense(toks))
    assert mx.array_equal(incremental(sparse, toks, [7]), incremental(dense, toks, [7]))
    # and with k < T the selection bites: the outputs differ after position k
    small_k = make_model(**{**VARIANTS[variant], "index_topk": 4})
    small_k.load_weights(tree_flatten(sparse.parameters()))
    diff = mx.abs(small_k(toks) - dense(toks)).max(axis=-1)[0]
    assert mx.all(diff[:4] == 0).item() and diff[4:].max().item() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    model = make_model(**VARIANTS[variant])
    a, b = tokens(20, seed=1), tokens(20, seed=2)
    mixed = mx.concatenate([a[:, :12], b[:, 12:]], axis=1)
    assert mx.allclose(model(a)[:, :12], model(mixed)[:, :12], atol=1e-5)


def test_swa_window_is_respected():
    model = make_model(sliding_window=4, index_topk=0, n_layers=2)
    cache_a, cache_b = model.make_cache(), model.make_cache()
    a, b = tokens(12, seed=1), tokens(12, seed=2)
    mixed = mx.concatenate([b[:, :3], a[:, 3:]], axis=1)
    x_a = model.self_decoder(model.embed_tokens(a), cache_a, 0)
    x_m = model.self_decoder(model.embed_tokens(mixed), cache_b, 0)
    # one SWA layer of window 4: position t sees t-3..t
    assert mx.allclose(x_a[:, 6:], x_m[:, 6:], atol=1e-6)
    assert not mx.allclose(x_a[:, 3:6], x_m[:, 3:6], atol=1e-3)


def _graph_nodes(*arrays):
    f = io.StringIO()
    mx.export_to_dot(f, *arrays)
    return f.getvalue().count("shape=rectangle")


def test_prefill_never_touches_the_cross_decoder():
    """mlx-lm evaluates only the caches during prefill; their graph must not grow with depth."""
    toks = tokens(30)
    sizes = []
    for repeat in (1, 20):
        model = make_model()
        model.cross_decoder.layers = model.cross_decoder.layers * repeat
        cache = model.make_cache()
        logits = model(toks, cache)
        sizes.append((_graph_nodes(*[a for c in cache for a in c.state if isinstance(a, mx.array)]),
                      _graph_nodes(logits)))
    (state_small, logits_small), (state_big, logits_big) = sizes
    assert state_small == state_big
    assert logits_big > logits_small


def test_mlx_lm_model_contract():
    """mlx-lm's own model test runner, plus batch and deepcopy."""
    from mlx_lm.models.cache import make_prompt_cache

    model = make_model()
    assert len(model.layers) == model.args.n_layers and model.model_type == "clsa"
    for dtype in (mx.float32, mx.float16):
        model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
        inputs = mx.array([[0, 1]])
        assert model(inputs).shape == (1, 2, model.args.vocab_size) and model(inputs).dtype == dtype
        cache = make_prompt_cache(model)
        out = model(inputs, cache=cache)
        out = model(mx.argmax(out[0, -1:, :], keepdims=True), cache=cache)
        assert out.shape == (1, 1, model.args.vocab_size) and out.dtype == dtype
    assert model(mx.array([[0, 1], [2, 3]])).shape == (2, 2, model.args.vocab_size)
    copy.deepcopy(model)


@pytest.mark.parametrize("bad,msg", [
    (dict(self_decoder="mamba"), "self_decoder"),
    (dict(self_decoder="swa", sliding_window=None), "sliding_window"),
    (dict(n_layers=5), "n_layers"),
    (dict(dim=63), "split"),
    (dict(rope_style="llama3"), "rope_style"),
    (dict(index_topk=-1), "index_topk"),
])
def test_bad_config_names_the_problem(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_args(**bad)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits", [0, 4])
def test_fused_projections_equal_separate(variant, bits):
    import mlx.nn as nn

    model = make_model(**VARIANTS[variant], dim=64, hidden_dim=128)
    if bits:
        nn.quantize(model, group_size=32, bits=bits, class_predicate=lambda p, m: isinstance(m, nn.Linear) and "indexer" not in p)
    toks = tokens(23, B=2)
    full, inc = model(toks), incremental(model, toks, [11])
    names = {k for k, _ in tree_flatten(model.stack_projections().parameters())}
    assert "self_decoder.layers.0.ffn.fc1_gate.weight" in names and "cross_decoder.layers.1.ffn.gate.weight" not in names
    assert ("self_decoder.layers.0.mixer.qkv_proj.weight" in names) == (model.self_decoder.window is not None)
    for before, after in ((full, model(toks)), (inc, incremental(model, toks, [11]))):
        assert mx.abs(before - after).max().item() <= 1e-5


def test_fusion_leaves_mixed_quantization_alone():
    import mlx.nn as nn

    from clsa_mlx.model import stack_linears

    model = make_model(dim=64, hidden_dim=128)
    ffn = model.self_decoder.layers[0].ffn
    ffn.fc1 = nn.QuantizedLinear.from_linear(ffn.fc1, group_size=32, bits=4)
    ffn.gate = nn.QuantizedLinear.from_linear(ffn.gate, group_size=32, bits=8)
    stack_linears(ffn, ("fc1", "gate"), "fc1_gate")
    assert "fc1_gate" not in ffn and "fc1" in ffn and "gate" in ffn


def test_fusion_needs_matching_parameters_and_runs_once():
    import mlx.nn as nn

    from clsa_mlx.model import stack_linears

    model = make_model(dim=64, hidden_dim=128)
    ffn = model.self_decoder.layers[0].ffn
    ffn.gate = nn.Linear(64, 128, bias=True)  # a bias the other part lacks would be dropped
    stack_linears(ffn, ("fc1", "gate"), "fc1_gate")
    assert "fc1_gate" not in ffn
    ffn.gate = nn.Linear(64, 128, bias=False)
    ffn.gate.weight = ffn.gate.weight.astype(mx.bfloat16)  # would promote fc1's output
    stack_linears(ffn, ("fc1", "gate"), "fc1_gate")
    assert "fc1_gate" not in ffn
    model = make_model(dim=64, hidden_dim=128)
    names = {k for k, _ in tree_flatten(model.stack_projections().stack_projections().parameters())}
    assert "self_decoder.layers.0.ffn.fc1_gate.weight" in names


def test_load_fuses_unless_asked_not_to(tmp_path):
    from clsa_mlx import load, load_model
    from clsa_mlx.tiny import make_tiny_folder

    make_tiny_folder(tmp_path)
    names = lambda m: {k for k, _ in tree_flatten(m.parameters())}  # noqa: E731
    fused, _ = load(tmp_path)
    assert "self_decoder.layers.0.mixer.qkv_proj.weight" in names(fused)
    assert "self_decoder.layers.0.mixer.q_proj.weight" in names(load_model(tmp_path, fuse=False))
    lazy = load_model(tmp_path, lazy=True)
    toks = tokens(9)
    assert mx.abs(lazy(toks) - load_model(tmp_path, fuse=False)(toks)).max().item() <= 1e-5
