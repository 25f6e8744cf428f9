"""Quality of the shipped model: dense YOCO vs CLSA on the same weights.

    python benchmarks/eval_quality.py --model PATH --data DIR [--lengths 1024 4096 16384] [--samples 40]

- retrieval: a held-out document with needles (key-value, multi-key, pass key, two-hop), the
  question as a chat turn, greedy generation through the real cached path (prefill, then
  route-once decode); exact match of the answer. Dense = the same weights with no indexer.
- coverage (the paper's Table 4): share of the dense cross-attention mass (mean over cross layers
  and heads) that the k routed tokens hold, on held-out text, from the PyTorch reference.
- perplexity on held-out text windows, dense vs sparse (every position attends its own top-k).
Writes quality.json and quality.png with machine, versions and date.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from clsa_mlx import Model, ModelArgs, load_model  # noqa: E402
from training.data import Sampler, split  # noqa: E402


def dense_twin(model: Model) -> Model:
    """The same weights read as dense YOCO (no indexer)."""
    args = ModelArgs(**{**vars(model.args), "index_topk": 0})
    dense = Model(args)
    dense.load_weights([(k, v) for k, v in tree_flatten(model.parameters()) if ".indexer." not in k])
    return dense


def retrieval(models, sampler, length, n):
    hits = {name: 0 for name in models}
    for _ in range(n):
        ids, _, answers = sampler.chat_task(length)
        start, answer = answers[0]
        for name, model in models.items():
            steps = generate_step(mx.array(ids[:start]), model, max_tokens=len(answer),
                                  sampler=lambda x: mx.argmax(x, axis=-1))
            hits[name] += [int(t) for t, _ in steps] == answer
    return {name: h / n for name, h in hits.items()}


def perplexity(models, text_ids, length, n):
    out = {}
    for name, model in models.items():
        nll = count = 0
        for i in range(n):
            x = mx.array(text_ids[i * length:(i + 1) * length + 1])[None]
            logits = model(x[:, :-1]).astype(mx.float32)
            ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, x[:, 1:, None], axis=-1)[..., 0]
            nll += ce.sum().item()
            count += ce.size
        out[name] = math.exp(nll / count)
    return out


def coverage(model: Model, text_ids, length, n):
    """Mean over rows t >= k of sum_{s in S_t} Abar[t, s], via the PyTorch reference
    (`model` unfused: the reference names the projections separately)."""
    import torch

    from torch_ref.model import Model as TorchModel

    tmodel = TorchModel(vars(model.args)).eval()
    tmodel.load_state_dict({k: torch.from_numpy(np.array(v.astype(mx.float32)))
                            for k, v in tree_flatten(model.parameters())})
    k, shares = model.args.index_topk, []
    with torch.no_grad():
        for i in range(n):
            x = torch.from_numpy(text_ids[i * length:(i + 1) * length].astype(np.int64))[None]
            _, aux = tmodel(x, sparse=True, return_aux=True)
            held = (aux["abar"] * aux["mask"]).sum(-1)[0, k:]
            shares.append(held.mean().item())
    return float(np.mean(shares))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lengths = sorted(int(n) for n in results["retrieval"])
    for name in ("dense", "clsa"):
        axes[0].plot(lengths, [100 * results["retrieval"][str(n)][name] for n in lengths], "o-", label=name)
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="retrieval accuracy (%)", ylim=(0, 102),
                title=f"retrieval (k = {results['index_topk']})")
    axes[0].minorticks_off()
    axes[0].set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    axes[0].legend()
    ppl = results["perplexity"]
    axes[1].bar(["dense", "clsa"], [ppl["dense"], ppl["clsa"]])
    axes[1].set(ylabel="perplexity", title=f"held-out text, {results['ppl_length']} tokens; "
                f"coverage {100 * results.get('coverage', float('nan')):.1f}%")
    m = results["machine"]
    fig.suptitle(f"{results['model']} — {m.get('gpu') or m['device']}, mlx {m['mlx']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True, help="folder with corpus_ids.npy")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--ppl-length", type=int, default=2048)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--coverage-length", type=int, default=2048)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()

    import sentencepiece as spm

    unfused = load_model(args.model, fuse=False)
    clsa = load_model(args.model)  # what generate() runs
    models = {"dense": dense_twin(unfused).stack_projections(), "clsa": clsa}
    sp = spm.SentencePieceProcessor(model_file=str(Path(args.model) / "tokenizer.model"))
    corpus = np.load(args.data / "corpus_ids.npy")
    heldout = split(corpus, "heldout")
    results = dict(model=str(args.model), index_topk=clsa.args.index_topk, samples=args.samples,
                   machine=machine(), retrieval={}, ppl_length=args.ppl_length)
    for length in args.lengths:
        t0 = time.time()
        results["retrieval"][str(length)] = retrieval(models, Sampler(sp, corpus, seed=length, part="heldout"),
                                                      length, args.samples)
        print(f"retrieval @ {length}: {results['retrieval'][str(length)]} ({time.time() - t0:.0f}s)", flush=True)
    results["perplexity"] = perplexity(models, heldout, args.ppl_length, args.ppl_windows)
    print(f"perplexity @ {args.ppl_length}: {results['perplexity']}", flush=True)
    try:
        results["coverage"] = coverage(unfused, heldout, args.coverage_length, 4)
        print(f"coverage @ {args.coverage_length}: {results['coverage']:.4f}")
    except ImportError:
        print("coverage skipped: it needs torch (the PyTorch reference)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "quality.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out_dir / "quality.png")
    print(f"-> {args.out_dir / 'quality.json'}, quality.png")


if __name__ == "__main__":
    main()
