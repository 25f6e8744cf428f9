#!/usr/bin/env bash
# Batched serving on the GPU box (MLX CUDA installed), in two parts that each fit one device call:
#   bash benchmarks/gpu_batch.sh check   kernel tests (padding-aware routing), mlx-lm's batch
#                                        machinery through the kernels, the quick routing/gather sweep
#   bash benchmarks/gpu_batch.sh sweep   the whole routing/gather sweep (T to 1M; ~250 s without padding)
#   bash benchmarks/gpu_batch.sh bench   bench_batch.py, paper-4b bf16: 32K and 128K, 1M for YOCO/CLSA
# -> $OUT/*.log, $OUT/check_kernels_gpu_batch.json, $OUT/bench_batch_paper-4b.{json,png}
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu_$1.log"
if [ "$1" = check ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_sparse_ref.py \
    tests/test_batch.py -k "not dispatch_on_cpu" 2>&1 | tail -30 | tee "$OUT/tests_gpu_batch.log"
  timeout 200 python3 benchmarks/check_kernels_gpu.py --quick --only route,select_kv \
    --out "$OUT/check_kernels_gpu_batch_quick.json" 2>&1 | tail -40 | tee "$OUT/check_batch_quick.log"
elif [ "$1" = sweep ]; then
  timeout 560 python3 benchmarks/check_kernels_gpu.py --only route,select_kv \
    --out "$OUT/check_kernels_gpu_batch.json" 2>&1 | tail -40 | tee "$OUT/check_batch.log"
else
  timeout 540 python3 benchmarks/bench_batch.py --config paper-4b --contexts 32768 131072 --long 1048576 \
    --batches 1 2 4 6 7 8 16 32 64 128 192 256 --mem-gb 150 --out-dir "$OUT" 2>&1 | tee "$OUT/bench_batch.log"
fi
