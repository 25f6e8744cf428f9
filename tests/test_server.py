"""The real `mlx_lm.server` on 127.0.0.1, started as a user would (no Python of ours: the folder's
`model_file` and --trust-remote-code), serves concurrent requests of different lengths,
streaming and not, with the text each gets alone, and answers afterwards."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from clsa_mlx.tiny import make_tiny_folder

pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e

ARCHS = {"clsa": {}, "yoco-retention": dict(index_topk=0, sliding_window=None, self_decoder="gated_retention")}
# byte tokenizer: one token per character; window 16, top-k 8; prompt chunks of 256 tokens
PROMPTS = [("The document says: " + "routing once per token " * n)[: n * 23] for n in (2, 19, 33, 44)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, body, timeout=120):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        if not body.get("stream"):
            return json.loads(r.read())["choices"][0]["text"]
        text = ""
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                text += "".join(c.get("text", "") for c in choices)
        return text


def complete(port, prompt, stream=False):
    return post(port, dict(prompt=prompt, max_tokens=24, temperature=0.0, stream=stream))


def chat_usage(port, messages):
    """-> (the reply, the prompt tokens the server took from its prompt cache)."""
    body = dict(messages=messages, max_tokens=20, temperature=0.0)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def chat(port, messages):
    return chat_usage(port, messages)[0]


@contextmanager
def serve(folder, log_path, launcher=()):
    """`python -m mlx_lm server` on a free port (under `launcher`, e.g. mlx.launch); yields (port, log)."""
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [*launcher, sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--trust-remote-code",
         "--host", "127.0.0.1", "--port", str(port), "--prefill-step-size", "256"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # one group: mlx.launch's ranks too
    )
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                log.seek(0)
                pytest.fail(f"mlx_lm.server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    try:
        yield port, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # mlx.launch does not pass SIGTERM on to its ranks
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module", params=list(ARCHS))
def folder(request, tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp(request.param), seed=5, **ARCHS[request.param])


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    with serve(folder, tmp_path_factory.mktemp("log") / "server.log") as running:
        yield running


def test_concurrent_requests_get_their_sequential_answers(server):
    port, log = server
    alone = [complete(port, p) for p in PROMPTS]
    assert all(alone) and len(set(alone)) > 1
    streams = [False, True, False, True]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda a: complete(port, *a), zip(PROMPTS, streams)))
    assert together == alone
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # shortest and longest join mid-flight
        futures = [pool.submit(complete, port, p, s) for p, s in zip(PROMPTS[::-1], streams)]
        assert [f.result() for f in futures] == alone[::-1]
    assert complete(port, PROMPTS[0]) == alone[0]  # still answering
    log.seek(0)
    assert "generation thread died" not in log.read()


def test_concurrent_chats_and_follow_ups_get_their_sequential_answers(server):
    port, log = server
    system = {"role": "system", "content": "You answer questions about documents. " * 5}
    convs = [[system, {"role": "user", "content": f"Question {i}: " + "what does it say? " * (9 * i + 1)}] for i in range(4)]
    alone = [chat(port, c) for c in convs]
    with ThreadPoolExecutor(len(convs)) as pool:
        assert list(pool.map(lambda c: chat(port, c), convs)) == alone
    follow = [c + [{"role": "assistant", "content": a}, {"role": "user", "content": "And then?"}] for c, a in zip(convs, alone)]
    follow_alone = [chat(port, c) for c in follow]
    with ThreadPoolExecutor(len(follow)) as pool:
        assert list(pool.map(lambda c: chat(port, c), follow[::-1])) == follow_alone[::-1]
    log.seek(0)
    assert "generation thread died" not in log.read()


DOCUMENT = "File notes.txt:\n" + "".join(f"Key {i} routes to slot {i * 37 % 101}. " for i in range(40))  # 65 windows


def test_another_question_about_a_document_is_served_from_its_prefix(server, folder, tmp_path):
    """The document is prefilled once: the second question starts from the cache kept at its end
    (framed as `Question: ...` after it, or as a message after it) and gets the uncached reply."""
    framings = [lambda q: [{"role": "user", "content": f"{DOCUMENT}\n\nQuestion: {q}"}],
                lambda q: [{"role": "user", "content": DOCUMENT}, {"role": "user", "content": q}]]
    with serve(folder, tmp_path / "cold.log") as (cold, _):
        uncached = [chat_usage(cold, frame("Which slot has key 7?")) for frame in framings]
    assert [n for _, n in uncached] == [0, 0]
    port, log = server
    for frame, (reply, _) in zip(framings, uncached):
        chat(port, frame("What routes to slot 3?"))
        again, cached = chat_usage(port, frame("Which slot has key 7?"))
        assert cached >= len(DOCUMENT) and again == reply
    log.seek(0)
    assert "generation thread died" not in log.read()
