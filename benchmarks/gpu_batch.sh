#!/usr/bin/env bash
# Batched serving on the GPU box (MLX CUDA installed): bench_batch.py, paper-4b bf16, 32K and 128K for
# all three architectures, 1M for YOCO/CLSA. The kernel checks are benchmarks/gpu_kernels.sh.
# -> $OUT/bench_batch.log, $OUT/bench_batch_paper-4b.{json,png}
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu_bench.log"
timeout 540 python3 benchmarks/bench_batch.py --config paper-4b --contexts 32768 131072 --long 1048576 \
  --batches 1 2 4 6 7 8 16 32 64 128 192 256 --mem-gb 150 --out-dir "$OUT" 2>&1 | tee "$OUT/bench_batch.log"
