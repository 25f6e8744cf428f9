#!/usr/bin/env bash
# After training/gpu_train.sh, on the same box with MLX CUDA installed: convert the models with
# the project's convert.py (big: 8-bit and fp16; small: fp16), evaluate them through the chat's
# path to 64K (one process per model, at once), pack what comes back.
#   [MODELS=small] [BASELINE=clsa_mlx/shipped] bash benchmarks/gpu_quality.sh /tmp/run /tmp/data
#   -> $OUT/quality_*.png, $OUT/shipped.tar.* (the folder to ship: big8, or small16 alone),
#      $OUT/results.tar.gz (quality_*.json, other plots, eval and training logs): 8 files at most
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
RUN=$1 DATA=$2
MODELS=${MODELS:-big small}
OUT=${OUT:-/tmp/out}
R=/tmp/results
rm -rf /tmp/ship $R  # a warm box keeps an earlier run's plots, which would come back too
mkdir -p "$OUT" $R
convert() {  # checkpoint, folder, extra flags
  python3 convert.py --torch-path "$1" --mlx-path "$2" --dtype float16 --tokenizer "$DATA/hf" "${@:3}" 2>&1 | tail -3
}
E="timeout ${EVAL_S:-420} python3 benchmarks/eval_quality.py --data $DATA --out-dir $R --lengths 1024 4096 16384 32768 65536"
SAMPLES=${SAMPLES:-10 10 8 6 4}
SHIP=
for m in $MODELS; do
  if [ "$m" = big ]; then
    convert "$RUN/big/joint" /tmp/ship/big8 -q --q-bits 8
    convert "$RUN/big/joint" /tmp/ship/big16
    $E --model /tmp/ship/big8 --name quality_big8 --samples $SAMPLES > "$R/eval_big8.log" 2>&1 &
    $E --model /tmp/ship/big16 --name quality_big16 --samples 6 6 4 3 2 --kinds value signature default doc mention \
      > "$R/eval_big16.log" 2>&1 &
    SHIP=big8
  else
    convert "$RUN/small/joint" /tmp/ship/small16
    $E --model /tmp/ship/small16 --name quality_small16 --samples $SAMPLES > "$R/eval_small16.log" 2>&1 &
    SHIP=${SHIP:-small16}
  fi
done
if [ -n "$BASELINE" ]; then  # an MLX folder (the shipped model) evaluated beside, on the same questions
  $E --model "$BASELINE" --name quality_baseline --samples $SAMPLES > "$R/eval_baseline.log" 2>&1 &
fi
wait
(cd /tmp/ship && tar cf - "$SHIP" | split -b 15m - "$OUT/shipped.tar.")
cp $R/quality_*.png "$OUT"/
(cd "$RUN" && cp --parents */*.log */*/train_*.json $R/)
tar czf "$OUT/results.tar.gz" -C $R .
ls -la "$OUT"
