"""Phi-4-mini-flash (SambaY) against mlx-lm's Phi-4-mini (the dense Transformer of the same
size, its published configuration), random weights, bf16 and 4-bit:

    python benchmarks/bench_phi4flash.py --out-dir benchmarks/results            (GPU box)
    python benchmarks/bench_phi4flash.py --config tiny --contexts 256 1024 --prefill 512   (CPU check)
    python benchmarks/bench_phi4flash.py --bytes-only     (what a 64K-token document needs, no weights)

Per model and bits: prefill tok/s of `--prefill`-token prompts (chunks of 2048, caches
evaluated per chunk as mlx-lm does) and their peak memory; then per context and batch, decode tok/s
(median step of B sequences of `context` tokens, random cache contents: decode cost does not
depend on them) and cache bytes per sequence. A point that would not fit the device (estimated:
weights + B caches + 10%) is recorded as not fitting. Models load one at a time. Rows go to
bench_phi4flash_<config>.json as they come; a rerun skips the rows already there (resumable).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import phi3  # noqa: E402
from mlx_lm.models.cache import ArraysCache, RotatingKVCache, make_prompt_cache  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from clsa_mlx.models import phi4flash  # noqa: E402

GB = 1e9
MAC_16GB_WORKING_SET = 2 / 3 * 16 * 1024**3  # Metal's recommended working set on a 16 GB Mac (about 11.5 GB)
# microsoft/Phi-4-mini-flash-reasoning config.json (architecture keys)
PHI4FLASH = dict(model_type="phi4flash", vocab_size=200064, hidden_size=2560, intermediate_size=10240,
                 num_hidden_layers=32, num_attention_heads=40, num_key_value_heads=20, sliding_window=512,
                 max_position_embeddings=262144, layer_norm_eps=1e-5, tie_word_embeddings=True)
# microsoft/Phi-4-mini-instruct config.json; its longrope factors (48 per list) are set to 1 here:
# the same RoPE work, and decode cost does not depend on the values.
PHI4MINI = dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32, intermediate_size=8192,
                num_attention_heads=24, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=200064,
                rope_theta=10000.0, partial_rotary_factor=0.75, max_position_embeddings=131072,
                original_max_position_embeddings=4096, tie_word_embeddings=True,
                rope_scaling=dict(type="longrope", long_factor=[1.0] * 48, short_factor=[1.0] * 48))
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=1024)
TINY_MINI = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=1024,
                 num_attention_heads=4, num_key_value_heads=2,
                 rope_scaling=dict(type="longrope", long_factor=[1.0] * 24, short_factor=[1.0] * 24))


def build(name, config, bits, materialize=True):
    if name == "phi4flash":
        args = {**PHI4FLASH, **(dict(TINY, num_attention_heads=8, num_key_value_heads=4) if config == "tiny" else {})}
        model = phi4flash.Model(phi4flash.ModelArgs.from_dict(args))
    else:
        model = phi3.Model(phi3.ModelArgs.from_dict({**PHI4MINI, **(TINY_MINI if config == "tiny" else {})}))
    model.set_dtype(mx.bfloat16)
    if name == "phi4flash":  # what clsa-convert writes: the decay rates, skips and lambdas in fp32
        model.load_weights([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
                            if phi4flash.full_precision(k)], strict=False)
    if bits:
        predicate = getattr(model, "quant_predicate", None)
        nn.quantize(model, group_size=64, bits=bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and (predicate is None or predicate(p, m)))
    if materialize:
        mx.eval(model.parameters())
    return model


def weights_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def filled_cache(model, B: int, context: int, room: int):
    """B sequences of `context` tokens each: random K/V (window caches full), random Mamba states."""
    cache = make_prompt_cache(model)
    for c in cache:
        if isinstance(c, ArraysCache):  # Mamba: conv inputs and SSM state
            m = model.layers[cache.index(c)].attn
            c[0] = mx.random.normal((B, m.d_conv - 1, m.d_inner)).astype(mx.bfloat16)
            c[1] = mx.random.normal((B, m.d_inner, m.d_state)) * 0.1
            mx.eval(c[0], c[1])
            continue
        heads, hd = kv_shape(model)
        n = min(context, c.max_size) if isinstance(c, RotatingKVCache) else -(-(context + room) // 256) * 256
        c.keys = mx.random.normal((B, heads, n, hd)).astype(mx.bfloat16)
        c.values = mx.random.normal((B, heads, n, hd)).astype(mx.bfloat16)
        c.offset = context
        if isinstance(c, RotatingKVCache):
            c._idx = n
        mx.eval(c.keys, c.values)
    return cache


def kv_shape(model):
    """(heads, dim) of a K/V cache row: Phi-4-mini-flash keeps head pairs (2 x 64 wide)."""
    a = model.args
    hd = a.hidden_size // a.num_attention_heads
    return (a.num_key_value_heads // 2, 2 * hd) if isinstance(model, phi4flash.Model) else (a.num_key_value_heads, hd)


def cache_bytes(model, context: int) -> int:
    """Bytes of one sequence's cache holding `context` tokens (no spare rows)."""
    heads, hd = kv_shape(model)
    total = 0
    for c in make_prompt_cache(model):
        if isinstance(c, ArraysCache):
            m = model.layers[0].attn
            total += (m.d_conv - 1) * m.d_inner * 2 + m.d_inner * m.d_state * 4
        elif isinstance(c, RotatingKVCache):
            total += 2 * heads * min(context, c.max_size) * hd * 2
        else:
            total += 2 * heads * context * hd * 2
    return total


