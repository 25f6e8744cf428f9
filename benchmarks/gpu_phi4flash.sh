#!/usr/bin/env bash
# Phi-4-mini-flash vs mlx-lm's Phi-4-mini on a GPU machine (MLX CUDA installed), random weights at
# the published configurations, bf16 and 4-bit: prefill 16K and 64K, decode at 4K/16K/64K/128K for
# batch 1 and 8, cache bytes per sequence. Resumable: rerun the same command to finish after a timeout.
#   bash benchmarks/gpu_phi4flash.sh [--out DIR] [--limit-s SECONDS]
# -> DIR/bench_phi4flash_real.json (rows + summary), DIR/bench_phi4flash.log (DIR default: benchmarks/results)
set -o pipefail
OUT=benchmarks/results LIMIT=0
while [ $# -gt 0 ]; do
  case $1 in --out) OUT=$2; shift 2 ;; --limit-s) LIMIT=$2; shift 2 ;; *) echo "unknown option: $1" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
timeout "$LIMIT" python3 benchmarks/bench_phi4flash.py --out-dir "$OUT" 2>&1 | tee -a "$OUT/bench_phi4flash.log"
