"""The model that ships inside the package: found from the installed package, answers a
retrieval question, and its cached decoding equals uncached evaluation."""

import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import clsa_mlx
from clsa_mlx.loading import shipped_model

pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e

ROOT = Path(__file__).resolve().parents[1]
FILLER = (
    "The module provides functions for working with paths, files and directories. Each function "
    "accepts a path object or a string, and raises an error when the file does not exist. "
)
NEEDLES = [("kavo-tiba", "48213"), ("mileru-sado", "90357"), ("zeta-lumo", "11846")]


def document(repeats=6):
    parts = [FILLER * repeats]
    for key, value in NEEDLES:
        parts += [f"The value of key {key} is {value}. ", FILLER * repeats]
    return "".join(parts)


def answer(model, tokenizer, question, doc):
    messages = [{"role": "user", "content": f"{doc}\n\nQuestion: {question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return clsa_mlx.generate(model, tokenizer, ids, max_tokens=8), len(ids)


def test_found_in_the_installed_package():
    assert shipped_model() == Path(clsa_mlx.__file__).parent / "shipped"
    model, _ = clsa_mlx.load(shipped_model())
    assert model.args.index_topk > 0  # it is a CLSA model


def test_answers_a_retrieval_question():
    model, tokenizer = clsa_mlx.load(shipped_model())
    doc = document()
    right = 0
    for key, value in NEEDLES:
        text, n = answer(model, tokenizer, f"What is the value of key {key}?", doc)
        right += value in text
    assert n > 2 * model.args.index_topk  # long enough that routing selects
    assert right >= 2, right


def test_cached_decoding_equals_uncached():
    """Prefill then token-by-token decode (routing through the decode path) against one full
    forward (per-row routing): fp32 within 1e-4; the shipped fp16 within 4 fp16 steps at the
    largest logit (the one-row decode path rounds in another order in each of 10 layers: 2 steps
    seen), same argmax everywhere."""
    for dtype in (mx.float32, mx.float16):
        model, tokenizer = clsa_mlx.load(shipped_model())
        model.set_dtype(dtype)
        ids = tokenizer.encode(document(2))[: 3 * model.args.index_topk]
        full = model(mx.array(ids)[None])
        cache = model.make_cache()
        cut = len(ids) - 12
        parts = [model(mx.array(ids[:cut])[None], cache)]
        parts += [model(mx.array(ids[t:t + 1])[None], cache) for t in range(cut, len(ids))]
        inc = mx.concatenate(parts, axis=1)
        fp16_step = 2.0 ** (math.floor(math.log2(mx.abs(full).max().item())) - 10)
        atol = 1e-4 if dtype == mx.float32 else 4 * fp16_step
        assert mx.allclose(inc, full, atol=atol).item(), dtype
        assert mx.array_equal(mx.argmax(inc, axis=-1), mx.argmax(full, axis=-1)).item()


def test_chat_main_job_one_shot():
    """The README's main job, `python chat.py`, on the shipped model (one-shot form)."""
    r = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--max-tokens", "8"],
                       input=f"{document()}\n\nQuestion: What is the value of key zeta-lumo?",
                       capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0 and "11846" in r.stdout, (r.stdout, r.stderr)
