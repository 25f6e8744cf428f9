"""Quality on the documents people bring: questions of every kind (training/tasks.py) about
held-out documents of every format, through the chat's path, CLSA and its dense twin.

    python benchmarks/eval_documents.py --model PATH --data DIR [--lengths 1024 4096 16384 32768]
        [--samples 2] [--models clsa dense] [--name documents]

- Held out: whole sources (packages, repositories) within every format, and whole formats never
  trained on (training/formats.py HELD_OUT_FORMATS), reported apart.
- Each task: files written to disk and added with `Conversation.add_document` (as `/file`), held-out
  files of any format around the target up to the length, the question asked with
  `Conversation.ask` (greedy); a follow-up is asked after the model's own first reply and scored.
  Exact match of the reply with the verbatim answer (or ABSTAIN), per format and question kind;
  whether the reply stopped by itself; abstention precision and recall.
- The regression row: benchmarks/eval_quality.py's lookups (its kinds) on the held-out packages
  of the earlier data; perplexity and top-k coverage on held-out text as there.
Resumable: tasks already in NAME.json (same model, data and settings) are not asked again.
Writes NAME.json and NAME.png with machine, versions and date.
"""

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from benchmarks.eval_quality import coverage, dense_twin, heldout_text, lookups, perplexity, score  # noqa: E402
from clsa_mlx import load, load_model  # noqa: E402
from clsa_mlx.conversation import Conversation  # noqa: E402
from training.data import Sampler, part_of, read_docs  # noqa: E402
from training.facts import KINDS  # noqa: E402
from training.formats import HELD_OUT_FORMATS  # noqa: E402
from training.tasks import ABSTAIN, LABELS  # noqa: E402

MAX_REPLY = 160


def restricted(sampler, fmt):
    """The sampler with its questions about documents of one format (other files: any format)."""
    out = Sampler.__new__(Sampler)
    out.__dict__.update(sampler.__dict__)
    out.labels = {label: {fmt: v[fmt]} if fmt in v else {} for label, v in sampler.labels.items()}
    return out


def unquoted(text):
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`" else text


def ask(chat, question, answer):
    """`right`: the reply is the answer, a pair of quotes around either aside (`"#fff"` for the value
    `#fff` of `color = "#fff"`); `verbatim`: exactly."""
    reply = "".join(chat.ask(question, max_tokens=MAX_REPLY)).strip()
    return dict(right=unquoted(reply) == unquoted(answer), verbatim=reply == answer,
                stopped=chat.last.finish_reason == "stop",
                abstained=reply.startswith(ABSTAIN.rstrip(".")), unanswerable=answer == ABSTAIN,
                question=question, answer=answer, reply=reply[:300])


def task(models, tokenizer, sampler, length, label, folder):
    """-> {model: the scored turn} for one task of `label` (a follow-up: the second turn)."""
    files, qa, kind = sampler.chat_parts(length, label)
    if kind != label:  # no document of this format has a question of this kind
        return None
    paths = []
    for j, (name, text) in enumerate(files):
        (folder / str(j)).mkdir(parents=True, exist_ok=True)
        paths.append(folder / str(j) / name)
        paths[-1].write_text(text)
    out = {}
    for name, model in models.items():
        chat = Conversation(model, tokenizer, model_id=name)
        for path in paths:
            chat.add_document(str(path))
        turn = ask(chat, *qa[0])
        if label == "follow-up":
            first = turn
            turn = ask(chat, *qa[1])
            turn["first_right"] = first["right"]
        out[name] = dict(turn, tokens=chat.used)
    return out


def share(rows, key):
    return sum(r[key] for r in rows) / len(rows) if rows else None


def summary(rows):
    answerable = [r for r in rows if not r["unanswerable"]]
    unanswerable = [r for r in rows if r["unanswerable"]]
    abstained = [r for r in rows if r["abstained"]]
    return dict(exact=share(rows, "right"), stopped=share(rows, "stopped"), n=len(rows),
                abstain_recall=share(unanswerable, "abstained"), abstain_on_answerable=share(answerable, "abstained"),
                abstain_precision=share([dict(x=r["unanswerable"]) for r in abstained], "x"))


