"""Facts of documents of many formats, each answered by a verbatim span of the document.

A fact is [kind, subject, answer, offset, extra]; text[offset:offset + len(answer)] == answer.

  setting    a key or constant and its value; extra: path (the keys above it, outermost first)
  signature  a function's parameter list as written (C, Go, Rust, JavaScript)
  stated     a value stated in prose about a term ("The default is 22."); extra: what ("default")
  cell       a table cell; extra: row, column
  describe   the description of a term: its first sentence, its table cell, the comment on it
  prose      a fact from one sentence; extra: question, and `then` (the question as a follow-up)
"""

import collections
import re

from training.facts import python_facts

MAX_VALUE, MAX_DESCRIPTION = 60, 240
CONFIG = {"ini", "toml", "keyvalue", "yaml", "json"}


def lines_at(text):
    """-> [(line, offset)] without line ends."""
    out, at = [], 0
    for line in text.splitlines(keepends=True):
        out.append((line.rstrip("\r\n"), at))
        at += len(line)
    return out


def value_span(raw, at):
    """A scalar value as written, quotes and trailing separators off -> (answer, offset) or None."""
    stripped = raw.rstrip().rstrip(",;").rstrip()
    quoted = len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "\"'"
    if quoted:
        stripped, at = stripped[1:-1], at + 1
    if not stripped.strip() or len(stripped) > MAX_VALUE or not quoted and stripped[0] in "{[|>&*" \
            or stripped.endswith("\\") or stripped != stripped.strip():
        return None
    return stripped, at


def comment_text(line):
    if re.match(r"^\s*#\s*(?:define|include|if|ifdef|ifndef|endif|else|elif|undef|pragma|error)\b|^#!", line):
        return None  # C preprocessor lines, a shebang
    m = re.match(r"^\s*(?:#+|;+|//+!?|/\*+|\*(?!/))\s?(.*?)\s*(?:\*/)?\s*$", line)
    return m.group(1) if m else None


def description(text, at):
    """A comment's or paragraph's first sentence: -> (sentence, offset) or None."""
    m = re.match(r"(?:[^\n]|\n(?![ \t]*(?:\n|[-*+#|]|$)))*?[.!?](?=\s|$)", text[at:at + MAX_DESCRIPTION + 1])
    line, _, rest = text[at:].partition("\n")
    # without a sentence's end, a line that stands alone (not the start of a longer sentence)
    after = re.sub(r"^[ \t]*(?:#+|//+|\*)?[ \t]*", "", rest.split("\n", 1)[0])
    alone = not after or after[0] in "-*+|" or after[0].isupper()
    sentence = m.group(0) if m else line.rstrip() if alone else ""
    words = sentence.split()
    if len(words) < 3 or not sentence[0].isalpha() or len(sentence) > MAX_DESCRIPTION or "=" in sentence:
        return None
    return sentence, at


def comment_above(text, lines, i):
    """The first line of the comment block right above line i -> (text, offset) or None."""
    j = i
    while j > 0 and comment_text(lines[j - 1][0]) is not None and lines[j - 1][0].strip():
        j -= 1
    for line, at in lines[j:i]:
        body = comment_text(line)
        if body and len(body.split()) >= 3 and body[0].isalpha() and not body.endswith(":"):
            return description(text, at + line.index(body))
    return None


