#!/usr/bin/env bash
# The paper-4b decode / prefill / cache table on a GPU machine (MLX CUDA installed):
#   bash benchmarks/gpu_models.sh [--out DIR] [--limit-s SECONDS] 16|4
# 16: bf16. 4: 4-bit with prefill to 1M, then the 1M prefill again in 512-token chunks.
# --limit-s stops each python run after that long (default: no limit).
# -> DIR/bench_models_paper-4b_*.{json,png}, DIR/bench_*.log (DIR default: benchmarks/results)
set -o pipefail
OUT=benchmarks/results LIMIT=0
while [ $# -gt 1 ]; do
  case $1 in --out) OUT=$2; shift 2 ;; --limit-s) LIMIT=$2; shift 2 ;; *) echo "unknown option: $1" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
B="timeout $LIMIT python3 benchmarks/bench_models.py --config paper-4b --out-dir $OUT"
C="--contexts 8192 32768 131072 524288 1048576 --steps 32 --reps 5"
case $1 in
  16) $B $C 2>&1 | tee "$OUT/bench_16bit.log" ;;
  4) $B $C --bits 4 --prefill-max 1048576 2>&1 | tee "$OUT/bench_4bit.log"
     $B --bits 4 --contexts 1048576 --prefill-max 1048576 --prefill-step 512 --steps 16 --reps 1 2>&1 \
       | tee "$OUT/bench_4bit_step512.log" ;;
  *) echo "usage: bash benchmarks/gpu_models.sh [--out DIR] [--limit-s SECONDS] 16|4" >&2; exit 2 ;;
esac
