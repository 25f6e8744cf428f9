"""Real documents on this machine under permissive licences, each with its licence and origin.

- CPython's standard library sources and C headers (PSF-2.0);
- the Python packages installed beside it, or in folders given only to be read, whose metadata
  names a permissive licence (their sources and documentation files);
- Debian's manual pages (rendered to text) and /usr/share/doc text of packages whose DEP-5
  copyright file names only permissive licences;
- the packages training/fetch.py unpacked (Debian packages: docs, man pages, headers, configs, Go
  and Rust sources; npm packages; PyPI sdists), each by its own licence record.

Every document has a `format` (training/formats.py).

A document's `group` (a package or top-level module) decides the train / held-out split, so no
part of a held-out package is ever trained on.
"""

import email.parser
import fnmatch
import gzip
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from training.formats import format_of

PERMISSIVE = re.compile(r"^(mit|expat|bsd|isc|apache|psf|python|zlib|x11|public.?domain|mpl|unlicense|0bsd|"
                        r"boost|curl|hpnd|cc0|permissive|historical|openssh|[\w-]*bsd-style)", re.I)
TEXT_SUFFIXES = {".py", ".pyi", ".md", ".rst", ".txt", ".h", ".c", ".cfg", ".toml", ".ini", ".json", ".yaml"}
FETCHED_SUFFIXES = TEXT_SUFFIXES | {".hpp", ".hh", ".go", ".rs", ".js", ".mjs", ".cjs", ".ts", ".sh", ".bash", ".mk",
                                    ".markdown", ".yml", ".conf", ".cnf", ".defs", ".example", ".properties", ""}
MAX_CHANGELOG = 40_000  # the newest entries: a whole Debian changelog runs to megabytes
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
    return metadata_licence(dist.metadata)


def metadata_licence(meta):
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


def dep5_licence(text):
    """The licences a DEP-5 copyright file names, if all are permissive; else None."""
    names = set(re.findall(r"^License:\s*(\S[^\n]*)", text, re.M))
    if text.startswith("Format:") and names and all(PERMISSIVE.match(n.strip()) for n in names):
        return " / ".join(sorted(n.strip() for n in names))
    return None


def debian_licences():
    """package -> licence for /usr/share/doc/*/copyright files that name only permissive ones."""
    out = {}
    for copyright in pathlib.Path("/usr/share/doc").glob("*/copyright"):
        try:
            licence = dep5_licence(copyright.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
        if licence:
            out[copyright.parent.name] = licence
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


def decoded(path: pathlib.Path):
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError):
        return None
    if path.name.startswith("changelog") and len(text) > MAX_CHANGELOG:
        text = text[:text.rfind("\n\n", 0, MAX_CHANGELOG) + 1]  # whole entries
    return text


def checked(text):
    if text is None or not MIN_CHARS <= len(text) <= MAX_CHARS or not text.isascii() or "\x00" in text:
        return None
    return text if max(map(len, text.splitlines())) <= 400 else None


def dep5_paragraphs(text):
    """-> [(Files patterns, licence)] of a DEP-5 copyright file, or [] if it is not one."""
    if not text.startswith("Format:"):
        return []
    out = []
    for para in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*((?:.+)(?:\n[ \t]+.+)*)", para, re.M)
        licence = re.search(r"^License:\s*(\S[^\n]*)", para, re.M)
        if files and licence:
            out.append((files.group(1).split(), licence.group(1).strip()))
    return out


def relevant(pattern, rel: pathlib.PurePosixPath):
    """Whether a Files pattern may cover the installed file `rel` (its source path is unknown):
    by its name, unless the pattern names another language's manual pages."""
    folder, _, base = pattern.rpartition("/")
    name = rel.name.removesuffix(".gz")
    if base != "*" and not fnmatch.fnmatch(name, base):
        return False
    if "man" in folder and re.search(r"(^|/)[a-z]{2}(_[A-Z]{2})?(/|$)", folder):
        return False
    return True


def file_licence(paragraphs, rel):
    """The licences of every paragraph that may cover `rel`, if all are permissive; else None."""
    names = {licence for patterns, licence in paragraphs if any(relevant(p, rel) for p in patterns)}
    if names and all(PERMISSIVE.match(n) for n in names):
        return " / ".join(sorted(names))
    return None


def deb_package(root: pathlib.Path, package):
    """An unpacked Debian package's files, each under the licences of its copyright file's
    paragraphs that may cover it, all permissive."""
    copyright = root / "usr/share/doc" / package / "copyright"
    paragraphs = dep5_paragraphs(copyright.read_text(errors="replace")) if copyright.is_file() else []
    group, rendered = "debian:" + package, []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root)
        name = path.name.removesuffix(".gz")
        licence = file_licence(paragraphs, pathlib.PurePosixPath(rel))
        if not licence:
            continue
        if rel.parts[:3] == ("usr", "share", "man"):
            if re.fullmatch(r"man[1-8]", rel.parts[3]):
                rendered.append((path, licence))
            continue
        if pathlib.PurePosixPath(name).suffix not in FETCHED_SUFFIXES and name != "copyright" \
                and not name.startswith(("changelog", "README", "NEWS", "Makefile")):
            continue
        text = checked(decoded(path))
        if text:
            yield doc(name, text, licence, f"debian-pkg:{package}/{rel}", group)
    with ThreadPoolExecutor(2) as pool:
        for (path, licence), text in zip(rendered, pool.map(render_man, [p for p, _ in rendered])):
            if text and text.isascii():
                yield doc(path.name.removesuffix(".gz"), text, licence, f"debian-man:{package}/{path.name}", group)


def npm_package(root: pathlib.Path, package):
    try:
        meta = json.loads((root / "package" / "package.json").read_text())
    except (OSError, ValueError):
        return
    licence = meta.get("license") if isinstance(meta.get("license"), str) else None
    if not licence or not all(PERMISSIVE.match(n.strip("() ")) for n in re.split(r"\s+(?:OR|AND)\s+", licence)):
        return
    yield from fetched_tree(root / "package", licence, f"npm:{package}", "npm:" + package)


def sdist_package(root: pathlib.Path, package):
    infos = sorted(root.glob("*/PKG-INFO"))
    if not infos:
        return
    meta = email.parser.Parser().parsestr(infos[0].read_text(errors="replace"))
    licence = metadata_licence(meta)
    if licence:
        yield from fetched_tree(infos[0].parent, licence, f"pypi-sdist:{package}", "pypi:" + meta["Name"])


def fetched_tree(root, licence, origin, group):
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts) or path.name.endswith((".min.js", "-lock.json", ".lock", "_test.go")):
            continue
        if path.suffix in FETCHED_SUFFIXES - {""} or path.name.startswith(("Makefile", "README", "CHANGELOG")):
            text = checked(decoded(path))
            if text:
                yield doc(path.name, text, licence, f"{origin}/{rel}", group)


def fetched(cache):
    """The packages training/fetch.py unpacked under `cache`, in a fixed order."""
    cache = pathlib.Path(cache)
    readers = dict(deb=deb_package, npm=npm_package, pypi=sdist_package)
    for kind, reader in readers.items():
        for root in sorted((cache / kind).glob("*/")):
            if (root / ".done").exists():
                yield from reader(root, root.name)


def documents(extra=(), cache=None):
    """Every document once (by text), in a fixed order, with its format."""
    seen = set()
    for d in (*stdlib(), *packages(extra), *debian(), *(fetched(cache) if cache else ())):
        key = hash(d["text"])
        if key not in seen:
            seen.add(key)
            d["format"] = format_of(d["name"], d["origin"], d["text"])
            yield d
