#!/usr/bin/env bash
# The server's figures on a GPU machine (MLX CUDA installed), paper-4b bf16 with random weights.
#   bash benchmarks/gpu_serve.sh step  [--out DIR]   one batched decode step at 128K, split into what the
#                                                    server adds to a plain batched loop (bench_batch_step.py;
#                                                    resumable: finished rows are kept)
#   bash benchmarks/gpu_serve.sh serve [--out DIR]   requests/s, p50/p95 at 1/4/16 clients, 32K prompts,
#                                                    clsa-serve beside mlx_lm.server (bench_serve.py)
#   bash benchmarks/gpu_serve.sh prefill [--out DIR] one client, 128K-token prompts, one token: the prefill
#                                                    through each server's prompt loop
# -> DIR/bench_batch_step_paper-4b.json, DIR/bench_serve_paper-4b.json, DIR/bench_serve_prefill_paper-4b.json
#    and their .log (DIR default: benchmarks/results)
set -o pipefail
MODE=${1:?usage: gpu_serve.sh step|serve|prefill [--out DIR]}; shift
OUT=benchmarks/results
while [ $# -gt 0 ]; do
  case $1 in --out) OUT=$2; shift 2 ;; *) echo "unknown option: $1" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH=.
mkdir -p "$OUT"
case $MODE in
  step)
    J="$OUT/bench_batch_step_paper-4b.json"
    { python3 benchmarks/bench_batch_step.py --config paper-4b --context 131072 --batches 1 64 --archs clsa \
        --steps 48 --out "$J" &&
      python3 benchmarks/bench_batch_step.py --config paper-4b --context 131072 --batches 1 --archs transformer yoco \
        --steps 48 --out "$J"; } 2>&1 | tee -a "$OUT/bench_batch_step_paper-4b.log" ;;
  serve)
    python3 benchmarks/bench_serve.py --config paper-4b --folder /tmp/clsa-paper-4b-random --prompt-tokens 32768 \
      --max-tokens 64 --requests 16 --mlx-lm --out "$OUT/bench_serve_paper-4b.json" 2>&1 |
      tee "$OUT/bench_serve_paper-4b.log" ;;
  prefill)
    python3 benchmarks/bench_serve.py --config paper-4b --folder /tmp/clsa-paper-4b-random --prompt-tokens 131000 \
      --max-tokens 1 --clients 1 --requests 3 --mlx-lm --out "$OUT/bench_serve_prefill_paper-4b.json" 2>&1 |
      tee "$OUT/bench_serve_prefill_paper-4b.log" ;;
  *) echo "unknown mode: $MODE (step, serve or prefill)" >&2; exit 2 ;;
esac
