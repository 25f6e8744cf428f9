"""The shipped model's training data: lookup facts are quotes with one right answer, and a chat
task's tokens are the tokens the chat feeds the model for the same files and question."""

import random
import re
from pathlib import Path

import numpy as np
import pytest

import clsa_mlx
from clsa_mlx.conversation import Conversation
from training.data import Sampler, part_of
from training.facts import KINDS, QUESTIONS, facts, question

pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e

ROOT = Path(__file__).resolve().parents[1]


def spm_model():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(clsa_mlx.shipped_model() / "tokenizer.model"))


PYTHON = '''"""A module."""

FTP_PORT = 21
MAXLINE = 8192
DUP = 1
DUP = 2


class FTP:
    """An FTP client class."""

    def connect(self, host='', port=0, timeout=-999):
        """Connect to host."""
        return host


def quit():
    pass
'''
C_HEADER = "#define PY_MAJOR_VERSION 3\n#define PY_MINOR_VERSION\t11\n#define TWICE 1\n#define TWICE 2\n"
TEXT = "Package: demo\nVersion: 1.2.3\nThe passive mode is the default since version two of the client.\n"


def by_subject(found):
    return {(f[0], f[1]): f[2] for f in found}


@pytest.mark.parametrize("name,text", [("ftp.py", PYTHON), ("patchlevel.h", C_HEADER), ("control.txt", TEXT)])
def test_facts_are_quotes_at_their_offsets_with_one_answer(name, text):
    found = facts(name, text)
    assert found and {f[0] for f in found} <= set(KINDS)
    for kind, subject, answer, at in found:
        assert text[at:at + len(answer)] == answer
    subjects = [(f[0], f[1]) for f in found]
    assert len(subjects) == len(set(subjects))


def test_facts_of_python_c_and_text():
    py, c, txt = (by_subject(facts(n, t)) for n, t in (("ftp.py", PYTHON), ("p.h", C_HEADER), ("c.txt", TEXT)))
    assert py[("value", "FTP_PORT")] == "21" and py[("value", "MAXLINE")] == "8192"
    assert ("value", "DUP") not in py  # assigned twice: no single right answer
    assert py[("signature", "FTP.connect")] == "(self, host='', port=0, timeout=-999)"
    assert py[("default", "FTP.connect timeout")] == "-999"
    assert py[("doc", "FTP")] == "An FTP client class."
    assert c[("value", "PY_MINOR_VERSION")] == "11" and ("value", "TWICE") not in c
    assert txt[("value", "Version")] == "1.2.3"


def test_questions_name_their_subject():
    rng = random.Random(0)
    for _ in range(20):
        assert "FTP_PORT" in question(rng, "value", "FTP_PORT")
        q = question(rng, "default", "FTP.connect timeout")
        assert "FTP.connect" in q and "timeout" in q


def test_held_out_groups_include_the_files_users_tried():
    assert {part_of(g) for g in ("stdlib:ftplib", "stdlib:_pydecimal", "stdlib:argparse")} == {"heldout"}
    assert sum(part_of(f"stdlib:m{i}") == "heldout" for i in range(1000)) < 120


def test_a_chat_task_is_what_the_chat_feeds_the_model(tmp_path):
    """Files added with /file and a question, through Conversation: the tokens in its cache
    before the reply equal the training sequence up to the answer."""
    folder = clsa_mlx.shipped_model()
    sp = spm_model()
    docs = [dict(name=n, text=t, facts=facts(n, t)) for n, t in (("ftp.py", PYTHON), ("p.h", C_HEADER), ("c.txt", TEXT))]
    sampler = Sampler(sp, docs, seed=3)
    model, tokenizer = clsa_mlx.load(folder)
    for kind in ("value", "signature", "passkey"):
        files, qa, _ = sampler.chat_parts(600, kind)
        ids, _, answers = sampler.encode(files, qa)
        chat = Conversation(model, tokenizer, model_id="test")
        for j, (name, text) in enumerate(files):
            (tmp_path / kind / str(j)).mkdir(parents=True)
            (tmp_path / kind / str(j) / name).write_text(text)
            chat.add_document(str(tmp_path / kind / str(j) / name))
        list(chat.ask(qa[0][0], max_tokens=1))
        assert chat.ids[:-1] == ids[: answers[0][0]], kind


