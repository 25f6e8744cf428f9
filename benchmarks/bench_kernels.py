"""Routing and sparse-attention kernels vs MLX-op baselines, and vs copy bandwidth.

    python benchmarks/bench_kernels.py [--out-dir DIR] [--T 8192,32768,...] [--iters 20]

Decode routing (B=1, one query row, d_idx=128, k=2048, bf16):
  kernel            clsa_mlx.kernels.route (radix select, 5 launches)
  argpartition      scores matmul + mx.argpartition + mx.sort of the k indices
  topk_ref          clsa_mlx.sparse.route_ref (mx.topk threshold + cumsum compaction)
select_kv (routing + gather of K/V rows, Hkv=8, hd=128): kernel vs argpartition + take.
Batched decode routing (B=32, T <= 128K): kernel vs argpartition.
Sparse attention (B=1, Hq=20, Hkv=4, hd=128, 16, 32 and to 128K keys 256 query rows, k=2048):
kernel vs the reference (masked dense SDPA over all T keys), the data for a dispatch rule between
the two in terms of selected fraction k / T and rows L.
--tree DIR times DIR's kernels (another checkout, e.g. the previous commit's) with this script,
so before and after run the same measurements.
Times are per call, averaged over `iters` calls evaluated together (one sync), so
they measure GPU time rather than per-eval launch/sync overhead; `*_sync_ms` is one
call with its own eval. Bandwidth: bytes the kernel must read / time, against the
measured bandwidth of a large elementwise copy (read + write).
Writes bench_kernels.json and bench_kernels.png with machine, versions and date.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--tree" in sys.argv:  # another checkout's kernels, timed by this script
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()))

import mlx.core as mx  # noqa: E402

from benchmarks.common import copy_bandwidth, machine, timed  # noqa: E402
from clsa_mlx import kernels, sparse  # noqa: E402

BATCH = 32


def argpartition_route(q, kidx, k):
    s = sparse.index_scores(q, kidx)
    return mx.sort(mx.argpartition(-s, kth=k - 1, axis=-1)[..., :k], axis=-1).astype(mx.int32)


def routing_fns(q, kidx, keys, values, k, be):
    """The routing and select_kv calls timed per T: MLX ops, the reference and the kernels."""
    T = kidx.shape[1]
    fns = {
        "route_argpartition": lambda: argpartition_route(q, kidx, k),
        "route_topk_ref": lambda: sparse.route_ref(q, kidx, k, T - 1),
        "scores_matmul": lambda: sparse.index_scores(q, kidx),
        "select_kv_argpartition": lambda: (
            lambda i: (mx.take_along_axis(keys, i, 2), mx.take_along_axis(values, i, 2))
        )(argpartition_route(q, kidx, k)[:, 0][:, None, :, None]),
    }
    if be:
        fns["route_kernel"] = lambda: kernels.route(q, kidx, k, T - 1, be)
        fns["select_kv_kernel"] = lambda: kernels.select_kv(q, kidx, keys, values, k, be)
    return fns


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--T", default="8192,32768,131072,524288,1048576")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--tree", help="checkout whose kernels to time (default: this one)")
    args = ap.parse_args()
    be = kernels.backend()
    k, D, dt = args.k, 128, mx.bfloat16
    out = dict(machine=machine(), k=k, d_idx=D, dtype="bfloat16", iters=args.iters, kernels=kernels.__file__)
    out["copy_GBps"], out["copy_variants_GBps"] = copy_bandwidth(args.iters)
    if be:  # warm up clocks and JIT caches before the first timed size
        w = mx.random.normal((1, 65536, D)).astype(dt)
        for _ in range(20):
            mx.eval(kernels.route(w[:, :1], w, k, 65535, be))
    print(json.dumps(out, indent=1), flush=True)
    rows = []
    for T in [int(t) for t in args.T.split(",")]:
        mx.random.seed(T)
        q = mx.random.normal((1, 1, D)).astype(dt)
        kidx = mx.random.normal((1, T, D)).astype(dt)
        keys = mx.random.normal((1, 8, T, 128)).astype(dt)
        values = mx.random.normal((1, 8, T, 128)).astype(dt)
        mx.eval(q, kidx, keys, values)
        r = dict(T=T)
        fns = routing_fns(q, kidx, keys, values, k, be)
        if be and hasattr(kernels, "_SCORE_KEYS"):  # the scoring pass alone, in this tree's layout
            chunk, C = kernels._chunking(T)
            S = max(1, chunk // kernels._SCORE_KEYS)
            prm = mx.array([T, 1, T - 1, k, chunk, C, S, 0], dtype=mx.int32)
            fns["route_score_pass"] = lambda q=q, kidx=kidx: kernels._kernel(be, "route_score")(
                inputs=[q.reshape(1, D), kidx, prm, mx.zeros((1,), mx.int32)],
                template=[("QT", dt), ("KT", dt), ("D", D), ("TG", kernels._TG_SCORE)],
                grid=(C * S * kernels._TG_SCORE, 1, 1), threadgroup=(kernels._TG_SCORE, 1, 1),
                output_shapes=[(1, (C + 1) * 256 + T)], output_dtypes=[mx.uint32], init_value=0,
            )
        if be and T <= 131072:  # batched decode routing (mlx-lm's BatchGenerator), one row each
            qb = mx.random.normal((BATCH, 1, D)).astype(dt)
            kb = mx.random.normal((BATCH, T, D)).astype(dt)
            mx.eval(qb, kb)
            fns[f"route_kernel_b{BATCH}"] = lambda: kernels.route(qb, kb, k, T - 1, be)
            fns[f"route_argpartition_b{BATCH}"] = lambda: argpartition_route(qb, kb, k)
        # 256 rows: where the kernel reads more K/V rows (L * k) than a dense pass over the cache (T)
        for Lq in ((16, 32, 256) if T <= 131072 else (16, 32)) if T >= k else ():
            # Sparse attention for Lq query rows (verification / full-sequence eval).
            Hkv, G, tag = 4, 5, "" if Lq == 16 else f"_l{Lq}"
            qa = mx.random.normal((1, Hkv * G, Lq, 128)).astype(dt)
            ka, va = keys[:, :Hkv], values[:, :Hkv]
            idx = sparse.route_ref(mx.random.normal((1, Lq, 32)), mx.random.normal((1, T, 32)), k, T - Lq)
            mx.eval(qa, ka, va, idx)
            fns["attention_ref" + tag] = lambda qa=qa, idx=idx: sparse.sparse_attention_ref(qa, ka, va, idx, 128**-0.5)
            if be:
                fns["attention_kernel" + tag] = lambda qa=qa, idx=idx: kernels.sparse_attention(
                    qa, ka, va, idx, 128**-0.5, be)
            r["attention_bytes" + tag] = Lq * Hkv * k * 128 * 2 * 2
        for name, fn in fns.items():
            try:
                r[name + "_ms"], r[name + "_sync_ms"] = timed(fn, args.iters)
            except Exception as e:  # keep the other figures
                r[name + "_error"] = repr(e)[:300]
        r["index_key_bytes"] = T * D * 2
        if "route_kernel_ms" in r:
            bw = r["index_key_bytes"] / (r["route_kernel_ms"] * 1e-3) / 1e9
            r["route_kernel_GBps"] = bw
            r["route_kernel_frac_copy"] = bw / out["copy_GBps"]
            for base in ("route_argpartition", "route_topk_ref"):
                if base + "_ms" in r:
                    r[f"speedup_vs_{base}"] = r[base + "_ms"] / r["route_kernel_ms"]
        if f"route_kernel_b{BATCH}_ms" in r and f"route_argpartition_b{BATCH}_ms" in r:
            r[f"speedup_vs_route_argpartition_b{BATCH}"] = r[f"route_argpartition_b{BATCH}_ms"] / r[f"route_kernel_b{BATCH}_ms"]
        if "select_kv_kernel_ms" in r and "select_kv_argpartition_ms" in r:
            r["speedup_select_kv"] = r["select_kv_argpartition_ms"] / r["select_kv_kernel_ms"]
        if "attention_kernel_ms" in r:
            r["attention_kernel_GBps"] = r["attention_bytes"] / (r["attention_kernel_ms"] * 1e-3) / 1e9
            r["attention_frac_copy"] = r["attention_kernel_GBps"] / out["copy_GBps"]
            if "attention_ref_ms" in r:
                r["speedup_attention"] = r["attention_ref_ms"] / r["attention_kernel_ms"]
        print(json.dumps(r), flush=True)
        rows.append(r)
        del q, kidx, keys, values
    out["rows"] = rows
    d = Path(args.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "bench_kernels.json").write_text(json.dumps(out, indent=1))
    plot(out, d / "bench_kernels.png")


def plot(out, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    rows = out["rows"]
    Ts = [r["T"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    for name in ("route_kernel", "route_argpartition", "route_topk_ref", "scores_matmul",
                 "select_kv_kernel", "select_kv_argpartition", f"route_kernel_b{BATCH}", f"route_argpartition_b{BATCH}"):
        ys = [r.get(name + "_ms") for r in rows]
        if any(y is not None for y in ys):
            ax[0].plot([t for t, y in zip(Ts, ys) if y], [y for y in ys if y], "o-", label=name)
    ax[0].set(xscale="log", yscale="log", xlabel="T (keys)", ylabel="ms per call",
              title=f"decode routing, k={out['k']}, d_idx={out['d_idx']}, bf16")
    ax[0].legend(fontsize=7)
    for name in ("attention_kernel", "attention_ref"):
        pts = [(r["T"], r[name + "_ms"]) for r in rows if name + "_ms" in r]
        if pts:
            ax[1].plot(*zip(*pts), "o-", label=name)
    ax[1].set(xscale="log", yscale="log", xlabel="T (keys)", ylabel="ms per call",
              title="sparse attention, 16 rows, Hq=20, Hkv=4, k=2048")
    ax[1].legend(fontsize=7)
    for name, lab in (("route_kernel_frac_copy", "routing (index keys read)"),
                      ("attention_frac_copy", "sparse attention (K/V rows read)")):
        pts = [(r["T"], r[name]) for r in rows if name in r]
        if pts:
            ax[2].plot(*zip(*pts), "o-", label=lab)
    ax[2].axhline(0.6, color="gray", ls="--", label="60% target")
    ax[2].set(xscale="log", xlabel="T (keys)", ylabel="fraction of copy bandwidth",
              title=f"copy bandwidth {out['copy_GBps']:.0f} GB/s")
    ax[2].legend(fontsize=7)
    m = out["machine"]
    fig.suptitle(f"{m.get('gpu') or m['device']}  mlx {m['mlx']}  {m['backend']}  {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
