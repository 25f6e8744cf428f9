"""Requests/s and p50/p95 latency of `clsa-serve` at 1, 4 and 16 concurrent clients (and, with
--mlx-lm, of `mlx_lm.server --trust-remote-code` on the same folder, side by side in one run).

    python benchmarks/bench_serve.py                                   (the shipped model, this CPU)
    python benchmarks/bench_serve.py --config paper-4b --prompt-tokens 32768 --max-tokens 64 --mlx-lm

Each client sends its requests one after another; every request has its own prompt (no prompt-cache
hits) of --prompt-tokens tokens and asks for exactly --max-tokens tokens (greedy, end of text
banned). `--config` builds a random-weight bf16 folder of that configuration (a byte tokenizer)
under --folder first. Latency is from the request's send to its last byte. Writes
results/bench_serve_<name>.json with machine, versions and commit; the servers' logs go to the
temporary folder.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import machine  # noqa: E402

WORDS = ("the shared cache is read once by every cross layer while the index keys pick the top rows "
         "of each query and the window keeps the recent tokens").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(f"the server did not start; see {log_path}")


def stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def post(port, body):
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = json.loads(r.read())
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{r.status}: {out}")
    return time.perf_counter() - t0, out["usage"]


def prompt_text(tokenizer, n, seed):
    """A text of about n tokens, its own from the first words on (no prompt-cache hits)."""
    rng = np.random.default_rng(seed)
    text = f"Request {seed}: " + " ".join(rng.choice(WORDS, size=n))
    return tokenizer.decode(tokenizer.encode(text)[:n])


def measure(port, clients, requests, prompts, max_tokens, eos):
    bodies = [dict(prompt=p, max_tokens=max_tokens, temperature=0.0, logit_bias={str(e): -100 for e in eos})
              for p in prompts]
    post(port, {**bodies[0], "max_tokens": 2})  # warm
    per_client = [bodies[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda bs: [post(port, b) for b in bs], per_client))
    wall = time.perf_counter() - t0
    lat = np.array([t for run in runs for t, _ in run])
    tokens = sum(u["completion_tokens"] for run in runs for _, u in run)
    return dict(clients=clients, requests=requests, wall_s=wall, requests_per_s=requests / wall,
                p50_s=float(np.percentile(lat, 50)), p95_s=float(np.percentile(lat, 95)),
                generated_tok_per_s=tokens / wall)


def build_folder(config, folder):
    if (folder / "config.json").is_file():
        return folder
    import mlx.core as mx

    from benchmarks.bench_models import CONFIGS, build
    from clsa_mlx.tiny import byte_tokenizer, save_model_folder

    model = build("clsa", CONFIGS[config], 0, fuse=False)
    model.args.max_seq_len = 1 << 17
    mx.eval(model.parameters())
    return save_model_folder(model, folder, byte_tokenizer())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--config", default=None, help="build a random-weight folder of this benchmark config")
    ap.add_argument("--folder", default="/tmp/clsa-bench-serve-model")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per client count")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mlx-lm", action="store_true", help="also mlx_lm.server --trust-remote-code on the same folder")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # the servers are stopped on the way out

    from mlx_lm.utils import load_tokenizer

    from clsa_mlx import shipped_model

    folder = build_folder(args.config, Path(args.folder)) if args.config else Path(args.model or shipped_model())
    tokenizer = load_tokenizer(folder)
    prompts = [prompt_text(tokenizer, args.prompt_tokens, i) for i in range(args.requests + 1)]
    eos = sorted(tokenizer.eos_token_ids)
    name = args.config or folder.name
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_serve_{name}.json")
    servers = {"clsa-serve": [sys.executable, "-m", "clsa_mlx.serve", "--prefix-cache-dir", ""]}
    if args.mlx_lm:
        servers["mlx_lm.server"] = [sys.executable, "-m", "mlx_lm", "server", "--trust-remote-code"]
    rows = []
    for server, cmd in servers.items():
        port = free_port()
        proc = start([*cmd, "--model", str(folder), "--port", str(port), "--decode-concurrency", "32",
                      "--prompt-concurrency", "8"], port, Path(tempfile.gettempdir()) / f"{out.stem}.{server}.log")
        try:
            for clients in args.clients:
                row = dict(server=server, **measure(port, clients, args.requests, prompts[1:], args.max_tokens, eos))
                rows.append(row)
                print(f"{server:14s} {clients:3d} clients: {row['requests_per_s']:.2f} req/s, "
                      f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, "
                      f"{row['generated_tok_per_s']:.1f} generated tok/s", flush=True)
        finally:
            stop(proc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=machine(), model=str(folder), prompt_tokens=args.prompt_tokens,
                                   max_tokens=args.max_tokens, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
