"""`clsa-serve` as a user starts it, a real server process on 127.0.0.1 with a tiny CLSA model
(byte tokenizer: one token per character; window 16, top-k 8; max_seq_len 4096): no code from
folders, every request checked before the model, a client that leaves stops its request, a failed
step answered with an error, the document prefix kept (in memory and on disk), and concurrent
requests answered exactly as sequential ones. Tests that start servers of their own (the document
prefix across a restart, a failing model) and the bounded soak run are under the e2e marker."""

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from clsa_mlx import mlx_lm_hooks as hooks
from clsa_mlx.serve import main
from clsa_mlx.tiny import byte_tokenizer, make_tiny_folder

LIMIT = 4096
EOS = 257  # the byte tokenizer's </s>
NO_EOS = {str(EOS): -100}
PROMPTS = [("The document says: " + "routing once per token " * n)[: n * 23] for n in (2, 19, 33, 44)]
DOCUMENT = "File notes.txt:\n" + "".join(f"Key {i} routes to slot {i * 37 % 101}. " for i in range(80))  # > 2048


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(folder, tmp_path, *extra, code=None, env=None, command=None):
    """`python -m clsa_mlx.serve` (or `code`, or `command`, run with the same options) on a free
    port: yields (port, process, log path)."""
    port, log_path = free_port(), tmp_path / f"serve-{time.monotonic_ns()}.log"
    command = command or [sys.executable, *(["-c", code] if code else ["-m", "clsa_mlx.serve"])]
    argv = [*command, "--model", str(folder), "--port", str(port), "--prefill-step-size", "256", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"clsa-serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
    try:
        yield port, proc, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def request(port, path, body, timeout=120, raw=None, headers=None):
    """-> (status, parsed JSON reply or the list of stream events)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    if r.getheader("Content-Type", "").startswith("text/event-stream"):
        lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        events = [json.loads(line) for line in lines if line != "[DONE]"]
        return r.status, events
    return r.status, json.loads(text)


def complete(port, prompt, stream=False, **kw):
    status, out = request(port, "/v1/completions", {"max_tokens": 24, "temperature": 0.0, **kw, "prompt": prompt,
                                                    "stream": stream})
    assert status == 200, out
    if stream:
        return "".join(c.get("text", "") for e in out for c in e.get("choices", []))
    return out["choices"][0]["text"]


def chat(port, messages, **kw):
    status, out = request(port, "/v1/chat/completions", dict(messages=messages, max_tokens=20, temperature=0.0, **kw))
    assert status == 200, out
    return out["choices"][0]["message"]["content"], out["usage"]


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid):
    return int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("clsa"), seed=5, max_seq_len=LIMIT)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    empty_home = tmp_path_factory.mktemp("no-hf-cache")
    with serve(folder, tmp, "--prefix-cache-dir", "", env={"HF_HOME": str(empty_home), "HOME": str(empty_home)}) as s:
        yield s


# -- 1. no code from folders ---------------------------------------------------------------------


def test_only_the_model_named_at_start_is_served_and_no_folder_code_runs(server, folder, tmp_path):
    port, _, log = server
    payload = tmp_path / "payload"
    payload.mkdir()
    marker = tmp_path / "ran"
    (payload / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                     "model_file": "evil.py"}))
    (payload / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name in (str(payload), "mlx-community/anything", "../" * 5 + "etc"):
        status, out = request(port, "/v1/completions", dict(prompt="hi", model=name, max_tokens=2))
        assert status == 404 and "not served here" in out["error"]["message"], out
    status, out = request(port, "/v1/completions", dict(prompt="hi", adapters=str(payload), max_tokens=2))
    assert status == 400 and "adapters" in out["error"]["message"]
    assert not marker.exists()
    for name in ("default_model", str(folder)):  # the model itself, by any of its names
        status, out = request(port, "/v1/completions", dict(prompt="hi", model=name, max_tokens=2))
        assert status == 200 and out["model"] == str(folder)
    # /v1/models with no Hugging Face cache folder: the served model, no traceback
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models") as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == [str(folder)] and models["data"][0]["context_length"] == LIMIT
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/default_model") as r:
        assert json.loads(r.read())["id"] == str(folder)
    assert "Traceback" not in log.read_text()


def test_it_binds_this_machine_only_and_refuses_trust_remote_code(server, folder):
    port, proc, log = server
    assert f"on http://127.0.0.1:{port}/v1" in log.read_text()
    listening = {line.split()[1] for line in open("/proc/net/tcp").readlines()[1:]}
    assert f"0100007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening
    with pytest.raises(SystemExit, match="--trust-remote-code is not accepted"):
        main(["--model", str(folder), "--trust-remote-code"])
    with pytest.raises(SystemExit, match=r"^clsa-serve: \S+/missing: no such model folder$"):
        main(["--model", str(folder / "missing")])


# -- 2. every request checked before the model ----------------------------------------------------

HOSTILE = [
    ({"prompt": "hi", "logit_bias": {"99999999": 5}}, 400, "logit_bias: '99999999' is not a token id"),
    ({"prompt": "hi", "logit_bias": {"-3": 5}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": "x"}}, 400, "logit_bias[5]"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt: token 1000000000 is not a token id of this model (0..258)"),
    ({"prompt": [1, -1]}, 400, "token -1"),
    ({"prompt": [1, 2.5]}, 400, "prompt must be"),
    ({"prompt": "x" * LIMIT}, 400, f"the model's context limit (max_seq_len) is {LIMIT} tokens"),
    ({"prompt": ""}, 400, "prompt must be"),
    ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens must be an integer"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": float("nan")}, 400, "temperature"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 2}, 400, "top_p"),
    ({"prompt": "hi", "top_k": 10**6}, 400, "top_k must be an integer from 0 to 259"),
    ({"prompt": "hi", "repetition_context_size": 10**12}, 400, "repetition_context_size"),
    ({"prompt": "hi", "seed": -1}, 400, "seed"),
    ({"prompt": "hi", "n": 3}, 400, "n must be"),
    ({"prompt": "hi", "stop": ["ok", 5]}, 400, "stop must be"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop must be"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream must be"),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options"),
    ({"messages": "hello"}, 400, "messages must be a non-empty list"),
    ({"messages": ["hello"]}, 400, "messages[0] must be an object"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0] must be an object whose role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x"}}]}]},
     400, "text only"),
    ({"messages": [{"role": "user", "content": {"a": 1}}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": False}}, 400,
     "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": "all"}, 400, "tools"),
    ({"messages": [{"role": "user", "content": "y" * LIMIT}]}, 400, f"max_seq_len) is {LIMIT}"),
    ([1, 2, 3], 400, "JSON object"),
]


@pytest.mark.parametrize("body,status,message", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_a_bad_request_gets_a_clear_error(server, body, status, message):
    port, _, _ = server
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    got, out = request(port, path, body)
    assert got == status and message in out["error"]["message"], out


def test_bad_bodies_are_refused_and_the_server_goes_on(server):
    port, proc, log = server
    before = complete(port, PROMPTS[0])
    bodies = [(b"{not json", {}, 400), (b"\xff\xfe", {}, 400), (b"[" * 100000 + b"]" * 100000, {}, 400),
              (b'{"prompt": "hi"}', {"Content-Length": "99999999999"}, 413),
              (b'{"prompt": "hi"}', {"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403)]
    for raw, headers, status in bodies:
        got, out = request(port, "/v1/completions", None, raw=raw, headers=headers)
        assert got == status, out
    with ThreadPoolExecutor(8) as pool:  # hostile and good requests at once
        futures = [pool.submit(request, port, "/v1/completions" if "prompt" in b else "/v1/chat/completions", b)
                   for b, _, _ in HOSTILE if isinstance(b, dict)]
        good = [pool.submit(complete, port, p) for p in PROMPTS[:2]]
        assert all(f.result()[0] >= 400 for f in futures)
        assert good[0].result() == before
    assert complete(port, PROMPTS[0]) == before
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    assert proc.poll() is None and "Traceback" not in log.read_text()


def test_max_tokens_is_capped_by_the_context_left(server):
    port, _, _ = server
    prompt = "z" * (LIMIT - 7)
    status, out = request(port, "/v1/completions", dict(prompt=prompt, max_tokens=10**6, logit_bias=NO_EOS))
    assert status == 200, out
    usage = out["usage"]
    assert usage["prompt_tokens"] == LIMIT - 7 and usage["completion_tokens"] == 7
    assert out["choices"][0]["finish_reason"] == "length"


def test_stop_words_and_logit_bias_inside_the_vocabulary_work(server):
    port, _, _ = server
    free = complete(port, PROMPTS[1])
    stop = free[5:7]
    assert complete(port, PROMPTS[1], stop=[stop]).startswith(free[:5])
    assert stop not in complete(port, PROMPTS[1], stop=[stop])
    (q,) = byte_tokenizer().encode("q")
    biased = complete(port, PROMPTS[1], logit_bias={str(q): 100})
    assert biased == "q" * 24


# -- 3. no work for nobody -------------------------------------------------------------------------


def _idle_after(pid, seconds=1.5):
    t = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - t


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_whose_client_has_gone_stops(server, stream):
    port, proc, _ = server
    body = json.dumps(dict(prompt="Tell me everything. ", max_tokens=LIMIT, logit_bias=NO_EOS, stream=stream)).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    if stream:
        seen = b""
        while b"data: " not in seen:  # it is generating
            seen += s.recv(4096)
    t = cpu_seconds(proc.pid)
    time.sleep(1.0)
    assert cpu_seconds(proc.pid) - t > 0.3  # busy while the client waits
    s.close()
    time.sleep(0.3)
    assert _idle_after(proc.pid) < 0.2  # and idle once it has gone
    assert complete(port, PROMPTS[0])


# -- 4. the model's own path -----------------------------------------------------------------------


def test_prefill_progress_is_reported_to_a_client_that_asks(server):
    port, _, _ = server
    body = dict(prompt=PROMPTS[3], max_tokens=3, stream=True, stream_options={"include_progress": True})
    status, events = request(port, "/v1/completions", body)
    progress = [(e["processed"], e["total"]) for e in events if e.get("object") == "prompt.progress"]
    assert status == 200 and progress[-1] == (len(PROMPTS[3]), len(PROMPTS[3])) and len(progress) >= 4
    assert [p for p, _ in progress] == sorted(p for p, _ in progress)
    status, events = request(port, "/v1/completions", {**body, "stream_options": None})
    assert not [e for e in events if e.get("object") == "prompt.progress"]


@pytest.mark.e2e  # three server starts
def test_a_document_prefix_is_kept_in_memory_and_on_disk(folder, tmp_path):
    """The second question about a document starts from the cache kept at its end; after a restart
    the first one does too (read from the folder); each reply is what a server without any cache
    gives."""
    def ask(q):
        return [{"role": "user", "content": f"{DOCUMENT}\n\nQuestion: {q}"}]

    questions = ["Which slot has key 7?", "What routes to slot 3?"]
    with serve(folder, tmp_path, "--prefix-cache-dir", "", "--prompt-cache-size", "0") as (cold, _, _):
        uncached = [chat(cold, ask(q)) for q in questions]
    assert [u["prompt_tokens_details"]["cached_tokens"] for _, u in uncached] == [0, 0]
    disk = tmp_path / "prefixes"
    with serve(folder, tmp_path, "--prefix-cache-dir", str(disk)) as (port, _, _):
        first, usage = chat(port, ask(questions[0]))
        assert first == uncached[0][0] and usage["prompt_tokens_details"]["cached_tokens"] == 0
        again, usage = chat(port, ask(questions[1]))
        assert again == uncached[1][0] and usage["prompt_tokens_details"]["cached_tokens"] >= len(DOCUMENT)
    assert len(list(disk.glob("*.safetensors"))) == 1
    with serve(folder, tmp_path, "--prefix-cache-dir", str(disk)) as (port, _, log):
        for (reply, _), q in zip(uncached, questions):
            got, usage = chat(port, ask(q))
            assert got == reply and usage["prompt_tokens_details"]["cached_tokens"] >= len(DOCUMENT)


def test_concurrent_requests_get_their_sequential_answers(server):
    port, proc, log = server
    alone = [complete(port, p) for p in PROMPTS]
    assert all(alone) and len(set(alone)) > 1
    streams = [False, True, False, True]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda a: complete(port, *a), zip(PROMPTS, streams))) == alone
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda a: complete(port, *a), zip(PROMPTS[::-1], streams))) == alone[::-1]
    assert "generation thread died" not in log.read_text()


def test_prompt_cache_writes_document_prefixes_and_reads_them_back(folder, tmp_path):
    """In-process: a "system" entry of MIN_TOKENS or more goes to the folder; a new prompt cache
    (a restarted server) finds it for a prompt that starts with it, and only then."""
    import mlx.core as mx

    from clsa_mlx import load
    from clsa_mlx.generate import prefill
    from clsa_mlx.prefix_cache import MIN_TOKENS, PrefixCache
    from clsa_mlx.serve import PromptCache

    model, _ = load(folder)
    ids = [int(t) for t in mx.random.randint(0, 256, (MIN_TOKENS + 5,)).tolist()]
    cache = model.make_cache()
    prefill(model, ids, cache, 512)
    key = ("folder", None, None)
    PromptCache(4, PrefixCache("m", tmp_path, 1.0, in_memory=0), lambda: model).insert_cache(
        key, ids, cache, cache_type="system")
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    restarted = PromptCache(4, PrefixCache("m", tmp_path, 1.0, in_memory=0), lambda: model)
    assert restarted.fetch_nearest_cache(key, ids + [1, 2])[0] is None  # no hint: memory only
    other = restarted.hint = ids[:-1] + [ids[-1] ^ 1]  # another prefix: not on disk
    assert restarted.fetch_nearest_cache(key, other + [1]) == (None, other + [1])
    restarted.hint = ids
    got, rest = restarted.fetch_nearest_cache(key, ids + [1, 2])
    assert rest == [1, 2] and got[len(model.self_decoder.layers)].offset == len(ids)


# -- a failed step ---------------------------------------------------------------------------------

# The model fails (as an allocation would) on any prompt chunk that holds a "~" (id 93), in a batch
# with others too.
FAULTY = """
import sys
from clsa_mlx.model import Model
call = Model.__call__
def failing(self, inputs, *a, **k):
    if inputs.shape[-1] > 1 and (inputs == 93).any().item():
        raise RuntimeError("[malloc] Unable to allocate 1e12 bytes (injected)")
    return call(self, inputs, *a, **k)
Model.__call__ = failing
from clsa_mlx.serve import main
sys.argv[0] = "clsa-serve"
main()
"""


@pytest.mark.e2e  # a server of its own
def test_a_failed_generation_step_is_answered_and_the_server_goes_on(folder, tmp_path):
    with serve(folder, tmp_path, "--prefill-step-size", "2048", code=FAULTY) as (port, proc, log):
        before = complete(port, PROMPTS[2])
        status, out = request(port, "/v1/completions", dict(prompt="~" * 334, max_tokens=4))
        assert status == 500 and "Unable to allocate" in out["error"], out  # mlx-lm's error reply
        status, events = request(port, "/v1/completions", dict(prompt="~" * 334, max_tokens=4, stream=True))
        assert status == 200 and "Unable to allocate" in events[-1]["error"]["message"], events
        assert complete(port, PROMPTS[2]) == before
        alone = [complete(port, p) for p in PROMPTS]
        long = dict(max_tokens=300, logit_bias=NO_EOS)
        long_alone = complete(port, PROMPTS[1], **long)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda p: complete(port, p), PROMPTS)) == alone
            # one reply decoding (not streamed), then prompts prefilled in one padded batch with the
            # failing one: all are served again alone and get their answers; the failing one its error
            decoding = pool.submit(complete, port, PROMPTS[1], **long)
            time.sleep(0.5)
            faulty = pool.submit(request, port, "/v1/completions", dict(prompt="~" * 334, max_tokens=4))
            others = [pool.submit(complete, port, p, s) for p, s in zip(PROMPTS[:3], [False, True, False])]
            assert [f.result() for f in others] == alone[:3]
            status, out = faulty.result()
            assert status == 500 and "Unable to allocate" in out["error"]
            assert decoding.result() == long_alone
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            assert json.loads(r.read())["status"] == "ok"
        assert proc.poll() is None


@pytest.mark.e2e  # a second server
def test_answers_equal_mlx_lm_servers_on_the_same_folder(server, folder, tmp_path):
    """The same requests to `mlx_lm.server --trust-remote-code` on the same folder: the same text."""
    port, _, _ = server
    system = {"role": "system", "content": "You answer questions about documents. " * 5}
    chats = [[system, {"role": "user", "content": f"Question {i}: " + "what does it say? " * (9 * i + 1)}]
             for i in range(3)]
    ours = [complete(port, p, stream=s) for p, s in zip(PROMPTS, [False, True] * 2)]
    ours_chat = [chat(port, c)[0] for c in chats]
    mlx_lm = [sys.executable, "-m", "mlx_lm", "server", "--trust-remote-code"]
    with serve(folder, tmp_path, command=mlx_lm) as (theirs, _, _):
        assert [complete(theirs, p, stream=s) for p, s in zip(PROMPTS, [False, True] * 2)] == ours
        assert [chat(theirs, c)[0] for c in chats] == ours_chat
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda p: complete(theirs, p), PROMPTS)) == [complete(port, p) for p in PROMPTS]


@pytest.mark.e2e  # a server each
@pytest.mark.parametrize("arch", [dict(index_topk=0), dict(index_topk=0, sliding_window=None,
                                                           self_decoder="gated_retention")], ids=["yoco", "retention"])
def test_dense_yoco_and_retention_models_are_served_too(arch, tmp_path):
    folder = make_tiny_folder(tmp_path / "model", seed=5, max_seq_len=LIMIT, **arch)
    with serve(folder, tmp_path, "--prefix-cache-dir", "") as (port, _, log):
        alone = [complete(port, p) for p in PROMPTS]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda a: complete(port, *a), zip(PROMPTS, [False, True] * 2))) == alone
        status, out = request(port, "/v1/completions", dict(prompt="x" * LIMIT))
        assert status == 400 and f"max_seq_len) is {LIMIT}" in out["error"]["message"]
        assert "Traceback" not in log.read_text()


# -- the hooks into mlx-lm's internals ---------------------------------------------------------------


def test_hooks_refuse_an_mlx_lm_they_were_not_written_for():
    hooks.check()
    with pytest.raises(RuntimeError, match="mlx-lm 0.33.0: clsa-mlx's server hooks were written for mlx-lm 0.32.x"):
        hooks.check("0.33.0")


def test_hook_prefix_split_adds_one_segment_at_the_question():
    segments, types = hooks.split_segments([[1, 2], [3, 4, 5, 6, 7]], ["system", "user"], 4)
    assert segments == [[1, 2], [3, 4], [5, 6, 7]] and types == ["system", "system", "user"]
    assert hooks.split_segments([[1, 2, 3]], ["user"], 3) == ([[1, 2, 3]], ["user"])  # at an end: none


def test_hook_install_wraps_mlx_lm_servers_tokenize_once(monkeypatch):
    """What our folders' model_file does under mlx_lm.server: the document prefix becomes its own
    "system" segment, ending after `Question: `."""
    from types import SimpleNamespace

    from mlx_lm import server
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from clsa_mlx import server_prefix

    monkeypatch.setattr(server.ResponseGenerator, "_tokenize", server.ResponseGenerator._tokenize)
    server_prefix.install()
    wrapped = server.ResponseGenerator._tokenize
    server_prefix.install()
    assert server.ResponseGenerator._tokenize is wrapped and wrapped.splits_shared_prefix
    gen = object.__new__(server.ResponseGenerator)
    gen.model_provider = SimpleNamespace(processor=None, cli_args=SimpleNamespace(chat_template_args={}))
    tokenizer = TokenizerWrapper(byte_tokenizer())
    text = "DOC " * 20 + "\n\nQuestion: which?"
    request = server.CompletionRequest("chat", "", [{"role": "user", "content": text}], None, None)
    args = SimpleNamespace(chat_template_kwargs=None)
    prompt, segments, types, _, _ = gen._tokenize(tokenizer, request, args)
    plain = hooks.MLX_TOKENIZE(gen, tokenizer, request, args)
    assert prompt == plain[0] and plain[2] == ["user"] and types == ["system", "user"]
    assert tokenizer.decode(segments[0]).endswith("Question: ") and sum(segments, []) == prompt


def test_hook_step_budget_ends_one_step_after_an_interrupt():
    budget = hooks.StepBudget(budget=60)
    steps = 0
    for _ in budget:
        steps += 1
        if steps == 3:
            budget.interrupt()
        assert steps < 10
    assert steps == 3
    budget.interrupt()
    assert sum(1 for _ in zip(budget, range(5))) == 1  # interrupted between loops: one step, then ends


def test_hook_batch_generator_is_exact_against_mlx_lm_and_one_at_a_time(folder):
    """Ours prefills a lone prompt through the project's loop and a batch through mlx-lm's loop
    without freeing buffers: the same tokens as mlx-lm's BatchGenerator, alone and together."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from clsa_mlx import load

    model, tokenizer = load(folder)
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def run(cls, batch):
        gen = cls(model, max_tokens=12, prefill_step_size=64, completion_batch_size=4, prefill_batch_size=4)
        out = {}
        groups = [prompts] if batch else [[p] for p in prompts]
        for group in groups:
            uids = gen.insert(group)
            tokens = {u: [] for u in uids}
            while any(len(t) < 12 for t in tokens.values()):
                for r in gen.next_generated():
                    tokens[r.uid].append(r.token)
            out.update({len(out) + i: tokens[u] for i, u in enumerate(uids)})
        gen.close()
        return [out[i] for i in range(len(prompts))]

    with mx.stream(mx.default_stream(mx.default_device())):
        theirs_alone, ours_alone = run(BatchGenerator, False), run(hooks.BatchGenerator, False)
        theirs, ours = run(BatchGenerator, True), run(hooks.BatchGenerator, True)
    assert ours_alone == theirs_alone and ours == theirs == theirs_alone


# -- the soak run ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_soak_200_requests_16_at_a_time(server):
    """200 requests, 16 at a time: lengths from 10 tokens to past the limit, some streamed and left
    mid-reply, some hostile. Every good one gets its sequential answer, every bad one a clear
    error, and the server's memory stays within 10% of its level after the first round."""
    port, proc, log = server
    rng = random.Random(7)
    lengths = [10, 40, 200, 900, 2500, LIMIT - 30]
    prompts = [("Soak %d. " % n + "the shared cache is read by every layer " * (n // 30 + 1))[:n] for n in lengths]
    alone = {p: complete(port, p, max_tokens=16) for p in prompts}

    kinds = [rng.choice(["good", "good", "good", "stream", "hostile", "long", "leave"]) for _ in range(200)]

    def one(i):
        kind = kinds[i]
        p = prompts[i % len(prompts)]
        if kind == "good":
            return complete(port, p, max_tokens=16) == alone[p]
        if kind == "stream":
            return complete(port, p, stream=True, max_tokens=16) == alone[p]
        if kind == "hostile":
            body, status, message = HOSTILE[i % len(HOSTILE)]
            path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
            got, out = request(port, path, body)
            return got == status and message in out["error"]["message"]
        if kind == "long":
            got, out = request(port, "/v1/completions", dict(prompt="w" * (LIMIT + i)))
            return got == 400 and str(LIMIT) in out["error"]["message"]
        body = json.dumps(dict(prompt=p, max_tokens=2000, logit_bias=NO_EOS, stream=True)).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode()
                      + body)
            seen = b""
            while b"data: " not in seen and len(seen) < 1 << 20:
                seen += s.recv(65536)
            return b"data: " in seen

    def settled_rss():
        while _idle_after(proc.pid, 0.5) > 0.05:  # the requests left mid-reply have stopped
            pass
        return rss_bytes(proc.pid)

    with ThreadPoolExecutor(16) as pool:
        first = list(pool.map(one, range(40)))
        level = settled_rss()
        rest = list(pool.map(one, range(40, 200)))
    assert all(first) and all(rest), [(i, kinds[i]) for i, ok in enumerate(first + rest) if not ok]
    assert complete(port, prompts[0], max_tokens=16) == alone[prompts[0]]
    assert settled_rss() < 1.1 * level, (rss_bytes(proc.pid), level)
    assert proc.poll() is None and "Traceback" not in log.read_text()
