#!/usr/bin/env bash
# The long run of issue 20: the head-to-head winner, continued with its own objective and data for a
# CPU budget, then evaluated on 500 held-out questions at 2, 4, 8, 16x with the text peers.
#
#   recipes/embedded_default/long_run.sh ARM [RUNS_DIR]               # background; log RUNS_DIR/long_run.log
#   recipes/embedded_default/long_run.sh --foreground ARM [RUNS_DIR]
#
# ARM is the head-to-head arm (a, b, c or d) whose config and final checkpoint the run continues
# (RUNS_DIR/h2h-ARM/final, from head_to_head.sh in the same RUNS_DIR; FROM=DIR continues another
# checkpoint instead, e.g. the shipped default when the head-to-head folder is gone). Trained like an arm: until its
# steps have used CPU_SECONDS of CPU time (a probe's first plan, re-planned from the measured steps).
# Resumable: a killed run resumes from its newest checkpoint, a finished eval is skipped; rerun the
# same command, in as many sessions as it takes.
#
# Environment: FROM (the checkpoint to continue), CPU_SECONDS (default 21600 = 3 hours of both
# cores), LIMIT (held-out questions, default 500), ADQA (the AdversarialQA parquet), REUSE (an
# eval folder over the same questions and settings whose text-baseline and peer answers are
# copied instead of recomputed, e.g. the peers run of recipes/embedded_default/peers).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_background.sh"
source "$HERE/_data.sh"
FOREGROUND=0
if [[ "${1:-}" == "--foreground" ]]; then FOREGROUND=1; shift; fi
ARM="${1:?usage: long_run.sh ARM [RUNS_DIR]}"
RUNS="$(mkdir -p "${2:-/work/runs/20}" && cd "${2:-/work/runs/20}" && pwd)"

background_or_lock "$FOREGROUND" "$RUNS" long_run "$ARM" "$RUNS"

CPU_SECONDS="${CPU_SECONDS:-21600}"
LIMIT="${LIMIT:-500}"
ADQA="${ADQA:-$REPO/../shared/data/adversarialqa_validation.parquet}"
START="${FROM:-$RUNS/h2h-$ARM/final}"
START="$(cd "$START" 2>/dev/null && pwd || echo "$START")"  # absolute: the run reads it from RUNS
[[ -f "$START/config.json" ]] || { echo "no checkpoint $START: run head_to_head.sh (arm $ARM) first, or set FROM"; exit 2; }
cd "$RUNS"
prepare_arm_data "$ADQA"   # already there when head_to_head.sh ran in this folder
echo "== $(date -Is) long run of arm $ARM from $START: $CPU_SECONDS CPU s, then $LIMIT held-out questions"

if [[ ! -f "long-$ARM/final/config.json" ]]; then
  # a fresh warm-up and cosine schedule from the arm's end; held-out LM loss every 300 steps
  "$PY" "$HERE/head_to_head.py" train --config "$HERE/h2h_$ARM.yaml" --set "init_from=$START" \
    --set "output_dir=long-$ARM" --set progress=false --set eval_every=300 --set keep_checkpoints=2 \
    --cpu-seconds "$CPU_SECONDS"
fi

REUSE_ARGS=()
[[ -n "${REUSE:-}" ]] && REUSE_ARGS=(--reuse-baselines "$REUSE")
"${CLI[@]}" eval --dataset data/heldout.jsonl --compressor "long-$ARM/final" --out "eval-long-$ARM" \
  --setting gold --limit "$LIMIT" --factors 2,4,8,16 --scales=-1,0,1,2 --max-new-tokens 16 \
  --question-suffix " Answer briefly." --decode-batch-size 8 --llmlingua off --no-progress \
  --systems uncompressed,no_context,fixed,semi_dynamic,truncate,sentence_optimizer,longllmlingua "${REUSE_ARGS[@]}"

steps="$("$PY" -c "import json; print(json.load(open('long-$ARM/budget.json'))['max_steps'])")"
CURVE=()
[[ -d "h2h-$ARM" ]] && CURVE=(--run "$ARM (head to head)=h2h-$ARM")
"$PY" "$HERE/learning_curve.py" "${CURVE[@]}" --run "$ARM (long run)=long-$ARM" \
  --accuracy "$ARM (long run)@$steps=eval-long-$ARM" --out long_curve.png
echo "== $(date -Is) long run done: eval-long-$ARM/results.md, long_curve.png; ship with ship.py if it beats the default"
