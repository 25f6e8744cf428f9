"""Questions about documents of many formats (training/extract.py, training/tasks.py): every
answer is a verbatim span of the document, paraphrases differ from the identifier, follow-ups
omit the name, unanswerable questions have no answer in any file given."""

import json
import random
import re

import pytest

import clsa_mlx
from clsa_mlx.conversation import Conversation
from training import tasks
from training.data import Sampler, part_of
from training.extract import doc_facts
from training.facts import facts as old_facts
from training.formats import HELD_OUT_FORMATS, format_of

LOGIN_DEFS = """#
# Password aging controls:
#
#\tPASS_MAX_DAYS\tMaximum number of days a password may be used.
#\tPASS_MIN_DAYS\tMinimum number of days allowed between password changes.
#
PASS_MAX_DAYS\t99999
PASS_MIN_DAYS\t0
#
# Max number of login retries if password is bad.
#
LOGIN_RETRIES\t\t5
ENCRYPT_METHOD SHA512
"""
YAML = """server:
  host: example.org
  tls:
    port: 8443
    cert_file: "/etc/ssl/server.pem"
  port: 8080
client:
  retries: 3
  items:
    - name: first
"""
JSON = """{
  "name": "demo-lib",
  "version": "1.4.2",
  "scripts": {
    "test": "node test.js"
  },
  "files": [
    "index.js"
  ],
  "engines": {
    "node": ">=18"
  }
}
"""
INI = """[database]
# Seconds to wait for a connection before giving up.
connect_timeout = 30
max_connections = 100
min_connections = 2

[cache]
max_connections = 8
"""
C_HEADER = """/* The largest frame the decoder accepts. */
#define MAX_FRAME_SIZE 16384
#define VERSION_MAJOR 3

enum color {
    COLOR_RED = 1,
    COLOR_BLUE = 4,
};

/* Open a stream on a file descriptor. */
int stream_open(int fd, const char *mode, size_t buffer_size);
"""
GO = """package demo

// DefaultPort is the port a server listens on.
const DefaultPort = 8080

const (
\tmaxRetries = 5
\tminRetries = 1
)

// Dial connects to the address within the timeout.
func Dial(network, address string, timeout time.Duration) (Conn, error) {
\treturn nil, nil
}
"""
MAN = """SSH_CONFIG(5)                 File Formats Manual                SSH_CONFIG(5)

NAME
     ssh_config - OpenSSH client configuration file

DESCRIPTION
     The file contains keyword-argument pairs, one per line.  The ssh program
     was written by Tatu Ylonen.

     Port    Specifies the port number to connect on the remote host.  The
             default is 22.

     ConnectTimeout
             Specifies the timeout (in seconds) used when connecting to the
             SSH server.  The default is the system TCP timeout.
"""
MARKDOWN = """# demo

The demo tool is a small command-line utility for testing.

| Option | Default | Description |
| --- | --- | --- |
| `--depth` | 3 | How deep to follow links. |
| `--jobs` | 4 | Number of parallel workers. |

- `serve`: Start the web server on the given port.
- `build`: Compile the site into the output folder.
"""
COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: curl
Source: https://curl.se/

Files: *
Copyright: 1996-2024, Daniel Stenberg
License: curl

