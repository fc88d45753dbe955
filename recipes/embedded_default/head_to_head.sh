#!/usr/bin/env bash
# Objectives head to head at equal CPU time, from the shipped default (issue 20):
#   (a) the current objective on the new data mix, (b) + hidden-state alignment, (c) + cloze
#   questions (optional (d) = b + c); each trained for CPU_SECONDS of CPU time, then evaluated
#   on LIMIT held-out questions at 4x (fixed factor 4 and semi-dynamic scale 0); the starting
#   checkpoint is evaluated the same way, with the uncompressed and no-context baselines.
#
#   recipes/embedded_default/head_to_head.sh [RUNS_DIR]     # starts in the background, returns
#   recipes/embedded_default/head_to_head.sh --foreground [RUNS_DIR]
#
# Resumable: every step skips what is done (data, finished runs, finished evals) and a killed
# training resumes from its newest checkpoint (every 25 steps), so rerunning the same command
# continues. One instance at a time (a lock in RUNS_DIR). Progress: RUNS_DIR/head_to_head.log;
# figures: RUNS_DIR/h2h_summary.md (.json) and RUNS_DIR/h2h_curve.png (.json).
#
# Environment: CPU_SECONDS (default 5400 = 45 minutes of both cores), ARMS (default "a b c"),
# LIMIT (held-out questions, default 200), PROBE_STEPS (default 10), ADQA (the AdversarialQA
# parquet), SMOKE=1 (a few steps per arm, 4 questions, its own folder: proves the script runs).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/_background.sh"
source "$HERE/_data.sh"
FOREGROUND=0
if [[ "${1:-}" == "--foreground" ]]; then FOREGROUND=1; shift; fi
SMOKE="${SMOKE:-0}"
if [[ "$SMOKE" == 1 ]]; then DEFAULT_RUNS=/work/runs/20/smoke; else DEFAULT_RUNS=/work/runs/20; fi
RUNS="$(mkdir -p "${1:-$DEFAULT_RUNS}" && cd "${1:-$DEFAULT_RUNS}" && pwd)"

background_or_lock "$FOREGROUND" "$RUNS" head_to_head "$RUNS"

ADQA="${ADQA:-$REPO/../shared/data/adversarialqa_validation.parquet}"
START="$REPO/semidyn_rag/assets/default-compressor"
ARMS="${ARMS:-a b c}"
CPU_SECONDS="${CPU_SECONDS:-5400}"
LIMIT="${LIMIT:-200}"
PROBE_STEPS="${PROBE_STEPS:-10}"
EXTRA=()
if [[ "$SMOKE" == 1 ]]; then
  CPU_SECONDS=20; LIMIT=4; PROBE_STEPS=2
  EXTRA=(--set eval_every=2 --set save_every=1 --set data.eval_max_records=4)
fi
cd "$RUNS"
echo "== $(date -Is) head to head in $RUNS: arms $ARMS, $CPU_SECONDS CPU s each, $LIMIT questions"

# 1. data (_data.sh): the recipe's files plus the wiki (trainable half) reconstruction and
#    cloze records
prepare_arm_data "$ADQA"

EVAL=(--dataset data/heldout.jsonl --setting gold --limit "$LIMIT" --factors 4 --scales 0 --max-new-tokens 16
      --question-suffix " Answer briefly." --decode-batch-size 8 --llmlingua off --no-progress)

# 2. the starting checkpoint on the same questions, with the text baselines (and the truncation
#    peer at 4x when this version of the eval harness has it)
START_SYSTEMS=uncompressed,no_context,fixed,semi_dynamic
if "$PY" -c "import sys; from semidyn_rag.evaluation.systems import FAMILIES; sys.exit('truncate' not in FAMILIES)"; then
  START_SYSTEMS="$START_SYSTEMS,truncate"
fi
[[ -f eval-h2h-start/results.json ]] || "${CLI[@]}" eval --compressor "$START" --out eval-h2h-start \
  --systems "$START_SYSTEMS" "${EVAL[@]}"

# 3. the arms, one after another: train to the CPU budget (probe once, then resumable), evaluate
REPORT=()
CURVE=()
for arm in $ARMS; do
  cfg="$HERE/h2h_$arm.yaml"
  [[ -f "$cfg" ]] || { echo "no config $cfg"; exit 2; }
  if [[ ! -f "h2h-$arm/final/config.json" ]]; then
    echo "== $(date -Is) training arm $arm"
    "$PY" "$HERE/head_to_head.py" train --config "$cfg" --set "init_from=$START" --set "output_dir=h2h-$arm" \
      --set progress=false --cpu-seconds "$CPU_SECONDS" --probe-steps "$PROBE_STEPS" "${EXTRA[@]}"
  fi
  [[ -f "eval-h2h-$arm/results.json" ]] || "${CLI[@]}" eval --compressor "h2h-$arm/final" --out "eval-h2h-$arm" \
    --systems fixed,semi_dynamic "${EVAL[@]}"
  REPORT+=(--arm "$arm=h2h-$arm:eval-h2h-$arm")
  steps="$("$PY" -c "import json; print(json.load(open('h2h-$arm/budget.json'))['max_steps'])")"
  CURVE+=(--run "$arm=h2h-$arm" --accuracy "$arm@$steps=eval-h2h-$arm")
done

# 4. the table and the learning curves
"$PY" "$HERE/head_to_head.py" report --start eval-h2h-start "${REPORT[@]}" --out .
"$PY" "$HERE/learning_curve.py" "${CURVE[@]}" --out h2h_curve.png
echo "== $(date -Is) head to head done: $RUNS/h2h_summary.md"
