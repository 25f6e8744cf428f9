"""chat.py driven for real: in a pseudo-terminal (pexpect), one-shot, and the Conversation API."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from clsa_mlx import load
from clsa_mlx.conversation import ChatError, Conversation, model_identity
from clsa_mlx.tiny import make_tiny_folder

pytestmark = pytest.mark.e2e  # subprocesses, terminals, servers or training: pytest -m e2e

pexpect = pytest.importorskip("pexpect")
ROOT = Path(__file__).resolve().parents[1]
STATS = r"\[prompt \d+ tok"


def default_sigint():
    # A test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and so
    # would the chat; a user's terminal has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("chat") / "tiny", index_topk=8, sliding_window=8)


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    p = tmp_path_factory.mktemp("docs") / "notes.txt"
    p.write_text("The value of key bada-ko is 12345.\n" * 20)
    return p


def spawn(folder, *args):
    c = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "12", *args],
                      encoding="utf-8", codec_errors="replace", timeout=90, cwd=str(ROOT))
    c.expect(">> ")
    return c


def ask(c, text):
    """Sends a question; returns what was streamed before the stats line."""
    c.sendline(text)
    c.expect(STATS)
    answer = c.before.split(text, 1)[1]
    c.expect(">> ")
    return answer


def run(folder, *args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(folder), *args],
                          input=stdin, capture_output=True, text=True, errors="replace", cwd=str(ROOT), timeout=120)


def conversation(folder, **kwargs):
    model, tokenizer = load(folder)
    return Conversation(model, tokenizer, model_identity(folder), **kwargs)


def test_streamed_answer_file_and_commands(folder, doc, tmp_path):
    c = spawn(folder)
    assert ask(c, "hello").strip()
    c.sendline(f"/file {doc}")
    c.expect(r"notes.txt: (\d+) tokens added")
    assert int(c.match.group(1)) > 500
    c.expect(">> ")
    assert ask(c, "What is the value of key bada-ko?").strip()
    for line, message in [("/nope", "unknown command /nope"), ("/file missing.txt", "missing.txt: no such file"),
                          ("/load", "/load needs a path"), (f"/load {doc}", "corrupted or not a session file")]:
        c.sendline(line)
        c.expect_exact(message)
        c.expect(">> ")
    assert ask(c, "still there?").strip()  # the chat goes on
    c.sendline("/quit")
    c.expect(pexpect.EOF)
    c.wait()
    assert c.exitstatus == 0


def test_save_quit_load_continues_like_the_uninterrupted_session(folder, tmp_path):
    c = spawn(folder)
    ask(c, "first question")
    straight = ask(c, "second question")
    c.sendeof()
    c.expect(pexpect.EOF)

    c = spawn(folder)
    ask(c, "first question")
    c.sendline(f"/save {tmp_path / 's'}")
    c.expect_exact("saved")
    c.expect(">> ")
    c.sendline("/quit")
    c.expect(pexpect.EOF)

    c = spawn(folder)
    c.sendline(f"/load {tmp_path / 's'}")
    c.expect(r"loaded .* 1 turns")
    c.expect(">> ")
    assert ask(c, "second question") == straight
    c.sendline("/quit")
    c.expect(pexpect.EOF)


def test_ctrl_c_stops_the_reply_and_keeps_the_session(tmp_path):
    # seed 2: greedy decoding of this prompt runs past 600 tokens without an end token
    folder = make_tiny_folder(tmp_path / "long", seed=2, index_topk=8, sliding_window=8)
    c = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "100000"],
                      encoding="utf-8", codec_errors="replace", timeout=90, cwd=str(ROOT), preexec_fn=default_sigint)
    c.expect(">> ")
    c.sendline("talk for a long time")
    c.expect_exact("talk for a long time")
    c.expect(r"\S", timeout=60)  # the reply has started streaming
    c.sendintr()
    c.expect_exact("[stopped]")
    c.expect(r"context (\d+)/")
    used = int(c.match.group(1))
    assert used < 100000
    c.expect(">> ")
    c.sendline("/stats")
    c.expect(r"context (\d+)/")
    assert int(c.match.group(1)) == used  # nothing lost, nothing half-written
    c.expect(">> ")
    c.sendintr()  # one Ctrl-C at the prompt keeps the session, a second one leaves cleanly
    c.expect_exact("[Ctrl-C again or Ctrl-D to leave]")
    c.expect(">> ")
    c.sendline("/stats")
    c.expect(r"context (\d+)/")
    assert int(c.match.group(1)) == used
    c.expect(">> ")
    c.sendintr()
    c.expect_exact("[Ctrl-C again or Ctrl-D to leave]")
    c.sendintr()
    c.expect(pexpect.EOF)
    c.wait()
    assert c.exitstatus == 0


def test_overflow_is_refused_and_the_chat_continues(folder):
    c = spawn(folder, "--max-context", "120")
    c.sendline("x" * 200)
    c.expect_exact("context overflow")
    c.expect(">> ")
    assert ask(c, "short").strip()
    c.sendline("/quit")
    c.expect(pexpect.EOF)


def test_drop_oldest_keeps_going(folder, tmp_path):
    conv = conversation(folder)
    conv.limit, conv.drop_oldest = 160, True
    for i in range(6):
        "".join(conv.ask(f"question number {i} " * 3, max_tokens=8))
        assert conv.used <= conv.limit
    assert len(conv.messages) < 12
    doc = tmp_path / "d.txt"
    doc.write_text("short note " * 4)
    conv.add_document(str(doc))
    "".join(conv.ask("and now?", max_tokens=8))
    assert len(conv.ids) == conv.used <= conv.limit  # the cache is exactly what was tracked


def test_one_shot_prompt_and_stdin(folder, doc):
    a = run(folder, "--prompt", "hello", "--max-tokens", "6")
    assert a.returncode == 0 and a.stdout.strip() and "[prompt" not in a.stdout
    b = run(folder, "--max-tokens", "6", stdin="hello")
    assert b.returncode == 0 and b.stdout == a.stdout
    with_doc = run(folder, "--file", str(doc), "--prompt", "key?", "--max-tokens", "6")
    assert with_doc.returncode == 0
    assert run(folder, "--prompt", "  ").returncode == 1
    missing = run(folder, "--prompt", "hi", "--file", "nope.txt")
    assert missing.returncode == 2 and "nope.txt" in missing.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", "/nonexistent/model", "--prompt", "hi"],
                         capture_output=True, text=True, cwd=str(ROOT))
    assert bad.returncode == 1 and bad.stderr.strip() == "error: /nonexistent/model: no such model folder"
    assert run(folder, "--prompt", "hi", "--temp", "-1").returncode == 2
    assert run(folder, "--prompt", "hi", "--prefill-step-size", "0").returncode == 2
    overflow = run(folder, "--prompt", "y" * 300, "--max-context", "100")
    assert overflow.returncode == 1 and "context overflow" in overflow.stderr


@pytest.mark.parametrize("prefill_step", [2048, 7])
def test_the_cache_holds_exactly_the_rendered_conversation(folder, doc, prefill_step):
    """Prompt reuse is exact: after turns and a document, the cache equals a fresh prefill."""
    conv = conversation(folder, prefill_step=prefill_step)
    "".join(conv.ask("one", max_tokens=5))
    conv.add_document(str(doc))
    "".join(conv.ask("two", max_tokens=5))
    assert len(conv.ids) == conv.used and conv.text_in_cache.endswith(conv.tokenizer.decode(conv.ids[-3:]))
    fresh = conv.model.make_cache()
    probe = mx.array([[5]])
    conv.model(mx.array(conv.ids)[None], cache=fresh)
    assert mx.allclose(conv.model(probe, cache=fresh), conv.model(probe, cache=conv.cache), atol=1e-4)


def test_load_refuses_another_model_and_keeps_the_session(folder, tmp_path):
    conv = conversation(folder)
    "".join(conv.ask("hello", max_tokens=4))
    saved = conv.save(str(tmp_path / "mine"))
    other = make_tiny_folder(tmp_path / "other", seed=1, index_topk=8, sliding_window=8)
    conv2 = conversation(other)
    "".join(conv2.ask("something else", max_tokens=4))
    before = (conv2.used, list(conv2.messages))
    with pytest.raises(ChatError, match="another model"):
        conv2.load(saved)
    Path(tmp_path / "broken.safetensors").write_bytes(Path(saved).read_bytes()[:100])
    with pytest.raises(ChatError, match="corrupted"):
        conv2.load(str(tmp_path / "broken.safetensors"))
    assert (conv2.used, conv2.messages) == before
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def shipped_chat_about(doc):
    """`python chat.py` with no --model (the shipped model), after `/file doc`."""
    c = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--max-tokens", "10"],
                      encoding="utf-8", codec_errors="replace", timeout=120, cwd=str(ROOT))
    c.expect(">> ")
    c.sendline(f"/file {doc}")
    c.expect(r"tokens added")
    c.expect(">> ")
    return c


def test_shipped_model_answers_from_a_file(tmp_path):
    """`python chat.py` with no --model: the shipped model reads a /file and answers from it."""
    filler = "Each function accepts a path object or a string and raises an error when it is missing. " * 8
    doc = tmp_path / "notes.txt"
    doc.write_text(f"{filler}The value of key kavo-tiba is 48213. {filler}The value of key zeta-lumo is 11846. {filler}")
    c = shipped_chat_about(doc)
    c.sendline("What is the value of key zeta-lumo?")
    c.expect(STATS)
    assert "11846" in c.before
    c.expect(">> ")
    c.sendline("What is the value of key kavo-tiba?")
    c.expect(STATS)
    assert "48213" in c.before
    c.sendline("/quit")
    c.expect(pexpect.EOF)


def test_follow_up_questions_about_a_file_are_answered_from_it(tmp_path):
    """A follow-up is asked as the model was trained to read one (`Question: ...`); asked bare,
    the shipped model answered `9` / `3:` and invented a next question."""
    code = (ROOT / "clsa_mlx" / "chat.py").read_text()[:3000]  # real text around the needle
    doc = tmp_path / "notes.txt"
    doc.write_text(f"{code}\nThe pass key is 70531. Remember it. 70531 is the pass key.\n{code}")
    c = shipped_chat_about(doc)
    ask(c, "Who wrote it?")
    assert ask(c, "What is the pass key?").strip() == "70531"
    c.sendline("/quit")
    c.expect(pexpect.EOF)


def test_ctrl_c_inside_a_document_prefill_leaves_the_conversation_as_it_was(folder, doc):
    conv, alone = conversation(folder, prefill_step=64), conversation(folder, prefill_step=64)
    for c in (conv, alone):
        list(c.ask("hello", max_tokens=4))
    before = (conv.used, list(conv.messages), conv.text_in_cache)
    held = sum(c.nbytes for c in conv.cache)

    def ctrl_c(done, total):
        if done >= 256:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.add_document(str(doc), progress=ctrl_c)
    assert conv.documents == [] and (conv.used, list(conv.messages), conv.text_in_cache) == before
    assert sum(c.nbytes for c in conv.cache) <= held  # the rows reserved for the document are given back
    # the next question is asked as if the interrupted document had never been added
    assert "".join(conv.ask("What does it say?", max_tokens=8)) == "".join(alone.ask("What does it say?", max_tokens=8))
    assert conv.used == len(conv.ids) and "notes.txt" not in conv.text_in_cache  # the cache holds no stale rows


def test_ctrl_c_inside_a_question_prefill_puts_the_cache_back(folder):
    conv, alone = conversation(folder, prefill_step=64), conversation(folder, prefill_step=64)
    for c in (conv, alone):
        list(c.ask("hello", max_tokens=4))
    before = (conv.used, list(conv.messages), conv.text_in_cache, list(conv.ids))

    def ctrl_c(done, total):
        if done >= 512:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(conv.ask("tell me about it " * 100, progress=ctrl_c))
    assert (conv.used, list(conv.messages), conv.text_in_cache, list(conv.ids)) == before  # no rebuild needed
    assert "".join(conv.ask("and now?", max_tokens=8)) == "".join(alone.ask("and now?", max_tokens=8))


def test_ctrl_c_in_a_typed_question_prefill_stops_at_once_and_keeps_the_session(folder):
    c = spawn(folder, "--prefill-step-size", "16")
    c.searchwindowsize = 4000  # the echo of the long question need not be searched again and again
    ask(c, "hello")
    c.sendline("/stats")
    c.expect(r"context (\d+)/")
    used = c.match.group(1)
    c.expect(">> ")
    c.sendline('"""')  # a question of many lines, each under the terminal's line limit
    for i in range(8):
        c.sendline(f"line {i}: " + "the routing picks the top keys once per token " * 30)
    c.sendline('"""')
    c.expect(r"\[prefill\] [\d,]+/[\d,]+ tokens")
    time.sleep(0.5)
    c.sendintr()
    t0 = time.perf_counter()
    c.expect(r"\[interrupted\]")
    assert time.perf_counter() - t0 < 2.0  # one 16-token chunk, not the whole prefill
    c.expect(">> ")
    c.sendline("/stats")
    c.expect(r"context (\d+)/")
    assert c.match.group(1) == used
    c.expect(">> ")
    assert ask(c, "and now?") is not None
    c.sendline("/quit")
    c.expect(pexpect.EOF)