def training_folder(tmp_path):
    """prepare.py's folder in small: the shipped tokenizer and four documents; with the override
    for a tiny model of the tokenizer's vocabulary."""
    import json
    import lzma
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(clsa_mlx.shipped_model() / "tokenizer.model", data / "tokenizer.model")
    with lzma.open(data / "docs.jsonl.xz", "wt") as f:
        for i, (n, t) in enumerate((("ftp.py", PYTHON), ("p.h", C_HEADER), ("c.txt", TEXT), ("x.txt", "x\n" * 900))):
            assert part_of(f"stdlib:doc{i}") == "train"
            f.write(json.dumps(dict(name=n, text=t, group=f"stdlib:doc{i}", facts=facts(n, t))) + "\n")
    vocab = json.loads((clsa_mlx.shipped_model() / "config.json").read_text())["vocab_size"]
    tiny = json.dumps(dict(dim=64, n_layers=2, hidden_dim=128, n_self_heads=2, n_attn_heads=2, n_self_kv_heads=1,
                           n_attn_kv_heads=1, index_topk=16, index_head_dim=16, vocab_size=vocab))
    return data, tiny


def train_py(data, out, stage, *flags):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--data", str(data), "--out", str(out),
                           "--stage", stage, "--seq", "256", "--batch", "1", "--workers", "0", "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=300)


def test_the_three_stages_train_convert_and_load(tmp_path):
    """train.py's dense -> warmup -> joint on a tiny model over a few documents (CPU, a step
    each), then convert.py: the folder's CLSA logits are the trained checkpoint's."""
    import subprocess
    import sys

    data, tiny = training_folder(tmp_path)
    init = []
    for stage in ("dense", "warmup", "joint"):
        r = train_py(data, tmp_path / stage, stage, "--steps", "1", "--override", tiny, *init)
        assert r.returncode == 0, r.stderr[-2000:]
        init = ["--init", str(tmp_path / stage)]
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--torch-path", str(tmp_path / "joint"), "--mlx-path",
                        str(tmp_path / "mlx"), "--dtype", "float32", "--tokenizer", str(clsa_mlx.shipped_model())],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    model, tokenizer = clsa_mlx.load(tmp_path / "mlx")
    ids = tokenizer.encode("File ftp.py:\n" + PYTHON * 3)[:300]  # past top-k 16: routing selects
    got, want = mlx_and_torch_logits(tmp_path / "mlx", tmp_path / "joint", ids)
    assert model.args.index_topk == 16 and np.allclose(got, want, atol=1e-3), np.abs(got - want).max()


def mlx_and_torch_logits(folder, checkpoint, ids):
    import mlx.core as mx
    import torch

    from torch_ref.model import load_official

    model = clsa_mlx.load_model(folder)
    model.set_dtype(mx.float32)
    trained, _ = load_official(checkpoint)
    with torch.no_grad():
        want = trained.float()(torch.tensor([ids]), sparse=True).numpy()
    return np.array(model(mx.array([ids]))), want


class FakeClock:
    """Seconds that pass only when read: `first` at the first reading after the start (a slow
    start-up: CUDA, loader workers), then `step` per reading; `stop_at`: raise there instead."""

    def __init__(self, first=2.0, step=0.05, stop_at=None):
        self.now, self.reads, self.first, self.step, self.stop_at = 0.0, 0, first, step, stop_at

    def __call__(self):
        self.reads += 1
        if self.stop_at is not None and self.reads >= self.stop_at:
            raise KeyboardInterrupt("the box went away")
        self.now += self.first if self.reads == 2 else self.step if self.reads > 2 else 0.0
        return self.now


def train_args(data, out, stage, *flags):
    from training.train import parser

    return parser().parse_args(["--data", str(data), "--out", str(out), "--stage", stage, "--seq", "256",
                                "--batch", "1", "--workers", "0", "--device", "cpu", *flags])


