"""Kernels vs references on a GPU (Metal on a Mac, CUDA through MLX's CUDA backend).
Skips where no kernel backend is available; the full sweep is
benchmarks/check_kernels_gpu.py."""

import mlx.core as mx
import numpy as np
import pytest

from clsa_mlx import kernels, sparse

pytestmark = pytest.mark.skipif(kernels.backend() is None, reason="no GPU kernel backend")


@pytest.fixture(autouse=True)
def no_fallback():
    """The dispatch falls back to the references when a kernel fails its self-test; here
    that would compare a reference with itself."""
    yield
    assert not sparse.fallbacks(), sparse.fallbacks()


def ints(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(-3, 4, size=shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("B,L,T,k", [(1, 1, 5, 8), (1, 1, 8, 8), (2, 1, 3001, 64), (1, 3, 70001, 2048), (2, 9, 300, 16)])
def test_route_kernel_exact(dtype, B, L, T, k):
    q, kk = ints((B, L, 64), dtype, 1), ints((B, T + 3, 64), dtype, 2)[:, :T]
    got = sparse.route(q, kk, k, T - L)
    np.testing.assert_array_equal(np.array(got), np.array(sparse.route_ref(q, kk, k, T - L)))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("L,T,k", [(1, 40, 8), (1, 3001, 64), (5, 300, 16), (9, 70001, 2048)])
def test_route_kernel_with_start_exact(dtype, L, T, k):
    # Left-padded batch rows: under k valid positions, none, one chunk's worth, many chunks.
    start = mx.array([0, 3, T - L - 1, T, T // 2, T - 1])
    B = start.shape[0]
    q, kk = ints((B, L, 32), dtype, 5), ints((B, T, 32), dtype, 6)
    got = sparse.route(q, kk, k, T - L, start)
    np.testing.assert_array_equal(np.array(got), np.array(sparse.route_ref(q, kk, k, T - L, start)))


@pytest.mark.parametrize("L", [1, 6])
def test_route_kernel_special_scores(L):
    # NaN (both signs, and from inf - inf), +-inf and -0 order as in route_ref on every backend.
    B, T = 2, 600
    kk = ints((B, T, 4), mx.float32, 7)
    for t, v in {5: float("nan"), 7: float("inf"), 9: -float("inf"), 11: -0.0, 300: -float("nan")}.items():
        kk[:, t] = mx.array([v] * 4)
    q = mx.concatenate([mx.ones((B, L, 2)), -mx.ones((B, L, 2))], axis=-1)
    for k in (1, 4, 64):
        got = sparse.route(q, kk, k, T - L, mx.array([0, 4]))
        np.testing.assert_array_equal(np.array(got), np.array(sparse.route_ref(q, kk, k, T - L, mx.array([0, 4]))))


def test_select_kv_kernel_with_start():
    B, H, T, hd, k = 3, 2, 700, 64, 256
    start = mx.array([0, 600, 699])
    q, kk = ints((B, 1, 32), mx.float16, 7), ints((B, T, 32), mx.float16, 8)
    keys = mx.random.normal((B, H, T, hd)).astype(mx.float16)
    values = mx.random.normal((B, H, T, hd)).astype(mx.float16)
    got, ref = sparse.select_kv(q, kk, keys, values, k, start), sparse.select_kv_ref(q, kk, keys, values, k, start)
    assert all(mx.array_equal(a, b) for a, b in zip(got, ref))


def test_select_kv_kernel():
    B, H, T, hd, k = 2, 4, 5000, 64, 256
    q, kk = ints((B, 1, 128), mx.bfloat16, 3), ints((B, T, 128), mx.bfloat16, 4)
    keys = mx.random.normal((B, H, T + 5, hd)).astype(mx.bfloat16)[:, :, :T]
    values = mx.random.normal((B, H, T + 5, hd)).astype(mx.bfloat16)[:, :, :T]
    ks, vs, idx = sparse.select_kv(q, kk, keys, values, k)
    rk, rv, ridx = sparse.select_kv_ref(q, kk, keys, values, k)
    assert mx.array_equal(ks, rk) and mx.array_equal(vs, rv) and mx.array_equal(idx, ridx)


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-4), (mx.float16, 4e-3), (mx.bfloat16, 3e-2)])
@pytest.mark.parametrize("G", [1, 5])
def test_sparse_attention_kernel(dtype, tol, G):
    B, H, L, T, hd, k = 2, 2, 7, 3000, 128, 256
    q = mx.random.normal((B, H * G, L, hd)).astype(dtype)
    keys = mx.random.normal((B, H, T, hd)).astype(dtype)
    values = mx.random.normal((B, H, T, hd)).astype(dtype)
    idx = sparse.route_ref(mx.random.normal((B, L, 16)), mx.random.normal((B, T, 16)), k, T - L)
    got = sparse.sparse_attention(q, keys, values, idx, hd**-0.5).astype(mx.float32)
    with mx.stream(mx.cpu):  # fp32 on the CPU: MLX CUDA's SDPA may use TF32
        ref = sparse.sparse_attention_ref(
            q.astype(mx.float32), keys.astype(mx.float32), values.astype(mx.float32), idx, hd**-0.5
        )
    assert float(mx.abs(got - ref).max()) <= tol * 4


def test_sparse_attention_kernel_gradients_equal_the_references():
    B, H, G, L, T, hd, k = 1, 2, 5, 7, 3000, 128, 256
    q = mx.random.normal((B, H * G, L, hd))
    keys, values = mx.random.normal((B, H, T, hd)), mx.random.normal((B, H, T, hd))
    idx = sparse.route_ref(mx.random.normal((B, L, 16)), mx.random.normal((B, T, 16)), k, T - L)
    w = mx.random.normal(q.shape)
    loss = lambda f: lambda q, k, v: (f(q, k, v, idx, hd**-0.5) * w).sum()  # noqa: E731
    got = mx.grad(loss(sparse.sparse_attention), argnums=(0, 1, 2))(q, keys, values)
    with mx.stream(mx.cpu):  # fp32 on the CPU: MLX CUDA's SDPA may use TF32
        want = mx.grad(loss(sparse.sparse_attention_ref), argnums=(0, 1, 2))(q, keys, values)
    for a, b in zip(got, want):
        assert float(mx.abs(a - b).max()) <= 2e-3 * max(1.0, float(mx.abs(b).max()))


@pytest.mark.parametrize("rows", [None, 4])
@pytest.mark.parametrize("L", [1, 6])
def test_route_kernel_nine_rows_and_pieces_exact(L, rows, monkeypatch):
    # 9 batch rows pass `start` in device memory (a library of its own); pieces of 4 rows, in
    # constant memory again.
    T, k = 3001, 64
    if rows:
        monkeypatch.setattr(kernels, "_MAX_SCORE_BYTES", 4 * T * rows)
    start = mx.array([0, 3, T - L - 1, T, T // 2, T - 1, 1, 2, 5])
    q, kk = ints((9, L, 32), mx.bfloat16, 9), ints((9, T, 32), mx.bfloat16, 10)
    got = sparse.route(q, kk, k, T - L, start)
    np.testing.assert_array_equal(np.array(got), np.array(sparse.route_ref(q, kk, k, T - L, start)))
