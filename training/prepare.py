"""Build the training data folder: the documents (training/sources.py) with their licences, a
sentencepiece tokenizer trained on them, and the same tokenizer as Hugging Face files with the
chat template (DIR/hf) for the model folder.

  python training/prepare.py DIR [--tokenizer OLD_DIR] [--packages PKG_DIR ...] [--fetched CACHE]
  python training/prepare.py DIR --refresh
    OLD_DIR: a folder whose tokenizer to reuse (to continue a model); PKG_DIR: more packages to
    read, installed with `pip install --no-deps --target PKG_DIR ...` (not imported); CACHE:
    training/fetch.py's folder (packages of many formats); --refresh: the documents of DIR again,
    their formats and facts found anew (after a change to training/formats.py or extract.py)
  -> DIR/docs.jsonl.xz (each document with its format and facts), DIR/tokenizer.model, DIR/hf/,
     DIR/licences.json, DIR/stats.json (documents, facts and held-out sources per format)
"""

import collections
import json
import lzma
import multiprocessing
import pathlib
import random
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from training.data import CHAT_TEMPLATE, SPECIALS, part_of, train_tokenizer  # noqa: E402
from training.extract import doc_facts  # noqa: E402
from training.facts import facts  # noqa: E402
from training.formats import format_of  # noqa: E402
from training.sources import documents  # noqa: E402

MAX_GROUP_CHARS = 15_000_000  # torch alone has 56 MB of sources: keep any one package from dominating
MAX_FETCHED_GROUP_CHARS = 2_000_000  # fetched packages: many of them, of many formats
OWN = "pypi:clsa-mlx"


def sentencepiece_bpe_json(sp, converted: dict) -> dict:
    """Hugging Face's conversion of `sp`, corrected to encode exactly as sentencepiece: the
    converter drops the user-defined "\\n" piece (shifting every id after it), and knows no
    whitespace-only pieces (runs of spaces: sentencepiece's words are a run of spaces plus the
    characters up to the next space)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    atomic = {i for i in vocab.values() if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)}
    atomic |= {vocab[s] for s in SPECIALS + ["\n"]}
    merges = sorted((i, vocab[p[:k]], vocab[p[k:]]) for p, i in vocab.items() if i not in atomic
                    for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
    converted["model"].update(vocab=vocab, merges=[[sp.id_to_piece(a), sp.id_to_piece(b)] for _, a, b in merges])
    converted["added_tokens"].append(dict(id=vocab["\n"], content="\n", single_word=False, lstrip=False,
                                          rstrip=False, normalized=False, special=False))
    words = {"type": "Split", "pattern": {"Regex": "\u2581*[^\u2581]+|\u2581+"}, "behavior": "Isolated", "invert": False}
    converted["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [converted["pre_tokenizer"], words]}
    return converted


def write_hf_tokenizer(sp_model, folder):
    """tokenizer.json + tokenizer_config.json that encode exactly as the sentencepiece model."""
    import shutil

    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model, folder / "tokenizer.model")
    config = dict(tokenizer_class="LlamaTokenizer", legacy=False, add_prefix_space=False, add_bos_token=False,
                  add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder, additional_special_tokens=SPECIALS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    converted = json.loads((folder / "tokenizer.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    (folder / "tokenizer.json").write_text(json.dumps(sentencepiece_bpe_json(sp, converted), ensure_ascii=False))
    # a reply ends with <|end|>; plain text with </s> (mlx-lm reads eos ids from here)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, end]}))
    return folder


def capped(docs):
    """Each group's documents in a seeded random order, up to MAX_GROUP_CHARS per group."""
    by_group = collections.defaultdict(list)
    for d in docs:
        if d["group"] != OWN:
            by_group[d["group"]].append(d)
    for group, members in sorted(by_group.items()):
        random.Random(group).shuffle(members)
        total, cap = 0, MAX_FETCHED_GROUP_CHARS if members[0]["origin"].startswith(FETCHED) else MAX_GROUP_CHARS
        for d in members:
            total += len(d["text"])
            if total > cap:
                break
            yield d


FETCHED = ("debian-pkg:", "npm:", "pypi-sdist:")


def all_facts(name, text, fmt):
    found = facts(name, text)
    return found + doc_facts(name, text, fmt, [f for f in found if f[0] != "mention"])


