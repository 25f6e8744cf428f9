"""Lookup questions about a real document whose answer is a quote from it.

Each fact is (kind, subject, answer, offset): `answer` occurs in the text at `offset`, and the
subject names it once in the whole document, so the question has one right answer.

  value      NAME = value (Python), #define NAME value (C), key: value / key = value (text)
  signature  the parameter list of a def, as written
  default    a parameter's default, as written
  doc        the first line of a function's or class's docstring
  mention    the whole line that holds a phrase found once in the document
"""

import ast
import collections
import random
import re

MAX_VALUE, MAX_LINE, MAX_SIGNATURE = 48, 120, 400
KINDS = ("value", "signature", "default", "doc", "mention")

QUESTIONS = {
    "value": ["What is the value of {s}?", "What is {s} set to?", "What is {s}?", "What value does {s} have?",
              "Which value is assigned to {s}?", "What does {s} equal?", "Tell me the value of {s}.",
              "How is {s} defined?", "{s} is set to what?", "Find {s}. What is its value?",
              "What is the value of `{s}`?", "What's {s}?"],
    "signature": ["What are the parameters of {s}?", "What is the signature of {s}?", "Which arguments does {s} take?",
                  "List the parameters of {s}.", "What are the arguments of `{s}`?", "How is {s} declared? Give its parameters."],
    "default": ["What is the default value of {p} in {s}?", "What does {p} default to in {s}?",
                "In {s}, what is the default of the parameter {p}?", "What is the default of `{p}` for {s}?",
                "If {p} is not given to {s}, what value does it take?"],
    "doc": ["What does {s} do?", "What is {s} for?", "Describe {s} in one line.",
            "What does the docstring of {s} say?", "What is the first line of {s}'s docstring?"],
    # unquoted too: after a quote the phrase's first word loses the leading "▁" it has in the text
    "mention": ['Which line mentions "{s}"?', 'Quote the line that contains "{s}".',
                'Where does the file say "{s}"? Give the line.', 'Find "{s}" and give the whole line.',
                'What is the full line with "{s}"?', "Which line has the words {s}?", "Give the line that says {s}."],
}


def question(rng: random.Random, kind: str, subject: str) -> str:
    template = rng.choice(QUESTIONS[kind])
    if kind == "default":
        function, parameter = subject.split(" ", 1)
        return template.format(s=function, p=parameter)
    return template.format(s=subject)


def line_offsets(text):
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts


def short(segment):
    return segment and "\n" not in segment and len(segment) <= MAX_VALUE


def python_facts(text):
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    starts, facts, counts = line_offsets(text), [], collections.Counter()
    nodes = []

    def visit(body, owner):
        for node in body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if len(targets) == 1 and isinstance(targets[0], ast.Name) and node.value is not None:
                    name = owner + targets[0].id
                    counts[name] += 1
                    nodes.append(("value", name, node.value))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = owner + node.name
                counts[name] += 1
                nodes.append(("def", name, node))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name + ".")

    visit(tree.body, "")

    def at(node):
        return starts[node.lineno - 1] + node.col_offset

    def source(node):
        """ast.get_source_segment without splitting the whole text again for every node (that
        made a large module quadratic); offsets are in UTF-8 bytes, so only ASCII text."""
        if not text.isascii():
            return ast.get_source_segment(text, node)
        return text[at(node):starts[node.end_lineno - 1] + node.end_col_offset]

    for kind, name, node in nodes:
        if counts[name] != 1:
            continue
        if kind == "value":
            segment = source(node)
            if short(segment):
                facts.append(("value", name, segment, at(node)))
            continue
        doc = ast.get_docstring(node, clean=False)
        first = doc.strip().split("\n")[0].strip() if doc else ""
        if 12 <= len(first) <= MAX_LINE and first[0].isalpha() and first in text:
            facts.append(("doc", name, first, text.index(first, at(node))))
        if isinstance(node, ast.ClassDef):
            continue
        header = text[at(node):].split("\n", 1)[0]
        m = re.match(r"(?:async\s+)?def\s+\w+\s*(\(.*\))\s*(?:->.*)?:\s*(#.*)?$", header)
        if m and len(m.group(1)) <= MAX_LINE and m.group(1) not in ("()", "(self)", "(cls)"):
            facts.append(("signature", name, m.group(1), at(node) + m.start(1)))
        elif not m:
            wrapped = parameters_over_lines(text, text.index("(", at(node)))
            if wrapped:
                facts.append(("signature", name, *wrapped))
        args = node.args
        positional = args.posonlyargs + args.args
        pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        for arg, default in pairs:
            segment = source(default)
            if short(segment):
                facts.append(("default", f"{name} {arg.arg}", segment, at(default)))
    return facts


def parameters_over_lines(text, start):
    """A parameter list written over several lines, as written: -> (text, offset) or None."""
    depth = 0
    for i in range(start, min(len(text), start + MAX_SIGNATURE)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            segment = text[start:i + 1]
            try:
                ast.parse(f"def f{segment}: pass")
            except SyntaxError:
                return None
            return (segment, start) if "\n" in segment and segment.count("\n") <= 8 else None
    return None


DEFINE = re.compile(r"^#\s*define\s+([A-Za-z_]\w*)[ \t]+(\S[^\n]*?)\s*(?:/\*.*)?$", re.M)
KEY_VALUE = re.compile(r"^[ \t]*([A-Za-z][\w.-]{2,40})[ \t]*[:=][ \t]*(\S[^\n]*?)[ \t]*$", re.M)


def pattern_facts(text, pattern):
    found = list(pattern.finditer(text))
    counts = collections.Counter(m.group(1) for m in found)
    return [("value", m.group(1), m.group(2), m.start(2)) for m in found
            if counts[m.group(1)] == 1 and short(m.group(2)) and not m.group(2).endswith("\\")]


def mention_facts(text, rng, n=12):
    """Lines of text holding a 2-5 word phrase found nowhere else in the document."""
    starts, lines, facts = line_offsets(text), text.splitlines(), []
    for i in rng.sample(range(len(lines)), k=min(len(lines), 8 * n)):
        line = lines[i].strip()
        words = line.split()
        if not 20 <= len(line) <= MAX_LINE or len(words) < 4 or not any(w.isalpha() for w in words):
            continue
        size = rng.randint(2, min(5, len(words) - 1))
        at = rng.randrange(0, len(words) - size + 1)
        phrase = " ".join(words[at:at + size])
        if len(phrase) >= 12 and text.count(phrase) == 1 and '"' not in phrase:
            facts.append(("mention", phrase, line, starts[i] + lines[i].index(line)))
            if len(facts) == n:
                break
    return facts


def facts(name: str, text: str, seed: int = 0):
    """Every lookup fact of one document, in document order."""
    rng = random.Random(f"{seed}:{name}:{len(text)}")
    if name.endswith((".py", ".pyi")):
        found = python_facts(text)
    elif name.endswith((".h", ".c")):
        found = pattern_facts(text, DEFINE)
    else:
        found = pattern_facts(text, KEY_VALUE)
    found += mention_facts(text, rng)
    found = [f for f in found if text[f[3]:f[3] + len(f[2])] == f[2]]
    return [list(f) for f in sorted(set(found), key=lambda f: (f[3], f))]  # not set order: it varies by run
