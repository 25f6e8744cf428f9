#!/usr/bin/env bash
# After training/gpu_train.sh, on the same box with MLX CUDA installed: convert both models with
# the project's convert.py (the larger one 8-bit, and fp16 too; the small one fp16), evaluate
# them through the chat's path to 64K (two processes at once), pack what comes back.
#   bash benchmarks/gpu_quality.sh /tmp/run /tmp/data
#   -> $OUT/quality_{big8,small16}.png, $OUT/shipped.tar.* (the 8-bit folder), $OUT/results.tar.gz
#      (quality_*.json, the big fp16 plot, eval and training logs): 8 files come back at most
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
RUN=$1 DATA=$2
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
rm -rf /tmp/ship
convert() {  # checkpoint, folder, extra flags
  python3 convert.py --torch-path "$1" --mlx-path "$2" --dtype float16 --tokenizer "$DATA/hf" "${@:3}" 2>&1 | tail -3
}
convert "$RUN/big/joint" /tmp/ship/big8 -q --q-bits 8
convert "$RUN/big/joint" /tmp/ship/big16
convert "$RUN/small/joint" /tmp/ship/small16
R=/tmp/results
mkdir -p $R
E="timeout ${EVAL_S:-420} python3 benchmarks/eval_quality.py --data $DATA --out-dir $R --lengths 1024 4096 16384 32768 65536"
$E --model /tmp/ship/big8 --name quality_big8 --samples 10 10 8 6 4 > "$R/eval_big8.log" 2>&1 &
$E --model /tmp/ship/small16 --name quality_small16 --samples 10 10 8 6 4 > "$R/eval_small16.log" 2>&1 &
$E --model /tmp/ship/big16 --name quality_big16 --samples 6 6 4 3 2 --kinds value signature default doc mention \
  > "$R/eval_big16.log" 2>&1 &
wait
(cd /tmp/ship && tar cf - big8 | split -b 15m - "$OUT/shipped.tar.")
cp $R/quality_big8.png $R/quality_small16.png "$OUT"/
(cd "$RUN" && cp --parents */*.log */*/train_*.json $R/)
tar czf "$OUT/results.tar.gz" -C $R .
ls -la "$OUT"
