"""Fetch the packages of training/fetch_packages.txt into a cache, each unpacked once: Debian
packages (`apt-get download` + `dpkg -x`: docs, man pages, headers, default configs, Go and Rust
sources), npm packages (`npm pack`) and PyPI sdists (`pip download --no-binary`). Resumable: a
package unpacked before is skipped, one that fails is recorded and skipped, so a rerun continues.

  python training/fetch.py [--cache .train/fetch] [--list training/fetch_packages.txt] [--retry]
  -> CACHE/{deb,npm,pypi}/NAME/ (unpacked), CACHE/failed.json (tried again only with --retry)
"""

import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = pathlib.Path(__file__).resolve().parent
KINDS = ("deb", "npm", "pypi")


def read_list(path):
    """-> [(kind, name)] from `KIND NAME` lines (# comments)."""
    out = []
    for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, name = line.partition(" ")
        if kind not in KINDS or not name.strip() or " " in name.strip():
            sys.exit(f"{path}:{n}: expected `{'|'.join(KINDS)} NAME`, got {line!r}")
        out.append((kind, name.strip()))
    return out


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if r.returncode:
        said = (r.stderr or r.stdout).strip()
        raise RuntimeError(said.splitlines()[-1] if said else "failed")


def safe_extract(archive, dest):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # no links out of dest, no absolute paths


def fetch_one(kind, name, cache):
    dest = cache / kind / name
    if (dest / ".done").exists():
        return None
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = pathlib.Path(tmp)
        if kind == "deb":
            run(["apt-get", "download", name], tmp)
            run(["dpkg", "-x", next(tmp.glob("*.deb")).name, "x"], tmp)
        elif kind == "npm":
            run(["npm", "pack", "--silent", name], tmp)
            safe_extract(next(tmp.glob("*.tgz")), tmp / "x")
        else:
            run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", ".",
                 name], tmp)
            archive = next(p for p in tmp.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar.bz2")))
            safe_extract(archive, tmp / "x")
        if dest.exists():
            subprocess.run(["rm", "-rf", str(dest)], check=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        (tmp / "x").rename(dest)
    (dest / ".done").write_text("")
    return None


def main(cache, listing, workers=4, retry=False):
    cache = pathlib.Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    wanted = read_list(listing)
    record = cache / "failed.json"
    failed = {} if retry or not record.exists() else json.loads(record.read_text())

    def one(item):
        try:
            fetch_one(*item, cache)
        except (RuntimeError, StopIteration, OSError, tarfile.TarError, subprocess.TimeoutExpired) as e:
            failed[f"{item[0]} {item[1]}"] = str(e)[:200] or type(e).__name__

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, [w for w in wanted if f"{w[0]} {w[1]}" not in failed]))
    record.write_text(json.dumps(failed, indent=1, sort_keys=True))
    done = sum((cache / k / n / ".done").exists() for k, n in wanted)
    print(f"{done} of {len(wanted)} packages in {cache}; {len(failed)} failed (failed.json)")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=".train/fetch")
    p.add_argument("--list", default=str(HERE / "fetch_packages.txt"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--retry", action="store_true", help="try the packages that failed before again")
    a = p.parse_args()
    main(a.cache, a.list, a.workers, a.retry)
