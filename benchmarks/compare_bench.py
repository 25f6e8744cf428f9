"""bench_kernels.py runs of two kernel versions side by side: decode routing and select_kv time
per T, one line per run, the versions' medians printed.

    python benchmarks/compare_bench.py --out OUT/bench_kernels_compare \
        after=run_a.json,run_c.json before=run_b.json
"""

import argparse
import json
import statistics
from pathlib import Path

NAMES = ("route_kernel_ms", "select_kv_kernel_ms", "route_kernel_b32_ms")


def medians(runs):
    """{name: {T: median over runs}} for the runs of one version."""
    out = {}
    for name in NAMES:
        by_t = {}
        for rows in runs:
            for r in rows:
                if name in r:
                    by_t.setdefault(r["T"], []).append(r[name])
        out[name] = {t: statistics.median(v) for t, v in sorted(by_t.items())}
    return out


def plot(versions, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, len(NAMES), figsize=(15, 4.4))
    for (label, runs), color in zip(versions.items(), ("C0", "C3", "C2", "C1")):
        for i, rows in enumerate(runs):
            for a, name in zip(ax, NAMES):
                pts = [(r["T"], r[name]) for r in rows if name in r]
                if pts:
                    a.plot(*zip(*pts), "o-", color=color, alpha=0.6, label=label if i == 0 else None)
    for a, name in zip(ax, NAMES):
        a.set(xscale="log", yscale="log", xlabel="T (keys)", ylabel="ms per call", title=name)
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="path without suffix: writes .json and .png")
    ap.add_argument("versions", nargs="+", help="LABEL=run.json,run.json,...")
    args = ap.parse_args()
    files = {label: names.split(",") for label, names in (v.split("=", 1) for v in args.versions)}
    versions = {label: [json.loads(Path(f).read_text())["rows"] for f in fs] for label, fs in files.items()}
    summary = {label: dict(runs=len(runs), **medians(runs)) for label, runs in versions.items()}
    summary["files"] = files
    Path(args.out + ".json").write_text(json.dumps(summary, indent=1))
    plot(versions, args.out + ".png")
    for name in NAMES:
        print(name)
        for label in versions:
            print(f"  {label:>8}", "  ".join(f"{t}: {m:.3f}" for t, m in summary[label][name].items()))


if __name__ == "__main__":
    main()
