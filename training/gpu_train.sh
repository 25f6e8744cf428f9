#!/usr/bin/env bash
# The shipped model's GPU run on one H200: dense -> warmup -> joint, by default for two models at
# once, one for 8 bits (GPU_CONFIG: ~22M parameters) and an fp16 one of the same bytes (~12M,
# the shipped size). Detach it (setsid) and poll: it outlasts one device call.
#   carry .train/box (training/prepare.py's folder)
#   setsid bash training/gpu_train.sh .train/box /tmp/run DENSE_MINUTES [JOINT_MINUTES] > /tmp/run.log 2>&1 &
#   -> /tmp/run/{big,small}/{dense,warmup,joint}(.log), then /tmp/run/done
#   MODELS=small (or big) trains one alone: the 22M one ran 470K tokens/s alone, 220K side by side
#   JOINT_SEQ=16384 trains the joint stage on longer rows
#   INIT=CHECKPOINT starts the dense stage from it, LR= sets that stage's peak (1e-3 to continue
#   a trained model). The shipped folder travels with the tree; on the box:
#   python3 training/from_mlx.py clsa_mlx/shipped /tmp/init && INIT=/tmp/init LR=1e-3 MODELS=small ...
set -eo pipefail
export PYTHONUNBUFFERED=1
DATA=$1 RUN=$2 DENSE=${3:-10} JOINT=${4:-2.5}
MODELS=${MODELS:-big small} JOINT_SEQ=${JOINT_SEQ:-8192}  # joint rows of JOINT_SEQ tokens, 64K tokens a step
SMALL='{"dim":256,"hidden_dim":768,"n_self_heads":4,"n_attn_heads":4}'  # no spaces: one word

stages() {  # name, override
  mkdir -p "$RUN/$1"
  local T="python3 training/train.py --data $DATA --workers 6 --log-every 100 --override $2" R="$RUN/$1"
  $T --stage dense ${INIT:+--init "$INIT"} ${LR:+--lr "$LR"} --out "$R/dense" --seq 4096 --batch 16 --minutes "$DENSE" > "$R/dense.log" 2>&1
  $T --stage warmup --init "$R/dense" --out "$R/warmup" --seq 8192 --batch 8 --minutes 1 > "$R/warmup.log" 2>&1
  $T --stage joint --init "$R/warmup" --out "$R/joint" --seq "$JOINT_SEQ" --batch $((65536 / JOINT_SEQ)) --minutes "$JOINT" \
    --eval-lengths 4096 16384 --eval-samples 24 > "$R/joint.log" 2>&1
}
pids=()
for m in $MODELS; do
  if [ "$m" = small ]; then stages small "$SMALL" & else stages big '{}' & fi
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
touch "$RUN/done"
