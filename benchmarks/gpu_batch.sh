#!/usr/bin/env bash
# Batched serving on a GPU machine (MLX CUDA installed): bench_batch.py, paper-4b bf16, 32K and
# 128K for all three architectures, 1M for YOCO/CLSA, batches until the device is full.
#   bash benchmarks/gpu_batch.sh [--out DIR] [--limit-s SECONDS]
# -> DIR/bench_batch.log, DIR/bench_batch_paper-4b.{json,png} (DIR default: benchmarks/results)
set -o pipefail
OUT=benchmarks/results LIMIT=0
while [ $# -gt 0 ]; do
  case $1 in --out) OUT=$2; shift 2 ;; --limit-s) LIMIT=$2; shift 2 ;; *) echo "unknown option: $1" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
timeout "$LIMIT" python3 benchmarks/bench_batch.py --config paper-4b --contexts 32768 131072 --long 1048576 \
  --batches 1 2 4 6 7 8 16 32 64 128 192 256 --out-dir "$OUT" 2>&1 | tee "$OUT/bench_batch.log"