Files: debian/*
Copyright: 2020, Someone Else
License: MIT
"""
CHANGELOG = """curl (7.88.1-10) bookworm; urgency=medium

  * Fix a crash.

 -- Jane Doe <jane@example.org>  Mon, 01 Jan 2024 12:00:00 +0000

curl (7.88.1-9) bookworm; urgency=low

  * Another fix.

 -- John Roe <john@example.org>  Sun, 31 Dec 2023 12:00:00 +0000
"""
DOCS = [("login.defs", "debian-pkg:login/etc/login.defs", LOGIN_DEFS, "keyvalue"),
        ("config.yaml", "npm:demo/config.yaml", YAML, "yaml"), ("package.json", "npm:demo/package.json", JSON, "json"),
        ("app.ini", "npm:demo/app.ini", INI, "ini"), ("frame.h", "debian-pkg:x/usr/include/frame.h", C_HEADER, "c"),
        ("dial.go", "debian-pkg:y/dial.go", GO, "go"),
        ("ssh_config.5", "debian-man:openssh-client/ssh_config.5.gz", MAN, "man"),
        ("README.md", "npm:demo/README.md", MARKDOWN, "markdown"),
        ("copyright", "debian-pkg:curl/usr/share/doc/curl/copyright", COPYRIGHT, "debian-copyright"),
        ("changelog.Debian", "debian-pkg:curl/usr/share/doc/curl/changelog.Debian.gz", CHANGELOG, "debian-changelog")]


def found(name):
    name, origin, text, fmt = next(d for d in DOCS if d[0] == name)
    return doc_facts(name, text, fmt)


def answers(facts):
    return {(f[0], f[1]): f[2] for f in facts}


@pytest.mark.parametrize("name,origin,text,fmt", DOCS)
def test_formats_and_facts_are_verbatim_spans(name, origin, text, fmt):
    assert format_of(name, origin, text) == fmt
    facts = doc_facts(name, text, fmt)
    assert facts
    for kind, subject, answer, at, extra in facts:
        assert text[at:at + len(answer)] == answer and answer == answer.strip() and answer


def test_what_the_formats_give():
    login = answers(found("login.defs"))
    assert login[("setting", "PASS_MAX_DAYS")] == "99999" and login[("setting", "LOGIN_RETRIES")] == "5"
    assert login[("describe", "PASS_MAX_DAYS")] == "Maximum number of days a password may be used."
    assert login[("setting", "ENCRYPT_METHOD")] == "SHA512"
    yaml = {(f[1], tuple(f[4]["path"])): f[2] for f in found("config.yaml") if f[0] == "setting"}
    assert yaml[("port", ("server", "tls"))] == "8443" and yaml[("port", ("server",))] == "8080"
    assert yaml[("cert_file", ("server", "tls"))] == "/etc/ssl/server.pem" and ("name", ("client",)) not in yaml
    js = {(f[1], tuple(f[4]["path"])): f[2] for f in found("package.json") if f[0] == "setting"}
    assert js[("node", ("engines",))] == ">=18" and js[("test", ("scripts",))] == "node test.js"
    assert js[("version", ())] == "1.4.2"
    ini = {(f[1], tuple(f[4]["path"])): f[2] for f in found("app.ini") if f[0] == "setting"}
    assert ini[("max_connections", ("cache",))] == "8" and ini[("max_connections", ("database",))] == "100"
    described = answers(found("app.ini"))[("describe", "connect_timeout")]
    assert described == "Seconds to wait for a connection before giving up."
    c = answers(found("frame.h"))
    assert c[("setting", "MAX_FRAME_SIZE")] == "16384" and c[("setting", "COLOR_BLUE")] == "4"
    assert c[("signature", "stream_open")] == "(int fd, const char *mode, size_t buffer_size)"
    assert c[("describe", "MAX_FRAME_SIZE")] == "The largest frame the decoder accepts."
    go = answers(found("dial.go"))
    assert go[("setting", "DefaultPort")] == "8080" and go[("setting", "maxRetries")] == "5"
    assert go[("signature", "Dial")] == "(network, address string, timeout time.Duration)"
    assert go[("describe", "Dial")] == "Dial connects to the address within the timeout."
    man = answers(found("ssh_config.5"))
    assert man[("stated", "Port")] == "22"
    assert man[("describe", "Port")] == "Specifies the port number to connect on the remote host."
    wrapped = "Specifies the timeout (in seconds) used when connecting to the\n             SSH server."
    assert man[("describe", "ConnectTimeout")] == wrapped
    md = answers(found("README.md"))
    assert md[("cell", "--depth | Default")] == "3" and md[("describe", "--jobs")] == "Number of parallel workers."
    assert md[("describe", "serve")] == "Start the web server on the given port."
    assert md[("prose", "the demo tool")] == "a small command-line utility for testing"
    cr = answers(found("copyright"))
    assert cr[("setting", "Upstream-Name")] == "curl"
    prose = {f[4]["question"]: f[2] for f in found("copyright") + found("changelog.Debian") if f[0] == "prose"}
    assert prose["Who holds the copyright of the files *?"] == "1996-2024, Daniel Stenberg"
    assert prose["Under which licence are the files debian/*?"] == "MIT"
    assert prose["Who made the upload of version 7.88.1-9?"] == "John Roe <john@example.org>"
    assert prose["What is the urgency of version 7.88.1-10?"] == "medium"


def test_paraphrases_differ_from_the_identifier():
    rng = random.Random(0)
    seen = 0
    for _, _, text, fmt in DOCS:
        facts = doc_facts("x", text, fmt)
        for f in facts:
            if f[0] != "setting":
                continue
            for _ in range(10):
                asked = tasks.ask(rng, f, facts, "paraphrase")
                if asked is None:
                    continue
                seen += 1
                q = asked[0]
                by_path = bool(f[4]["path"]) and " -> ".join(f[4]["path"]) in q
                assert by_path or not re.search(rf"(?<!\w){re.escape(f[1].lower())}(?!\w)", q.lower()), q
    assert seen > 50
    phrases = {tasks.paraphrase(random.Random(i), "PASS_MAX_DAYS") for i in range(40)}
    assert "password maximum days" in phrases and any("largest" in p or "highest" in p for p in phrases)
    assert tasks.paraphrase(random.Random(0), "Port") is None  # one word, nothing to say otherwise
    assert all(tasks.paraphrase(random.Random(i), "_") is None for i in range(10))  # no words at all
    assert all(tasks.ask(random.Random(i), ["setting", "_", "1", 0, dict(path=[])], [], "paraphrase") is None
               for i in range(10))


def test_follow_ups_refer_back_without_the_name():
    rng = random.Random(0)
    pairs = 0
    for _, _, text, fmt in DOCS:
        facts = doc_facts("x", text, fmt)
        for i, j, template in tasks.follow_ups(facts):
            q = tasks.follow_question(rng, facts, i, j, template)
            subject = facts[i][4]["row"] if facts[i][0] == "cell" else facts[i][1]
            assert not any(s in q.lower() for s in tasks.spellings(subject) if len(s) > 2), (subject, q)
            pairs += 1
    login = found("login.defs")
    names = {(login[i][1], login[j][1], t) for i, j, t in tasks.follow_ups(login)}
    assert ("PASS_MAX_DAYS", "PASS_MIN_DAYS", "And the minimum?") in names
    assert ("PASS_MAX_DAYS", "PASS_MAX_DAYS", "And its value?") in names
    man = found("ssh_config.5")
    assert any(man[i][0] == "describe" and man[j][0] == "stated" and man[j][2] == "22"
               for i, j, _ in tasks.follow_ups(man))
    assert pairs > 10


def test_unanswerable_questions_name_what_no_file_holds():
    facts = found("config.yaml")
    assert tasks.unanswerable(random.Random(0), facts[0], facts, [YAML]) is None  # the file has it
    other = found("login.defs")
    q, a = tasks.unanswerable(random.Random(0), other[0], other, [YAML])
    assert a == tasks.ABSTAIN and tasks.absent(other[0][1], [YAML])
    assert not tasks.absent("max_connections", ["the MAX-CONNECTIONS key"])
    assert not tasks.absent("PASS_MAX_DAYS", ["days of the password at most: max"])


def sampler(seed=0):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(clsa_mlx.shipped_model() / "tokenizer.model"))
    docs = [dict(name=n, text=t, format=f, group=o, facts=old_facts(n, t) + doc_facts(n, t, f)) for n, o, t, f in DOCS]
    return Sampler(sp, docs, seed=seed)


def test_chat_tasks_answer_from_their_files_or_abstain():
    s = sampler()
    asked, ask = [], s.abstain_question

    def recorded(fmt, texts):
        out = ask(fmt, texts)
        asked.append(out[1] if out else None)
        return out

    s.abstain_question = recorded
    for label in tasks.LABELS:
        for _ in range(12):
            files, qa, kind = s.chat_parts(900, label)
            assert kind == label
            texts = [t for _, t in files]
            assert all(t.strip() for t in texts)  # the chat refuses an empty file
            for q, a in qa:
                if a == tasks.ABSTAIN:
                    assert label != "unanswerable" or qa[0][1] == a
                else:
                    assert any(a in t for t in texts), (q, a)
            for (q, a), subject in zip([qa for qa in qa if qa[1] == tasks.ABSTAIN], [a for a in asked if a]):
                assert tasks.absent(subject, texts), (q, subject)
            asked.clear()
            if label == "follow-up":
                assert len(qa) >= 2 and qa[1][1] != tasks.ABSTAIN
                assert qa[1][0].split()[0] in ("And", "What", "Quote", "Who"), qa[1][0]


def test_held_out_formats_are_never_trained_on():
    assert HELD_OUT_FORMATS and all(part_of("debian:anything", f) == "heldout" for f in HELD_OUT_FORMATS)
    trained = [g for g in (f"npm:p{i}" for i in range(200)) if part_of(g, "yaml") == "train"]
    assert 150 < len(trained) < 200


def test_a_follow_up_reads_as_the_chat_asks_it(tmp_path):
    """The tokens of a follow-up turn in training equal those the chat feeds after its reply."""
    s = sampler(seed=5)
    model, tokenizer = clsa_mlx.load(clsa_mlx.shipped_model())
    files, qa, _ = s.chat_parts(700, "follow-up")
    ids, _, answers = s.encode(files, qa[:2])
    chat = Conversation(model, tokenizer, model_id="test")
    for j, (name, text) in enumerate(files):
        (tmp_path / str(j)).mkdir()
        (tmp_path / str(j) / name).write_text(text)
        chat.add_document(str(tmp_path / str(j) / name))
    list(chat.ask(qa[0][0], max_tokens=4))
    before = len(chat.ids)
    list(chat.ask(qa[1][0], max_tokens=1))
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    turn = chat.ids[before:-1]
    turn = turn[turn.index(user):]
    start = answers[0][0] + len(answers[0][1]) + 1
    assert turn == ids[start:answers[1][0]]


def test_fetched_files_are_read_by_the_licences_that_may_cover_them(tmp_path):
    """A Debian package's files under its DEP-5 paragraphs that may cover them (all permissive),
    translated manual pages' paragraphs aside; npm and sdist packages by their metadata."""
    from training.sources import fetched

    deb = tmp_path / "deb" / "login"
    (deb / "usr/share/doc/login").mkdir(parents=True)
    (deb / "etc").mkdir()
    (deb / "usr/share/doc/login/copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 1990 Someone\nLicense: BSD-3-clause\n\n"
        "Files: man/hu/man5/*\nCopyright: 2000 Other\nLicense: GPL-2+\n\n"
        "Files: contrib/adduser2.sh\nCopyright: 2001 Other\nLicense: GPL-2+\n")
    (deb / "etc/login.defs").write_text(LOGIN_DEFS * 4)
    (deb / "etc/adduser2.sh").write_text("#!/bin/sh\n" + "NAME=value\n" * 60)
    npm = tmp_path / "npm"
    for name, licence in (("okay", "MIT"), ("copyleft", "GPL-3.0"), ("either", "(MIT OR Apache-2.0)")):
        (npm / name / "package").mkdir(parents=True)
        words = [f"keyword-{i}" for i in range(40)]
        (npm / name / "package/package.json").write_text(json.dumps(dict(name=name, license=licence, keywords=words),
                                                                    indent=2))
        (npm / name / "package/README.md").write_text(MARKDOWN * 3)
    for folder in (deb, *npm.iterdir()):
        (folder / ".done").write_text("")
    (npm / "unfinished" / "package").mkdir(parents=True)  # no .done: an interrupted fetch
    (npm / "unfinished" / "package/README.md").write_text(MARKDOWN * 3)
    got = {(d["origin"], d["license"]) for d in fetched(tmp_path)}
    assert ("debian-pkg:login/etc/login.defs", "BSD-3-clause") in got
    assert not any("adduser2" in o or "copyleft" in o or "unfinished" in o for o, _ in got)
    assert {o for o, _ in got if o.startswith("npm:")} == {
        "npm:okay/package.json", "npm:okay/README.md", "npm:either/package.json", "npm:either/README.md"}


def test_python_facts_read_source_segments_as_ast_does():
    """The fast source segments (ASCII text) against ast.get_source_segment (taken for other text)."""
    import sysconfig
    from pathlib import Path

    from training.facts import python_facts

    for module in ("ftplib.py", "configparser.py", "smtplib.py"):
        text = (Path(sysconfig.get_paths()["stdlib"]) / module).read_text()
        fast = python_facts(text)
        assert len(fast) > 50 and fast == python_facts(text + "# caf\u00e9\n")


def test_a_signature_over_lines_is_quoted_whole():
    """A parameter list wrapped over lines (the stdlib's SMTP.__init__) is one answer, as written."""
    text = ("class SMTP:\n    def __init__(self, host='', port=0,\n                 timeout=30,\n"
            "                 source_address=None):\n        pass\n\n    def quit(self):\n        pass\n")
    found = {(f[0], f[1]): f[2] for f in old_facts("smtp.py", text)}
    assert found[("signature", "SMTP.__init__")] == text[text.index("(self"):text.index("None)") + 5]
    assert found[("default", "SMTP.__init__ timeout")] == "30"
    assert ("signature", "SMTP.quit") not in found  # (self) alone: nothing to ask
