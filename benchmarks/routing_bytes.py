"""Routing's memory: what one call allocates (the dispatch's plan) and the bytes its kernels
move (counted from the kernels' loads and stores, checked on the SIMT emulator), against the
minimum the algorithm needs.

    python benchmarks/routing_bytes.py --rows R --keys T [--batch B] [--k 2048]
        the plan of one call of R query rows (per batch row) over T keys: its pieces, launches,
        zero fills and the line `scratch N MB` (the most extra device memory it holds at once:
        one piece's matmul scores and zero-filled work buffers; pieces run one after another)
    python benchmarks/routing_bytes.py --rows R --keys T --measure [--tree DIR] [--out FILE]
        on a GPU: runs that call (bf16 small-integer index keys, so ties abound) with the kernels
        of this checkout or of DIR (another checkout, e.g. the previous commit's), checks it
        against the reference and prints the device memory it held beyond its inputs and
        output (MLX's peak memory) and its time
    python benchmarks/routing_bytes.py [--out-dir benchmarks/results] [--emulate-to 65536]
        one decode token's routing traffic at 8K-1M keys, counted; up to --emulate-to also run on
        the emulator (tests/simt.py), which counts every element each launch reads or writes,
        per kernel; writes routing_bytes.json and routing_bytes.png

The minimum: reading the index keys once and writing the k indices. The count is of bytes
requested; a GPU's caches serve part of the repeated reads.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if "--tree" in sys.argv:  # another checkout's kernels (before/after on one machine)
    ROOT = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parents[1] / "tests")]

import mlx.core as mx  # noqa: E402

from clsa_mlx import kernels  # noqa: E402

# Apple's published unified-memory bandwidths, GB/s.
MACS = {"M1": 68, "M2 Pro": 200, "M3 Max": 400, "M4 Max": 546, "M2 Ultra": 800}


def routing_bytes(T: int, D: int, k: int, key_bytes: int = 2) -> dict:
    """One decode row's routing traffic by part (the scores computed in the kernel)."""
    _, C = kernels._chunking(T)
    hist = C * 1024  # one digit's chunk histograms
    (piece,) = kernels.route_plan(1, 1, T, k)["pieces"]
    return {
        "index keys": T * D * key_bytes,
        "score keys (write, 3 radix reads, final read)": T * 4 * 5,
        "chunk histograms (write, own-row reads)": hist * 5,
        "row totals (atomics, reads)": 4 * (hist + C * 1024),
        "zero fills of the outputs": piece["fill_bytes"],
        "select in the write pass": C * 1024 + 3 * 4 * C * (C - 1) // 2,
        "index list": k * 4,
    }


def minimum_bytes(T: int, D: int, k: int, key_bytes: int = 2) -> int:
    return T * D * key_bytes + 4 * k


def emulated(T: int, D: int, k: int) -> dict:
    """One decode row's routing (fp16 index keys) on the SIMT emulator: per kernel, its
    launches and the bytes they read and write, less the parameters and the query row that
    every thread reads (broadcast loads a cache serves)."""
    import simt

    q = mx.random.normal((1, 1, D), key=mx.random.key(0)).astype(mx.float16)
    kk = mx.random.normal((1, T, D), key=mx.random.key(1)).astype(mx.float16)
    with simt.emulated() as made:
        mx.eval(kernels.route(q, kk, k, T - 1, "simt"))
    return {name: dict(launches=kern.launches,
                       bytes=sum(v for b, v in kern.bytes.items() if b not in ("prm", "start", "q")))
            for name, kern in made.items() if kern.launches}


def emulated_bytes(T: int, D: int, k: int) -> int:
    """The emulator's count plus MLX's zero fills (not kernel accesses)."""
    return sum(v["bytes"] for v in emulated(T, D, k).values()) + routing_bytes(T, D, k)["zero fills of the outputs"]


def plan_lines(B: int, L: int, T: int, k: int) -> list:
    plan = kernels.route_plan(B, L, T, k)
    pieces, MB = plan["pieces"], 1e6
    p = pieces[0]
    how = "scores in the kernel" if p["fused"] else "scores by matmul (fp32), read by the passes"
    total = {n: sum(q[n] for q in pieces) for n in ("launches", "fills", "fill_bytes")}
    return [
        f"routing call: {B} batch row(s) x {L} query rows over {T} keys, k = {k}",
        f"pieces {len(pieces)}: up to {p['rows']} rows, {p['chunks']} chunk(s) of {p['chunk']} keys a row; {how}",
        f"launches {total['launches']} ({p['launches']} a piece, matmul included) and {total['fills']} zero fills",
        f"per piece: matmul scores {p['score_bytes'] / MB:.1f} MB, zero-filled work {p['fill_bytes'] / MB:.1f} MB",
        f"zero fill in all {total['fill_bytes'] / MB:.1f} MB; index lists out {plan['out_bytes'] / MB:.1f} MB",
        f"scratch {plan['scratch_bytes'] / MB:.1f} MB",
    ]


