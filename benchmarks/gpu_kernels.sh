#!/usr/bin/env bash
# The kernels on the GPU box (MLX CUDA installed), one device call per part:
#   bash benchmarks/gpu_kernels.sh check   kernel tests against the references (the self-test must pass
#                                          everywhere: tests/conftest.py fails the run on a fallback),
#                                          mlx-lm's batch machinery through the kernels, the quick sweep
#   bash benchmarks/gpu_kernels.sh sweep   the whole kernel-vs-reference sweep (T to 1M, left padding;
#                                          ONLY=route,select_kv for the routing alone, SWEEP_S its limit)
#   bash benchmarks/gpu_kernels.sh bench   bench_kernels.py on this tree's kernels, on before_tree/'s (an
#                                          untracked copy of the previous commit, made for the run, e.g.
#                                          git archive REV clsa_mlx metal benchmarks | tar -x -C before_tree),
#                                          then this tree's again: the spread of the two "after" runs is the noise
#   bash benchmarks/gpu_kernels.sh scratch one routing call of 2048 query rows at 128K keys: the extra
#                                          device memory it held (MLX's peak) and its time, checked against
#                                          the reference, on this tree and on before_tree/ if there; and the
#                                          plan the dispatch counts for it (routing_bytes.py)
# -> $OUT/*.log, $OUT/*.json, $OUT/*.png
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu_$1.log"
if [ "$1" = check ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernel_fallback.py \
    tests/test_sparse_ref.py tests/test_batch.py -k "not dispatch_on_cpu" 2>&1 | tail -30 | tee "$OUT/tests_gpu_kernels.log"
  timeout 200 python3 benchmarks/check_kernels_gpu.py --quick \
    --out "$OUT/check_kernels_gpu_quick.json" 2>&1 | tail -40 | tee "$OUT/check_quick.log"
elif [ "$1" = scratch ]; then
  python3 benchmarks/routing_bytes.py --rows 2048 --keys 131072 2>&1 | tee "$OUT/scratch.log"
  timeout 200 python3 benchmarks/routing_bytes.py --rows 2048 --keys 131072 --measure \
    --out "$OUT/scratch_after.json" 2>&1 | tail -5 | tee -a "$OUT/scratch.log"
  if [ -d before_tree ]; then
    timeout 200 python3 benchmarks/routing_bytes.py --rows 2048 --keys 131072 --measure --tree before_tree \
      --out "$OUT/scratch_before.json" 2>&1 | tail -5 | tee -a "$OUT/scratch.log"
  fi
elif [ "$1" = sweep ]; then
  timeout "${SWEEP_S:-570}" python3 benchmarks/check_kernels_gpu.py --only "${ONLY:-route,select_kv,sparse_attention}" --out "$OUT/check_kernels_gpu.json" 2>&1 | tail -40 | tee "$OUT/check_sweep.log"
else
  mkdir -p "$OUT/before" "$OUT/after" "$OUT/after2"
  timeout 150 python3 benchmarks/bench_kernels.py --out-dir "$OUT/after" 2>&1 | tail -12 | tee "$OUT/bench_after.log"
  timeout 150 python3 benchmarks/bench_kernels.py --tree before_tree --out-dir "$OUT/before" 2>&1 \
    | tail -12 | tee "$OUT/bench_before.log"
  timeout 150 python3 benchmarks/bench_kernels.py --out-dir "$OUT/after2" 2>&1 | tail -12 | tee "$OUT/bench_after2.log"
  rm -f "$OUT/before/bench_kernels.png" "$OUT/after2/bench_kernels.png"  # 8 files come back at most
fi
