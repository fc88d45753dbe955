# Sourced by the recipe's long jobs (head_to_head.sh, long_run.sh): start once in the background,
# one instance per runs folder, with the environment both use.
#
#   background_or_lock FOREGROUND RUNS NAME ARGS...
# Without --foreground (FOREGROUND=0), reruns the calling script in the background with
# `--foreground ARGS...`, logging to RUNS/NAME.log, and exits; in the foreground, takes the lock
# RUNS/.NAME.lock or exits if another instance holds it.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="$REPO/.venv/bin/python"
CLI=("$PY" -m semidyn_rag.cli)
# Passive OpenMP waiting: on a shared machine spinning threads burn CPU time without work, which
# made the same step cost 8 to 27 CPU seconds; passive, it costs 7-8 whatever else runs.
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

background_or_lock() {
  local foreground="$1" runs="$2" name="$3"
  shift 3
  if [[ "$foreground" == 0 ]]; then
    nohup "$0" --foreground "$@" >> "$runs/$name.log" 2>&1 &
    echo "$name started in the background (pid $!); log: $runs/$name.log"
    exit 0
  fi
  exec 9> "$runs/.$name.lock"
  flock -n 9 || { echo "another $name.sh is running in $runs"; exit 1; }
}
