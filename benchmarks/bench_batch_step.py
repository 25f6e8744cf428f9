"""Where a batched decode step's time goes as the server runs it (mlx-lm's `BatchGenerator`), beside
a plain batched loop over mlx-lm's `KVCache`, in one run on one device:

    python benchmarks/bench_batch_step.py --config paper-4b --context 131072 --batches 1 64 --archs clsa transformer
    python benchmarks/bench_batch_step.py --config micro --context 256 --batches 1 4 --steps 8   (CPU check)

Every variant adds one thing the server's step does to the one before it; the differences are
the costs. B sequences of `context` tokens (random keys and values, bf16 random weights):

  plain      model(B x 1) on B-row KVCache / RotatingKVCache, argmax, the next step queued first
  batch      the same on mlx-lm's batch caches, merged from B prompt caches (per-row offsets,
             left padding, masks, cache growth by concatenation every 256 steps)
  logprobs   + logsumexp normalisation, the token from the log-probabilities
  rows       + the per-row log-probability arrays the generator keeps and the host sync (tolist)
  generator  mlx-lm's BatchGenerator.next() (what mlx_lm.server runs)
  ours       clsa_mlx.mlx_lm_hooks.BatchGenerator.next() (what clsa-serve runs)
  served     + what the server's loop does with each row's response: its token's log-probability
             read to the host (one `.item()` a row) and the text detokenized

Median and mean ms per step over --steps (the mean includes the batch caches' growth copies).
Resumable: finished (arch, context, batch, variant) rows in the output JSON are kept and skipped.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import BatchGenerator, _merge_caches  # noqa: E402
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache  # noqa: E402
from mlx_lm.tokenizer_utils import NaiveStreamingDetokenizer  # noqa: E402

from benchmarks.bench_models import CONFIGS, build, filled_cache  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from clsa_mlx import mlx_lm_hooks  # noqa: E402
from clsa_mlx.tiny import byte_tokenizer  # noqa: E402

VARIANTS = ("plain", "batch", "logprobs", "rows", "generator", "ours", "served")


def plain_cache(model, source, B):
    """B rows of `source` in mlx-lm's single-sequence caches (room for new rows kept)."""
    cache = make_prompt_cache(model)
    for c, s in zip(cache, source):
        c.keys = mx.contiguous(mx.broadcast_to(s.keys, (B, *s.keys.shape[1:])))
        c.values = mx.contiguous(mx.broadcast_to(s.values, (B, *s.values.shape[1:])))
        c.offset = s.offset
        if isinstance(c, RotatingKVCache):
            c._idx = s._idx
    mx.eval([c.state for c in cache])
    return cache


def loop_ms(model, cache, B, steps, logprobs=False, rows=False):
    def step(y):
        logits = model(y[:, None], cache=cache)[:, -1, :]
        if logprobs:
            logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.argmax(logits, axis=-1), (list(logits) if rows else [])

    y, lp = step(mx.zeros((B,), mx.int32))
    mx.async_eval(y, lp)
    stamps = []
    for _ in range(steps + 3):
        nxt, nlp = step(y)
        mx.async_eval(nxt, nlp)
        mx.eval(y, lp)
        if rows:
            y.tolist()
        y, lp = nxt, nlp
        stamps.append(time.perf_counter())
    mx.eval(y, lp)
    return np.diff(stamps)[1:]


def generator_ms(cls, model, source, B, steps, served=False):
    gen = cls(model, max_tokens=steps + 100, completion_batch_size=B, prefill_batch_size=B)
    uids = gen.insert([[1]] * B, caches=[source] * B)
    detokenizers = {u: NaiveStreamingDetokenizer(byte_tokenizer()) for u in uids}
    stamps = []
    while len(stamps) < steps + 4:
        _, responses = gen.next()
        if served:  # as mlx_lm.server's generation loop handles each response
            for r in responses:
                r.logprobs[r.token].item()
                detokenizers[r.uid].add_token(r.token % 256)
                detokenizers[r.uid].last_segment
        stamps.append(time.perf_counter())
    gen.remove(uids)
    gen.close()
    return np.diff(stamps)[2:]


def run(variant, model, source, B, steps):
    if variant == "plain":
        return loop_ms(model, plain_cache(model, source, B), B, steps)
    if variant in ("batch", "logprobs", "rows"):
        cache = _merge_caches([source] * B)
        return loop_ms(model, cache, B, steps, logprobs=variant != "batch", rows=variant == "rows")
    cls = BatchGenerator if variant == "generator" else mlx_lm_hooks.BatchGenerator
    return generator_ms(cls, model, source, B, steps, served=variant == "served")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="micro", choices=sorted(CONFIGS))
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--archs", nargs="+", default=["clsa"], choices=["transformer", "yoco", "clsa"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or Path(__file__).parent / "results" / f"bench_batch_step_{args.config}.json")
    data = json.loads(out.read_text()) if out.is_file() else dict(rows=[])
    data["machine"] = machine()
    done = {(r["arch"], r["context"], r["batch"], r["variant"]) for r in data["rows"]}
    for arch in args.archs:
        model = build(arch, CONFIGS[args.config], 0)
        source = filled_cache(model, args.context)
        for B in args.batches:
            base = None
            for variant in args.variants:
                if (arch, args.context, B, variant) in done:
                    continue
                with mx.stream(mx.default_stream(mx.default_device())):
                    ms = run(variant, model, source, B, args.steps) * 1e3
                row = dict(arch=arch, context=args.context, batch=B, variant=variant, median_ms=float(np.median(ms)),
                           mean_ms=float(np.mean(ms)), tok_per_s=float(B / np.median(ms) * 1e3),
                           peak_gb=mx.get_peak_memory() / 1e9)
                base = base or row["median_ms"]
                print(f"{arch:11s} {args.context:7d} B={B:4d} {variant:9s} median {row['median_ms']:8.2f} ms "
                      f"(x{row['median_ms'] / base:.2f} of the first), mean {row['mean_ms']:8.2f} ms, "
                      f"{row['tok_per_s']:9.1f} tok/s", flush=True)
                data["rows"].append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(data, indent=1))
                gc.collect()
                mx.clear_cache()
                mx.reset_peak_memory()
        del model, source
        gc.collect()
        mx.clear_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
