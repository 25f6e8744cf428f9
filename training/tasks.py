"""Questions people ask about a document (training/extract.py's facts), each answered by a
verbatim span of it, or by ABSTAIN where the document does not say.

Question kinds (LABELS):
  exact         the name as written ("What is PASS_MAX_DAYS?")
  paraphrase    its words split, expanded, reordered, with synonyms ("the maximum days of the
                password"), or a key by its path ("server -> tls -> port")
  prose         a value stated in prose ("The default is 22."), a fact from one sentence
  table         a cell by its row's key and its column's header
  quote         "quote / describe X" -> X's description
  follow-up     a second question that refers back without the name ("And its default?")
  unanswerable  about a name the document does not hold -> ABSTAIN
"""

import re

ABSTAIN = "The document does not say."
LABELS = ("exact", "paraphrase", "prose", "table", "quote", "follow-up", "unanswerable")
ABBREVIATIONS = {
    "max": "maximum", "min": "minimum", "cfg": "configuration", "conf": "configuration", "config": "configuration",
    "dir": "directory", "dirs": "directories", "num": "number", "nr": "number", "len": "length", "msg": "message",
    "buf": "buffer", "addr": "address", "auth": "authentication", "env": "environment", "tmp": "temporary",
    "src": "source", "dst": "destination", "dest": "destination", "str": "string", "ptr": "pointer", "err": "error",
    "ctx": "context", "req": "request", "resp": "response", "db": "database", "pkg": "package", "lib": "library",
    "opt": "option", "opts": "options", "param": "parameter", "params": "parameters", "arg": "argument",
    "args": "arguments", "attr": "attribute", "info": "information", "init": "initial", "idx": "index",
    "cnt": "count", "ver": "version", "prev": "previous", "cur": "current", "curr": "current", "sec": "seconds",
    "secs": "seconds", "ms": "milliseconds", "usr": "user", "pass": "password", "passwd": "password",
    "pwd": "password", "uid": "user ID", "gid": "group ID", "perm": "permissions", "perms": "permissions",
    "proto": "protocol", "pid": "process ID", "sys": "system", "tty": "terminal", "mem": "memory",
    "alloc": "allocation", "fmt": "format", "util": "utility", "val": "value", "var": "variable",
    "def": "default", "lang": "language", "ts": "timestamp", "ext": "extension", "hdr": "header",
    "pos": "position", "cmd": "command", "exe": "executable", "bin": "binary", "doc": "documentation",
    "docs": "documentation", "repo": "repository", "srv": "server", "svc": "service", "cert": "certificate",
    "certs": "certificates", "conn": "connection", "conns": "connections", "ttl": "time to live",
}
SYNONYMS = {
    "maximum": ["largest", "highest", "upper limit of the"], "minimum": ["smallest", "lowest", "lower limit of the"],
    "number": ["count"], "directory": ["folder"], "timeout": ["time limit"], "delay": ["wait"],
    "enable": ["turn on"], "disable": ["turn off"], "size": ["length"], "retries": ["attempts"],
    "default": ["standard"], "path": ["location"], "limit": ["cap"],
}
SETTING = ["What is {s}?", "What is {s} set to?", "What value does {s} have?", "Which value is given for {s}?",
           "What is the value of {s}?", "How is {s} set?", "Tell me {s}.", "What does the file give as {s}?"]
STATED = ["What is the default of {s}?", "What does {s} default to?", "What is {s}'s default value?",
          "Which value does {s} take by default?", "What is the default value for {s}?"]
CELL = ["In the table, what is the {c} of {r}?", "What {c} does the table give for {r}?",
        "Which {c} is listed for {r}?", "What is the {c} for {r} in the table?", "Look up {r}: what is its {c}?"]
DESCRIBE = ["Quote the description of {s}.", "Describe {s}.", "What does {s} do? Quote the description.",
            "Give the description of {s}.", "What is {s}? Quote what the document says.",
            "What does the document say about {s}? Quote it."]
SIGNATURE = ["What are the parameters of {s}?", "What is the signature of {s}?", "Which arguments does {s} take?",
             "List the parameters of {s}."]
FOLLOW = {
    "setting": ["And its value?", "What is it set to?", "And what value does it have?"],
    "stated": ["And its default?", "What does it default to?", "And the default value?"],
    "describe": ["What does it do?", "Quote its description.", "And what is it for?", "And its description?"],
    "signature": ["And its parameters?", "What arguments does it take?"],
    "cell": ["And its {c}?", "What about its {c}?"],
}
SIBLING = {"max": "maximum", "min": "minimum"}


def words_of(name):
    """An identifier's words: snake, kebab, dotted and camel case split, lower case."""
    parts = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name))
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", parts) if w]


def spellings(name):
    """Ways an identifier may be written: as given, its words joined by _, -, ., space or nothing."""
    words = words_of(name)
    return {name.lower(), *(sep.join(words) for sep in ("_", "-", ".", " ", ""))}