def test_file_paths_as_typed_docs_and_stats_after_reset(folder, doc, tmp_path):
    spaced = tmp_path / "my notes.txt"
    spaced.write_text(doc.read_text())
    (tmp_path / "empty.txt").write_text("  \n")
    c = spawn(folder)
    for typed, shown in [(str(tmp_path), "is a folder; /file takes one file"),
                         (str(tmp_path / "empty.txt"), "empty; nothing added"),
                         (f'"{spaced}"', "my notes.txt: "), (str(spaced).replace(" ", "\\ "), "my notes.txt: ")]:
        c.sendline(f"/file {typed}")
        c.expect_exact(shown)
        c.expect(">> ")
    c.sendline("/docs")
    c.expect_exact("[my notes.txt, my notes.txt; context")
    c.expect(">> ")
    ask(c, "What is the value of key bada-ko?")
    c.sendline("/reset")
    c.expect_exact("[conversation cleared]")
    c.expect(">> ")
    c.sendline("/stats")
    c.expect(r"\[(.*)\]\r?\n")
    assert c.match.group(1).startswith("context 0/")  # not the last reply's figures
    c.sendline("/docs")
    c.expect_exact("[no documents]")
    c.sendline("/quit")
    c.expect(pexpect.EOF)


def test_piped_input_starting_with_a_command_runs_line_by_line(folder, doc, tmp_path):
    session = tmp_path / "piped"
    r = run(folder, "--max-tokens", "6", stdin=f"/file {doc}\nWhat is the value of key bada-ko?\n/docs\n/save {session}\n")
    assert r.returncode == 0, r.stderr
    assert "tokens added" in r.stdout and "[notes.txt; context" in r.stdout and "[saved " in r.stdout
    assert (tmp_path / "piped.safetensors").is_file()


