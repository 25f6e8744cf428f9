"""Where one batch-1 decode step's time goes on the host and on the GPU.

    python benchmarks/profile_step.py --config paper-4b --contexts 8192 131072 [--bits 4]

Per architecture and context, medians over `--steps` steps of:
- build_ms: Python building the step's lazy graph (`model(y, cache)`);
- dispatch_ms: `mx.async_eval` encoding and launching it (host, C++);
- wait_ms: what is left until the result is ready (the GPU's share not hidden under dispatch);
- synced_ms: build + dispatch + wait, one step at a time;
- pipelined_ms: mlx-lm's generate loop, which builds step n+1 while the GPU runs step n;
- ops: primitives in the step's graph;
- with --prefill N: prefill tok/s of an N-token prompt and its peak memory above the weights;
- with --prefill-breakdown N: one prefill chunk over N cached tokens, part by part.
Run it under different MLX_* environment variables (benchmarks/gpu_profile.sh) to see which
knob moves the floor; the variables in effect are saved with the results.
`--plot FILE.jsonl` draws a saved run: one panel per setting, a bar per step (build, dispatch,
wait stacked) and a black mark for the pipelined step.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.base import create_attention_mask  # noqa: E402

from benchmarks.bench_models import (  # noqa: E402
    ARCHS,
    CONFIGS,
    build,
    filled_cache,
    prefill_tps,
    warm_prefill,
    weights_bytes,
)
from benchmarks.common import machine  # noqa: E402
from clsa_mlx import Model  # noqa: E402
from clsa_mlx.model import DecoderLayer, Memory  # noqa: E402


def compile_decode(model):
    """Experiment: one compiled call per decode-step FFN block of `model`, and for CLSA's routed
    decode one compiled call for all cross layers (their inputs have fixed shapes). Returns a
    switch: `.on` (off at first), `.calls` (compiled calls so far), `.restore()` (unpatch)."""
    switch = SimpleNamespace(on=False, calls=0)
    eager_layer = DecoderLayer.__call__
    blocks = {id(layer): None for layer in model.layers}

    def layer_call(self, x, *mixer_args):
        if not switch.on or x.shape[1] != 1 or id(self) not in blocks:
            return eager_layer(self, x, *mixer_args)
        if blocks[id(self)] is None:
            blocks[id(self)] = mx.compile(lambda h: h + self.ffn(self.final_layer_norm(h)))
        switch.calls += 1
        return blocks[id(self)](x + self.mixer(self.mixer_layer_norm(x), *mixer_args))

    cd = model.cross_decoder
    eager_attend = cd.attend
    compiled = mx.compile(lambda x, k, v: eager_attend(x, Memory(k, v)))

    def attend(x, memory):
        routed = memory.index is None and cd.topk and memory.keys.shape[2] == cd.topk
        if switch.on and x.shape[1] == 1 and routed and cd.rope is None:
            switch.calls += 1
            return compiled(x, memory.keys, memory.values)
        return eager_attend(x, memory)

    def restore():
        DecoderLayer.__call__ = eager_layer

    DecoderLayer.__call__ = layer_call
    object.__setattr__(cd, "attend", attend)
    switch.restore = restore
    return switch


def count_ops(out) -> int:
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as f:
        mx.export_to_dot(f, out)
        f.seek(0)
        return f.read().count("shape=rectangle")


def profile(model, context: int, steps: int) -> dict:
    cache = filled_cache(model, context)
    y = mx.array([[1]])
    parts = {k: [] for k in ("build_ms", "dispatch_ms", "wait_ms")}
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        out = model(y, cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        t3 = time.perf_counter()
        for k, a, b in zip(parts, (t0, t1, t2), (t1, t2, t3)):
            parts[k].append((b - a) * 1e3)
    row = {k: float(np.median(v[2:])) for k, v in parts.items()}
    row["synced_ms"] = float(np.median(np.sum([v[2:] for v in parts.values()], axis=0)))
    row["ops"] = count_ops(model(y, cache=cache))
    cache = filled_cache(model, context)
    stamps = [time.perf_counter() for _ in generate_step(mx.array([1]), model, max_tokens=steps, prompt_cache=cache)]
    row["pipelined_ms"] = float(np.median(np.diff(stamps)[2:])) * 1e3
    return row


def prefill_breakdown(model, context: int, chunk: int, reps: int = 3) -> dict:
    """Milliseconds of one `chunk`-token prefill step over a cache holding `context` tokens: the
    step as mlx-lm runs it (one eval of the caches), then each part synced on its own, summed
    over the layers a prompt runs: attention halves, FFN halves, and for YOCO/CLSA the shared
    K/V and index keys written for the cross layers."""
    toks = mx.array(np.random.default_rng(0).integers(0, 200, (1, chunk)))
    runs = []
    for _ in range(reps + 1):
        cache = filled_cache(model, context, room=chunk + 1)
        t0 = time.perf_counter()
        model(toks, cache=cache)
        mx.eval([c.state for c in cache])
        row = {"step (one eval)": time.perf_counter() - t0, "attention": 0.0, "ffn": 0.0, "shared K/V + index keys": 0.0}
        cache = filled_cache(model, context, room=chunk + 1)
        if isinstance(model, Model):
            n, offset = len(model.self_decoder.layers), cache[len(model.self_decoder.layers)].offset
            x = model.embed_tokens(toks) * model.args.embed_scale
            mask = create_attention_mask(x, cache[0], window_size=model.self_decoder.window)
            halves = [(lambda h, l=l, c=c: l.mixer(l.mixer_layer_norm(h), mask, c, offset),
                       lambda h, l=l: l.ffn(l.final_layer_norm(h))) for l, c in zip(model.self_decoder.layers, cache)]
        else:
            x = model.model.embed_tokens(toks)
            mask = create_attention_mask(x, cache[0])
            halves = [(lambda h, l=l, c=c: l.self_attn(l.input_layernorm(h), mask, c),
                       lambda h, l=l: l.mlp(l.post_attention_layernorm(h))) for l, c in zip(model.layers, cache)]
        mx.eval(x)
        for attention, ffn in halves:
            for name, half in (("attention", attention), ("ffn", ffn)):
                t0 = time.perf_counter()
                x = x + half(x)
                mx.eval(x)
                row[name] += time.perf_counter() - t0
        if isinstance(model, Model):
            t0 = time.perf_counter()
            memory = model.cross_decoder.memory(x, cache[n], cache[n + 1] if model.args.sparse else None, offset)
            mx.eval(memory.keys, memory.values, [c.state for c in cache[n:]])
            row["shared K/V + index keys"] = time.perf_counter() - t0
        runs.append(row)
    return {k: float(np.median([r[k] for r in runs[1:]])) * 1e3 for k in runs[0]}


def plot(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tags = list(dict.fromkeys(r["tag"] for r in rows))
    fig, axes = plt.subplots(1, len(tags), figsize=(4.5 * len(tags), 4.5), sharey=True, squeeze=False)
    for ax, tag in zip(axes[0], tags):
        sel = [r for r in rows if r["tag"] == tag]
        x = np.arange(len(sel))
        bottom = np.zeros(len(sel))
        for part, color in (("build_ms", "tab:blue"), ("dispatch_ms", "tab:orange"), ("wait_ms", "tab:green")):
            v = np.array([r[part] for r in sel])
            ax.bar(x, v, bottom=bottom, color=color, label=part[:-3])
            bottom += v
        ax.plot(x, [r["pipelined_ms"] for r in sel], "k_", markersize=14, mew=2, label="pipelined step")
        ax.set_xticks(x, [f"{r['arch']}{'' if r.get('variant', '-') in ('-', 'fused') else ' ' + r['variant']}\n"
                          f"{r['context'] // 1024}K" for r in sel], rotation=90, fontsize=7)
        ax.set_title(f"{tag} ({sel[0]['bits']}-bit)", fontsize=9)
    axes[0][0].set_ylabel("ms per decode step")
    axes[0][0].legend(fontsize=7)
    m = rows[0]["machine"]
    fig.suptitle(f"{rows[0]['config']} decode step, host vs GPU — {m.get('gpu') or m['device']}, mlx {m['mlx']}, "
                 f"{m['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="cpu-small")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096])
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    p.add_argument("--bits", type=int, choices=[0, 4, 8], default=0)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prefill", type=int, default=0, help="also time an N-token prefill (0: none)")
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--prefill-breakdown", type=int, default=0,
                   help="also time one --prefill-step chunk over a cache of N tokens, part by part (0: none)")
    p.add_argument("--variants", nargs="+", choices=["unfused", "fused", "compiled"], default=["fused"],
                   help="YOCO/CLSA: separate projections, stacked ones (what load() gives), stacked + compiled decode blocks")
    p.add_argument("--reps", type=int, default=1, help="measurements per variant, in turns")
    p.add_argument("--tag", default="default", help="names this run's environment in the output")
    p.add_argument("--out", type=Path, help="append the result (JSON lines)")
    p.add_argument("--plot", type=Path, help="draw FILE.jsonl as FILE.png and exit")
    args = p.parse_args()
    if args.plot:
        return plot(args.plot)
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLX_", "CLSA_MLX_"))}
    for arch in args.archs:
        variants = ["-"] if arch == "transformer" else args.variants
        models, switch = {}, None
        if "unfused" in variants:
            models["unfused"] = build(arch, CONFIGS[args.config], args.bits, fuse=False)
        if {"fused", "compiled"} & set(variants):
            models["fused"] = models["compiled"] = build(arch, CONFIGS[args.config], args.bits)
            switch = compile_decode(models["fused"])
        if arch == "transformer":
            models["-"] = build(arch, CONFIGS[args.config], args.bits)
        pre = {}
        if args.prefill:
            model = models[variants[-1]]
            warm_prefill(model, args.prefill_step, args.prefill)
            tps, peak = prefill_tps(model, args.prefill, args.prefill_step)
            loaded = sum(weights_bytes(m) for m in {id(m): m for m in models.values()}.values())
            pre = dict(prefill=args.prefill, prefill_step=args.prefill_step, prefill_tps=tps,
                       prefill_peak_over_weights_gb=(peak - loaded) / 1e9)
        if args.prefill_breakdown:
            pre["prefill_breakdown_ms"] = prefill_breakdown(models[variants[-1]], args.prefill_breakdown,
                                                            args.prefill_step)
        for context in args.contexts:
            runs = {v: [] for v in variants}
            for _ in range(args.reps):  # variants in turns, so drift hits all alike
                for v in variants:
                    if switch is not None:
                        switch.on = v == "compiled"
                    runs[v].append(profile(models[v], context, args.steps))
            for v in variants:
                row = {k: float(np.median([r[k] for r in runs[v]])) for k in runs[v][0]}
                row = dict(tag=args.tag, variant=v, env=env, config=args.config, bits=args.bits or 16, arch=arch,
                           context=context, **pre, **row, pipelined_ms_runs=[r["pipelined_ms"] for r in runs[v]])
                print(json.dumps(row), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(dict(row, machine=machine())) + "\n")
        if switch is not None:
            switch.restore()
        del models


if __name__ == "__main__":
    main()