def split(d):
    return part_of(d["group"], d["format"])


def main(out, tokenizer=None, extra=(), fetched=None, refresh=False):
    import shutil

    import sentencepiece as spm

    out = pathlib.Path(out)
    if tokenizer and not (pathlib.Path(tokenizer) / "tokenizer.model").is_file():  # before minutes of work
        sys.exit(f"{tokenizer}/tokenizer.model: no such file")
    for folder in [*extra, *([fetched] if fetched else [])]:
        if not pathlib.Path(folder).is_dir():
            sys.exit(f"{folder}: no such folder")
    if refresh and not (out / "docs.jsonl.xz").is_file():
        sys.exit(f"{out}/docs.jsonl.xz: no such file")
    out.mkdir(parents=True, exist_ok=True)
    if refresh:
        with lzma.open(out / "docs.jsonl.xz", "rt") as f:
            docs = [json.loads(line) for line in f]
        for d in docs:
            d["format"] = format_of(d["name"], d["origin"], d["text"])
    else:
        docs = list(capped(documents(extra, fetched)))
    with multiprocessing.Pool() as pool:  # once here, not in every training worker
        found = pool.starmap(all_facts, [(d["name"], d["text"], d["format"]) for d in docs], chunksize=16)
    for d, f in zip(docs, found):
        d["facts"] = f
    with lzma.open(out / "docs.jsonl.xz.partial", "wt", preset=6) as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    (out / "docs.jsonl.xz.partial").replace(out / "docs.jsonl.xz")
    train_text = [d["text"] for d in docs if split(d) == "train"]
    if tokenizer:
        shutil.copy(pathlib.Path(tokenizer) / "tokenizer.model", out / "tokenizer.model")
    elif not refresh:
        (out / "corpus.txt").write_text("\n\n".join(train_text))
        train_tokenizer(out / "corpus.txt", out / "tokenizer")
        (out / "corpus.txt").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    sample = "\n\n".join(random.Random(0).sample(train_text, k=min(400, len(train_text))))
    licences = collections.defaultdict(set)
    for d in docs:
        licences[d["origin"].split("/")[0].split(":")[0] + ":" + d["group"].split(":", 1)[1]].add(d["license"])
    (out / "licences.json").write_text(json.dumps({k: sorted(v) for k, v in sorted(licences.items())}, indent=1))
    chars, formats = collections.Counter(), collections.defaultdict(collections.Counter)
    for d in docs:
        chars[split(d)] += len(d["text"])
        formats[d["format"]][split(d)] += 1
        formats[d["format"]]["facts"] += len(d["facts"])
    stats = dict(documents=len(docs), groups=len({d["group"] for d in docs}),
                 facts=dict(collections.Counter(f[0] for d in docs for f in d["facts"])),
                 formats={k: dict(v) for k, v in sorted(formats.items())},
                 heldout_groups=sorted({d["group"] for d in docs if part_of(d["group"]) == "heldout"}),
                 chars=dict(chars), chars_per_token=len(sample) / len(sp.encode(sample)))
    unheld = [k for k, v in formats.items() if not v["heldout"]]
    if unheld:
        print(f"no held-out documents of: {', '.join(sorted(unheld))}")
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    hf = write_hf_tokenizer(out / "tokenizer.model", out / "hf")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf)
    specials = SPECIALS + ["<s>", "</s>", "<unk>"]  # text that spells a special token is read as one
    for text in sample.split("\n\n")[:3000]:  # the chat's tokenizer must read text as training did
        if not any(s in text for s in specials):
            assert hf.encode(text, add_special_tokens=False) == sp.encode(text), text[:200]
    print(f"{len(docs)} documents, {sum(chars.values()) / 1e6:.1f} MB ({chars['heldout'] / 1e6:.1f} MB held out), "
          f"{stats['chars_per_token']:.2f} chars/token, vocab {sp.get_piece_size()} -> {out}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--tokenizer", help="a prepared folder whose tokenizer to reuse instead of training one")
    p.add_argument("--packages", nargs="*", default=[], help="folders of packages to read as well")
    p.add_argument("--fetched", help="training/fetch.py's cache folder, read as well")
    p.add_argument("--refresh", action="store_true", help="find the formats and facts of DIR's documents anew")
    a = p.parse_args()
    main(a.out, a.tokenizer, a.packages, a.fetched, a.refresh)
