"""Training data for the shipped model: permissive text plus synthetic long-context chat tasks.

Text: the pydoc topic pages and docstrings of CPython's standard library (PSF licence) and the
docstrings of permissively licensed packages installed beside it (PERMISSIVE_PACKAGES). Tasks: key-value lookup, pass key, multi-key needles and
two-hop lookups, written as a document followed by question/answer chat turns, so that retrieval
is learnable and measurable at any length.
"""

import ast
import math
import pathlib
import random
import re
import sysconfig

import numpy as np

SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYLLABLES = "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu " \
            "pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo vu za ze zi zo zu".split()


PERMISSIVE_PACKAGES = {"numpy": "BSD-3-Clause", "torch": "BSD-3-Clause", "transformers": "Apache-2.0",
                       "huggingface_hub": "Apache-2.0", "click": "BSD-3-Clause"}


def docstrings(root: pathlib.Path):
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages") for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield from doc.split("\n\n")


def corpus() -> str:
    """Paragraphs of English prose, deduplicated, in a fixed order."""
    import importlib.util

    import pydoc_data.topics

    paragraphs = [p for page in pydoc_data.topics.topics.values() for p in page.split("\n\n")]
    paragraphs += docstrings(pathlib.Path(sysconfig.get_paths()["stdlib"]))
    for package in PERMISSIVE_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec and spec.origin:
            paragraphs += docstrings(pathlib.Path(spec.origin).parent)
    seen, keep = set(), []
    for p in paragraphs:
        p = re.sub(r"[ \t]+", " ", p.strip())
        if len(p) > 80 and p not in seen and p.isascii():
            seen.add(p)
            keep.append(p)
    return "\n\n".join(keep)


def train_tokenizer(corpus_file, prefix, vocab_size=4096):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, user_defined_symbols=SPECIALS,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=8192, num_threads=2, minloglevel=2,
        # Keep text as written (newlines, runs of spaces) so the Hugging Face conversion of this
        # model encodes exactly as sentencepiece does.
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
    )


def word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) + "-" + \
           "".join(rng.choice(SYLLABLES) for _ in range(2))


def number(rng):
    return str(rng.randint(10000, 99999))


def make_task(rng: random.Random, kind: str):
    """-> (needle sentences, [(question, answer)])."""
    if kind == "passkey":
        v = number(rng)
        return [f"The pass key is {v}. Remember it. {v} is the pass key."], [("What is the pass key?", v)]
    if kind == "twohop":
        a, b, v = word(rng), word(rng), number(rng)
        needles = [f"Key {a} points to key {b}.", f"The value of key {b} is {v}."]
        return needles, [(f"Key {a} points to another key. What is the value of that key?", v)]
    n = 1 if kind == "kv" else rng.randint(2, 24)
    keys = list({word(rng) for _ in range(n)})
    values = [number(rng) for _ in keys]
    needles = [f"The value of key {k} is {v}." for k, v in zip(keys, values)]
    asked = rng.sample(range(len(keys)), k=min(len(keys), rng.randint(1, 4)))
    return needles, [(f"What is the value of key {keys[i]}?", values[i]) for i in asked]


KINDS = ("kv", "multikey", "passkey", "twohop")
W_ANSWER, W_TEXT, W_CONTEXT = 1.0, 0.2, 0.05  # per-token loss weights: answers dominate the signal
HELD_OUT = 0.03  # the last 3% of the corpus tokens: never trained on, used for perplexity


def split(corpus_ids: np.ndarray, part: str) -> np.ndarray:
    cut = int(len(corpus_ids) * (1 - HELD_OUT))
    return corpus_ids[:cut] if part == "train" else corpus_ids[cut:]


class Sampler:
    """Token sequences of exactly `length` tokens with per-token loss weights."""

    def __init__(self, sp, corpus_ids: np.ndarray, seed: int = 0, part: str = "train"):
        self.sp, self.corpus, self.rng = sp, split(corpus_ids, part), random.Random(seed)
        self.bos, self.eos = sp.bos_id(), sp.eos_id()
        self.user, self.assistant, self.end = (sp.piece_to_id(s) for s in SPECIALS[1:])

    def filler(self, n):
        start = self.rng.randrange(0, len(self.corpus) - n)
        return self.corpus[start:start + n].tolist()

    def chat_task(self, length, kind=None):
        """-> (ids, weights, [(answer start, answer ids)]): a document with needles, then Q/A turns."""
        kind = kind or self.rng.choice(KINDS)
        needles, qa = make_task(self.rng, kind)
        needle_ids = [self.sp.encode(" " + s + " ") for s in needles]
        turns = []
        for i, (q, a) in enumerate(qa):
            q_ids = self.sp.encode(("\n\nQuestion: " if i == 0 else "Question: ") + q)
            turns.append((q_ids, self.sp.encode(a)))
        fixed = 2 + sum(len(n) for n in needle_ids) + sum(len(q) + len(a) + 4 for q, a in turns)
        body = self.filler(max(0, length - fixed))
        for n in needle_ids:
            at = self.rng.randint(0, len(body))
            body[at:at] = n
        ids, w, answers = [self.bos, self.user] + body, [W_CONTEXT] * (2 + len(body)), []
        for i, (q, a) in enumerate(turns):
            head = ([] if i == 0 else [self.user]) + q + [self.end, self.assistant]
            ids += head
            w += [W_CONTEXT] * len(head)
            answers.append((len(ids), a))
            ids += a + [self.end]
            w += [W_ANSWER] * (len(a) + 1)
        return ids, w, answers

    def sequence(self, length, text_share=0.15):
        """Packs samples (corpus text or chat tasks, log-uniform lengths so that short, dense
        retrieval lessons are common) into exactly `length` tokens."""
        ids, w = [], []
        while len(ids) < length:
            room = length - len(ids)
            n = min(room, int(math.exp(self.rng.uniform(math.log(96), math.log(max(97, length))))))
            if self.rng.random() < text_share or n < 96:
                part = [self.bos] + self.filler(n - 1)
                ids += part
                w += [W_TEXT] * len(part)
            else:
                part, pw, _ = self.chat_task(n)
                ids += part + [self.eos]
                w += pw + [W_CONTEXT]
        return np.array(ids[:length], dtype=np.int32), np.array(w[:length], dtype=np.float32)
