"""Training sequences for the shipped model: real documents and lookup questions about them.

A chat task reads as the chat renders `/file` (clsa_mlx/conversation.py): one user turn holding
`File NAME:\\n<text>` blocks and the first `Question: ...`, then the answer and `<|end|>`; each
follow-up is a user turn `Question: ...` alone. Answers are quotes of the document
(training/facts.py) or, for the synthetic long-context tasks, a needle's value. The other files
in the turn are real documents too, so the question must be looked up in the right one.
"""

import hashlib
import json
import lzma
import math
import random

import numpy as np

from training import facts as lookup
from training import tasks
from training.formats import HELD_OUT_FORMATS

SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SYLLABLES = "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu " \
            "pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo vu za ze zi zo zu".split()
NOTE_NAMES = ["notes.txt", "log.txt", "report.md", "memo.txt", "data.txt", "README"]

W_ANSWER, W_TEXT, W_CONTEXT = 1.0, 0.2, 0.05  # per-token loss weights: answers dominate the signal
# How often each lookup kind is asked first: long quotes (a docstring line, a whole line) are
# the weakest, mentions most of all; synthetic needles are found every
# time, so lookups are 80% of chat tasks.
KIND_WEIGHTS = dict(value=1.0, signature=0.8, default=0.6, doc=1.6, mention=3.0)
LOOKUP_SHARE = 0.8
# Of lookups, the share asked as before (facts.py's kinds, Python first); the rest are the
# questions of training/tasks.py, each label by its weight.
OLD_SHARE = 0.3
TASK_WEIGHTS = {"exact": 1.0, "paraphrase": 1.6, "prose": 1.2, "table": 0.8, "quote": 1.2, "follow-up": 1.4,
                "unanswerable": 0.8}
MORE_TURNS = [0, 0, 1, 1, 2, 3]  # questions after the first, about the same window
CHARS_PER_TOKEN = 3.1  # prepare.py measures it (stats.json); only sizes the documents' windows
HELD_OUT = 0.06  # share of groups (packages, top-level modules) never trained on
ALWAYS_HELD_OUT = {"stdlib:ftplib", "stdlib:_pydecimal", "stdlib:argparse",  # the ones users tried
                   "debian:login", "debian:openssh-client", "debian:curl", "debian:libcurl4-openssl-dev",
                   "pypi:sqlparse", "debian:zookeeper"}  # formats the hash left without a held-out source


def part_of(group: str, fmt: str = None) -> str:
    """Whole groups (packages, modules) are held out, and whole formats (HELD_OUT_FORMATS)."""
    if group in ALWAYS_HELD_OUT or fmt in HELD_OUT_FORMATS:
        return "heldout"
    h = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 16**8
    return "heldout" if h < HELD_OUT else "train"


def read_docs(path, part: str):
    with lzma.open(path, "rt") as f:
        return [d for d in map(json.loads, f) if part_of(d["group"], d.get("format")) == part]


def train_tokenizer(corpus_file, prefix, vocab_size=8192):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, user_defined_symbols=SPECIALS + ["\n"],
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, input_sentence_size=3_000_000, shuffle_input_sentence=True,
        max_sentence_length=8192, num_threads=2, minloglevel=2,
        # Keep text as written (newlines, runs of spaces) so the Hugging Face conversion of this
        # model encodes exactly as sentencepiece does.
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # indentation: one piece per run of spaces, not per space
    )


def word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) + "-" + \
           "".join(rng.choice(SYLLABLES) for _ in range(2))


def number(rng):
    return str(rng.randint(10000, 99999))


def synthetic_task(rng: random.Random, kind: str):
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


SYNTHETIC = ("kv", "multikey", "passkey", "twohop")


