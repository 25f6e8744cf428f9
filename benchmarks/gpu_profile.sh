#!/usr/bin/env bash
# Where a paper-4b decode step's time goes on the GPU box: separate vs stacked projections vs
# compiled decode blocks, measured in turns in one process; and one MLX CUDA knob (MLX reads
# them once per process).   bash benchmarks/gpu_profile.sh -> $OUT/profile_step.jsonl, profile.log
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
P="timeout 200 python3 benchmarks/profile_step.py --config paper-4b --steps 32 --reps 3 --out $OUT/profile_step.jsonl"
{
$P --contexts 8192 131072 --variants unfused fused compiled --tag default
$P --contexts 8192 131072 --variants fused compiled --bits 4 --tag default-4bit
MLX_MAX_OPS_PER_BUFFER=300 $P --contexts 131072 --archs yoco clsa --variants fused compiled --tag ops300
} 2>&1 | tee "$OUT/profile.log"
