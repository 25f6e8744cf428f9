"""Where one batch-1 decode step's time goes on the host and on the GPU.

    python benchmarks/profile_step.py --config paper-4b --contexts 8192 131072 [--bits 4]

Per architecture and context, medians over `--steps` steps of:
- build_ms: Python building the step's lazy graph (`model(y, cache)`);
- dispatch_ms: `mx.async_eval` encoding and launching it (host, C++);
- wait_ms: what is left until the result is ready (the GPU's share not hidden under dispatch);
- synced_ms: build + dispatch + wait, one step at a time;
- pipelined_ms: mlx-lm's generate loop, which builds step n+1 while the GPU runs step n;
- ops: primitives in the step's graph;
- with --prefill N: prefill tok/s of an N-token prompt and its peak memory above the weights.
Run it under different MLX_* environment variables (benchmarks/gpu_profile.sh) to see which
knob moves the floor; the variables in effect are saved with the results.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from benchmarks.bench_models import ARCHS, CONFIGS, build, filled_cache, prefill_tps, weights_bytes  # noqa: E402
from benchmarks.common import machine  # noqa: E402


def count_ops(out) -> int:
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as f:
        mx.export_to_dot(f, out)
        f.seek(0)
        return f.read().count("shape=rectangle")


def profile(model, context: int, steps: int) -> dict:
    cache = filled_cache(model, context)
    y = mx.array([[1]])
    parts = {k: [] for k in ("build_ms", "dispatch_ms", "wait_ms")}
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        out = model(y, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        for k, a, b in zip(parts, (t0, t1, t2), (t1, t2, t3)):
            parts[k].append((b - a) * 1e3)
    row = {k: float(np.median(v[2:])) for k, v in parts.items()}
    row["synced_ms"] = float(np.median(np.sum([v[2:] for v in parts.values()], axis=0)))
    row["ops"] = count_ops(model(y, cache=cache))
    cache = filled_cache(model, context)
    stamps = [time.perf_counter() for _ in generate_step(mx.array([1]), model, max_tokens=steps, prompt_cache=cache)]
    row["pipelined_ms"] = float(np.median(np.diff(stamps)[2:])) * 1e3
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="cpu-small")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096])
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--bits", type=int, choices=[0, 4, 8], default=0)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prefill", type=int, default=0, help="also time an N-token prefill (0: none)")
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--tag", default="default", help="names this run's environment in the output")
    p.add_argument("--out", type=Path, help="append the result (JSON lines)")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    for arch in args.archs:
        model = build(arch, CONFIGS[args.config], args.bits)
        pre = {}
        if args.prefill:
            prefill_tps(model, 2 * args.prefill_step + 1, args.prefill_step)  # JIT every chunk shape
            tps, peak = prefill_tps(model, args.prefill, args.prefill_step)
            pre = dict(prefill=args.prefill, prefill_tps=tps, prefill_peak_over_weights_gb=(peak - weights_bytes(model)) / 1e9)
        for context in args.contexts:
            row = dict(tag=args.tag, env=env, config=args.config, bits=args.bits or 16, arch=arch, context=context,
                       **pre, **profile(model, context, args.steps))
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(dict(row, machine=machine())) + "\n")
        del model


if __name__ == "__main__":
    main()
