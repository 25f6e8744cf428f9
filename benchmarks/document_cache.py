"""Time to the first answer about a long document, the first time and the second time (the
document cache: `clsa_mlx.prefix_cache`), through the real chat command on the shipped model.

    python benchmarks/document_cache.py [--tokens 100000] [--out-dir benchmarks/results]

The document is real text (Python standard-library sources, concatenated) with a pass key in
the middle. Each run is a fresh `python chat.py --file DOC --prompt Q` process with its own
empty cache folder at the start, so the second run reads only what the first one wrote.
Writes document_cache.json and document_cache.png with the machine and versions.
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402


def document(tokens: int, path: Path):
    from clsa_mlx import load, shipped_model

    _, tok = load(shipped_model())
    text, lib = "", Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(lib.glob("*.py")):
        text += f.read_text(errors="ignore")
        if len(text) > tokens * 5 and len(tok.encode(text)) >= tokens:  # a few characters per token
            break
    ids = tok.encode(text)[:tokens]
    body = tok.decode(ids)
    half = len(body) // 2
    path.write_text(body[:half] + "\nThe pass key is 70531. Remember it. 70531 is the pass key.\n" + body[half:])
    return len(ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="doccache-"))
    doc = work / "document.py"
    n = document(args.tokens, doc)
    env = {**os.environ, "CLSA_MLX_DOCUMENT_CACHE": str(work / "cache"), "CLSA_MLX_HISTORY": ""}
    runs = []
    for name in ("first", "second"):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--file", str(doc), "--prompt", "What is the pass key?",
                            "--max-tokens", "8"], capture_output=True, text=True, env=env, cwd=ROOT)
        runs.append(dict(run=name, seconds=time.perf_counter() - t0, answer=r.stdout.strip(), rc=r.returncode,
                         cache_mb=sum(p.stat().st_size for p in (work / "cache").glob("*")) / 1e6))
        print(json.dumps(runs[-1]), flush=True)
    out = dict(machine=machine(), document_tokens=n, runs=runs, speedup=runs[0]["seconds"] / runs[1]["seconds"])
    d = Path(args.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "document_cache.json").write_text(json.dumps(out, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["run"] for r in runs], [r["seconds"] for r in runs], color=["tab:red", "tab:green"])
    ax.set(ylabel="seconds to the first answer", title=f"{n:,}-token document, shipped model")
    m = out["machine"]
    fig.suptitle(f"{m.get('gpu') or m['device']}  mlx {m['mlx']}  {m['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(d / "document_cache.png", dpi=110)


if __name__ == "__main__":
    main()