def paraphrase(rng, name, path=()):
    """The name in other words: -> phrase, or None where nothing differs from the identifier."""
    words = words_of(name)
    if not re.fullmatch(r"[A-Za-z_][\w.-]{0,40}", name):
        return None  # a phrase or an option: its words are the name
    if path and rng.random() < 0.4:
        return " -> ".join([*path, name])
    if path and rng.random() < 0.3:
        return f"{name} under {' -> '.join(path)}"
    out = []
    for w in words:
        w = ABBREVIATIONS.get(w, w)
        if w in SYNONYMS and rng.random() < 0.4:
            w = rng.choice(SYNONYMS[w])
        out.append(w)
    if len(out) >= 3 and rng.random() < 0.5:
        out = out[1:] + ["of", "the", out[0]]
    phrase = " ".join(out)
    if not phrase:  # a name of no words (`_`, `$`) has no paraphrase
        return None
    if path and rng.random() < 0.5:
        phrase += f" in the {' '.join(words_of(path[-1]))} section"
    if re.search(rf"(?<!\w){re.escape(name.lower())}(?!\w)", phrase.lower()):  # not a paraphrase
        return " -> ".join([*path, name]) if path else None
    return phrase


def exact_name(fact, facts):
    """The setting's name as written, or its dotted path where its name alone is not unique."""
    path = fact[4].get("path") or []
    same = sum(f[0] == fact[0] and f[1] == fact[1] for f in facts)
    return ".".join([*path, fact[1]]) if same > 1 and path else fact[1]


def ask(rng, fact, facts, form="exact"):
    """-> (question, label) for `fact` asked first; `form`: exact or paraphrase (settings, terms)."""
    kind, subject, extra = fact[0], fact[1], fact[4] if len(fact) > 4 else {}
    if kind == "prose":
        return extra["question"], "prose"
    if kind == "cell":
        return rng.choice(CELL).format(c=extra["column"], r=extra["row"]), "table"
    name = exact_name(fact, facts) if kind == "setting" else subject
    if form == "paraphrase":
        name = paraphrase(rng, subject, extra.get("path") or [])
        if name is None:
            return None
        name = "the " + name if not name[0].isupper() and " -> " not in name else name
    if kind == "setting":
        return rng.choice(SETTING).format(s=name), form
    if kind == "stated":
        return rng.choice(STATED).format(s=name), "prose"
    if kind == "describe":
        return rng.choice(DESCRIBE).format(s=name), "quote"
    if kind == "signature":
        return rng.choice(SIGNATURE).format(s=name), form
    raise ValueError(f"no questions for a {kind} fact")


def sibling(name):
    """PASS_MAX_DAYS -> (PASS_MIN_DAYS, 'minimum'): the min/max twin's name and word."""
    pieces = re.split(r"([^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z]))", name)
    for k, piece in enumerate(pieces):
        if piece.lower() in SIBLING:
            other = "min" if piece.lower() == "max" else "max"
            other = other.upper() if piece.isupper() else other.title() if piece[0].isupper() else other
            return "".join(pieces[:k] + [other] + pieces[k + 1:]), SIBLING[other.lower()]
    return None


def follow_ups(facts):
    """-> [(i, j, question)]: fact j asked right after fact i, about the same subject (or its
    min/max twin), without naming it."""
    by_subject, out = {}, []
    for i, f in enumerate(facts):
        key = f[4]["row"] if f[0] == "cell" else f[1]
        by_subject.setdefault((key, tuple(f[4].get("path") or [])), []).append(i)
    for (key, path), members in by_subject.items():
        for i in members:
            for j in members:
                a, b = facts[i], facts[j]
                if i == j or a[0] == b[0] and a[0] != "cell" and a[0] != "prose":
                    continue
                if b[0] == "prose":
                    if b[4].get("then") and a[2] != b[2]:
                        out.append((i, j, b[4]["then"]))
                elif b[0] == "cell":
                    if a[0] != "cell" or a[4]["column"] != b[4]["column"]:
                        out.append((i, j, FOLLOW["cell"][0].format(c=b[4]["column"])))
                elif b[0] in FOLLOW:
                    out.append((i, j, FOLLOW[b[0]][0]))
        twin = sibling(key)
        if twin and (twin[0], path) in by_subject:
            for i in members:
                for j in by_subject[(twin[0], path)]:
                    if facts[i][0] == facts[j][0] == "setting":
                        out.append((i, j, f"And the {twin[1]}?"))
    return out


def follow_question(rng, facts, i, j, template):
    b = facts[j]
    if b[0] in FOLLOW and template == FOLLOW[b[0]][0].format(c=b[4].get("column", "")):
        return rng.choice(FOLLOW[b[0]]).format(c=b[4].get("column", ""))
    return template


def absent(subject, texts):
    """No spelling of the subject, nor all of its words, in any of the texts."""
    lowered = [t.lower() for t in texts]
    words = [w for w in words_of(subject) if len(w) > 2]
    return not any(s in t for t in lowered for s in spellings(subject) if len(s) > 1) and \
        not any(words and all(w in t for w in words) for t in lowered)


def unanswerable(rng, fact, facts, texts):
    """A question about another document's `fact` that none of `texts` answers -> (question,
    ABSTAIN), or None where its name appears in them."""
    if fact[0] not in ("setting", "stated", "describe", "signature") or not absent(fact[1], texts):
        return None
    form = "paraphrase" if rng.random() < 0.4 else "exact"
    asked = ask(rng, [*fact[:4], {}], facts, form) or ask(rng, [*fact[:4], {}], facts)
    return asked[0], ABSTAIN
