#!/usr/bin/env bash
# The paper-4b efficiency table on the GPU box (MLX CUDA installed): bf16; 4-bit with prefill
# to 1M; the 1M 4-bit prefill again in 512-token chunks (peak memory vs chunk size).
#   bash benchmarks/gpu_models.sh   -> $OUT/bench_models_paper-4b_*.{json,png}, $OUT/bench_*.log
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B="python3 benchmarks/bench_models.py --config paper-4b --out-dir $OUT --transformer-max 131072"
C="--contexts 8192 32768 131072 524288 1048576 --steps 48 --reps 3"
timeout 230 $B $C 2>&1 | tee "$OUT/bench_16bit.log"
timeout 230 $B $C --bits 4 --prefill-max 1048576 2>&1 | tee "$OUT/bench_4bit.log"
timeout 110 $B --bits 4 --contexts 1048576 --prefill-max 1048576 --prefill-step 512 --steps 16 --reps 1 2>&1 \
  | tee "$OUT/bench_4bit_step512.log"
