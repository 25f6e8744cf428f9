#!/usr/bin/env bash
# What ran on the GPU box (MLX CUDA installed per ../shared/device/README.md):
#   bash benchmarks/gpu_box.sh   -> $OUT/{smoke.log,check.log,check_kernels_gpu.json,bench.log,bench_kernels.json,bench_kernels.png}
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 120 python3 benchmarks/smoke_gpu.py 2>&1 | tee "$OUT/smoke.log"
timeout 400 python3 benchmarks/check_kernels_gpu.py --out "$OUT/check_kernels_gpu.json" > "$OUT/check.log" 2>&1
echo "check rc=$?"; grep -v '^FAIL' "$OUT/check.log" | tail -32; grep -c '^FAIL' "$OUT/check.log"
timeout 150 python3 benchmarks/bench_kernels.py --out-dir "$OUT" --iters 20 2>&1 | tee "$OUT/bench.log" | tail -8