def aggregate(tasks, models):
    """tasks: [dict(length, format, label, held, turns={model: row})] -> nested summaries."""
    out = {}
    for name in models:
        rows = [dict(t["turns"][name], **{k: t[k] for k in ("length", "format", "label", "held")}) for t in tasks]
        by = collections.defaultdict(list)
        for r in rows:
            n = str(r["length"])
            for key in (("all",), ("label", r["label"]), ("format", r["format"]), ("held", r["held"]),
                        ("held_label", r["held"], r["label"])):
                by[(n, *key)].append(r)
        m = out[name] = {}
        for key, members in by.items():
            node = m
            for part in key[:-1]:
                node = node.setdefault(part, {})
            node[key[-1]] = summary(members)
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results.get("summary", {})
    lengths = sorted(int(n) for n in s.get("clsa", {}))
    if not lengths:  # a regression-only run (--formats none)
        return
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    width = 0.8 / len(lengths)
    for ax, key, names in ((axes[0], "label", LABELS), (axes[1], "format", results["formats"])):
        for i, n in enumerate(lengths):
            got = s["clsa"][str(n)].get(key, {})
            ys = [100 * (got[k]["exact"] if k in got else np.nan) for k in names]
            ax.bar(np.arange(len(names)) + i * width, ys, width, label=f"CLSA {n // 1024}K")
            if "dense" in s:
                dense = s["dense"][str(n)].get(key, {})
                ax.plot(np.arange(len(names)) + i * width, [100 * (dense[k]["exact"] if k in dense else np.nan)
                                                            for k in names], "k_", markersize=10)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=35, ha="right", fontsize=8)
        ax.set(ylabel="exact answers (%)", ylim=(0, 102), title=f"per {'question kind' if key == 'label' else 'format'}"
               + (" (bars CLSA, dashes dense)" if "dense" in s else ""))
        ax.legend(fontsize=8)
    rows = []
    for n in lengths:
        a = s["clsa"][str(n)]["all"]
        held = s["clsa"][str(n)].get("held", {})
        rows.append((f"{n // 1024}K", [100 * (held.get(h, {}).get("exact") or 0) for h in ("source", "format")],
                     100 * (a["abstain_recall"] or 0), 100 * (a["abstain_on_answerable"] or 0)))
    x = np.arange(len(rows))
    axes[2].bar(x - 0.3, [r[1][0] for r in rows], 0.2, label="held-out sources")
    axes[2].bar(x - 0.1, [r[1][1] for r in rows], 0.2, label="held-out formats")
    axes[2].bar(x + 0.1, [r[2] for r in rows], 0.2, label="unanswerable: abstained")
    axes[2].bar(x + 0.3, [r[3] for r in rows], 0.2, label="answerable: abstained")
    reg = results.get("regression", {})
    axes[2].set_xticks(x, [r[0] for r in rows])
    axes[2].set(ylim=(0, 102), ylabel="%", title="regression (earlier lookups) " + ", ".join(
        f"{n // 1024}K {100 * reg[str(n)]['clsa']:.0f}%" for n in lengths if str(n) in reg)
        + (f"; ppl {results['perplexity']['clsa']:.1f}" if "perplexity" in results else ""))
    axes[2].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"{results['model']}: documents of many formats — {m.get('gpu') or m['device']}, mlx {m['mlx']}, "
                 f"{m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True, help="training/prepare.py's folder")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--samples", type=int, default=2, help="tasks per format, question kind and length")
    p.add_argument("--models", nargs="+", default=["clsa", "dense"], choices=["clsa", "dense"])
    p.add_argument("--formats", nargs="*", help="only these formats (default: every held-out one)")
    p.add_argument("--regression-samples", type=int, default=4, help="per earlier lookup kind and length; 0: none")
    p.add_argument("--ppl-length", type=int, default=2048)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--coverage-length", type=int, default=2048)
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="documents")
    args = p.parse_args()

    import sentencepiece as spm

    clsa, tokenizer = load(args.model)
    models = {"clsa": clsa, "dense": dense_twin(args.model) if "dense" in args.models else None}
    models = {k: v for k, v in models.items() if k in args.models}
    sp = spm.SentencePieceProcessor(model_file=str(Path(args.model) / "tokenizer.model"))
    docs = read_docs(args.data / "docs.jsonl.xz", "heldout")
    formats = sorted({d["format"] for d in docs} & set(args.formats or {d["format"] for d in docs}))
    out = args.out_dir / f"{args.name}.json"
    settings = dict(model=str(args.model), data=str(args.data), samples=args.samples, models=args.models)
    results = json.loads(out.read_text()) if out.exists() else {}
    if results.get("settings") != settings:
        results = dict(settings=settings, tasks=[])
    for row in (row for t in results["tasks"] for row in t["turns"].values()):  # scored as now
        row.update(right=unquoted(row["reply"]) == unquoted(row["answer"]), verbatim=row["reply"] == row["answer"])
    results.update(model=str(args.model), machine=machine(), formats=formats,
                   held_out_formats=sorted(HELD_OUT_FORMATS), index_topk=clsa.args.index_topk)
    done = collections.Counter((t["length"], t["format"], t["label"]) for t in results["tasks"])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for length in args.lengths:
            base = Sampler(sp, docs, seed=length)
            for fmt in formats:
                t0, sampler = time.time(), restricted(base, fmt)
                for label in LABELS:
                    for i in range(done[(length, fmt, label)], args.samples):
                        sampler.rng.seed(f"{length}:{fmt}:{label}:{i}")
                        folder = Path(tmp) / f"{length}-{fmt}-{label}-{i}"
                        turns = task(models, tokenizer, sampler, length, label, folder)
                        if turns is None:
                            break
                        results["tasks"].append(dict(length=length, format=fmt, label=label, turns=turns,
                                                     held="format" if fmt in HELD_OUT_FORMATS else "source"))
                rows = [t["turns"]["clsa"]["right"] for t in results["tasks"]
                        if (t["length"], t["format"]) == (length, fmt)]
                print(f"{length} {fmt}: clsa {sum(rows)}/{len(rows)} ({time.time() - t0:.0f}s)", flush=True)
                results["summary"] = aggregate(results["tasks"], models)
                out.write_text(json.dumps(results, indent=1))
            plot(results, args.out_dir / f"{args.name}.png")  # what a run stopped by a time limit leaves
    if args.regression_samples:
        earlier = [d for d in docs if part_of(d["group"]) == "heldout" and d["format"] not in HELD_OUT_FORMATS
                   and not d["origin"].startswith(("debian-pkg:", "npm:", "pypi-sdist:"))]
        results["regression"] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for length in args.lengths:
                per_kind = {k: lookups(models, tokenizer, Sampler(sp, earlier, seed=length), length, k,
                                       args.regression_samples, Path(tmp)) for k in KINDS}
                results["regression"][str(length)] = {
                    name: float(np.mean([score(per_kind[k][name])["exact"] for k in KINDS])) for name in models}
                print(f"{length} regression: {results['regression'][str(length)]}", flush=True)
    if args.ppl_windows:
        text = heldout_text(tokenizer, docs, max(args.ppl_length * args.ppl_windows + 1, 4 * args.coverage_length))
        results["perplexity"] = perplexity(models, text, args.ppl_length, args.ppl_windows)
        print(f"perplexity @ {args.ppl_length}: {results['perplexity']}", flush=True)
        try:
            results["coverage"] = coverage(load_model(args.model, fuse=False), text, args.coverage_length, 4)
        except ImportError:
            print("coverage skipped: it needs torch (the PyTorch reference)")
    results["summary"] = aggregate(results["tasks"], models)
    out.write_text(json.dumps(results, indent=1))
    plot(results, args.out_dir / f"{args.name}.png")
    for name in models:
        for n in args.lengths:
            s = results["summary"][name].get(str(n))
            if s:
                print(f"{name} {n}: all {s['all']['exact']:.2f}, " + ", ".join(
                    f"{k} {v['exact']:.2f}" for k, v in s["label"].items()) + f"; abstain recall "
                    f"{s['all']['abstain_recall']}, on answerable {s['all']['abstain_on_answerable']}")
    print(f"-> {out}, .png")


if __name__ == "__main__":
    main()