def test_the_learning_rate_follows_the_time_budget(tmp_path):
    """By --minutes the cosine runs on the time spent: near the peak after warm-up, a tenth of it
    at the end, however slow the first steps (guessed from them, it once ended at 37% of a run).
    The time is a fake clock's, so no speed of this machine changes the test."""
    import json

    from training.train import lr_at, train

    assert lr_at(0, 0.0, 1.0, 4) == 0.25 and lr_at(4, 0.0, 1.0, 4) == 1.0
    assert abs(lr_at(9, 0.5, 1.0, 4) - 0.55) < 1e-12 and abs(lr_at(9, 1.0, 1.0, 4) - 0.1) < 1e-12
    assert lr_at(9, 3.0, 1.0, 4) == lr_at(9, 1.0, 1.0, 4)
    data, tiny = training_folder(tmp_path)
    budget = 4.8  # seconds of the fake clock; the first step alone takes 2
    train(train_args(data, tmp_path / "dense", "dense", "--minutes", str(budget / 60), "--warmup", "1",
                     "--log-every", "1", "--lr", "1e-3", "--override", tiny), clock=FakeClock())
    log = json.loads((tmp_path / "dense" / "train_dense.json").read_text())["log"][1:]
    off = [abs(row["lr"] - lr_at(row["step"], row["seconds"] / budget, 1e-3, 1)) for row in log]
    assert len(log) >= 5 and max(off) < 0.05e-3 and log[-1]["lr"] < 0.2e-3, [(r["seconds"], r["lr"]) for r in log]
    assert log[0]["seconds"] >= 2.0  # the slow start counted in the schedule


def test_a_stage_continues_from_its_last_save(tmp_path):
    """A stage stopped mid-run (the box taken back) continues from OUT/resume.pt when the same
    command runs again: the step count goes on, the finished stage is skipped after."""
    import json

    import pytest

    from training.train import train

    data, tiny = training_folder(tmp_path)
    args = train_args(data, tmp_path / "dense", "dense", "--steps", "8", "--log-every", "1", "--save-every", "0",
                      "--override", tiny)
    with pytest.raises(KeyboardInterrupt):
        train(args, clock=FakeClock(stop_at=30))
    assert (tmp_path / "dense" / "resume.pt").exists() and not (tmp_path / "dense" / "train_dense.json").exists()
    train(args, clock=FakeClock())
    result = json.loads((tmp_path / "dense" / "train_dense.json").read_text())
    steps = [row["step"] for row in result["log"]]
    assert result["steps"] == 8 and steps == list(range(8)) and not (tmp_path / "dense" / "resume.pt").exists()
    before = (tmp_path / "dense" / "checkpoint.pth").stat().st_mtime_ns
    train(args, clock=FakeClock())
    assert (tmp_path / "dense" / "checkpoint.pth").stat().st_mtime_ns == before