class Sampler:
    """Token sequences with per-token loss weights, from the documents of one part."""

    def __init__(self, sp, docs, seed: int = 0, fresh_mentions: bool = False):
        self.sp, self.docs, self.rng, self.fresh_mentions = sp, docs, random.Random(seed), fresh_mentions
        self.bos, self.eos = sp.bos_id(), sp.eos_id()
        self.user, self.assistant, self.end = (sp.piece_to_id(s) for s in SPECIALS[1:])
        self.kinds = {kind: [i for i, d in enumerate(docs) if any(f[0] == kind for f in d["facts"])]
                      for kind in lookup.KINDS}
        self.new_facts = [[f for f in d["facts"] if len(f) == 5] for d in docs]
        self.follows = {}
        wanted = {"exact": ("setting", "signature"), "paraphrase": ("setting",), "prose": ("stated", "prose"),
                  "table": ("cell",), "quote": ("describe",),
                  "unanswerable": ("setting", "stated", "describe", "signature")}
        # label -> format -> documents: each format asked as often as the others
        self.labels = {label: {} for label in tasks.LABELS}
        for i, (d, found) in enumerate(zip(docs, self.new_facts)):
            held = {f[0] for f in found}
            for label, kinds in wanted.items():
                if held & set(kinds):
                    self.labels[label].setdefault(d.get("format", "text"), []).append(i)
            twins = any(tasks.sibling(f[1]) for f in found if f[0] == "setting")
            if len(held) > 1 or held & {"prose", "cell"} or twins:
                self.labels["follow-up"].setdefault(d.get("format", "text"), []).append(i)
        self.subjects = dict(self.labels["unanswerable"])  # what unanswerable questions ask about

    def window(self, text, chars, span=None):
        """-> (start, slice): about `chars` characters of `text` on line boundaries, holding
        text[span[0]:span[1]] whole."""
        if len(text) <= chars:
            return 0, text
        lo, hi = (0, len(text) - chars) if span is None else (max(0, span[1] - chars), min(span[0], len(text) - chars))
        start = self.rng.randint(lo, max(lo, hi))
        if start:
            start = text.find("\n", start) + 1 or start
        end = text.rfind("\n", start, start + chars) + 1 or start + chars
        if span is not None and not start <= span[0] <= span[1] <= end:
            start, end = max(0, span[0] - chars // 2), max(span[1], span[0] + chars // 2)
        return start, text[start:end]

    def filler_files(self, chars, avoid=()):
        """Other documents' slices, none of which mentions the words in `avoid`."""
        files, tries = [], 0
        while chars > 200 and tries < 200:
            tries += 1
            d = self.docs[self.rng.randrange(len(self.docs))]
            take = min(chars, int(math.exp(self.rng.uniform(math.log(200), math.log(max(201, chars))))))
            _, text = self.window(d["text"], take)
            if text.strip() and not any(a in text for a in avoid):  # the chat refuses an empty file
                files.append((d["name"], text))
                chars -= len(text) + len(d["name"]) + 8
        return files

    def subject(self, fact, found):
        """The fact's name as asked: `Class.method` or, where no other fact of its kind shares
        it, sometimes the bare method name."""
        kind, name = fact[0], fact[1]
        head, _, tail = name.partition(" ")
        bare = head.rsplit(".", 1)[-1]
        alike = sum(f[0] == kind and f[1].partition(" ")[0].rsplit(".", 1)[-1] == bare
                    and f[1].partition(" ")[2] == tail for f in found)
        if bare != head and alike == 1 and self.rng.random() < 0.5:
            return f"{bare} {tail}".strip()
        return name

    def lookup_turns(self, chars, kind=None):
        """-> ((name, text) of the target file, [(question, answer)], kind, words the other
        files must not hold)."""
        kinds = [k for k in lookup.KINDS if self.kinds[k]]
        kind = kind or (self.rng.choices(kinds, [KIND_WEIGHTS[k] for k in kinds])[0] if kinds else "kv")
        if not self.kinds.get(kind):  # no document holds a fact of this kind
            return self.synthetic_turns(chars, "kv")
        i = self.rng.choice(self.kinds[kind])
        d = self.docs[i]
        # Training asks new phrases every time: a model learnt fixed ones by heart (98% of
        # training answer tokens right). Evaluations keep the fixed ones, to compare versions.
        fresh = [list(f) for f in lookup.mention_facts(d["text"], self.rng, n=4)] if self.fresh_mentions else []
        found = [f for f in d["facts"] if f[0] in lookup.KINDS and f[0] != "mention"] + fresh if fresh else \
            [f for f in d["facts"] if f[0] in lookup.KINDS]
        first = self.rng.choice([f for f in found if f[0] == kind] or [f for f in d["facts"] if f[0] == kind])
        start, text = self.window(d["text"], chars, span=(first[3], first[3] + len(first[2])))
        inside = [f for f in found if f is not first and start <= f[3] and f[3] + len(f[2]) <= start + len(text)]
        chosen = [first] + self.rng.sample(inside, k=min(len(inside), self.rng.choice([0, 1, 2, 3, 4, 6])))
        subjects = [self.subject(f, found) for f in chosen]
        qa = [(lookup.question(self.rng, f[0], s), f[2]) for f, s in zip(chosen, subjects)]
        avoid = [s if f[0] == "mention" else s.split(" ")[0].rsplit(".", 1)[-1] for f, s in zip(chosen, subjects)]
        return (d["name"], text), qa, kind, [a for a in avoid if len(a) > 3]

    def pick(self, label):
        by_format = self.labels[label]
        if not by_format:
            return None
        return self.rng.choice(by_format[self.rng.choice(sorted(by_format))])

    def follow_pairs(self, i):
        if i not in self.follows:
            self.follows[i] = tasks.follow_ups(self.new_facts[i])
        return self.follows[i]

    def first_turns(self, i, label):
        """-> ([(fact index, question)], label) for the label's first question (and, for a
        follow-up, the question it follows), or None where this document has none."""
        found, rng = self.new_facts[i], self.rng
        if label == "follow-up":
            pairs = self.follow_pairs(i)
            if not pairs:
                return None
            a, b, template = rng.choice(pairs)
            first = tasks.ask(rng, found[a], found, "paraphrase" if rng.random() < 0.3 else "exact") or \
                tasks.ask(rng, found[a], found)
            return [(a, first[0]), (b, tasks.follow_question(rng, found, a, b, template))]
        kinds = {"exact": ("setting", "signature"), "paraphrase": ("setting",), "prose": ("stated", "prose"),
                 "table": ("cell",), "quote": ("describe",)}[label]
        candidates = [k for k, f in enumerate(found) if f[0] in kinds]
        for k in rng.sample(candidates, k=min(len(candidates), 8)):
            form = label if label in ("exact", "paraphrase") else "paraphrase" if rng.random() < 0.2 else "exact"
            asked = tasks.ask(rng, found[k], found, form)
            if asked is None and label != "paraphrase":
                asked = tasks.ask(rng, found[k], found)
            if asked:
                return [(k, asked[0])]
        return None

    def abstain_question(self, fmt, texts):
        """A question about another document's fact of the same format that none of `texts` answers."""
        same = self.subjects.get(fmt) or []
        every = [j for v in self.subjects.values() for j in v]
        for attempt in range(20):
            other = self.new_facts[self.rng.choice(same if same and attempt < 10 else every)]
            fact = self.rng.choice(other)
            qa = tasks.unanswerable(self.rng, fact, other, texts)
            if qa:
                return qa, fact[1]
        return None

    def document_turns(self, chars, label=None):
        """-> ((name, text) of the target file, [(question, answer)], label, words the other files
        must not hold) for training/tasks.py's questions; the first question (or, for a
        follow-up, the second) is of `label`."""
        rng = self.rng
        label = label or rng.choices(tasks.LABELS, [TASK_WEIGHTS[k] for k in tasks.LABELS])[0]
        for _ in range(20):
            i = self.pick(label)
            if i is None:
                return self.synthetic_turns(chars, "kv")
            d, found = self.docs[i], self.new_facts[i]
            if label == "unanswerable":
                _, text = self.window(d["text"], chars)
                asked = self.abstain_question(d.get("format"), [text]) if text.strip() else None
                if asked:
                    (q, a), subject = asked
                    return (d["name"], text), [(q, a)], label, [subject]
                continue
            turns = self.first_turns(i, label)
            if turns:
                break
        else:
            return self.synthetic_turns(chars, "kv")
        spans = [(found[k][3], found[k][3] + len(found[k][2])) for k, _ in turns]
        start, text = self.window(d["text"], chars, span=(min(s for s, _ in spans), max(e for _, e in spans)))
        if not all(start <= s and e <= start + len(text) for s, e in spans):  # two facts too far apart
            turns, spans = turns[:1], spans[:1]
            start, text = self.window(d["text"], chars, span=spans[0])
        qa = [(q, found[k][2]) for k, q in turns]
        subjects = [found[k][1] for k, _ in turns]
        inside = [k for k, f in enumerate(found) if start <= f[3] and f[3] + len(f[2]) <= start + len(text)
                  and k not in {k for k, _ in turns}]
        for k in rng.sample(inside, k=min(len(inside), rng.choice(MORE_TURNS))):
            asked = tasks.ask(rng, found[k], found, "paraphrase" if rng.random() < 0.4 else "exact") or \
                tasks.ask(rng, found[k], found)
            qa.append((asked[0], found[k][2]))
            subjects.append(found[k][1])
        if rng.random() < 0.15:
            asked = self.abstain_question(d.get("format"), [text])
            if asked:
                qa.append(asked[0])
                subjects.append(asked[1])
        avoid = [s for s in subjects if len(s) > 3]
        return (d["name"], text), qa, label, avoid

    def synthetic_turns(self, chars, kind):
        needles, qa = synthetic_task(self.rng, kind)
        _, text = self.window(self.docs[self.rng.randrange(len(self.docs))]["text"], chars)
        lines = text.split("\n")
        for n in needles:
            lines.insert(self.rng.randint(0, len(lines)), n)
        return (self.rng.choice(NOTE_NAMES), "\n".join(lines)), qa, kind, []

    def chat_parts(self, length, kind=None):
        """-> ([(file name, text)], [(question, answer)], kind) of about `length` tokens. `kind`:
        a lookup kind, a synthetic one, "lookup" (any lookup) or None (lookups LOOKUP_SHARE of the time)."""
        if kind is None:
            kind = "lookup" if self.rng.random() < LOOKUP_SHARE else self.rng.choice(SYNTHETIC)
            old, new = any(self.kinds.values()), any(self.subjects.values())
            if kind == "lookup" and new and (self.rng.random() >= OLD_SHARE or not old):
                kind = "document"
        chars = int((length - 24) * CHARS_PER_TOKEN)
        share = chars if self.rng.random() < 0.3 else max(600, int(chars * self.rng.uniform(0.05, 1.0)))
        if kind in SYNTHETIC:
            target, qa, kind, avoid = self.synthetic_turns(share, kind)
        elif kind in tasks.LABELS or kind == "document":
            target, qa, kind, avoid = self.document_turns(share, None if kind == "document" else kind)
        else:
            target, qa, kind, avoid = self.lookup_turns(share, None if kind == "lookup" else kind)
        files = self.filler_files(chars - len(target[1]), avoid)
        if any(a == tasks.ABSTAIN for _, a in qa):  # no file may say what the abstention says none does
            unsaid = [s for s in avoid if tasks.absent(s, [target[1]])]
            files = [f for f in files if all(tasks.absent(s, [f[1]]) for s in unsaid)]
        files.insert(self.rng.randint(0, len(files)), target)
        return files, qa, kind

    def chat_task(self, length, kind=None):
        """-> (ids, weights, [(answer start, answer ids)], kind): files, then question/answer turns."""
        files, qa, kind = self.chat_parts(length, kind)
        return (*self.encode(files, qa), kind)

    def encode(self, files, qa):
        """-> (ids, weights, [(answer start, answer ids)]), in the pieces the chat encodes: each
        file as it is added, then the question."""
        blocks = [("\n\n" if j else "") + f"File {name}:\n{text}" for j, (name, text) in enumerate(files)]
        ids = [self.bos, self.user] + [t for b in blocks for t in self.sp.encode(b)]
        w, answers = [W_CONTEXT] * len(ids), []
        for i, (q, a) in enumerate(qa):
            head = self.sp.encode(f"\n\nQuestion: {q}") if i == 0 else [self.user] + self.sp.encode(f"Question: {q}")
            head += [self.end, self.assistant]
            ids += head
            w += [W_CONTEXT] * len(head)
            answers.append((len(ids), self.sp.encode(a)))
            ids += answers[-1][1] + [self.end]
            w += [W_ANSWER] * (len(answers[-1][1]) + 1)
        return ids, w, answers

    def text(self, n):
        _, text = self.window(self.docs[self.rng.randrange(len(self.docs))]["text"], int(n * CHARS_PER_TOKEN))
        return [self.bos] + self.sp.encode(text)[: n - 1]

    def sequence(self, length, text_share=0.15):
        """Packs samples (document text or chat tasks, log-uniform lengths so that short, dense
        lookup lessons are common) into exactly `length` tokens."""
        ids, w = [], []
        while len(ids) < length:
            room = length - len(ids)
            n = min(room, int(math.exp(self.rng.uniform(math.log(128), math.log(max(129, length))))))
            if self.rng.random() < text_share or n < 128:
                part = self.text(n)
                ids += part
                w += [W_TEXT] * len(part)
            else:
                part, pw, _, _ = self.chat_task(n)
                ids += part + [self.eos]
                w += pw + [W_CONTEXT]
        return np.array(ids[:length], dtype=np.int32), np.array(w[:length], dtype=np.float32)
