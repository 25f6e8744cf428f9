#!/usr/bin/env bash
# After training/gpu_train.sh, on the same box with MLX CUDA installed: convert the checkpoint
# with the project's convert.py, evaluate dense vs CLSA to 64K, run the GPU kernel tests.
#   bash benchmarks/gpu_quality.sh /tmp/run/joint .train/box
#   -> $OUT/{convert.log,quality.log,quality.json,quality.png,kernel_tests.log}
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
CKPT=$1 DATA=$2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
rm -rf /tmp/ship
python3 convert.py --torch-path "$CKPT" --mlx-path /tmp/ship --dtype float16 --tokenizer "$DATA/hf" 2>&1 \
  | tee "$OUT/convert.log" || exit 1
timeout 330 python3 benchmarks/eval_quality.py --model /tmp/ship --data "$DATA" --out-dir "$OUT" \
  --lengths 1024 4096 16384 32768 65536 --samples 50 2>&1 | tee "$OUT/quality.log"
timeout 120 python3 -m pytest -q tests/test_kernels_gpu.py 2>&1 | tail -15 | tee "$OUT/kernel_tests.log"
