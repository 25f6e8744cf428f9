#!/usr/bin/env bash
# Second GPU-box run, after the scoring pass went to 512 threads x 8 keys in flight per
# warp: re-check routing and select_kv (the attention kernel did not change), re-bench.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 200 python3 benchmarks/check_kernels_gpu.py --only route,select_kv --out "$OUT/check_kernels_gpu_route2.json" > "$OUT/check2.log" 2>&1
echo "check rc=$?"; grep -v '^FAIL' "$OUT/check2.log" | tail -24; grep -c '^FAIL' "$OUT/check2.log"
timeout 150 python3 benchmarks/bench_kernels.py --out-dir "$OUT" --iters 20 2>&1 | tee "$OUT/bench2.log" | tail -3