def config_settings(text, fmt):
    """Keys with scalar values and the path of keys or sections above them."""
    lines, out, stack, section = lines_at(text), [], [], []
    for i, (line, at) in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";", "//")):
            continue
        if fmt in ("ini", "toml") and stripped.startswith("[") and stripped.endswith("]"):
            name = stripped.strip("[]").strip()
            section = [p.strip().strip('"') for p in name.split(".")] if fmt == "toml" else [name]
            continue
        if fmt == "yaml":
            m = re.match(r"^( *)([A-Za-z_][\w.-]*|\"[^\"\n]+\"):(?:[ \t]+(\S.*?))?[ \t]*$", line)
            item = re.match(r"^( *)- ", line)
            if item:
                while stack and stack[-1][0] >= len(item.group(1)):
                    stack.pop()
                stack.append((len(item.group(1)), "[]"))
                continue
            if not m:
                continue
            while stack and stack[-1][0] >= len(m.group(1)):
                stack.pop()
            key, raw = m.group(2).strip('"'), m.group(3)
            if raw is None:
                stack.append((len(m.group(1)), key))
                continue
            raw = re.sub(r"[ \t]+#.*$", "", raw)
            path, start = [k for _, k in stack], at + m.start(3)
        elif fmt == "json":
            m = re.match(r'^\s*"([^"\\\n]{1,60})"\s*:\s*(.*?)\s*$', line)
            opens = stripped[-1] in "{[" and not stripped.endswith(("{}", "[]"))
            if m and opens:
                stack.append(m.group(1) if stripped.endswith("{") else "[]")
                continue
            if not m:
                if stripped[0] in "}]":
                    for _ in re.findall(r"[}\]]", stripped.split('"')[0]):
                        stack and stack.pop()
                elif opens:
                    stack.append("[]" if stack and stack[-1] == "[]" or stripped.endswith("[") else "")
                continue
            key, raw, path, start = m.group(1), m.group(2), [k for k in stack if k], at + m.start(2)
        else:
            pattern = {"keyvalue": r"^\s*([A-Za-z][\w.-]*)[ \t]+(\S.*?)\s*$",
                       "toml": r"^\s*([A-Za-z_][\w.-]*|\"[^\"\n]+\")\s*=\s*(\S.*?)\s*$"}.get(
                fmt, r"^\s*([A-Za-z_][\w.-]*)\s*[=:]\s*(\S.*?)\s*$")
            m = re.match(pattern, line)
            if not m:
                continue
            key, raw, path, start = m.group(1).strip('"'), m.group(2), section, at + m.start(2)
            raw = re.sub(r"[ \t]+[#;].*$", "", raw) if fmt != "keyvalue" else re.sub(r"[ \t]+#.*$", "", raw)
        if "[]" in path:
            continue
        span = value_span(raw, start)
        if span:
            out.append((key, list(path), *span, i))
    return out