def test_drop_oldest_says_what_it_dropped_and_refusals_change_nothing(folder, tmp_path):
    conv = conversation(folder)
    conv.limit, conv.drop_oldest = 200, True
    for i in range(3):
        "".join(conv.ask(f"question number {i} " * 2, max_tokens=8))
    before = (list(conv.messages), conv.used, conv.text_in_cache)
    big = tmp_path / "big.txt"
    big.write_text("far too long " * 40)
    with pytest.raises(ChatError, match=r"this input alone is \d+ tokens; a larger --max-context"):
        conv.add_document(str(big))
    assert (list(conv.messages), conv.used, conv.text_in_cache) == before and conv.documents == []
    "".join(conv.ask("question number 9 " * 4, max_tokens=8))
    assert conv.dropped >= 1 and len(conv.messages) == len(before[0]) + 2 - 2 * conv.dropped
    plain = conversation(folder)
    plain.limit = 60
    with pytest.raises(ChatError, match="/reset, or start with --drop-oldest"):
        for i in range(4):
            "".join(plain.ask(f"q{i} " * 3, max_tokens=4))


def test_typed_lines_are_kept_across_runs(folder, tmp_path):
    env = {**os.environ, "CLSA_MLX_HISTORY": str(tmp_path / "history")}
    c = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "4"],
                      encoding="utf-8", timeout=90, cwd=str(ROOT), env=env)
    c.expect(">> ")
    c.sendline("/stats")
    c.expect(">> ")
    c.sendline("/quit")
    c.expect(pexpect.EOF)
    assert "/stats" in (tmp_path / "history").read_text()
    c = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "4"],
                      encoding="utf-8", timeout=90, cwd=str(ROOT), env=env)
    c.expect(">> ")
    c.send("\x1b[A\x1b[A\r")  # Up twice: the earlier run's /stats (its last line was /quit), then Enter
    c.expect(r"context \d+/")
    c.sendline("/quit")
    c.expect(pexpect.EOF)


