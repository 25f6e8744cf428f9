"""Transformer vs dense YOCO vs CLSA at batch 1, side by side in one run, as a Mac user runs them.

    python benchmarks/bench_models.py --config paper-4b [--bits 4] [--contexts 8192 32768 131072]
    python benchmarks/bench_models.py --config cpu-small --contexts 4096 16384 32768

Random weights of one configuration, three architectures: mlx-lm's own Llama model (what a user
would pick instead), dense YOCO and CLSA (clsa_mlx). Per architecture and context:
- decode tok/s: median step of mlx-lm's generate loop over a cache holding `context` tokens
  (filled with random values: decode cost does not depend on them);
- prefill tok/s: time to first token for a `context`-token prompt (up to --prefill-max) through
  the app's own prompt loop (mlx-lm's for the Transformer, clsa_mlx's for YOCO/CLSA), and up to
  128K also through the other one (`prefill_tps_other_loop`);
- cache bytes (KV + index), peak memory; bytes a decode step must read and the share of the
  measured copy bandwidth that implies (the roofline);
- for CLSA, where a decode step's time goes (self layers, shared K/V + routing + gather, cross
  layers, head), each part synced on its own.
All three models stay loaded (paper-4b in bf16: 15 GB of weights) and decode is measured in
turns, `--reps` times per context. Writes bench_models_<config>_<bits>bit.json and .png with
machine, versions, date and commit, after each context.
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
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache  # noqa: E402

from benchmarks.common import copy_bandwidth, machine  # noqa: E402
from clsa_mlx import Model, ModelArgs  # noqa: E402
from clsa_mlx.generate import prefill  # noqa: E402

CONFIGS = {  # the paper's 4B (Table 7/8) and a small one whose ratios show on a CPU
    "paper-4b": dict(dim=2560, n_layers=32, hidden_dim=7680, heads=20, kv_heads=4, window=512, topk=2048,
                     d_idx=128, vocab=32000),
    "cpu-small": dict(dim=512, n_layers=8, hidden_dim=1536, heads=8, kv_heads=2, window=128, topk=256,
                      d_idx=64, vocab=32000),
    "micro": dict(dim=64, n_layers=4, hidden_dim=128, heads=4, kv_heads=2, window=16, topk=32, d_idx=16,
                  vocab=256),
}
ARCHS = ("transformer", "yoco", "clsa")
OTHER_LOOP_MAX = 1 << 17  # longest prompt also timed through the other app's prompt loop


def build(arch: str, c: dict, bits: int, materialize: bool = True, fuse: bool = True):
    if arch == "transformer":
        model = llama.Model(llama.ModelArgs(
            model_type="llama", hidden_size=c["dim"], num_hidden_layers=c["n_layers"],
            intermediate_size=c["hidden_dim"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
            rms_norm_eps=1e-5, vocab_size=c["vocab"], rope_theta=5e5, tie_word_embeddings=False))
    else:
        model = Model(ModelArgs(
            model_type="clsa" if arch == "clsa" else "yoco", dim=c["dim"], n_layers=c["n_layers"],
            hidden_dim=c["hidden_dim"], n_self_heads=c["heads"], n_self_kv_heads=c["kv_heads"],
            n_attn_heads=c["heads"], n_attn_kv_heads=c["kv_heads"], vocab_size=c["vocab"],
            sliding_window=c["window"], qk_norm=True, cross_rope=False, rope_style="standard",
            index_topk=c["topk"] if arch == "clsa" else 0, index_head_dim=c["d_idx"]))
    model.set_dtype(mx.bfloat16)
    if bits:
        predicate = getattr(model, "quant_predicate", None)
        nn.quantize(model, group_size=64, bits=bits,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and (predicate is None or predicate(p, m)))
    if fuse and arch != "transformer":  # what clsa_mlx.load does; mlx-lm's Llama keeps its separate projections
        model.stack_projections(materialize=materialize)
    if materialize:
        mx.eval(model.parameters())
    return model


def weights_bytes(model, embedding: bool = True) -> int:
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if embedding or "embed" not in k)


def filled_cache(model, context: int, room: int = 1024):
    """A prompt cache that holds `context` tokens of random keys and values."""
    cache = make_prompt_cache(model)
    for c in cache:
        n = min(context, c.max_size) if isinstance(c, RotatingKVCache) else context + room
        shape = lambda d: (1, heads, n, d)  # noqa: E731
        heads, kd, vd = _kv_shape(model, c, cache)
        c.keys = mx.random.normal(shape(kd)).astype(mx.bfloat16)
        c.values = mx.random.normal(shape(vd)).astype(mx.bfloat16)
        c.offset = context
        if isinstance(c, RotatingKVCache):
            c._idx = n
        mx.eval(c.keys, c.values)
    return cache


def _kv_shape(model, c, cache):
    if isinstance(model, llama.Model):
        a = model.args
        return a.num_key_value_heads, a.hidden_size // a.num_attention_heads, a.hidden_size // a.num_attention_heads
    return model.cache_shapes()[cache.index(c)]  # index keys: zero-width values


def decode_tps(model, context: int, steps: int):
    """Median tok/s, cache bytes, and peak memory while decoding (weights + cache + work)."""
    cache = filled_cache(model, context)
    mx.reset_peak_memory()
    stamps = []
    for _ in generate_step(mx.array([1]), model, max_tokens=steps, prompt_cache=cache):
        stamps.append(time.perf_counter())
    gaps = np.diff(stamps)[2:]  # skip warm-up steps
    cache_bytes = sum(c.nbytes for c in cache) - _slack_bytes(cache)
    return 1.0 / float(np.median(gaps)), cache_bytes, mx.get_peak_memory()


def _slack_bytes(cache):
    return sum(c.nbytes * (1 - c.offset / c.keys.shape[2]) for c in cache
               if isinstance(c, KVCache) and c.keys is not None)


def prefill_tps(model, context: int, step: int = 2048, keep=None):
    """Time to first token. `keep`: the prompt but its last token through clsa_mlx's loop, which
    keeps MLX's buffer cache between chunks; otherwise all of it through mlx-lm's. Default: the
    loop each app runs (clsa_mlx's for YOCO/CLSA, mlx-lm's for the Transformer)."""
    prompt = mx.array(np.random.default_rng(0).integers(0, 200, context))
    cache = make_prompt_cache(model)
    if hasattr(model, "reserve"):  # what clsa_mlx.generate does; mlx-lm's Llama grows per chunk
        model.reserve(cache, context + 1)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    if isinstance(model, Model) if keep is None else keep:
        prefill(model, prompt[:-1], cache, step)
        prompt = prompt[-1:]
    for _ in generate_step(prompt, model, max_tokens=1, prompt_cache=cache, prefill_step_size=step):
        pass
    return context / (time.perf_counter() - t0), mx.get_peak_memory()


def warm_prefill(model, step: int, longest: int):
    """JIT every chunk shape before any figure: full chunks, then a last step of 1 and of a full chunk."""
    for n in (2 * step + 1, 2 * step):
        prefill_tps(model, min(n, longest), step)


def decode_bytes(model, arch, c, context, cache_bytes):
    """Bytes one decode step must read: weights (one embedding row) plus the cache it attends to."""
    weights = weights_bytes(model, embedding=False)
    if arch == "transformer":
        return weights + cache_bytes
    a, n_cross = model.args, c["n_layers"] // 2
    token = 2 * model.cross_decoder.n_kv_heads * a.head_dim * 2  # K and V rows, bf16 (this rank's heads)
    swa = n_cross * 2 * min(context, a.sliding_window) * model.self_decoder.layers[0].mixer.n_kv_heads * a.self_head_dim * 2
    if arch == "yoco":
        return weights + swa + n_cross * context * token
    return weights + swa + context * a.index_head_dim * 2 + (n_cross + 2) * a.index_topk * token


def clsa_breakdown(model, context: int, reps: int = 10):
    """Milliseconds per part of one decode step, each part evaluated (synced) on its own."""
    cache = filled_cache(model, context)
    n = len(model.self_decoder.layers)
    parts = {"self layers": [], "K/V + routing + gather": [], "cross layers": [], "head": []}
    y = mx.array([[1]])
    for _ in range(reps + 2):
        offset = cache[n].offset
        t = [time.perf_counter()]
        x = model.self_decoder(model.embed_tokens(y) * model.args.embed_scale, cache[:n], offset)
        mx.eval(x)
        t.append(time.perf_counter())
        memory = model.cross_decoder.memory(x, cache[n], cache[n + 1], offset)
        mx.eval(memory.keys, memory.values)
        t.append(time.perf_counter())
        x = model.cross_decoder.attend(x, memory)
        mx.eval(x)
        t.append(time.perf_counter())
        y = mx.argmax(model.output_projection(model.layer_norm(x)), axis=-1)
        mx.eval(y)
        t.append(time.perf_counter())
        for name, a, b in zip(parts, t, t[1:]):
            parts[name].append((b - a) * 1e3)
    return {name: float(np.median(v[2:])) for name, v in parts.items()}


def run(config: str, contexts, bits: int, steps: int, prefill_max: int, transformer_max: int, reps: int = 3,
        prefill_step: int = 2048, save=None):
    """All models stay loaded; per context, decode is measured `reps` times in turn per
    architecture, so drift hits all of them alike."""
    c = CONFIGS[config]
    bw = copy_bandwidth(10, log2_bytes=30 if config == "paper-4b" else 24)[0] * 1e9
    models = {arch: build(arch, c, bits) for arch in ARCHS}
    for model in models.values():
        warm_prefill(model, prefill_step, contexts[0])
    rows = []
    # peak figures include the other resident models: subtract their weights for a model's own
    results = dict(config=config, model=c, bits=bits or 16, copy_bandwidth_gbs=bw / 1e9, reps=reps, steps=steps,
                   prefill_step=prefill_step, machine=machine(),
                   weights_bytes={a: weights_bytes(m) for a, m in models.items()}, rows=rows)
    for context in contexts:
        archs = [a for a in ARCHS if a != "transformer" or context <= transformer_max]
        runs = {a: [] for a in archs}
        for _ in range(reps):
            for arch in archs:
                runs[arch].append(decode_tps(models[arch], context, steps))
        for arch in archs:
            model = models[arch]
            tps_all = [r[0] for r in runs[arch]]
            tps, cache_bytes, peak = float(np.median(tps_all)), runs[arch][-1][1], runs[arch][-1][2]
            row = dict(arch=arch, context=context, decode_tps=tps, decode_tps_runs=tps_all,
                       cache_bytes=int(cache_bytes), decode_peak_memory=peak)
            row["decode_bytes"] = int(decode_bytes(model, arch, c, context, cache_bytes))
            row["roofline_share"] = row["decode_bytes"] / bw * tps
            if context <= prefill_max:
                row["prefill_tps"], row["peak_memory"] = prefill_tps(model, context, prefill_step)
                if context <= OTHER_LOOP_MAX:
                    keep = not isinstance(model, Model)
                    row["prefill_tps_other_loop"] = prefill_tps(model, context, prefill_step, keep)[0]
            if arch == "clsa":
                row["breakdown_ms"] = clsa_breakdown(model, context)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if save:  # after each context, so a run cut short keeps what it measured
            save(results)
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arch in ARCHS:
        rows = [r for r in results["rows"] if r["arch"] == arch]
        ctx = [r["context"] for r in rows]
        tps = np.array([r["decode_tps"] for r in rows])
        spread = [tps - [min(r["decode_tps_runs"]) for r in rows], [max(r["decode_tps_runs"]) for r in rows] - tps]
        axes[0].errorbar(ctx, tps, yerr=spread, fmt="o-", capsize=3, label=arch)
        pre = [r for r in rows if "prefill_tps" in r]
        axes[1].plot([r["context"] for r in pre], [r["prefill_tps"] for r in pre], "o-", label=arch)
        axes[2].plot(ctx, [r["cache_bytes"] / 1e9 for r in rows], "o-", label=arch)
    for ax, title, unit in zip(axes, ("decode", "prefill (time to first token)", "KV + index cache"),
                               ("tokens/s", "tokens/s", "GB")):
        ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel=unit, title=title)
        ax.legend()
    m = results["machine"]
    fig.suptitle(f"{results['config']}, {results['bits']}-bit weights — {m.get('gpu') or m['device']}, "
                 f"mlx {m['mlx']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="cpu-small")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--bits", type=int, choices=[0, 4, 8], default=0, help="0 = bf16 weights")
    p.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    p.add_argument("--reps", type=int, default=3, help="decode measurements per architecture and context")
    p.add_argument("--prefill-max", type=int, default=1 << 17, help="largest context whose prefill is timed")
    p.add_argument("--prefill-step", type=int, default=2048, help="prompt tokens per prefill chunk (mlx-lm's default)")
    p.add_argument("--transformer-max", type=int, default=1 << 17, help="largest context for the Transformer")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench_models_{args.config}_{16 if args.bits == 0 else args.bits}bit"
    if args.prefill_step != 2048:
        stem = stem.with_name(f"{stem.name}_step{args.prefill_step}")

    def save(results):
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        plot(results, stem.with_suffix(".png"))

    run(args.config, args.contexts, args.bits, args.steps, args.prefill_max, args.transformer_max, args.reps,
        args.prefill_step, save)
    print(f"-> {stem}.json, .png")


if __name__ == "__main__":
    main()
