"""The pure-MLX references in clsa_mlx.sparse against naive numpy, on CPU."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clsa_mlx import kernels, sparse

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def np_f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def naive_route(q, kk, k, offset, start=None):
    """Top-k by sorting (score desc, position asc) over positions start[b]..offset + l,
    output ascending, -1 padded."""
    q, kk = np_f32(q).astype(np.float64), np_f32(kk).astype(np.float64)
    B, L, _ = q.shape
    T = kk.shape[1]
    start = np.zeros(B, dtype=np.int64) if start is None else np.maximum(np.array(start), 0)
    out = np.full((B, L, k), -1, dtype=np.int64)
    for b in range(B):
        for l in range(L):
            lo, n = start[b], min(T, offset + l + 1)
            pos = np.arange(lo, max(lo, n))
            s = kk[b, pos] @ q[b, l]
            order = pos[np.lexsort((pos, -s))[: min(k, len(pos))]]
            sel = np.sort(order)
            out[b, l, : len(sel)] = sel
    return out


def naive_attention(q, keys, values, idx, scale):
    q, keys, values = (np_f32(x).astype(np.float64) for x in (q, keys, values))
    idx = np.array(idx)
    B, Hq, L, hd = q.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            for l in range(L):
                sel = idx[b, l][idx[b, l] >= 0]
                kk, vv = keys[b, h // G, sel], values[b, h // G, sel]
                s = kk @ q[b, h, l] * scale
                p = np.exp(s - s.max())
                out[b, h, l] = (p / p.sum()) @ vv
    return out


def int_inputs(shape, dtype, lo=-3, hi=4, seed=0):
    """Small integers: exact in every dtype, dot products exact in fp32, many ties."""
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(lo, hi, size=shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,L,T,k,offset",
    [
        (1, 1, 5, 8, 4),  # T < k
        (1, 1, 8, 8, 7),  # T == k
        (2, 1, 301, 16, 300),  # odd T, batch > 1
        (1, 7, 57, 9, 50),  # several rows, causal
        (2, 33, 33, 4, 0),  # prefill: rows see 1..33 positions
        (1, 3, 1000, 64, 997),
    ],
)
def test_route_ref_matches_naive_exact(dtype, B, L, T, k, offset):
    d = 16
    q = int_inputs((B, L, d), dtype, seed=1)
    kk = int_inputs((B, T, d), dtype, seed=2)
    got = np.array(sparse.route_ref(q, kk, k, offset))
    assert got.dtype == np.int32 and got.shape == (B, L, k)
    np.testing.assert_array_equal(got, naive_route(q, kk, k, offset))


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_ref_all_ties(dtype):
    # Every score equal: the k lowest positions win.
    q = mx.ones((2, 1, 8), dtype=dtype)
    kk = mx.ones((2, 100, 8), dtype=dtype)
    got = np.array(sparse.route_ref(q, kk, 10, 99))
    np.testing.assert_array_equal(got, np.broadcast_to(np.arange(10), (2, 1, 10)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_route_ref_random_scores(dtype):
    # Random normal inputs: compare the selected score sets (fp32 rounding may reorder
    # near-ties between numpy and MLX).
    B, L, T, k, d = 2, 2, 517, 32, 24
    mx.random.seed(3)
    q = mx.random.normal((B, L, d)).astype(dtype)
    kk = mx.random.normal((B, T, d)).astype(dtype)
    got = np.array(sparse.route_ref(q, kk, k, T - L))
    want = naive_route(q, kk, k, T - L)
    s = np.einsum("bld,btd->blt", np_f32(q), np_f32(kk))
    for b in range(B):
        for l in range(L):
            assert np.all(np.diff(got[b, l]) > 0)
            np.testing.assert_allclose(
                np.sort(s[b, l][got[b, l]]), np.sort(s[b, l][want[b, l]]), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_kv_ref(dtype):
    B, Hkv, T, hd, k, d = 2, 3, 40, 8, 16, 8
    q = int_inputs((B, 1, d), dtype, seed=4)
    kk = int_inputs((B, T, d), dtype, seed=5)
    keys = mx.random.normal((B, Hkv, T, hd)).astype(dtype)
    values = mx.random.normal((B, Hkv, T, hd)).astype(dtype)
    ks, vs, _ = sparse.select_kv_ref(q, kk, keys, values, k)
    idx = naive_route(q, kk, k, T - 1)[:, 0]
    for b in range(B):
        np.testing.assert_array_equal(np_f32(ks[b]), np_f32(keys[b])[:, idx[b]])
        np.testing.assert_array_equal(np_f32(vs[b]), np_f32(values[b])[:, idx[b]])


TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,L,T,k", [(1, 4, 4, 3, 50, 8), (2, 10, 2, 5, 37, 16)])
def test_sparse_attention_ref(dtype, B, Hq, Hkv, L, T, k):
    hd = 16
    mx.random.seed(6)
    q = mx.random.normal((B, Hq, L, hd)).astype(dtype)
    keys = mx.random.normal((B, Hkv, T, hd)).astype(dtype)
    values = mx.random.normal((B, Hkv, T, hd)).astype(dtype)
    qi = mx.random.normal((B, L, 8))
    ki = mx.random.normal((B, T, 8))
    idx = sparse.route_ref(qi, ki, k, T - L)  # last rows of a sequence
    scale = hd**-0.5
    got = np_f32(sparse.sparse_attention_ref(q, keys, values, idx, scale))
    want = naive_attention(q, keys, values, idx, scale)
    np.testing.assert_allclose(got, want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "L,T,k,offset,start",
    [
        (1, 40, 8, 39, [0, 3, 35, 39]),  # decode: one row under k valid positions, one with 1
        (5, 60, 8, 55, [0, 50, 52, 59]),  # several rows; the last batch row sees 0..5 positions
        (9, 9, 4, 0, [0, 2, 6, 9]),  # prefill of a left-padded batch; a fully padded row
        (3, 1000, 64, 997, [0, 1, 500, 990]),
    ],
)
def test_route_ref_with_start_matches_naive(dtype, L, T, k, offset, start):
    # Batch rows with left padding: positions below start[b] are never selected.
    B, d = len(start), 8
    q = int_inputs((B, L, d), dtype, seed=11)
    kk = int_inputs((B, T, d), dtype, seed=12)
    got = np.array(sparse.route_ref(q, kk, k, offset, mx.array(start)))
    np.testing.assert_array_equal(got, naive_route(q, kk, k, offset, start))
    for b, lo in enumerate(start):
        sel = got[b][got[b] >= 0]
        assert (sel >= lo).all()


def test_select_kv_ref_with_start_zeroes_unfilled_slots():
    B, H, T, hd, k = 2, 2, 20, 4, 8
    q, kk = mx.random.normal((B, 1, 6)), mx.random.normal((B, T, 6))
    keys, values = mx.random.normal((B, H, T, hd)), mx.random.normal((B, H, T, hd))
    ks, vs, idx = sparse.select_kv_ref(q, kk, keys, values, k, mx.array([0, 15]))
    idx = np.array(idx)
    np.testing.assert_array_equal(idx[1], [15, 16, 17, 18, 19, -1, -1, -1])
    np.testing.assert_array_equal(np.array(ks)[1, :, :5], np.array(keys)[1, :, 15:])
    assert not np.array(vs)[1, :, 5:].any()
    np.testing.assert_array_equal(np.array(vs)[0], np.array(values)[0][:, idx[0]])


def test_sparse_attention_ref_padded_rows():
    # Early rows of a prefill see fewer than k positions: -1 padding is ignored.
    B, Hq, Hkv, L, hd, k = 1, 2, 1, 6, 8, 4
    q = mx.random.normal((B, Hq, L, hd))
    keys = mx.random.normal((B, Hkv, L, hd))
    values = mx.random.normal((B, Hkv, L, hd))
    idx = sparse.route_ref(mx.random.normal((B, L, 4)), mx.random.normal((B, L, 4)), k, 0)
    assert (np.array(idx)[0, 0] == [0, -1, -1, -1]).all()
    got = np.array(sparse.sparse_attention_ref(q, keys, values, idx, 0.3))
    tol = 1e-5 if mx.default_device() == mx.cpu else 2e-3  # fp32 matmuls on the H200 are TF32: 1e-3 off here
    np.testing.assert_allclose(got, naive_attention(q, keys, values, idx, 0.3), rtol=tol, atol=tol)


def test_dispatch_on_cpu_uses_references(monkeypatch):
    assert kernels.backend() is None  # no GPU in the test suite
    q = int_inputs((1, 2, 8), mx.float32, seed=7)
    kk = int_inputs((1, 30, 8), mx.float32, seed=8)
    np.testing.assert_array_equal(
        np.array(sparse.route(q, kk, 5, 28)), np.array(sparse.route_ref(q, kk, 5, 28))
    )
    monkeypatch.setenv("CLSA_MLX_REFERENCE", "1")
    assert kernels.backend() is None


def test_chunking_bounds():
    for T in [1, 255, 256, 257, 8192, 131072, 10**6, 1 << 20, 3 * 10**7]:
        chunk, C = kernels._chunking(T)
        assert chunk % kernels._TG == 0 and 1 <= C <= kernels._MAX_CHUNKS and chunk * C >= T


def test_kernel_sources_found():
    for f in ["common.h", "dialect_metal.h", "dialect_cuda.h"] + [v[0] for v in kernels.KERNELS.values()]:
        assert (kernels.SOURCE_DIR / f).is_file(), f


def test_route_splits_many_rows(monkeypatch):
    # Many-row calls are cut into pieces along L with shifted offsets; the pieces
    # together must equal one call (checked with the reference standing in for the
    # kernel passes).
    monkeypatch.setattr(kernels, "_MAX_SCORE_BYTES", 40 * 4 * 5)  # 5 rows of T=40 per piece
    q = int_inputs((2, 23, 8), mx.float32, seed=9)
    kk = int_inputs((2, 40, 8), mx.float32, seed=10)
    calls = []

    def rows(q_, k_, kk_, off, be, start):
        calls.append(q_.shape[1])
        return sparse.route_ref(q_, k_, kk_, off, start)

    monkeypatch.setattr(kernels, "_route_rows", rows)
    got = kernels.route(q, kk, 6, 17, "cuda")
    assert max(calls) <= 5 and sum(calls) == 23
    np.testing.assert_array_equal(np.array(got), np.array(sparse.route_ref(q, kk, 6, 17)))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_route_ref_property_left_padded_batches(data):
    # Any batch of left-padded rows: the reference equals the naive sort, never picks a padded or
    # future position, and fills min(k, valid) slots.
    B = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(1, 70))
    L = data.draw(st.integers(1, min(T, 6)))
    k = data.draw(st.integers(1, 40))
    offset = T - L
    start = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    dtype = data.draw(st.sampled_from(DTYPES))
    seed = data.draw(st.integers(0, 2**16))
    q, kk = int_inputs((B, L, 4), dtype, seed=seed), int_inputs((B, T, 4), dtype, seed=seed + 1)
    got = np.array(sparse.route_ref(q, kk, k, offset, mx.array(start)))
    np.testing.assert_array_equal(got, naive_route(q, kk, k, offset, start))
    for b in range(B):
        for l in range(L):
            sel = got[b, l][got[b, l] >= 0]
            assert len(sel) == max(0, min(k, offset + l + 1 - start[b]))
            assert ((sel >= start[b]) & (sel <= offset + l)).all()
