#!/usr/bin/env bash
# The shipped model's GPU run: dense -> warmup -> joint on one H200 (one device call, ~9 min).
#   carry .train/box (tokenizer.model + corpus_ids.npy written by training/prepare.py)
#   bash training/gpu_train.sh .train/box /tmp/run
#   -> $OUT/{dense,warmup,joint}.log and $OUT/joint.tar.* (the official checkpoint, split)
set -eo pipefail
export PYTHONUNBUFFERED=1
DATA=$1 RUN=$2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$RUN"
T="python3 training/train.py --data $DATA --seq 4096 --batch 16 --workers 8 --log-every 100"
$T --stage dense --out "$RUN/dense" --minutes 5.2 | tee "$OUT/dense.log"
$T --stage warmup --init "$RUN/dense" --out "$RUN/warmup" --minutes 0.7 | tee "$OUT/warmup.log"
$T --stage joint --init "$RUN/warmup" --out "$RUN/joint" --minutes 1.6 --eval-lengths 4096 16384 \
  --eval-samples 16 | tee "$OUT/joint.log"
(cd "$RUN" && tar cf - joint | split -b 15m - "$OUT/joint.tar.")
