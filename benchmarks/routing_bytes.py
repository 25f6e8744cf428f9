"""Memory traffic of one decode token's routing, counted from the kernels' loads and stores
(not measured), before and after the row totals, and what it costs at Apple M-series
bandwidths.

    python benchmarks/routing_bytes.py [--out-dir benchmarks/results]

"before": every chunk group of the three radix passes summed all C chunk histograms of its
row (C x 1 KB each, so C^2 KB a level), and the select pass summed them once more.
"after": each histogram pass adds its chunk into a 256-bin row total (device atomics into
an MLX-zeroed output), and the next pass reads 1 KB of totals plus its own chunk's row; the
last digit is picked in the write pass, whose groups each read the total and three
counts per earlier chunk.
The count is of bytes requested; the GPU's caches serve part of the repeated histogram
reads, so the "before" time at DRAM bandwidth is an upper bound.
"emulated": the same routing run on the CPU's SIMT emulator (tests/simt.py), which counts every
element each launch reads or writes through its buffers, less the parameters and the query row
that every thread reads (broadcast loads); up to 64K keys; MLX's zero fills are not kernel
accesses and are added from the count above.
Writes routing_bytes.json and routing_bytes.png.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import mlx.core as mx  # noqa: E402

from clsa_mlx import kernels  # noqa: E402

# Apple's published unified-memory bandwidths, GB/s.
MACS = {"M1": 68, "M2 Pro": 200, "M3 Max": 400, "M4 Max": 546, "M2 Ultra": 800}


def routing_bytes(T: int, D: int, k: int, key_bytes: int = 2, totals: bool = True) -> dict:
    _, C = kernels._chunking(T)
    hist = C * 256 * 4  # one row's chunk histograms
    parts = {
        "index keys": T * D * key_bytes,
        "scores (write, 3 radix reads, final read)": T * 4 * 5,
        "chunk histograms (write, own-row reads)": hist * 5,
    }
    if totals:
        parts["row totals (atomics, reads)"] = 4 * (hist + C * 1024)
        parts["zero fills of the outputs"] = T * 4 + hist * 4 + 4 * 1024
        # the write pass's groups each read the total and 3 counts per earlier chunk
        parts["select in the write pass"] = C * 1024 + 3 * 4 * C * (C - 1) // 2
    else:
        parts["every group sums all chunk histograms"] = 3 * C * hist
        parts["select pass"] = 2 * hist
    parts["index list"] = k * 4
    return parts


def emulated_bytes(T: int, D: int, k: int) -> int:
    """One decode token's routing (one row, fp16 index keys) on the SIMT emulator: the bytes
    its launches read and write, plus MLX's zero fills."""
    import simt

    q = mx.random.normal((1, 1, D), key=mx.random.key(0)).astype(mx.float16)
    kk = mx.random.normal((1, T, D), key=mx.random.key(1)).astype(mx.float16)
    with simt.emulated() as made:
        mx.eval(kernels.route(q, kk, k, T - 1, "simt"))
    # Every thread reads the parameters and the query row: broadcast loads a cache serves.
    kernel_bytes = sum(v for kern in made.values() for b, v in kern.bytes.items() if b not in ("prm", "start", "q"))
    return kernel_bytes + routing_bytes(T, D, k)["zero fills of the outputs"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--emulate-to", type=int, default=65536, help="largest T run on the emulator")
    args = ap.parse_args()
    Ts = [8192, 32768, 65536, 131072, 262144, 524288, 1048576]
    rows = []
    for D, k in ((128, args.k), (32, 256)):  # paper-scale indexer; the shipped model's
        for T in Ts:
            before, after = (sum(routing_bytes(T, D, k, totals=t).values()) for t in (False, True))
            row = dict(T=T, D=D, k=k, chunks=kernels._chunking(T)[1], before_MB=before / 1e6, after_MB=after / 1e6)
            if T <= args.emulate_to:
                row["emulated_MB"] = emulated_bytes(T, D, k) / 1e6
            row.update({f"{m}_us_before": before / bw / 1e3 for m, bw in MACS.items()})
            row.update({f"{m}_us_after": after / bw / 1e3 for m, bw in MACS.items()})
            rows.append(row)
            print(json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in row.items()}))
    out = dict(note=__doc__.strip().splitlines()[0], macs_GBps=MACS, rows=rows,
               parts_1M_D128=dict(before=routing_bytes(1 << 20, 128, args.k, totals=False),
                                  after=routing_bytes(1 << 20, 128, args.k)))
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
        for key, color in (("before", "tab:red"), ("after", "tab:green")):
            ax[0].plot([r["T"] for r in pts], [r[f"{key}_MB"] for r in pts], style, color=color, marker="o",
                       label=f"{key}, d_idx={D}, k={pts[0]['k']}")
            ax[1].plot([r["T"] for r in pts], [r[f"M3 Max_us_{key}"] for r in pts], style, color=color,
                       marker="o", label=f"{key}, d_idx={D}")
        emu = [r for r in pts if "emulated_MB" in r]
        ax[0].plot([r["T"] for r in emu], [r["emulated_MB"] for r in emu], "x", color="black", ms=9,
                   label=f"after, run on the SIMT emulator, d_idx={D}")
    ax[0].set(xscale="log", yscale="log", xlabel="context T (keys)", ylabel="MB per decode token",
              title="routing traffic per token (counted, one row)")
    ax[1].set(xscale="log", yscale="log", xlabel="context T (keys)", ylabel="us per token",
              title="at an M3 Max's 400 GB/s (an upper bound: caches serve repeats)")
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
