"""What every benchmark shares: timing, the copy-bandwidth yardstick, the machine record."""

import platform
import subprocess
import time
from pathlib import Path

import mlx.core as mx

from clsa_mlx import kernels


def timed(fn, iters):
    """(mean ms per call over `iters` calls in one eval, median ms of single evals)."""
    for _ in range(3):
        mx.eval(fn())
    t0 = time.perf_counter()
    mx.eval([fn() for _ in range(iters)])
    batched = (time.perf_counter() - t0) / iters * 1e3
    singles = []
    for _ in range(max(3, iters // 4)):
        t0 = time.perf_counter()
        mx.eval(fn())
        singles.append((time.perf_counter() - t0) * 1e3)
    singles.sort()
    return batched, singles[len(singles) // 2]


def copy_bandwidth(iters, log2_bytes: int = 30):
    """Best of a few large copies (GB/s counting read + write): elementwise add in bf16
    and fp32, and a strided-to-contiguous copy, of 2**log2_bytes bytes each (1 GiB)."""
    res = {}
    a = mx.random.normal((1 << (log2_bytes - 1),)).astype(mx.bfloat16)
    b = mx.random.normal((1 << (log2_bytes - 2),))
    c = mx.random.normal((1 << (log2_bytes // 2 - 1), 1 << (log2_bytes - log2_bytes // 2))).astype(mx.bfloat16)
    mx.eval(a, b, c)
    for name, fn, nbytes in (
        ("add_bf16", lambda a=a: a + 1, a.nbytes),
        ("add_f32", lambda b=b: b + 1, b.nbytes),
        ("contiguous_of_slice", lambda c=c: mx.contiguous(c[:, 1:]), c.nbytes),
    ):
        ms, _ = timed(fn, iters)
        res[name] = 2 * nbytes / (ms * 1e-3) / 1e9
    del a, b, c
    return max(res.values()), res


def machine():
    info = dict(
        platform=platform.platform(),
        python=platform.python_version(),
        mlx=mx.__version__,
        device=str(mx.default_device()),
        backend=kernels.backend() or "reference",
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or None,
    )
    try:
        import mlx_lm

        info["mlx_lm"] = mlx_lm.__version__
    except Exception:
        pass
    try:
        info["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except Exception:
        pass
    try:
        info["device_info"] = {k: str(v) for k, v in mx.device_info().items()}
    except Exception:
        pass
    return info
