"""eval_quality.py runs of two or more model versions on the same questions, side by side:
real-document lookups per length (CLSA and dense twin) and CLSA per kind at one length.

    python benchmarks/compare_quality.py --out OUT/quality_versions \
        old=OLD/quality.json new=NEW/quality.json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

from training.facts import KINDS  # noqa: E402


def real_share(results, length, arch):
    """(right, asked) over the real-document kinds at one length."""
    row = results["lookups"][str(length)]
    right = sum(round(row[k][arch]["exact"] * row[k][arch]["n"]) for k in KINDS if k in row)
    return right, sum(row[k][arch]["n"] for k in KINDS if k in row)


def plot(versions, at, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(versions)
    for i, (name, results) in enumerate(versions.items()):
        lengths = sorted(int(n) for n in results["lookups"])
        for arch, style in (("clsa", "-"), ("dense", "--")):
            shares = [100 * np.divide(*real_share(results, n, arch)) for n in lengths]
            axes[0].plot(lengths, shares, "o" + style, color=f"C{i}", label=f"{name}, {arch}")
        row = results["lookups"][str(at)]
        axes[1].bar(np.arange(len(KINDS)) + i * width, [100 * row[k]["clsa"]["exact"] for k in KINDS], width,
                    color=f"C{i}", label=name)
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="exact answers (%)", ylim=(0, 102),
                title="real-document lookups, held-out documents")
    axes[0].minorticks_off()
    axes[0].set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(np.arange(len(KINDS)) + 0.4 - width / 2, KINDS)
    axes[1].set(ylabel="CLSA exact (%)", ylim=(0, 102), title=f"per kind at {at // 1024}K")
    axes[1].legend(fontsize=8)
    m = next(iter(versions.values()))["machine"]
    fig.suptitle(f"the same questions, one run — {m.get('gpu') or m['device']}, mlx {m['mlx']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("versions", nargs="+", help="NAME=quality.json")
    p.add_argument("--at", type=int, default=4096, help="the length of the per-kind panel")
    p.add_argument("--out", type=Path, required=True, help="path without suffix: .json and .png are written")
    a = p.parse_args()
    versions = {name: json.loads(Path(f).read_text()) for name, f in (v.split("=", 1) for v in a.versions)}
    table = {name: {n: {arch: real_share(r, n, arch) for arch in ("clsa", "dense")} for n in r["lookups"]}
             for name, r in versions.items()}
    for name, rows in table.items():
        print(name, "  ".join(f"{n}: {v['clsa'][0]}/{v['clsa'][1]} (dense {v['dense'][0]})" for n, v in rows.items()))
    a.out.with_suffix(".json").write_text(json.dumps(dict(real_lookups=table, machine=next(iter(versions.values()))["machine"]), indent=1))
    plot(versions, a.at, a.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