def decode_ms(model, cache, B: int, steps: int) -> float:
    """Median ms per step of B sequences, steps pipelined as mlx-lm's generate_step does."""
    y = mx.zeros((B, 1), mx.int32)

    def step(y):
        return mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True).astype(mx.int32)

    y = step(y)
    mx.async_eval(y)
    stamps = []
    for _ in range(steps + 3):
        nxt = step(y)
        mx.async_eval(nxt)
        mx.eval(y)
        stamps.append(time.perf_counter())
        y = nxt
    mx.eval(y)
    return float(np.median(np.diff(stamps)[1:]) * 1e3)


def prefill(model, n: int, step: int = 2048):
    """(tok/s, peak GB) of an n-token prompt, chunked, each chunk's caches evaluated."""
    cache = make_prompt_cache(model)
    if isinstance(model, phi4flash.Model):
        model.reserve(cache, n)
    tokens = mx.random.randint(0, model.args.vocab_size, (1, n))
    model(tokens[:, :min(step, n)], cache=make_prompt_cache(model))  # warm-up (kernels, compiles)
    mx.eval([c.state for c in make_prompt_cache(model)])
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for i in range(0, n, step):
        model(tokens[:, i:i + step], cache=cache)
        mx.eval([c.state for c in cache])
    seconds = time.perf_counter() - t0
    return n / seconds, mx.get_peak_memory() / GB


def device_bytes() -> float:
    info = mx.device_info()
    return float(info.get("memory_size") or info.get("total_memory") or 16 * GB)


