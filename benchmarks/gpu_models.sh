#!/usr/bin/env bash
# The paper-4b efficiency table on the GPU box (MLX CUDA installed): bf16, then 4-bit with
# prefill to 1M for the 6 GB check.   bash benchmarks/gpu_models.sh
#   -> $OUT/bench_models_paper-4b_{16,4}bit.{json,png}, $OUT/bench_{16,4}bit.log
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B="python3 benchmarks/bench_models.py --config paper-4b --out-dir $OUT --transformer-max 131072"
C="--contexts 8192 32768 131072 524288 1048576"
timeout 290 $B $C 2>&1 | tee "$OUT/bench_16bit.log"
timeout 290 $B $C --bits 4 --prefill-max 1048576 2>&1 | tee "$OUT/bench_4bit.log"
