#!/usr/bin/env bash
# The paper-4b efficiency table on the GPU box (MLX CUDA installed), in two parts that each fit
# one device call (each under 10 minutes):   bash benchmarks/gpu_models.sh 16   (bf16)
#                    bash benchmarks/gpu_models.sh 4    (4-bit with prefill to 1M; the 1M prefill
#                                                         again in 512-token chunks)
# -> $OUT/bench_models_paper-4b_*.{json,png}, $OUT/bench_*.log
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B="python3 benchmarks/bench_models.py --config paper-4b --out-dir $OUT --transformer-max 131072"
C="--contexts 8192 32768 131072 524288 1048576 --steps 32 --reps 5"
if [ "$1" = 16 ]; then
  timeout 420 $B $C 2>&1 | tee "$OUT/bench_16bit.log"
else
  timeout 320 $B $C --bits 4 --prefill-max 1048576 2>&1 | tee "$OUT/bench_4bit.log"
  timeout 240 $B --bits 4 --contexts 1048576 --prefill-max 1048576 --prefill-step 512 --steps 16 --reps 1 2>&1 \
    | tee "$OUT/bench_4bit_step512.log"
fi
