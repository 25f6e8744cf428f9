"""Batched decode: throughput and per-sequence latency against batch size, as a server runs it.

    python benchmarks/bench_batch.py --config paper-4b --contexts 32768 131072 --long 1048576
    python benchmarks/bench_batch.py --config micro --contexts 512 --batches 1 2 4   (CPU check)

Every architecture decodes through mlx-lm's `BatchGenerator` (what `mlx_lm.server` and
`batch_generate` run): the Transformer is mlx-lm's Llama, YOCO and CLSA are clsa_mlx models of
the same configuration (random bf16 weights). B sequences of `context` tokens each (random keys
and values: decode cost does not depend on them) are inserted as prompt caches with a one-token
prompt, merged by mlx-lm into its batch caches, and decoded; the figure is the median step.
Models are loaded one at a time, so each has the whole device. Batch sizes grow until the next
one would not fit (estimated: weights + one source cache + the merged batch cache twice, since
mlx-lm's BatchKVCache copies itself when it grows) or fails; the last that ran is the largest
batch the architecture holds. `--long` contexts run for YOCO and CLSA only. Writes
bench_batch_<config>.json and .png with machine, versions and commit.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import BatchGenerator  # noqa: E402

from benchmarks.bench_models import ARCHS, CONFIGS, build, filled_cache, weights_bytes  # noqa: E402
from benchmarks.common import copy_bandwidth, machine  # noqa: E402

GB = 1e9


def device_bytes(default_gb: float) -> float:
    info = mx.device_info()
    return float(info.get("memory_size") or info.get("total_memory") or default_gb * GB)


def read_per_seq(arch, model, cache) -> float:
    """Cache bytes one decode step reads per sequence: the Transformer all of its KV; YOCO the
    global K/V once per cross layer; CLSA the index keys plus top-k K/V rows. Window caches too."""
    n_self = len(model.layers) // 2 if arch != "transformer" else 0
    total = sum(c.nbytes for c in cache)
    if arch == "transformer":
        return total
    window = sum(c.nbytes for c in cache[:n_self])
    kv = cache[n_self].nbytes
    if arch == "yoco":
        return window + kv * n_self
    a = model.args
    return window + cache[n_self + 1].nbytes + a.index_topk * 2 * a.n_attn_kv_heads * a.head_dim * 2


def decode_step_ms(model, source, B: int, steps: int):
    """Median ms per BatchGenerator step for B copies of the `source` prompt cache."""
    gen = BatchGenerator(model, max_tokens=steps + 100, completion_batch_size=B, prefill_batch_size=B)
    uids = gen.insert([[1]] * B, caches=[source] * B)  # mlx-lm merges them into one batch cache
    stamps = []
    while len(stamps) < steps + 4:
        gen.next()
        stamps.append(time.perf_counter())
    gen.remove(uids)  # leave without mlx-lm extracting B caches for the answers
    gen.close()
    return float(np.median(np.diff(stamps)[2:]) * 1e3)


def run_arch(arch, cfg, contexts, batches, steps, budget, bandwidth, rows, out):
    model = build(arch, cfg, 0)
    wbytes = weights_bytes(model)
    for context in contexts:
        source = filled_cache(model, context, room=0)
        seq = sum(c.nbytes for c in source)
        reads = read_per_seq(arch, model, source)
        for B in batches:
            row = dict(arch=arch, context=context, batch=B, cache_gb_per_seq=seq / GB)
            need = wbytes + seq * (1 + 2 * B)
            if need > budget:
                rows.append(dict(row, fits=False, estimated_gb=need / GB))
                print(f"{arch:12s} {context:>8d} B={B:<4d} does not fit (estimated {need / GB:.0f} GB)", flush=True)
                break
            mx.reset_peak_memory()
            try:
                ms = decode_step_ms(model, source, B, steps)
            except Exception as e:  # out of memory or a launch limit: record, stop growing B
                rows.append(dict(row, fits=False, error=repr(e)[:500]))
                print(f"{arch:12s} {context:>8d} B={B:<4d} failed: {e!r}"[:300], flush=True)
                save(out, rows)  # a CUDA fault poisons the process: keep what ran
                break
            step_bytes = wbytes + B * reads
            rows.append(dict(row, fits=True, step_ms=ms, tok_s=B * 1e3 / ms, peak_gb=mx.get_peak_memory() / GB,
                             bytes_per_step_gb=step_bytes / GB,
                             roofline_ms=step_bytes / bandwidth * 1e3 if bandwidth else None))
            print(f"{arch:12s} {context:>8d} B={B:<4d} {ms:8.2f} ms/step {B * 1e3 / ms:9.0f} tok/s "
                  f"peak {mx.get_peak_memory() / GB:6.1f} GB", flush=True)
            mx.clear_cache()
            save(out, rows)
        del source
        mx.clear_cache()
    del model
    mx.clear_cache()


def summarize(rows):
    ran = [r for r in rows if r.get("fits")]
    tps = {(r["arch"], r["context"], r["batch"]): r["tok_s"] for r in ran}
    s = {}
    for context in sorted({r["context"] for r in ran}):
        best = {}
        for arch in ARCHS:
            mine = [r for r in ran if r["arch"] == arch and r["context"] == context]
            if mine:
                top = max(mine, key=lambda r: r["batch"])
                stopped = any(r["arch"] == arch and r["context"] == context and not r.get("fits") for r in rows)
                best[arch] = dict(largest_batch=top["batch"], tok_s=top["tok_s"],
                                  limited_by="memory or failure" if stopped else "the batch sizes tried")
        s[context] = dict(largest=best)
        for B in (1, 8, 32):
            t, y, c = (tps.get((a, context, B)) for a in ("transformer", "yoco", "clsa"))
            if c and t:
                s[context][f"clsa_over_transformer_B{B}"] = c / t
            if c and y:
                s[context][f"clsa_over_yoco_B{B}"] = c / y
        if "clsa" in best and "transformer" in best:
            s[context]["clsa_largest_over_transformer_largest"] = best["clsa"]["tok_s"] / best["transformer"]["tok_s"]
    return s


def save(out, rows, info=None):
    data = json.loads(out.read_text()) if out.exists() and info is None else dict(machine=info)
    data.update(rows=rows, summary=summarize(rows))
    out.write_text(json.dumps(data, indent=1))


def plot(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(out.read_text())
    ran = [r for r in data["rows"] if r.get("fits")]
    contexts = sorted({r["context"] for r in ran})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for color, arch in enumerate(ARCHS):
            mine = sorted((r["batch"], r["tok_s"]) for r in ran if r["arch"] == arch and r["context"] == context)
            if mine:
                ax.plot(*zip(*mine), marker="o", label=arch, color=f"C{color}")
        ax.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="decode tok/s (whole batch)",
               title=f"{context:,}-token context")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = data["machine"]
    fig.suptitle(f"BatchGenerator decode, {m.get('gpu') or m['device']}, mlx {m['mlx']}, commit {m.get('commit')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="paper-4b", choices=list(CONFIGS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--long", type=int, nargs="*", default=[], help="contexts for YOCO and CLSA only")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 13, 16, 32, 64, 128, 192, 256])
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--mem-gb", type=float, default=128.0, help="device memory if MLX does not report it")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out_dir) / f"bench_batch_{args.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine()
    budget = 0.92 * device_bytes(args.mem_gb)
    bandwidth = copy_bandwidth(5, 28)[0] * GB if mx.default_device() == mx.gpu else None
    info.update(config=args.config, budget_gb=budget / GB, copy_GBps=bandwidth / GB if bandwidth else None)
    rows = []
    save(out, rows, info)
    for arch in args.archs:
        contexts = args.contexts + (args.long if arch != "transformer" else [])
        run_arch(arch, CONFIGS[args.config], contexts, args.batches, args.steps, budget, bandwidth, rows, out)
    save(out, rows)
    plot(out)
    print(json.dumps(summarize(rows), indent=1))


if __name__ == "__main__":
    main()
