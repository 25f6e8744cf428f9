"""Real documents on this machine under permissive licences, each with its licence and origin.

- CPython's standard library sources and C headers (PSF-2.0);
- the Python packages installed beside it, or in folders given only to be read, whose metadata
  names a permissive licence (their sources and documentation files);
- Debian's manual pages (rendered to text) and /usr/share/doc text of packages whose DEP-5
  copyright file names only permissive licences.

A document's `group` (a package or top-level module) decides the train / held-out split, so no
part of a held-out package is ever trained on.
"""

import gzip
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

PERMISSIVE = re.compile(r"^(mit|expat|bsd|isc|apache|psf|python|zlib|x11|public.?domain|mpl|unlicense|0bsd|"
                        r"boost|curl|hpnd|cc0|permissive|historical)", re.I)
TEXT_SUFFIXES = {".py", ".pyi", ".md", ".rst", ".txt", ".h", ".c", ".cfg", ".toml", ".ini", ".json", ".yaml"}
MIN_CHARS, MAX_CHARS = 400, 400_000
SKIP_PARTS = {"test", "tests", "testing", "idlelib", "site-packages", "dist-packages", "__pycache__", "_vendor"}


def doc(name, text, licence, origin, group):
    return dict(name=name, text=text, license=licence, origin=origin, group=group)


def readable(path: pathlib.Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if not MIN_CHARS <= len(text) <= MAX_CHARS or not text.isascii() or "\x00" in text:
        return None
    if max(map(len, text.splitlines())) > 400:  # generated tables, minified data
        return None
    return text


def tree(root: pathlib.Path, licence, origin, group_of):
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix in TEXT_SUFFIXES and path.is_file() and not SKIP_PARTS & set(rel.parts):
            text = readable(path)
            if text:
                yield doc(path.name, text, licence, f"{origin}/{rel}", group_of(rel))


def stdlib():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    yield from tree(root, "PSF-2.0", "cpython-stdlib", lambda rel: "stdlib:" + rel.parts[0].removesuffix(".py"))
    include = pathlib.Path(sysconfig.get_paths()["include"])
    yield from tree(include, "PSF-2.0", "cpython-include", lambda rel: "include:" + rel.parts[0].removesuffix(".h"))


def package_licence(dist):
    meta = dist.metadata
    names = [meta.get("License-Expression") or "", (meta.get("License") or "").split("\n")[0]]
    names += [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    names = [n for n in names if n and n != "UNKNOWN"]
    if names and all(PERMISSIVE.match(n.replace("License", "").strip()) or "BSD" in n or "MIT" in n for n in names):
        return names[0]
    return None


def top_level(dist):
    """A distribution's top-level folders: top_level.txt, else (newer build backends write none)
    the first part of its files' paths."""
    listed = (dist.read_text("top_level.txt") or "").split()
    if listed:
        return listed
    found = {f.parts[0] for f in dist.files or () if len(f.parts) > 1 and f.suffix == ".py"}
    return sorted(top for top in found if top.isidentifier())  # not "..", not *.dist-info


def packages(extra=()):
    """`extra`: folders of packages installed only to be read (`pip install --target DIR`)."""
    seen = set()
    for dist in importlib.metadata.distributions(path=[*map(str, extra), *sys.path]):
        licence, name = package_licence(dist), dist.metadata["Name"]
        if not licence or name in seen:
            continue
        seen.add(name)
        for top in top_level(dist):
            root = pathlib.Path(dist.locate_file(top))
            if root.is_dir():
                yield from tree(root, licence, f"pypi:{name}", lambda rel, n=name: "pypi:" + n)


def debian_licences():
    """package -> licence for /usr/share/doc/*/copyright files that name only permissive ones."""
    out = {}
    for copyright in pathlib.Path("/usr/share/doc").glob("*/copyright"):
        try:
            text = copyright.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        names = set(re.findall(r"^License:\s*(\S[^\n]*)", text, re.M))
        if text.startswith("Format:") and names and all(PERMISSIVE.match(n.strip()) for n in names):
            out[copyright.parent.name] = " / ".join(sorted(names))
    return out


def debian_owner_of():
    owner = {}
    for listing in pathlib.Path("/var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(errors="replace").splitlines():
            owner[line] = package
    return owner


def render_man(path: pathlib.Path):
    r = subprocess.run(["man", "-l", "-E", "ascii", "-P", "cat", str(path)], capture_output=True, timeout=30,
                       env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LANG": "C"})
    text = re.sub(r".\x08", "", r.stdout.decode("ascii", errors="ignore"))
    return text if MIN_CHARS <= len(text) <= MAX_CHARS else None


def debian():
    licences, owner = debian_licences(), debian_owner_of()
    pages = [p for p in sorted(pathlib.Path("/usr/share/man").glob("man[1-8]/*"))
             if licences.get(owner.get(str(p)))]
    with ThreadPoolExecutor(4) as pool:
        for path, text in zip(pages, pool.map(render_man, pages)):
            package = owner[str(path)]
            if text:
                yield doc(path.name.removesuffix(".gz"), text, licences[package], f"debian-man:{package}/{path.name}",
                          "debian:" + package)
    for package, licence in sorted(licences.items()):
        for path in sorted(pathlib.Path("/usr/share/doc", package).rglob("*")):
            if path.name == "copyright" or not path.is_file():
                continue
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError):
                continue
            if MIN_CHARS <= len(text) <= MAX_CHARS and text.isascii():
                yield doc(path.name.removesuffix(".gz"), text, licence, f"debian-doc:{package}/{path.name}",
                          "debian:" + package)


def documents(extra=()):
    """Every document once (by text), in a fixed order."""
    seen = set()
    for d in (*stdlib(), *packages(extra), *debian()):
        key = hash(d["text"])
        if key not in seen:
            seen.add(key)
            yield d
