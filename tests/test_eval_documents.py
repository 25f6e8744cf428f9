"""benchmarks/eval_documents.py on a small held-out data folder: the questions it asks through the
chat are answered by their files (or abstain), the summary counts them, a rerun resumes."""

import json
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

import clsa_mlx
from benchmarks.eval_documents import unquoted
from tests.test_document_tasks import DOCS
from training.data import part_of
from training.extract import doc_facts
from training.facts import facts
from training.tasks import ABSTAIN

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e


def test_documents_are_asked_through_the_chat_and_resume(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with lzma.open(data / "docs.jsonl.xz", "wt") as f:
        for name, origin, text, fmt in DOCS:
            assert part_of("stdlib:ftplib", fmt) == "heldout"
            found = facts(name, text) + doc_facts(name, text, fmt)
            f.write(json.dumps(dict(name=name, text=text, format=fmt, group="stdlib:ftplib", origin=origin,
                                    license="MIT", facts=found)) + "\n")
    cmd = [sys.executable, str(ROOT / "benchmarks/eval_documents.py"), "--model", str(clsa_mlx.shipped_model()),
           "--data", str(data), "--lengths", "600", "--samples", "1", "--models", "clsa", "--formats", "keyvalue",
           "--regression-samples", "0", "--ppl-windows", "0", "--out-dir", str(tmp_path), "--name", "d"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "d.json").read_text())
    tasks = results["tasks"]
    assert {t["format"] for t in tasks} == {"keyvalue"} and {t["label"] for t in tasks} >= {"exact", "unanswerable"}
    texts = [text for _, _, text, _ in DOCS]
    for t in tasks:
        row = t["turns"]["clsa"]
        assert row["answer"] == ABSTAIN if t["label"] == "unanswerable" else any(row["answer"] in x for x in texts)
        assert row["verbatim"] == (row["reply"] == row["answer"])
        assert row["right"] == (unquoted(row["reply"]) == unquoted(row["answer"]))
    every = results["summary"]["clsa"]["600"]["all"]
    assert every["n"] == len(tasks) and every["exact"] == sum(t["turns"]["clsa"]["right"] for t in tasks) / len(tasks)
    assert (tmp_path / "d.png").stat().st_size > 10_000
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and json.loads((tmp_path / "d.json").read_text())["tasks"] == tasks


def test_a_pair_of_quotes_around_a_value_is_not_counted():
    assert unquoted('"#fff"') == "#fff" == unquoted("#fff") and unquoted("'a") == "'a" and unquoted('"') == '"'