DECLARATIONS = {
    "c": [r"^#\s*define\s+([A-Za-z_]\w*)[ \t]+(\S[^\n]*?)\s*(?:/\*.*)?$",
          r"^\s+([A-Z][A-Z0-9_]{2,})\s*=\s*([^,\n/]+?)\s*,?\s*(?:/[/*].*)?$"],
    "go": [r"^const\s+([A-Za-z_]\w*)(?:\s+[\w.]+)?\s*=\s*(\S[^\n]*?)\s*(?://.*)?$",
           r"^\t([A-Za-z_]\w*)(?:\s+[\w.]+)?\s*=\s*(\S[^\n]*?)\s*(?://.*)?$(?=(?:\n\t[^\n]*|\n)*\n\))"],
    "rust": [r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const|static)\s+([A-Z_][A-Z0-9_]*)\s*:\s*[^=\n]+=\s*([^;\n]+);"],
    "js": [r"^(?:export\s+)?(?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*(?::\s*[\w<>\[\]| ]+)?=\s*([^;\n]+?);?\s*$"],
    "shell": [r"^(?:export\s+)?([A-Za-z_]\w*)=(\S[^\n]*?)\s*$"],
    "make": [r"^([A-Za-z_][\w.-]*)\s*[:?+]?=\s*(\S[^\n]*?)\s*$"],
}
SIGNATURES = {
    "c": r"^\s*(?:extern\s+)?[A-Za-z_][\w \t*]*?[\s*]([A-Za-z_]\w*)\s*(\([^;{}()]*(?:\([^;{}()]*\)[^;{}()]*)*\))\s*;",
    "go": r"^func\s+(?:\([^)]*\)\s*)?([A-Za-z_]\w*)(?:\[[^\]]*\])?(\([^)\n]*\))",
    "rust": r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:(?:const|async|unsafe|extern \"C\")\s+)*fn\s+(\w+)"
            r"(?:<[^>\n]*>)?(\([^)\n]*\))",
    "js": r"^(?:export\s+)?(?:default\s+)?(?:declare\s+)?(?:async\s+)?function\*?\s*([A-Za-z_$][\w$]*)\s*"
          r"(?:<[^>\n]*>)?(\([^)\n]*\))",
}


KEYWORDS = {"if", "while", "for", "return", "sizeof", "switch"}


def code_facts(text, fmt):
    lines, out = lines_at(text), []
    starts = {at: i for i, (_, at) in enumerate(lines)}
    for pattern in DECLARATIONS.get(fmt, []):
        for m in re.finditer(pattern, text, re.M):
            span = value_span(m.group(2), m.start(2))
            if span and not span[0].startswith(("(", "`", "function", "require(")) or span and span[0].startswith("(") \
                    and span[0].endswith(")") and len(span[0]) < 24:
                line = starts.get(text.rfind("\n", 0, m.start()) + 1)
                out.append((m.group(1), [], *span, line))
    sigs = []
    if fmt in SIGNATURES:
        for m in re.finditer(SIGNATURES[fmt], text, re.M):
            if m.group(2) not in ("()", "(void)") and len(m.group(2)) <= 160 and m.group(1) not in KEYWORDS:
                sigs.append((m.group(1), m.group(2), m.start(2), starts.get(text.rfind("\n", 0, m.start(1)) + 1)))
    return out, sigs


def unique(items, key):
    counts = collections.Counter(map(key, items))
    return [x for x in items if counts[key(x)] == 1]


def settings_facts(text, fmt):
    lines = lines_at(text)
    if fmt in CONFIG:
        found, sigs = config_settings(text, fmt), []
    else:
        found, sigs = code_facts(text, fmt)
    found = unique(found, lambda s: (tuple(s[1]), s[0]))
    out = [["setting", key, answer, at, dict(path=path)] for key, path, answer, at, _ in found]
    out += [["signature", name, sig, at, {}] for name, sig, at, _ in unique(sigs, lambda s: s[0])]
    described = {}
    for key, path, _, _, i in found:
        d = comment_above(text, lines, i) if i is not None else None
        if d:
            described[(tuple(path), key)] = d
    for name, _, _, i in unique(sigs, lambda s: s[0]):
        d = comment_above(text, lines, i) if i is not None else None
        if d:
            described[((), name)] = d
    # `#  KEY  what it is` comment lines (login.defs) describe a key of the file
    keys = collections.Counter(k for k, _, _, _, _ in found)
    for line, at in lines:
        m = re.match(r"^\s*#+\s*([A-Za-z][\w.-]+)[ \t]+(?:-+\s+)?([A-Z][^\n]*)$", line)
        if m and keys[m.group(1)] == 1 and len(m.group(2).split()) >= 3:
            d = description(text, at + m.start(2))
            if d:
                described[((), m.group(1))] = d
    used = collections.Counter(d[0] for d in described.values())
    out += [["describe", key, d[0], d[1], dict(path=list(path))] for (path, key), d in described.items()
            if used[d[0]] == 1]
    return out


# the value ends the clause: "The default is 22." (not "defaults to current directory")
DEFAULT = re.compile(r"(?:[Tt]he )?[Dd]efault(?: value| setting)? is:?[ \n]+"
                     r"(?:``|\"|')?([\w./:~@%+-]+?)(?:''|\"|')?(?:[.,;)](?=\s|$)|$)"
                     r"|[Dd]efaults to:?[ \n]+(?:``|\"|')?([\w./:~@%+-]+?)(?:''|\"|')?(?:[.,;)](?=\s|$)|$)", re.M)
NOT_VALUES = {"to", "not", "the", "a", "an", "that", "set", "used", "this", "for", "as", "is", "in", "taken", "given"}


def stated(term, text, start, end):
    """'The default is X.' inside text[start:end] (a term's description)."""
    for m in DEFAULT.finditer(text, start, end):
        g = 1 if m.group(1) else 2
        if m.group(g).lower() not in NOT_VALUES:
            return ["stated", term, m.group(g), m.start(g), dict(what="default")]
    return None


def term_like(term):
    """A man page's tag: an option or a keyword, not words of a sentence."""
    return bool(re.fullmatch(r"[-+]*[\w.:\[\]=\",<>|/ -]{1,50}", term)) and len(term.split()) <= 4 \
        and not term.endswith((".", ":", ","))


def term_blocks(text, fmt):
    """(term, description start, paragraph end) of man-page tags, Markdown list items and
    headings, reStructuredText directives and definition lists."""
    lines, out = lines_at(text), []
    if fmt == "man":
        for i, (line, at) in enumerate(lines[:-1]):
            indent = len(line) - len(line.lstrip())
            if not 3 <= indent <= 30 or not line.strip():
                continue
            m = re.match(r"^( +)(\S(?:\S| (?! ))*)( {2,})(\S.*)$", line)
            nxt = lines[i + 1][0]
            deeper = len(nxt) - len(nxt.lstrip()) if nxt.strip() else 0
            if m and term_like(m.group(2)) and (deeper == m.start(4) or not nxt.strip()):
                body, col = at + m.start(4), m.start(4)
            elif deeper >= indent + 3 and term_like(line.strip()):
                body, col = lines[i + 1][1] + deeper, deeper
            else:
                continue
            end = body
            for line2, at2 in lines[i + 1:]:
                if not line2.strip() or len(line2) - len(line2.lstrip()) < col:
                    break
                end = at2 + len(line2)
            end = max(end, text.find("\n", body) if "\n" in text[body:] else len(text))
            out.append((line.strip() if body > at + len(line) else m.group(2), body, end))
    elif fmt == "markdown":
        for i, (line, at) in enumerate(lines):
            m = re.match(r"^\s*[-*+] +(?:\*\*|`)([^*`\n]{1,60}?)(?:\*\*|`)(?:\*\*)?\s*"
                         r"(?:[:\-\u2013\u2014]\s*)?(?=\S)", line)
            if m and len(line) > m.end() + 10:
                out.append((m.group(1).strip(), at + m.end(), at + len(line)))
            h = re.match(r"^#{2,5} +`?([\w.:-]+(?:\([^)\n]*\))?)`?\s*$", line)
            if h and i + 2 < len(lines) and not lines[i + 1][0].strip() and lines[i + 2][0][:1].isalpha():
                out.append((h.group(1), lines[i + 2][1], lines[i + 2][1] + len(lines[i + 2][0])))
    elif fmt == "rst":
        for i, (line, at) in enumerate(lines[:-2]):
            m = re.match(r"^\.\. (?:\w+:)?(?:option|function|method|class|data|attribute|envvar|confval)"
                         r":: +(\S.*)$", line)
            term = m.group(1).strip() if m else None
            if not m and re.match(r"^[A-Za-z`*-][^\n]{0,50}$", line) and not line.endswith("::") \
                    and re.match(r"^ {2,4}[A-Za-z]", lines[i + 1][0]):
                term = line.strip().strip("`*")
            if not term:
                continue
            j = i + 1
            while j < len(lines) and (not lines[j][0].strip() or lines[j][0].lstrip().startswith(":")):
                j += 1
            if j < len(lines) and lines[j][0].startswith(" "):
                first = lines[j][1] + len(lines[j][0]) - len(lines[j][0].lstrip())
                out.append((term, first, lines[j][1] + len(lines[j][0])))
    return out


def described_terms(text, fmt):
    out = []
    for term, body, end in term_blocks(text, fmt):
        d = description(text, body)
        if d and d[0][0].isupper():
            out.append(["describe", term, d[0], d[1], dict(path=[])])
        s = stated(term, text, body, end)
        if s:
            out.append(s)
    return unique(out, lambda f: (f[0], f[1]))


def table_facts(text):
    """Markdown tables: each cell by its row's first cell and its column's header."""
    lines, out, i = lines_at(text), [], 0
    while i + 2 < len(lines):
        head, sep = lines[i][0], lines[i + 1][0]
        if not (head.lstrip().startswith("|") and re.match(r"^\s*\|?\s*:?-{2,}", sep)):
            i += 1
            continue
        headers = [c.strip().strip("*`") for c in head.strip().strip("|").split("|")]
        rows, j = [], i + 2
        while j < len(lines) and lines[j][0].lstrip().startswith("|"):
            line, at = lines[j]
            cells, pos = [], line.index("|") + 1
            for raw in line[pos:].split("|"):
                cells.append((raw.strip(), at + pos + len(raw) - len(raw.lstrip())))
                pos += len(raw) + 1
            rows.append(cells)
            j += 1
        keys = collections.Counter(r[0][0] for r in rows)
        for cells in rows:
            row = cells[0][0].strip("`*")
            if keys[cells[0][0]] != 1 or not row or len(row) > 60 or "](" in row:
                continue
            for column, (cell, at) in zip(headers[1:], cells[1:]):
                if cell and column and len(cell) <= 160 and headers.count(column) == 1 and "\\|" not in cell \
                        and "![" not in cell:
                    out.append(["cell", f"{row} | {column}", cell, at, dict(row=row, column=column)])
                    if column.lower() in ("description", "meaning", "purpose", "summary", "explanation", "details"):
                        out.append(["describe", row, cell, at, dict(path=[])])
        i = j
    return out


SUBJECT = r"^(?P<s>(?:The |An? )?[A-Za-z][\w`'.-]*(?: [\w`'.-]+){0,3}) "
PROSE = [  # (pattern over one sentence, question, follow-up question)
    (SUBJECT + r"(?P<v>is|are|was|were) (?P<a>(?:an?|the) [^.;:\n]{3,90})\.$", "What {v} {s}?", None),
    (SUBJECT + r"(?:was |were |is |are )?(?P<v>written|developed|maintained|created|designed) by "
     r"(?P<a>[A-Z][^.;:\n]{2,60})\.$", "Who {v} {s}?", "And who {v} it?"),
    (SUBJECT + r"(?P<v>requires|supports|uses|returns|provides|accepts|contains) (?P<a>[^.;:\n]{3,90})\.$",
     "What does {s} {base}?", "And what does it {base}?"),
    (SUBJECT + r"(?P<v>has|have|takes|holds|contains|uses|supports|allows) (?:up to |at most |at least )?"
     r"(?P<a>\d[\d,]*) (?P<n>[a-z]+)\b[^\n]*\.$", "How many {n} does {s} {base}?", None),
]


PRONOUNS = {"This", "It", "There", "These", "That", "They", "He", "She", "We", "You", "Every", "Each", "Some", "All",
            "Here", "Which", "What", "One", "Its", "Their", "Our", "Your", "Both", "Such", "Other", "Another", "I"}


def sentences(text):
    """Single-line sentences of prose: -> (sentence, offset)."""
    for m in re.finditer(r"(?:(?<=^)|(?<=[.!?] )|(?<=\n))([A-Z][^\n.!?]{8,160}[.])(?= |$)", text, re.M):
        yield m.group(1), m.start(1)


def prose_facts(text):
    out = []
    for sentence, at in sentences(text):
        for pattern, question, then in PROSE:
            m = re.match(pattern, sentence)
            if not m:
                continue
            s, v = m.group("s"), m.group("v")
            if s.split()[0] in PRONOUNS or len(s.split()) == 1 and s[0].isupper() and s.lower() in text:
                break
            if s.split()[0] in ("The", "A", "An"):
                s = s[0].lower() + s[1:]
            base = {"has": "have", "does": "do"}.get(v, v[:-1] if v.endswith("s") and v not in ("is", "was") else v)
            v = {"written": "wrote"}.get(v, v)
            q = question.format(s=s, v=v, base=base, n=m.groupdict().get("n"))
            if q[0].islower():
                q = q[0].upper() + q[1:]
            out.append(["prose", s, m.group("a"), at + m.start("a"),
                        dict(question=q, then=then.format(v=v, base=base) if then else None)])
            break
    return unique(out, lambda f: f[4]["question"])


def changelog_facts(text):
    out, version = [], None
    for line, at in lines_at(text):
        m = re.match(r"^[a-z0-9][\w.+-]* \(([^)\s]+)\) ([\w-]+); urgency=(\w+)", line)
        if m:
            version = m.group(1)
            s = f"version {version}"
            out.append(["prose", s, m.group(2), at + m.start(2), dict(
                question=f"Which distribution was {s} uploaded to?",
                then="And which distribution was it uploaded to?")])
            out.append(["prose", s, m.group(3), at + m.start(3), dict(
                question=f"What is the urgency of {s}?", then="And its urgency?")])
            continue
        m = re.match(r"^ -- (.+? <[^>\n]+>)  (\S.*)$", line)
        if m and version:
            s = f"version {version}"
            out.append(["prose", s, m.group(1), at + m.start(1), dict(
                question=f"Who made the upload of {s}?", then="And who uploaded it?")])
            out.append(["prose", s, m.group(2), at + m.start(2), dict(
                question=f"When was {s} uploaded?", then="And when was it uploaded?")])
            version = None
    return unique(out, lambda f: f[4]["question"])


def copyright_facts(text):
    """DEP-5: the header's fields as settings; each Files paragraph's one-line Copyright and its License."""
    out = []
    for para in re.finditer(r"(?:[^\n]+\n?)+", text):
        body, start = para.group(0), para.start(0)
        fields = {m.group(1): m for m in re.finditer(r"^([A-Z][\w-]*):[ \t]*(\S[^\n]*)$", body, re.M)}
        files = fields.get("Files")
        for name, m in fields.items():
            value, at = m.group(2).strip(), start + m.start(2)
            if files is None and name in ("Upstream-Name", "Upstream-Contact", "Source", "Comment"):
                span = value_span(value, at)
                if span:
                    out.append(["setting", name, *span, dict(path=[])])
            elif files is not None and name in ("Copyright", "License") and len(value) <= 120:
                one_line = name == "License" or not re.match(r"^[ \t]", body[m.end() + 1:m.end() + 2] or "x")
                if not one_line:
                    continue
                pattern = files.group(2).strip()
                q = {"Copyright": f"Who holds the copyright of the files {pattern}?",
                     "License": f"Under which licence are the files {pattern}?"}[name]
                then = {"Copyright": "And who holds their copyright?", "License": "And their licence?"}[name]
                out.append(["prose", f"files {pattern}", value, at, dict(question=q, then=then)])
    return unique(out, lambda f: (f[0], f[1], f[4].get("question")))


def doc_facts(name, text, fmt, python=None):
    """Every fact of one document, in document order. `python`: its python_facts, if found before."""
    if fmt == "python":
        python = python_facts(text) if python is None else python
        found = [["setting", s, a, at, dict(path=s.split(".")[:-1])] if k == "value" else
                 ["describe", s, a, at, dict(path=[])] for k, s, a, at in python if k in ("value", "doc")]
        found = [[f[0], f[1].rsplit(".", 1)[-1] if f[0] == "setting" else f[1], *f[2:]] for f in found]
    elif fmt == "debian-copyright":
        found = copyright_facts(text)
    elif fmt == "debian-changelog":
        found = changelog_facts(text)
    else:
        found = settings_facts(text, fmt) if fmt in CONFIG or fmt in DECLARATIONS or fmt in SIGNATURES else []
        if fmt in ("man", "markdown", "rst"):
            found += described_terms(text, fmt)
        if fmt == "markdown":
            found += table_facts(text)
        if fmt in ("man", "markdown", "rst", "text"):
            found += prose_facts(text)
    found = [f for f in found if text[f[3]:f[3] + len(f[2])] == f[2] and f[2].strip() == f[2] and f[2]]
    return sorted(found, key=lambda f: (f[3], f[0], f[1]))
