"""Quality of the shipped model: lookups in held-out real documents, dense YOCO vs CLSA on the
same weights, through the chat's own path.

    python benchmarks/eval_quality.py --model PATH --data DIR [--lengths 1024 4096 16384 32768 65536]

- lookups: held-out documents (whole packages and modules never trained on, training/data.py)
  written to files and added with `Conversation.add_document`, as `/file` does, with other
  held-out files around them up to the length; the question asked with `Conversation.ask`
  (greedy); exact match of the reply with the quoted answer, per task kind (training/facts.py's
  lookups and the synthetic needles), and of a follow-up question where the task has one;
  whether the reply ended by itself (end of turn) rather than at the token cap.
- perplexity on held-out text windows, dense vs sparse (every position attends its own top-k).
- coverage (the paper's Table 4): share of the dense cross-attention mass (mean over cross layers
  and heads) that the k routed tokens hold, on held-out text, from the PyTorch reference.
Writes quality.json and quality.png with machine, versions and date.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from clsa_mlx import Model, load, load_model  # noqa: E402
from clsa_mlx.conversation import Conversation  # noqa: E402
from training.data import SYNTHETIC, Sampler, read_docs  # noqa: E402
from training.facts import KINDS  # noqa: E402


def dense_twin(path) -> Model:
    """The same weights read as dense YOCO (no indexer; its weights left out)."""
    return load_model(path, model_config={"index_topk": 0}, strict=False)


def ask(conversation, question, answer):
    reply = "".join(conversation.ask(question, max_tokens=96)).strip()  # greedy
    return dict(right=reply == answer, stopped=conversation.last.finish_reason == "stop", reply=reply[:200])


def lookups(models, tokenizer, sampler, length, kind, n, folder):
    """-> {model name: [per task: first answer, follow-up answer or None]}."""
    out = {name: [] for name in models}
    for i in range(n):
        files, qa, _ = sampler.chat_parts(length, kind)
        paths = []
        for j, (name, text) in enumerate(files):
            (folder / f"{length}-{kind}-{i}-{j}").mkdir(parents=True, exist_ok=True)
            paths.append(folder / f"{length}-{kind}-{i}-{j}" / name)
            paths[-1].write_text(text)
        for name, model in models.items():
            chat = Conversation(model, tokenizer, model_id=name)
            for path in paths:
                chat.add_document(str(path))
            first = ask(chat, *qa[0])
            follow = ask(chat, *qa[1]) if len(qa) > 1 else None
            out[name].append(dict(first=first, follow_up=follow, tokens=chat.used, question=qa[0][0], answer=qa[0][1]))
    return out


def score(runs):
    firsts = [r["first"] for r in runs]
    follows = [r["follow_up"] for r in runs if r["follow_up"]]
    share = lambda rows, key: sum(r[key] for r in rows) / len(rows) if rows else None  # noqa: E731
    return dict(exact=share(firsts, "right"), stopped=share(firsts, "stopped"), follow_up=share(follows, "right"),
                n=len(firsts), n_follow_up=len(follows), mean_tokens=float(np.mean([r["tokens"] for r in runs])))


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
    (`model` unfused: the reference names the projections separately; quantized weights are
    read dequantized)."""
    import torch
    from mlx_lm.utils import dequantize_model

    from torch_ref.model import Model as TorchModel

    model = dequantize_model(model)
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

    lengths = sorted(int(n) for n in results["lookups"])
    kinds = list(results["lookups"][str(lengths[0])])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, style in (("dense", "--"), ("clsa", "-")):
        for group, members in (("real-document lookups", KINDS), ("synthetic needles", SYNTHETIC)):
            if not set(members) & set(kinds):
                continue
            ys = [np.mean([results["lookups"][str(n)][k][name]["exact"] for k in members if k in kinds]) for n in lengths]
            axes[0].plot(lengths, [100 * y for y in ys], "o" + style, label=f"{name}: {group}")
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="exact answers (%)", ylim=(0, 102),
                title=f"held-out documents (k = {results['index_topk']})")
    axes[0].minorticks_off()
    axes[0].set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    axes[0].legend(fontsize=8)
    width = 0.8 / len(lengths)
    for i, n in enumerate(lengths):
        axes[1].bar(np.arange(len(kinds)) + i * width, [100 * results["lookups"][str(n)][k]["clsa"]["exact"] for k in kinds],
                    width, label=f"{n // 1024}K")
    axes[1].set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, rotation=30)
    axes[1].set(ylabel="CLSA exact (%)", ylim=(0, 102), title="per task kind")
    axes[1].legend(fontsize=8)
    ppl = results["perplexity"]
    axes[2].bar(["dense", "clsa"], [ppl["dense"], ppl["clsa"]])
    axes[2].set(ylabel="perplexity", title=f"held-out text, {results['ppl_length']} tokens; "
                f"coverage {100 * results.get('coverage', float('nan')):.1f}%")
    m = results["machine"]
    fig.suptitle(f"{results['model']} — {m.get('gpu') or m['device']}, mlx {m['mlx']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def heldout_text(tokenizer, docs, n_tokens):
    ids = []
    for d in docs:
        ids += tokenizer.encode(d["text"], add_special_tokens=False)
        if len(ids) >= n_tokens:
            break
    return np.array(ids[:n_tokens])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True, help="training/prepare.py's folder")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    p.add_argument("--samples", type=int, nargs="+", default=[12], help="tasks per kind, per length (one value: all)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS + SYNTHETIC))
    p.add_argument("--ppl-length", type=int, default=2048)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--coverage-length", type=int, default=2048)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="quality")
    args = p.parse_args()
    samples = dict(zip(args.lengths, args.samples * len(args.lengths) if len(args.samples) == 1 else args.samples))

    import sentencepiece as spm

    clsa, tokenizer = load(args.model)  # what the chat runs
    sp = spm.SentencePieceProcessor(model_file=str(Path(args.model) / "tokenizer.model"))
    models = {"dense": dense_twin(args.model), "clsa": clsa}
    docs = read_docs(args.data / "docs.jsonl.xz", "heldout")
    results = dict(model=str(args.model), index_topk=clsa.args.index_topk, samples=samples, machine=machine(),
                   lookups={}, ppl_length=args.ppl_length)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            results["lookups"][str(length)] = row = {}
            for kind in args.kinds:
                t0 = time.time()
                runs = lookups(models, tokenizer, Sampler(sp, docs, seed=length), length, kind, samples[length], Path(tmp))
                row[kind] = {name: score(r) for name, r in runs.items()}
                row[kind]["examples"] = [dict(question=r["question"], answer=r["answer"], reply=r["first"]["reply"])
                                         for r in runs["clsa"][:3]]
                print(f"{length} {kind}: " + ", ".join(f"{n} {row[kind][n]['exact']:.2f}" for n in models)
                      + f" ({time.time() - t0:.0f}s)", flush=True)
            (args.out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    text = heldout_text(tokenizer, docs, max(args.ppl_length * args.ppl_windows + 1, 4 * args.coverage_length))
    results["perplexity"] = perplexity(models, text, args.ppl_length, args.ppl_windows)
    print(f"perplexity @ {args.ppl_length}: {results['perplexity']}", flush=True)
    try:
        results["coverage"] = coverage(load_model(args.model, fuse=False), text, args.coverage_length, 4)
        print(f"coverage @ {args.coverage_length}: {results['coverage']:.4f}")
    except ImportError:
        print("coverage skipped: it needs torch (the PyTorch reference)")
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out_dir / f"{args.name}.png")
    print(f"-> {args.out_dir / args.name}.json, .png")


if __name__ == "__main__":
    main()
