"""A few small kernel-vs-reference cases, to fail fast before the full sweep."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import mlx.core as mx  # noqa: E402
from clsa_mlx import kernels, sparse  # noqa: E402

print("backend", kernels.backend(), mx.default_device())
for T, k, L in [(5, 8, 1), (300, 16, 1), (5000, 64, 2), (70000, 2048, 1), (40, 8, 9)]:
    q = mx.array(np.random.randint(-3, 4, (1, L, 128)).astype(np.float32)).astype(mx.bfloat16)
    kk = mx.array(np.random.randint(-3, 4, (1, T, 128)).astype(np.float32)).astype(mx.bfloat16)
    try:
        g = np.array(sparse.route(q, kk, k, T - L))
        r = np.array(sparse.route_ref(q, kk, k, T - L))
        print("route", T, k, L, "equal", (g == r).all(), g[0, 0, :8], r[0, 0, :8], flush=True)
    except Exception as e:
        print("route", T, k, "ERROR", repr(e)[:3000], flush=True)
q = mx.random.normal((1, 10, 4, 64)).astype(mx.float16)
keys = mx.random.normal((1, 2, 500, 64)).astype(mx.float16)
vals = mx.random.normal((1, 2, 500, 64)).astype(mx.float16)
idx = sparse.route_ref(mx.random.normal((1, 4, 16)), mx.random.normal((1, 500, 16)), 64, 496)
try:
    g = sparse.sparse_attention(q, keys, vals, idx, 0.125)
    r = sparse.sparse_attention_ref(q, keys, vals, idx, 0.125)
    print("attention max err", float(mx.abs(g.astype(mx.float32) - r.astype(mx.float32)).max()), flush=True)
except Exception as e:
    print("attention ERROR", repr(e)[:3000], flush=True)
