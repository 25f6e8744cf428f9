"""Which part of one batched CLSA decode step fails at a large batch (bench_batch on the H200 hit
an illegal address at 128K, B=192). Evaluates mlx-lm's merge, then the step part by part; run one
process per case (a CUDA fault poisons the process):

    python benchmarks/diag_batch_step.py --batch 192 --context 131072 [--reference]
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=192)
ap.add_argument("--context", type=int, default=131072)
ap.add_argument("--config", default="paper-4b")
ap.add_argument("--reference", action="store_true")
args = ap.parse_args()
if args.reference:
    os.environ["CLSA_MLX_REFERENCE"] = "1"

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import _merge_caches  # noqa: E402

from benchmarks.bench_models import CONFIGS, build, filled_cache  # noqa: E402


def stage(name, *arrays):
    mx.eval(*arrays)
    mx.synchronize()
    print(f"ok {name}", flush=True)


model = build("clsa", CONFIGS[args.config], 0)
source = filled_cache(model, args.context, room=0)
cache = _merge_caches([source] * args.batch)
stage("merge", [c.state for c in cache])
n = len(model.self_decoder.layers)
x = model.embed_tokens(mx.ones((args.batch, 1), mx.int32)) * model.args.embed_scale
offset = cache[n].offset
x = model.self_decoder(x, cache[:n], offset)
stage("self decoder", x, [c.state for c in cache[:n]])
B = args.batch
for c, (h, kd, vd) in zip(cache[n:], model.cache_shapes()[n:]):
    c.update_and_fetch(mx.zeros((B, h, 1, kd), mx.bfloat16), mx.zeros((B, h, 1, vd), mx.bfloat16))
    c.trim(1)  # grown by mlx-lm's step of 256 rows; the step below writes in place
stage("K/V and index caches grow", [c.state for c in cache[n:]])
memory = model.cross_decoder.memory(x, cache[n], cache[n + 1], offset)
stage("memory (projections, routing, gather)", memory.keys, memory.values, memory.mask)
stage("cross layers", model.cross_decoder.attend(x, memory))
