"""Bytes per rank of a model sharded over N machines (`Model.shard`; mlx-lm's `shard` for the
Transformer), computed from the sharded parameter shapes, never run:

    python benchmarks/shard_bytes.py [--config paper-4b] [--ranks 1 2 4] [--contexts 32768 131072]

Per rank: weights, cache bytes per token, bytes one decode step must read at each context
(bench_models.decode_bytes: weights but the embedding, window caches, index keys, the K/V it
attends to), and the all-reduce traffic of one token (two per layer, `dim` bf16 values each).
Writes benchmarks/results/shard_bytes_<config>.json and .png."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.bench_models import ARCHS, CONFIGS, build, decode_bytes, weights_bytes  # noqa: E402
from benchmarks.common import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


class Ranks:
    """Rank 0 of N, for shapes only: sharding slices lazily and sends nothing."""

    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n

    def rank(self):
        return 0


def per_rank(arch, c, bits, n, contexts):
    model = build(arch, c, bits, materialize=False, fuse=False)
    if n > 1:
        model.shard(Ranks(n))
    if arch == "transformer":
        attn = model.layers[0].self_attn
        token = c["n_layers"] * 2 * attn.n_kv_heads * (c["dim"] // c["heads"]) * 2
    else:
        token = 2 * model.cross_decoder.n_kv_heads * model.args.head_dim * 2 + (c["d_idx"] * 2 if arch == "clsa" else 0)
    return dict(
        weights_bytes=weights_bytes(model), cache_bytes_per_token=token,
        decode_read_bytes={T: decode_bytes(model, arch, c, T, token * T) for T in contexts},
        allreduce_bytes_per_token=0 if n == 1 else 2 * c["n_layers"] * c["dim"] * 2,
        allreduces_per_token=0 if n == 1 else 2 * c["n_layers"],
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper-4b", choices=list(CONFIGS))
    p.add_argument("--bits", type=int, default=0)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    args = p.parse_args()
    c = CONFIGS[args.config]
    rows = {arch: {n: per_rank(arch, c, args.bits, n, args.contexts) for n in args.ranks} for arch in ARCHS}
    out = RESULTS / f"shard_bytes_{args.config}"
    out.with_suffix(".json").write_text(json.dumps(dict(machine=machine(), config=c, bits=args.bits, per_rank=rows), indent=1))

    fig, axes = plt.subplots(1, len(args.contexts), figsize=(5 * len(args.contexts), 4), squeeze=False)
    width = 0.8 / len(args.ranks)
    for ax, T in zip(axes[0], args.contexts):
        for i, n in enumerate(args.ranks):
            ax.bar([a + i * width for a in range(len(ARCHS))], [rows[a][n]["decode_read_bytes"][T] / 1e9 for a in ARCHS],
                   width, label=f"{n} rank{'s' * (n > 1)}")
        ax.set_xticks([a + width * (len(args.ranks) - 1) / 2 for a in range(len(ARCHS))], ARCHS)
        ax.set_title(f"{args.config}, context {T // 1024}K: GB read per decode step per rank")
        ax.legend()
    fig.suptitle("computed from sharded shapes (not measured)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    for arch in ARCHS:
        for n in args.ranks:
            r = rows[arch][n]
            print(f"{arch:12s} N={n}: weights {r['weights_bytes'] / 1e9:.2f} GB, cache {r['cache_bytes_per_token']} B/token, "
                  + ", ".join(f"{T // 1024}K step reads {b / 1e9:.2f} GB" for T, b in r["decode_read_bytes"].items())
                  + f", all-reduce {r['allreduce_bytes_per_token'] / 1e3:.0f} KB in {r['allreduces_per_token']} messages")


if __name__ == "__main__":
    main()
