#!/usr/bin/env bash
# Where a paper-4b decode step's time goes on the GPU box, under MLX's CUDA knobs (one process
# per setting: MLX reads them once).   bash benchmarks/gpu_profile.sh -> $OUT/profile_step.jsonl
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
P="timeout 150 python3 benchmarks/profile_step.py --config paper-4b --steps 32 --out $OUT/profile_step.jsonl"
{
$P --contexts 8192 131072 --prefill 32768 --tag default
MLX_USE_CUDA_GRAPHS=0 $P --contexts 8192 131072 --prefill 32768 --tag no-graphs
MLX_MAX_OPS_PER_BUFFER=5000 MLX_MAX_MB_PER_BUFFER=1000000 $P --contexts 8192 131072 --tag one-graph
MLX_CUDA_USE_CUDNN_SDPA=0 $P --contexts 8192 --prefill 32768 --archs yoco clsa --tag no-cudnn-sdpa
MLX_CUDA_USE_CUDNN_SDPA=1 $P --contexts 8192 --prefill 32768 --archs yoco clsa --tag cudnn-sdpa
$P --contexts 8192 131072 --bits 4 --tag default-4bit
} 2>&1 | tee "$OUT/profile.log"