def bytes_for_document(tokens: int = 65536, bits: int = 4):
    """What Phi-4-mini-flash needs for a `tokens`-long document at `bits`-bit weights, counted from
    shapes (nothing is allocated): weights, the cache, and the largest prefill scratch we hold."""
    model = build("phi4flash", "real", bits, materialize=False)
    a = model.args
    w, c = weights_bytes(model), cache_bytes(model, tokens)
    E, N, step = 2 * a.hidden_size, a.mamba_d_state, 2048
    # per 2048-token chunk: the chunked scan's fp32 states (ends, starts) and its [L, E] fp32
    # inputs (x, dt, y), the layer's in_proj output and MLP activations in bf16
    chunks = -(-step // max(1, round((step / 2) ** 0.5)))
    scratch = 2 * chunks * E * N * 4 + 4 * step * E * 4 + step * (2 * E + 2 * a.intermediate_size) * 2 * 2
    return dict(tokens=tokens, bits=bits, weights_gb=w / GB, cache_gb=c / GB, prefill_scratch_gb=scratch / GB,
                total_gb=(w + c + scratch) / GB,
                mac_16gb_gpu_gb=MAC_16GB_WORKING_SET / GB)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["real", "tiny"], default="real")
    p.add_argument("--models", nargs="+", default=["phi4flash", "phi4mini"])
    p.add_argument("--bits", nargs="+", type=int, default=[0, 4], help="0: bf16")
    p.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384, 65536, 131072])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prefill", nargs="*", type=int, default=[16384, 65536], help="prompt lengths for prefill figures")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--bytes-only", action="store_true")
    o = p.parse_args()
    if o.bytes_only:
        print(json.dumps(bytes_for_document(), indent=1))
        return
    out = Path(o.out_dir) / f"bench_phi4flash_{o.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    doc["machine"], doc["document_64k_4bit"] = machine(), bytes_for_document()
    done = {tuple(r["key"]) for r in doc["rows"]}

    def record(row):
        doc["rows"].append(row)
        out.write_text(json.dumps(doc, indent=1))
        print(json.dumps(row), flush=True)

    budget = device_bytes() * 0.9
    for name in o.models:
        for bits in o.bits:
            model = None
            for what in o.prefill + [(ctx, B) for ctx in o.contexts for B in o.batches]:
                key = [name, bits, "prefill", what] if isinstance(what, int) else [name, bits, "decode", *what]
                if tuple(key) in done:
                    continue
                model = model or build(name, o.config, bits)
                w = weights_bytes(model)
                row = dict(key=key, model=name, bits=bits, weights_gb=w / GB)
                if isinstance(what, int):
                    try:
                        tps, peak = prefill(model, what)
                        record(dict(row, prefill_tokens=what, prefill_tok_s=tps, peak_gb=peak))
                    except Exception as e:
                        record(dict(row, error=repr(e)[:300]))
                    mx.clear_cache()
                    continue
                ctx, B = what
                seq = cache_bytes(model, ctx)
                row.update(context=ctx, batch=B, cache_gb_per_seq=seq / GB)
                if w + B * seq * 1.1 > budget:
                    record(dict(row, fits=False, estimated_gb=(w + B * seq) / GB))
                    continue
                try:
                    cache = filled_cache(model, B, ctx, room=o.steps + 8)
                    ms = decode_ms(model, cache, B, o.steps)
                    record(dict(row, fits=True, step_ms=ms, tok_s=B * 1e3 / ms, peak_gb=mx.get_peak_memory() / GB))
                except Exception as e:  # out of memory: record and go on
                    record(dict(row, fits=False, error=repr(e)[:300]))
                cache = None
                mx.clear_cache()
            del model
            mx.clear_cache()
    summarize(doc)
    out.write_text(json.dumps(doc, indent=1))


def summarize(doc):
    """Phi-4-mini-flash / Phi-4-mini decode speed and cache size at each point both ran."""
    rows = {tuple(r["key"]): r for r in doc["rows"] if r.get("fits") or "prefill_tok_s" in r}
    lines = []
    for (name, bits, kind, *point), r in sorted(rows.items(), key=lambda kv: str(kv[0])):
        if name != "phi4flash" or kind != "decode":
            continue
        other = rows.get(("phi4mini", bits, kind, *point))
        lines.append(dict(bits=bits, context=point[0], batch=point[1], phi4flash_tok_s=r["tok_s"],
                          phi4mini_tok_s=other and other["tok_s"],
                          speedup=other and r["tok_s"] / other["tok_s"],
                          cache_ratio=r["cache_gb_per_seq"] and _cache(doc, bits, point) / r["cache_gb_per_seq"]))
    doc["summary"] = lines
    for line in lines:
        print(json.dumps(line))


def _cache(doc, bits, point):
    for r in doc["rows"]:
        if r["key"][0] == "phi4mini" and r.get("context") == point[0]:
            return r["cache_gb_per_seq"]
    return float("nan")


if __name__ == "__main__":
    main()