def test_a_second_chat_about_the_same_file_starts_from_the_document_cache(tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text("The value of key bada-ko is 12345. " * 100)
    folder = make_tiny_folder(tmp_path / "m", index_topk=8, sliding_window=8)
    env = {**os.environ, "CLSA_MLX_DOCUMENT_CACHE": str(tmp_path / "cache")}
    shown = []
    for _ in range(2):
        c = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "6"],
                          encoding="utf-8", codec_errors="replace", timeout=90, cwd=str(ROOT), env=env)
        c.expect(">> ")
        c.sendline(f"/file {doc}")
        c.expect(r"\[long.txt: (\d+) tokens ([a-z ]+); context")
        shown.append((c.match.group(1), c.match.group(2)))
        c.expect(">> ")
        shown.append(ask(c, "What is the value of key bada-ko?"))
        c.sendline("/quit")
        c.expect(pexpect.EOF)
    assert shown[0][1] == "added" and shown[2] == (shown[0][0], "from the document cache")
    assert shown[1] == shown[3]  # the same answer as after the prefill


def test_a_session_saved_right_after_a_file_loads(folder, tmp_path):
    # after a prompt chunk mlx-lm's window cache holds the window plus the chunk; /load refused that
    doc = tmp_path / "d.txt"
    doc.write_text("The value of key bada-ko is 12345. " * 30)
    conv = conversation(folder, prefill_step=256)
    conv.add_document(str(doc))
    saved = conv.save(str(tmp_path / "s"))
    other = conversation(folder, prefill_step=256)
    other.load(saved)
    assert other.used == conv.used and "".join(other.ask("key?", max_tokens=6)) == "".join(conv.ask("key?", max_tokens=6))
