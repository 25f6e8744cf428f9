"""Where a YOCO/CLSA prompt's time goes: the prefill loop and one window-attention layer.

    python benchmarks/prefill_parts.py --config paper-4b --prompts 32768 131072

- loops: whole-prompt tok/s through mlx-lm's generate_step (which frees MLX's buffer cache after
  every chunk) and through clsa_mlx's loop that keeps it (`bench_models.prefill_tps`), the latter
  also with the window blocks eager and with the window attention as one masked call, in turns;
- parts: one self-decoder layer on a full chunk, each part repeated `--iters` times in one eval
  (the sync amortized): projections, RoPE, window-cache update, window attention in query blocks
  and as one masked call, cuDNN-eligible SDPA of the same size without a mask, FFN.
"""

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.base import create_attention_mask  # noqa: E402

from benchmarks.bench_models import CONFIGS, build, filled_cache, prefill_tps, warm_prefill  # noqa: E402
from benchmarks.common import machine, timed  # noqa: E402
from clsa_mlx import window  # noqa: E402
from clsa_mlx.model import split_heads  # noqa: E402
from clsa_mlx.window import (  # noqa: E402
    window_attention_blocks,
    window_attention_blocks_compiled,
    window_attention_ref,
)


def layer_parts(model, chunk: int, iters: int) -> dict:
    layer = model.self_decoder.layers[0]
    a = layer.mixer
    x = mx.random.normal((1, chunk, model.args.dim)).astype(mx.bfloat16)
    # timed() calls a part at most 2 * iters + 6 times; each cache update needs a fresh cache
    caches = [filled_cache(model, 8 * a.window)[0] for _ in range(2 * iters + 8)]
    mask = create_attention_mask(x, caches[0], window_size=a.window)
    q_end, k_end = a.n_heads * a.head_dim, (a.n_heads + a.n_kv_heads) * a.head_dim

    def project(x):
        return mx.split(a.qkv_proj(layer.mixer_layer_norm(x)), (q_end, k_end), axis=-1)

    def norm_rope(q, k):
        q = a.rope(a.q_norm(split_heads(q, a.n_heads)).transpose(0, 2, 1, 3), 0)
        return q, a.rope(a.k_norm(split_heads(k, a.n_kv_heads)).transpose(0, 2, 1, 3), 0)

    def pre(x):  # the window attention's steps before its cache
        q, k, v = project(x)
        return (*norm_rope(q, k), split_heads(v, a.n_kv_heads).transpose(0, 2, 1, 3))

    qp, kp, _ = project(x)
    q, k, v = pre(x)
    kw, vw = caches[-1].update_and_fetch(k, v)
    mx.eval(qp, kp, q, k, v, kw, vw)
    spare = iter(caches[:-1])
    ffn = lambda x: layer.ffn(layer.final_layer_norm(x))  # noqa: E731
    compiled_norm_rope, compiled_pre, compiled_ffn = mx.compile(norm_rope), mx.compile(pre), mx.compile(ffn)
    parts = {
        "norm + qkv": lambda: project(x),
        "norm + qkv + q/k norm + rope": lambda: pre(x),
        "norm + qkv + q/k norm + rope, compiled": lambda: compiled_pre(x),
        "q/k norm + rope": lambda: norm_rope(qp, kp),
        "q/k norm + rope, compiled": lambda: compiled_norm_rope(qp, kp),
        "window cache update": lambda: next(spare).update_and_fetch(k, v),
        "window attention, blocks": lambda: window_attention_blocks(q, kw, vw, a.scale, a.window),
        "window attention, blocks, compiled": lambda: window_attention_blocks_compiled(q, kw, vw, a.scale, a.window),
        "window attention, one masked call": lambda: window_attention_ref(q, kw, vw, a.scale, mask),
        "same-size SDPA, no mask": lambda: mx.fast.scaled_dot_product_attention(q, kw, vw, scale=a.scale),
        "same-size SDPA, causal": lambda: mx.fast.scaled_dot_product_attention(q, kw, vw, scale=a.scale,
                                                                              mask="causal"),
        "out_proj": lambda: a.out_proj(q.transpose(0, 2, 1, 3).reshape(1, chunk, -1)),
        "norm + FFN": lambda: ffn(x),
        "norm + FFN, compiled": lambda: compiled_ffn(x),
    }
    ref = window_attention_ref(q, kw, vw, a.scale, mask).astype(mx.float32)
    errors = {name: mx.abs(fn().astype(mx.float32) - ref).max().item()
              for name, fn in parts.items() if name.startswith("window attention")}
    return {name: timed(fn, iters)[0] for name, fn in parts.items()}, errors


LOOPS = {  # name: (keep buffers, window form)
    "mlx-lm generate_step": (False, "compiled blocks"),
    "keep buffers": (True, "compiled blocks"),
    "keep buffers, eager blocks": (True, "eager blocks"),
    "keep buffers, one masked call": (True, "one call"),
}


@contextmanager
def window_form(form: str):
    compiled, forced = window.window_attention_blocks_compiled, os.environ.get("CLSA_MLX_WINDOW_BLOCKS")
    if form == "eager blocks":
        window.window_attention_blocks_compiled = window.window_attention_blocks
    if form == "one call":
        os.environ["CLSA_MLX_WINDOW_BLOCKS"] = "0"
    try:
        yield
    finally:
        window.window_attention_blocks_compiled = compiled
        os.environ.pop("CLSA_MLX_WINDOW_BLOCKS", None)
        if forced is not None:
            os.environ["CLSA_MLX_WINDOW_BLOCKS"] = forced


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="cpu-small")
    p.add_argument("--archs", nargs="+", choices=["yoco", "clsa"], default=["clsa"])
    p.add_argument("--bits", type=int, choices=[0, 4, 8], default=0)
    p.add_argument("--prompts", type=int, nargs="+", default=[8192])
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--reps", type=int, default=2, help="measurements per loop, in turns")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tag", default="default")
    p.add_argument("--out", type=Path, help="append the result (JSON lines)")
    args = p.parse_args()
    for arch in args.archs:
        model = build(arch, CONFIGS[args.config], args.bits)
        parts, errors = layer_parts(model, args.prefill_step, args.iters)
        row = dict(tag=args.tag, config=args.config, bits=args.bits or 16, arch=arch, prefill_step=args.prefill_step,
                   env={k: v for k, v in os.environ.items() if k.startswith(("MLX_", "CLSA_MLX_"))},
                   layer_parts_ms=parts, window_max_abs_error_vs_ref=errors, loops={})
        print(json.dumps(parts), json.dumps(errors), flush=True)
        for keep, form in LOOPS.values():
            with window_form(form):
                warm_prefill(model, args.prefill_step, max(args.prompts))
        for n in args.prompts:
            runs = {name: [] for name in LOOPS}
            for _ in range(args.reps):
                for name, (keep, form) in LOOPS.items():
                    with window_form(form):
                        runs[name].append(prefill_tps(model, n, args.prefill_step, keep)[0])
            row["loops"][n] = runs
            print(n, json.dumps(runs), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(dict(row, machine=machine())) + "\n")
        del model


if __name__ == "__main__":
    main()
