#!/usr/bin/env bash
# Synthetic program tasks (issue 5): 4 tasks x 5 models (MLP, NSM, MoE, Neurocoder feed-forward
# and recurrent, all of about the same size), SEEDS seeds each.
#   bash scripts/reproduce_programs.sh [SEEDS] [OUT]
#   env: TASKS (default "modular reuse shift remember"), MODELS (default "mlp nsm moe nc-ff nc-rnn"),
#        WORKERS (parallel runs, one thread each; default 2), EXTRA_SET (more --set flags)
# Resumes unfinished runs (skips finished seeds), then writes OUT/report.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-5}"
out="${2:-runs/programs}"
neurocoder="${NEUROCODER:-.venv/bin/neurocoder}"
mkdir -p "$out"
jobs=()
for task in ${TASKS:-modular reuse shift remember}; do
  for model in ${MODELS:-mlp nsm moe nc-ff nc-rnn}; do
    jobs+=("$task $model ${EXTRA_SET:-}")
  done
done
run_one() {
  task=$1; model=$2; shift 2
  dir="$out/$task-$model"
  [ -f "$dir/results.json" ] && [ "$(ls "$dir/seeds" | wc -l)" -ge "$seeds" ] && { echo "done: $dir"; return 0; }
  resume=""; [ -f "$dir/config.json" ] && resume="--resume"
  "$neurocoder" run "program-$task" --set model="$model" --set seeds="$seeds" --set threads=1 "$@" \
      --out "$dir" $resume > "$dir.log" 2>&1 && tail -n 1 "$dir.log"
}
export -f run_one; export out neurocoder seeds
printf '%s\n' "${jobs[@]}" | xargs -P "${WORKERS:-2}" -I{} bash -c 'run_one {}'
"$neurocoder" report "$out" --out "$out/report"
