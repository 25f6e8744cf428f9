#!/usr/bin/env bash
# After training/gpu_train.sh, on the same box with MLX CUDA installed: convert the models (big:
# 8-bit, the one to ship at ~24.6 MB; small: fp16, ~23.6 MB), evaluate each and the shipped model
# (BASELINE) on the same questions with benchmarks/eval_documents.py at 1K-32K (one process per
# model, at once; each resumes from its JSON if run again), pack what comes back.
#   [MODELS="big small"] [BASELINE=clsa_mlx/shipped] [SAMPLES=1] [LENGTHS="1024 4096 16384 32768"] [EVAL_S=480]
#     bash benchmarks/gpu_documents.sh /tmp/run DATA
#   -> $OUT/documents_*.png, $OUT/shipped.tar.* (the big 8-bit folder, or small alone),
#      $OUT/documents.tar.gz (documents_*.json, eval and training logs)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
RUN=$1 DATA=$2
MODELS=${MODELS:-big small} BASELINE=${BASELINE-clsa_mlx/shipped}
OUT=${OUT:-/tmp/out} R=/tmp/documents
mkdir -p "$OUT" $R /tmp/ship
convert() {  # checkpoint, folder, extra flags
  [ -f "$2/config.json" ] || python3 convert.py --torch-path "$1" --mlx-path "$2" --dtype float16 --tokenizer "$DATA/hf" \
    "${@:3}" 2>&1 | tail -3
}
E="timeout ${EVAL_S:-480} python3 benchmarks/eval_documents.py --data $DATA --out-dir $R
   --lengths ${LENGTHS:-1024 4096 16384 32768} --samples ${SAMPLES:-1} --regression-samples ${REGRESSION_SAMPLES:-3}
   --ppl-windows 4"
SHIP=
for m in $MODELS; do
  if [ "$m" = big ]; then
    convert "$RUN/big/joint" /tmp/ship/big8 -q --q-bits 8
    $E --model /tmp/ship/big8 --name documents_big8 > "$R/eval_big8.log" 2>&1 &
    SHIP=big8
  else
    convert "$RUN/small/joint" /tmp/ship/small16
    $E --model /tmp/ship/small16 --name documents_small16 > "$R/eval_small16.log" 2>&1 &
    SHIP=${SHIP:-small16}
  fi
done
if [ -n "$BASELINE" ]; then  # CLSA alone: its dense twin was equal at every length before
  $E --model "$BASELINE" --name documents_baseline --models clsa > "$R/eval_baseline.log" 2>&1 &
fi
wait
rm -f "$OUT"/shipped.tar.*
(cd /tmp/ship && tar cf - "$SHIP" | split -b 15m - "$OUT/shipped.tar.")
cp $R/documents_*.png "$OUT"/ 2>/dev/null
(cd "$RUN" && cp --parents */*.log */*/train_*.json $R/ 2>/dev/null)
tar czf "$OUT/documents.tar.gz" -C $R .
ls -la "$OUT"
