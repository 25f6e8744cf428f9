"""A document's format, from its name, where it came from and its first lines."""

import pathlib
import re

SUFFIXES = {
    ".py": "python", ".pyi": "python", ".h": "c", ".hpp": "c", ".hh": "c", ".hxx": "c", ".c": "c", ".cc": "c",
    ".cpp": "c", ".go": "go", ".rs": "rust", ".js": "js", ".mjs": "js", ".cjs": "js", ".ts": "js", ".mts": "js",
    ".cts": "js", ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".mk": "make", ".md": "markdown",
    ".markdown": "markdown", ".rst": "rst", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json",
    ".ini": "ini", ".cfg": "ini", ".conf": "ini", ".cnf": "ini", ".defs": "ini", ".properties": "ini",
}
FORMATS = ("python", "c", "go", "rust", "js", "shell", "make", "markdown", "rst", "toml", "yaml", "json", "ini",
           "keyvalue", "man", "debian-copyright", "debian-changelog", "text")
# Never trained on: how far the skills carry to a kind of file the model never saw.
HELD_OUT_FORMATS = {"toml", "rst"}
SECTION = re.compile(r"^\s*\[[^\]\n]+\]\s*$", re.M)
KEY_SPACE_VALUE = re.compile(r"^[A-Za-z][\w.-]*[ \t]+\S", re.M)
KEY_EQUALS_VALUE = re.compile(r"^\s*[A-Za-z][\w.-]*\s*[=:]", re.M)


def config_format(text):
    """INI-like (sections or `key = value`) or `key value` lines (login.defs, sshd_config)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", ";"))]
    if not lines:
        return "text"
    if SECTION.search(text) or sum(bool(KEY_EQUALS_VALUE.match(ln)) for ln in lines) > len(lines) / 2:
        return "ini"
    if sum(bool(KEY_SPACE_VALUE.match(ln)) for ln in lines) > len(lines) / 2:
        return "keyvalue"
    return "text"


def format_of(name: str, origin: str, text: str) -> str:
    path = pathlib.PurePosixPath(origin.split(":", 1)[-1])
    kind = origin.split(":", 1)[0]
    first = text.lstrip()[:200]
    if kind == "debian-man" or "/man/man" in origin:
        return "man"
    if name == "copyright" and first.startswith("Format:"):
        return "debian-copyright"
    if name.startswith("changelog") and re.match(r"[a-z0-9][\w.+-]* \([^)]+\) [\w-]+", first):
        return "debian-changelog"
    if name in ("Makefile", "GNUmakefile", "makefile") or name.startswith("Makefile."):
        return "make"
    suffix = pathlib.PurePosixPath(name).suffix.lower()
    if suffix in (".conf", ".cfg", ".cnf", ".defs", ".ini", ".properties") or (not suffix and "etc" in path.parts):
        return config_format(text)
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if first.startswith("#!") and re.match(r"#!\s*/(usr/)?bin/(env\s+)?(ba|da|z|k)?sh\b", first):
        return "shell"
    return "text"
