#!/usr/bin/env bash
# The shipped model's GPU run on one H100/H200: dense -> warmup -> joint, by default for two models
# at once of the same stored bytes: `big` (hidden_dim 1152: 23.1M parameters, shipped 8-bit, ~24.6 MB)
# and `small` (11.8M, fp16, ~23.6 MB). Detach it (setsid) and poll: it outlasts one device call.
#   carry .train/box (training/prepare.py's folder)
#   setsid bash training/gpu_train.sh .train/box /tmp/run DENSE_MINUTES [JOINT_MINUTES] > /tmp/run.log 2>&1 &
#   -> /tmp/run/{big,small}/{dense,warmup,joint}(.log), then /tmp/run/done
# Resumable: every stage writes OUT/resume.pt every SAVE_EVERY minutes (default 3); the same command
# run again skips finished stages and continues the interrupted one from its last save.
#   MODELS=small (or big) trains one alone
#   JOINT_SEQ=16384 trains the joint stage on longer rows
#   INIT_SMALL / INIT_BIG (or INIT, for both) = CHECKPOINT starts that model's dense stage from it,
#   LR_SMALL / LR_BIG (or LR) set that stage's peak. MLX folders travel with the tree (the shipped
#   one, or a candidate carried back); on the box:
#   python3 training/from_mlx.py clsa_mlx/shipped /tmp/init_small && INIT_SMALL=/tmp/init_small LR_SMALL=1e-3 ...
set -eo pipefail
export PYTHONUNBUFFERED=1
DATA=$1 RUN=$2 DENSE=${3:-10} JOINT=${4:-2.5}
MODELS=${MODELS:-big small} JOINT_SEQ=${JOINT_SEQ:-8192}  # joint rows of JOINT_SEQ tokens, 64K tokens a step
SMALL='{"dim":256,"hidden_dim":768,"n_self_heads":4,"n_attn_heads":4}'  # no spaces: one word
BIG='{"hidden_dim":1152}'
INIT_SMALL=${INIT_SMALL:-$INIT} INIT_BIG=${INIT_BIG:-$INIT} LR_SMALL=${LR_SMALL:-$LR} LR_BIG=${LR_BIG:-$LR}

stages() {  # name, override, init, lr
  mkdir -p "$RUN/$1"
  local T="python3 training/train.py --data $DATA --workers 6 --log-every 100 --save-every ${SAVE_EVERY:-3} --override $2"
  local R="$RUN/$1"
  $T --stage dense ${3:+--init "$3"} ${4:+--lr "$4"} --out "$R/dense" --seq 4096 --batch 16 --minutes "$DENSE" >> "$R/dense.log" 2>&1
  $T --stage warmup --init "$R/dense" --out "$R/warmup" --seq 8192 --batch 8 --minutes 1 >> "$R/warmup.log" 2>&1
  $T --stage joint --init "$R/warmup" --out "$R/joint" --seq "$JOINT_SEQ" --batch $((65536 / JOINT_SEQ)) --minutes "$JOINT" \
    --eval-lengths 4096 16384 --eval-samples 24 >> "$R/joint.log" 2>&1
}
pids=()
for m in $MODELS; do
  if [ "$m" = small ]; then stages small "$SMALL" "$INIT_SMALL" "$LR_SMALL" & else stages big "$BIG" "$INIT_BIG" "$LR_BIG" & fi
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
touch "$RUN/done"
