"""The kernels of metal/ against their references on the CPU, through the SIMT emulator
(tests/simt.py): the same comparisons as tests/test_kernels_gpu.py at CPU sizes, a fuzz over
shapes, padding, dtypes and special scores, the dispatch and its self-test, a model's
prefill and decode through the kernels, and bugs injected into the kernel text that the
emulator must catch."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
import simt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clsa_mlx import kernels, sparse

pytestmark = pytest.mark.skipif(simt.compiler() is None, reason="no C++ compiler")
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


@pytest.fixture(autouse=True)
def emulated():
    with simt.emulated() as made:
        yield made


def ints(shape, dtype, seed, lo=-3, hi=4):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(lo, hi, size=shape).astype(np.float32)).astype(dtype)


def assert_route_equal(q, kk, k, offset, start=None):
    got = kernels.route(q, kk, k, offset, "simt", start)
    np.testing.assert_array_equal(np.array(got), np.array(sparse.route_ref(q, kk, k, offset, start)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,L,T,k", [(1, 1, 5, 8), (1, 1, 8, 8), (2, 1, 3001, 64), (1, 3, 2049, 300), (2, 9, 300, 16), (1, 5, 700, 700)]
)
def test_route_exact(dtype, B, L, T, k):
    q, kk = ints((B, L, 64), dtype, 1), ints((B, T + 3, 64), dtype, 2)[:, 3:]  # a strided view
    assert_route_equal(q, kk, k, T - L)


@pytest.mark.parametrize("T", [256 * 256, 256 * 256 + 1])
def test_route_exact_at_the_chunk_limit(T, monkeypatch):
    # 256 chunks of 256 keys in one select group; one more key: 129 chunks of 512.
    monkeypatch.setattr(kernels, "_MIN_CHUNK", 256)  # the limit at 64K keys, not 256K
    assert kernels._chunking(T) == ((256, 256) if T == 256 * 256 else (512, 129))
    q, kk = ints((1, 1, 32), mx.float16, 3), ints((1, T, 32), mx.float16, 4)
    assert_route_equal(q, kk, 2048, T - 1)


@pytest.mark.parametrize("B,L,T,rows", [(5, 1, 3001, 3), (2, 9, 1500, 7), (3, 6, 2100, 12), (9, 2, 700, 2)])
def test_route_in_pieces_with_few_chunks_exact(B, L, T, rows, monkeypatch):
    # Pieces of few rows (batch rows split, query rows split, fused and matmul pieces), one or
    # two chunks a row: what a many-row call at a long context runs, at CPU sizes.
    monkeypatch.setattr(kernels, "_MAX_SCORE_BYTES", 4 * T * rows)
    monkeypatch.setattr(kernels, "_GROUPS", 5)  # 1 to 3 chunks a row
    monkeypatch.setattr(kernels, "_SCORE_KEYS", 300)  # scoring groups a chunk that do not divide it
    assert len(kernels.route_pieces(B, L, T)) > 1
    start = mx.array([0, 7, T - L - 3, T, T // 2, 1, 2, 3, 4][:B])
    q, kk = ints((B, L, 32), mx.bfloat16, 11, -40, 41), ints((B, T, 32), mx.bfloat16, 12, -40, 41)
    assert_route_equal(q, kk, 300, T - L, start)
    assert_route_equal(q, kk, 300, T - L)


def test_route_plan_counts_what_the_kernels_allocate(emulated):
    # route_plan's zero-filled bytes and launches are the ones the dispatch makes.
    B, L, T, k = 2, 6, 2100, 64
    for shape in ((B, L, T), (B, 1, T)):
        for kern in emulated.values():
            kern.launches = 0
        filled = []
        real = simt.Kernel.__call__

        def counting(self, inputs, output_shapes, output_dtypes, init_value=None, **kw):
            if init_value is not None:
                filled.append(sum(4 * int(np.prod(s)) for s in output_shapes))
            return real(self, inputs, output_shapes, output_dtypes, init_value=init_value, **kw)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(simt.Kernel, "__call__", counting)
            q, kk = ints((shape[0], shape[1], 32), mx.float16, 1), ints((B, T, 32), mx.float16, 2)
            kernels.route(q, kk, k, T - 1, "simt")
        (piece,) = kernels.route_plan(*shape, k)["pieces"]
        assert sum(filled) == piece["fill_bytes"] and len(filled) == piece["fills"]
        assert sum(kern.launches for kern in emulated.values()) == piece["launches"] - (not piece["fused"])


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("L,T,k", [(1, 40, 8), (1, 3001, 64), (5, 300, 16), (9, 1500, 256)])
def test_route_with_start_exact(dtype, L, T, k):
    # Left-padded rows: under k valid positions, none, one chunk's worth, many chunks.
    start = mx.array([0, 3, T - L - 1, T, T // 2, T - 1])
    B = start.shape[0]
    assert_route_equal(ints((B, L, 32), dtype, 5), ints((B, T, 32), dtype, 6), k, T - L, start)


def test_special_scores_order_like_the_reference():
    # NaN of either sign, +-inf, -0 next to +0: the kernels and route_ref share one order.
    B, T = 2, 600
    kk = ints((B, T, 4), mx.float32, 7)
    rows = {5: float("nan"), 7: float("inf"), 9: -float("inf"), 11: -0.0, 300: float("nan"), 301: -float("inf")}
    for t, v in rows.items():
        kk[:, t] = mx.array([v] * 4)
    kk[1, 13] = mx.array([-float("nan")] * 4)
    for L in (1, 6):  # scores in the kernel, and from a matmul
        q = mx.concatenate([mx.ones((B, L, 2)), -mx.ones((B, L, 2))], axis=-1) * mx.arange(1, L + 1)[:, None]
        for k in (1, 4, 64):
            assert_route_equal(q, kk, k, T - L, mx.array([0, 4]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    L=st.sampled_from([1, 2, 4, 5, 8]),
    T=st.integers(1, 1300),
    k=st.integers(1, 300),
    D=st.sampled_from([4, 32, 40, 64]),
    dtype=st.sampled_from(DTYPES),
    values=st.sampled_from(["ties", "spread", "special"]),
    pad=st.lists(st.integers(-2, 1400), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_route_fuzz(B, L, T, k, D, dtype, values, pad, seed):
    L = min(L, T)
    q = ints((B, L, D), dtype, seed, *((-3, 4) if values != "spread" else (-40, 41)))
    kk = ints((B, T, D), dtype, seed + 1, *((-3, 4) if values != "spread" else (-40, 41)))
    if values == "special":
        rng = np.random.default_rng(seed)
        specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0], np.float32)
        kk = np.array(kk.astype(mx.float32))
        hit = rng.random(kk.shape) < 0.01
        kk[hit] = rng.choice(specials, size=int(hit.sum()))
        kk = mx.array(kk).astype(dtype)
    start = mx.array(pad[:B]) if seed % 2 else None
    assert_route_equal(q, kk, k, T - L, start)


@pytest.mark.parametrize("start", [None, [0, 600, 699]])
def test_select_kv_exact(start):
    B, H, T, hd, k = 3, 2, 700, 64, 256
    start = None if start is None else mx.array(start)
    q, kk = ints((B, 1, 32), mx.float16, 8), ints((B, T, 32), mx.float16, 9)
    keys = mx.random.normal((B, H, T + 5, hd), key=mx.random.key(1)).astype(mx.float16)[:, :, 5:]
    values = mx.random.normal((B, H, T, hd), key=mx.random.key(2)).astype(mx.float16)
    got = kernels.select_kv(q, kk, keys, values, k, "simt", start)
    want = sparse.select_kv_ref(q, kk, keys, values, k, start)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 2e-6), (mx.float16, 2e-3), (mx.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("G,HD,k", [(1, 64, 24), (2, 64, 300), (5, 128, 24), (8, 256, 100)])
def test_sparse_attention_close(dtype, tol, G, HD, k):
    # k = 100 and 300: index tiles over several warps, padding inside a tile and whole padded tiles.
    B, H, L, T = 2, 2, 5, 600
    q = mx.random.normal((B, H * G, L, HD), key=mx.random.key(3)).astype(dtype)
    keys = mx.random.normal((B, H, T + 4, HD), key=mx.random.key(4)).astype(dtype)[:, :, 4:]
    values = mx.random.normal((B, H, T, HD), key=mx.random.key(5)).astype(dtype)
    start = mx.array([0, T - L - 3 - k // 2])  # batch row 1: under k positions, -1 slots
    idx = sparse.route_ref(ints((B, L, 8), mx.float32, 3), ints((B, T, 8), mx.float32, 4), k, T - L, start)
    got = kernels.sparse_attention(q, keys, values, idx, HD**-0.5, "simt").astype(mx.float32)
    f32 = [a.astype(mx.float32) for a in (q, keys, values)]
    want = sparse.sparse_attention_ref(*f32, idx, HD**-0.5)
    assert float(mx.abs(got - want).max()) <= tol


def test_dispatch_and_self_test_use_the_kernels(emulated):
    q, kk = ints((2, 1, 32), mx.bfloat16, 1), ints((2, 900, 32), mx.bfloat16, 2)
    keys = values = ints((2, 2, 900, 64), mx.bfloat16, 3)
    sparse.route(q, kk, 64, 899)
    sparse.select_kv(q, kk, keys, values, 64)
    idx = sparse.route_ref(ints((2, 3, 32), mx.bfloat16, 4), kk, 16, 897)
    sparse.sparse_attention(ints((2, 4, 3, 64), mx.bfloat16, 5), keys, values, idx, 0.125)
    assert not sparse.fallbacks()
    assert {n for n, kern in emulated.items() if kern.launches} >= set(kernels.KERNELS) - {"route_hist0"}


def test_self_test_builds_every_library_variant_a_call_builds(monkeypatch):
    # MLX builds a separate library when `start` has under 8 elements (constant memory): each
    # variant a call launches (pieces of a many-row call included) must have run in a probe first.
    monkeypatch.setattr(sparse, "_verdicts", {})
    monkeypatch.setattr(kernels, "_MAX_SCORE_BYTES", 4 * 600 * 20)  # 20 rows a piece at T = 600
    made, probing = kernels._kernel, []
    launched = {True: set(), False: set()}  # in a probe or not -> {(kernel, start in constant memory)}

    def recording(be, name):
        def launch(inputs, **kw):
            if "start" in kernels.KERNELS[name][1]:
                launched[bool(probing)].add((name, inputs[kernels.KERNELS[name][1].index("start")].size < 8))
            return made(be, name)(inputs=inputs, **kw)

        return launch

    def probe(*a, **kw):
        probing.append(1)
        try:
            return self_test(*a, **kw)
        finally:
            probing.pop()

    self_test = sparse._self_test
    monkeypatch.setattr(kernels, "_kernel", recording)
    monkeypatch.setattr(sparse, "_self_test", probe)
    T = 600
    for B, L in ((2, 1), (9, 1), (30, 1), (2, 6), (9, 3), (3, 30)):  # (30, 1): pieces of 20 and 10 rows
        q, kk = ints((B, L, 32), mx.float16, B), ints((B, T, 32), mx.float16, L)
        sparse.route(q, kk, 64, T - L)
        if L == 1:
            sparse.select_kv(q, kk, ints((B, 2, T, 64), mx.float16, 3), ints((B, 2, T, 64), mx.float16, 4), 64)
    assert not sparse.fallbacks()
    assert launched[False] <= launched[True]
    assert {c for _, c in launched[False]} == {True, False}


def test_model_through_the_kernels_equals_the_references(emulated):
    # The shipped model's dims (index 32, head 64, G = 2): a prefill past k, then decode steps.
    from test_kernel_fallback import run_model

    dims = dict(dim=128, n_attn_heads=2, n_attn_kv_heads=1, index_head_dim=32, index_topk=16)
    got = run_model(**dims)
    assert all(emulated[n].launches for n in ("route_hist0", "sparse_attention", "route_score", "gather_kv"))
    assert not sparse.fallbacks()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "backend", lambda: None)  # the references
        want = run_model(**dims)
    for a, b in zip(got, want):
        assert float(mx.abs(a - b).max()) < 1e-4


def test_prepare_builds_what_the_model_uses(monkeypatch, emulated):
    # After prepare() with the model's dims, the model's prefill and decode run the kernels and
    # start no self-test.
    from test_kernel_fallback import run_model

    monkeypatch.setattr(sparse, "_verdicts", {})
    assert sparse.prepare(mx.float32, 32, mx.float32, 64, 2) == {}
    prepared = set(sparse._verdicts)
    for kern in emulated.values():
        kern.launches = 0
    run_model(dim=128, n_attn_heads=2, n_attn_kv_heads=1, index_head_dim=32, index_topk=16)
    assert set(sparse._verdicts) == prepared and len(prepared) == 4
    assert all(emulated[n].launches for n in ("route_hist0", "route_score", "gather_kv", "sparse_attention"))


# The emulator must fail on the bugs it exists to find: each mutant of the kernel text below
# compiles, and either answers wrong (fibers between barriers run in a random order) or
# stops at a barrier or SIMD operation not every thread reaches, or at an index out of bounds.
MUTANTS = {
    "scan without its first barrier": ("common.h", "ws[warp] = x + v;\n  BARRIER();", "ws[warp] = x + v;"),
    "histogram read before the barrier": ("route_hist.inc", "  }\n  BARRIER();\n  if (LEVEL", "  }\n  if (LEVEL"),
    "barrier in a branch": ("route_write.inc", "      out[ca + (ex >> 16)", "      BARRIER();\n      out[ca + (ex >> 16)"),
    "padding one slot too far": ("route_write.inc", "s < k; s += TG) out[s] = -1;", "s <= k; s += TG) out[s] = -1;"),
    "SIMD sum in some lanes": ("route_score.inc", "= SIMD_SUM(s[u]);", "= lane < 16u ? SIMD_SUM(s[u]) : 0.0f;"),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_emulator_catches_injected_bugs(mutant, tmp_path, monkeypatch):
    file, old, new = MUTANTS[mutant]
    shutil.copytree(kernels.SOURCE_DIR, tmp_path / "metal")
    text = (tmp_path / "metal" / file).read_text()
    assert text.count(old) == 1, mutant
    (tmp_path / "metal" / file).write_text(text.replace(old, new))
    monkeypatch.setattr(simt, "SOURCES", tmp_path / "metal")
    T, start = 3001, mx.array([0, 5, 2000])
    q, kk = ints((3, 1, 64), mx.float32, 1), ints((3, T, 64), mx.float32, 2, -40, 41)
    try:
        got = kernels.route(q, kk, 300, T - 1, "simt", start)
    except RuntimeError as e:
        assert any(w in str(e) for w in ("not reached by every", "different barriers", "out of bounds")), e
        return
    assert not mx.array_equal(got, sparse.route_ref(q, kk, 300, T - 1, start))
