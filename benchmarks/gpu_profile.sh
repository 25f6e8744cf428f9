#!/usr/bin/env bash
# Where a paper-4b prefill's time goes on a GPU machine (MLX CUDA installed): one 2048-token
# prefill chunk over a 128K cache, part by part, and the 32K prefill: window attention in query
# blocks, as one masked SDPA call, and blocks with cuDNN SDPA off (each setting its own process:
# MLX reads its knobs once). The decode step: benchmarks/results/README.md (profile_step); one
# layer's parts: benchmarks/prefill_parts.py.
#   bash benchmarks/gpu_profile.sh [--out DIR] [--limit-s SECONDS] -> DIR/profile_prefill.jsonl, profile.log
set -o pipefail
OUT=benchmarks/results LIMIT=0
while [ $# -gt 0 ]; do
  case $1 in --out) OUT=$2; shift 2 ;; --limit-s) LIMIT=$2; shift 2 ;; *) echo "unknown option: $1" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
P="timeout $LIMIT python3 benchmarks/profile_step.py --config paper-4b --steps 16 --contexts 8192 --out $OUT/profile_prefill.jsonl"
{
$P --prefill-breakdown 131072 --prefill 32768 --tag window-blocks
CLSA_MLX_WINDOW_BLOCKS=0 $P --archs yoco clsa --prefill-breakdown 131072 --prefill 32768 --tag window-one-call
MLX_CUDA_USE_CUDNN_SDPA=0 $P --archs yoco clsa --prefill-breakdown 131072 --prefill 32768 --tag window-blocks-no-cudnn
} 2>&1 | tee "$OUT/profile.log"