def measure(B: int, L: int, T: int, k: int, D: int = 128, iters: int = 5) -> dict:
    from clsa_mlx import sparse

    be = kernels.backend()
    if be is None:
        return dict(error="no GPU kernel backend here")
    q = mx.random.randint(-3, 4, (B, L, D), key=mx.random.key(0)).astype(mx.bfloat16)
    kk = mx.random.randint(-3, 4, (B, T, D), key=mx.random.key(1)).astype(mx.bfloat16)
    mx.eval(q, kk)
    mx.eval(kernels.route(q[:, :1], kk[:, :300], min(k, 300), 299, be))  # builds outside the count
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    idx = kernels.route(q, kk, k, T - L, be)
    mx.eval(idx)
    mx.synchronize()
    scratch = mx.get_peak_memory() - base - idx.nbytes
    t0 = time.perf_counter()
    for _ in range(iters):
        mx.eval(kernels.route(q, kk, k, T - L, be))
    ms = (time.perf_counter() - t0) / iters * 1e3
    exact = bool(mx.array_equal(idx, sparse.route_ref(q, kk, k, T - L)))
    return dict(B=B, L=L, T=T, k=k, D=D, backend=be, kernels=kernels.__file__, scratch_MB=scratch / 1e6, ms=ms,
                exact=exact, device=str(mx.default_device()), mlx=mx.__version__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, help="query rows of one call (per batch row)")
    ap.add_argument("--keys", type=int, help="keys T")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--emulate-to", type=int, default=65536, help="largest T run on the emulator")
    ap.add_argument("--measure", action="store_true", help="run the call on the GPU")
    ap.add_argument("--tree", help="checkout whose kernels --measure runs (default: this one)")
    ap.add_argument("--out", help="--measure: JSON file to write")
    args = ap.parse_args()
    if args.rows or args.keys:
        if not (args.rows and args.keys) or min(args.rows, args.keys, args.batch, args.k) < 1:
            ap.error("--rows and --keys go together, each at least 1")
        if args.measure:
            res = measure(args.batch, args.rows, args.keys, args.k)
            print(json.dumps(res))
            if args.out:
                Path(args.out).write_text(json.dumps(res, indent=1))
            return
        print("\n".join(plan_lines(args.batch, args.rows, args.keys, args.k)))
        return
    rows = []
    for D, k in ((128, args.k), (32, 256)):  # paper-scale indexer; the shipped model's
        for T in (8192, 32768, 65536, 131072, 262144, 524288, 1048576):
            parts = routing_bytes(T, D, k)
            row = dict(T=T, D=D, k=k, chunks=kernels._chunking(T)[1], counted_MB=sum(parts.values()) / 1e6,
                       minimum_MB=minimum_bytes(T, D, k) / 1e6)
            if T <= args.emulate_to:
                per = emulated(T, D, k)
                row["emulated"] = per
                row["emulated_MB"] = (sum(v["bytes"] for v in per.values()) + parts["zero fills of the outputs"]) / 1e6
            row["over_minimum"] = row.get("emulated_MB", row["counted_MB"]) / row["minimum_MB"]
            row.update({f"{m}_us": row["counted_MB"] * 1e6 / bw / 1e3 for m, bw in MACS.items()})
            rows.append(row)
            print(json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in row.items()}), flush=True)
    out = dict(note=__doc__.strip().splitlines()[0], macs_GBps=MACS, rows=rows,
               parts_1M_D128=routing_bytes(1 << 20, 128, args.k),
               plan_2048_rows_128K=plan_lines(1, 2048, 131072, args.k))
    d = Path(args.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "routing_bytes.json").write_text(json.dumps(out, indent=1))
    plot(rows, d / "routing_bytes.png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for D, style in ((128, "-"), (32, "--")):
        pts = [r for r in rows if r["D"] == D]
        ax[0].plot([r["T"] for r in pts], [r["counted_MB"] for r in pts], style, color="tab:green", marker="o",
                   label=f"counted, d_idx={D}, k={pts[0]['k']}")
        ax[0].plot([r["T"] for r in pts], [r["minimum_MB"] for r in pts], style, color="gray",
                   label=f"minimum (index keys once), d_idx={D}")
        emu = [r for r in pts if "emulated_MB" in r]
        ax[0].plot([r["T"] for r in emu], [r["emulated_MB"] for r in emu], "x", color="black", ms=9,
                   label=f"run on the SIMT emulator, d_idx={D}")
        ax[1].plot([r["T"] for r in pts], [r["over_minimum"] for r in pts], style, marker="o", label=f"d_idx={D}")
    ax[0].set(xscale="log", yscale="log", xlabel="context T (keys)", ylabel="MB per decode token",
              title="routing traffic per token (one row)")
    ax[1].axhline(1.5, color="gray", ls=":", label="1.5x the minimum")
    ax[1].set(xscale="log", xlabel="context T (keys)", ylabel="bytes / minimum",
              title="over the minimum (emulated where run, else counted)")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