def test_an_mlx_folder_goes_back_to_its_checkpoint(tmp_path):
    """training/from_mlx.py on the shipped fp16 folder: the checkpoint it writes (to train on
    from) gives the folder's logits."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "training" / "from_mlx.py"), str(clsa_mlx.shipped_model()),
                        str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ids = clsa_mlx.load(clsa_mlx.shipped_model())[1].encode(PYTHON * 8)[:400]  # past top-k 256
    got, want = mlx_and_torch_logits(clsa_mlx.shipped_model(), tmp_path / "ckpt", ids)
    assert np.allclose(got, want, atol=1e-3), np.abs(got - want).max()


def test_documents_without_facts_still_give_lookup_lessons():
    sp = spm_model()
    text = "the routing picks the top keys once per token\n" * 60
    sampler = Sampler(sp, [dict(name="x.txt", text=text, facts=[])], seed=0)
    ids, weights = sampler.sequence(4000)
    assert len(ids) == 4000 and weights.max() == 1.0  # synthetic needles stand in: answers are weighted


def asked_phrase(q):
    patterns = [re.escape(t).replace(re.escape("{s}"), "(.+)") for t in QUESTIONS["mention"]]
    return next(m.group(1) for p in patterns if (m := re.fullmatch(p, q)))


def test_training_asks_new_mentions_and_evaluation_the_fixed_ones():
    sp = spm_model()
    text = "".join(f"line {i}: the routing of block {i * 7} picks {i % 5} keys per token\n" for i in range(300))
    docs = [dict(name="r.txt", text=text, facts=facts("r.txt", text))]
    fixed = {f[1] for f in docs[0]["facts"] if f[0] == "mention"}
    asked = {True: set(), False: set()}
    for fresh in (True, False):
        sampler = Sampler(sp, docs, seed=1, fresh_mentions=fresh)
        for _ in range(40):
            (_, window), qa, kind, avoid = sampler.lookup_turns(2000, "mention")
            assert kind == "mention"
            for q, line in qa:
                phrase = asked_phrase(q)
                assert text.count(phrase) == 1 and phrase in line and line in window.splitlines()
                asked[fresh].add(phrase)
    assert asked[False] <= fixed and len(asked[True] - fixed) > 20


def test_lookup_kinds_are_asked_by_their_weights():
    import collections

    from training.data import KIND_WEIGHTS

    sp = spm_model()
    sampler = Sampler(sp, [dict(name=n, text=t, facts=facts(n, t)) for n, t in (("ftp.py", PYTHON),)], seed=0)
    counts = collections.Counter(sampler.lookup_turns(1500)[2] for _ in range(3000))
    total = sum(KIND_WEIGHTS[k] for k in counts)
    for kind, n in counts.items():
        assert abs(n / 3000 - KIND_WEIGHTS[kind] / total) < 0.04, (kind, counts)


def test_facts_come_in_the_same_order_in_every_process():
    """Facts at one offset were once in set order, which string hashing changes per process: the
    same data folder then asked other questions."""
    import json
    import subprocess
    import sys

    # a docstring's first line is also a mention's line: two facts at one offset
    text = "".join(f'def f{i}():\n    """\n    Return the {i}th value of the routing table here.\n    """\n' for i in range(40))
    code = f"import json, sys; from training.facts import facts; print(json.dumps(facts('m.py', {text!r})))"
    runs = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"}).stdout for seed in range(4)}
    assert len(runs) == 1 and json.loads(runs.pop())


def test_prepare_refuses_a_missing_tokenizer_before_any_work(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "training" / "prepare.py"), str(tmp_path / "out"), "--tokenizer",
                        str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'none'}/tokenizer.model: no such file"
    assert not (tmp_path / "out").exists()


def test_prepare_refuses_a_missing_packages_folder_before_any_work(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "training" / "prepare.py"), str(tmp_path / "out"), "--packages",
                        str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'none'}: no such folder"
    assert not (tmp_path / "out").exists()


def test_packages_of_an_extra_folder_are_read_by_their_files_and_licence(tmp_path):
    """`pip install --target DIR` folders; newer build backends write no top_level.txt, so the
    top-level folders come from the RECORD; a GPL package is left out."""
    from training.sources import packages

    body = "".join(f"def handler_{i}(request, timeout=30):\n    return request\n\n\n" for i in range(20))
    for name, licence in (("demo-lib", "MIT"), ("copyleft-lib", "GPL-3.0-only")):
        top = name.replace("-", "") + "_core"
        (tmp_path / top).mkdir()
        (tmp_path / top / "handlers.py").write_text(body)
        info = tmp_path / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\nVersion: 1.0\nLicense-Expression: {licence}\n")
        (info / "RECORD").write_text(f"{top}/handlers.py,,\n{info.name}/METADATA,,\n")
    found = [d for d in packages([tmp_path]) if d["origin"].startswith(("pypi:demo-lib", "pypi:copyleft-lib"))]
    assert [(d["origin"], d["group"], d["license"], d["text"]) for d in found] == [
        ("pypi:demo-lib/handlers.py", "pypi:demo-lib", "MIT", body)]


def test_prepare_refresh_refuses_a_folder_without_documents(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "training" / "prepare.py"), str(tmp_path / "out"), "--refresh"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"{tmp_path / 'out'}/docs.jsonl.xz: no such file"
    assert not (tmp_path / "out").exists()
