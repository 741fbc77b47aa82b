#!/usr/bin/env bash
# Split MNIST, incremental domain: the R1 table (../shared/REFERENCE_RESULTS.md), like for like.
#   bash scripts/reproduce_r1.sh [REPEATS] [OUT]
#   env: PRESET (default split-mnist-domain; any continual preset of `neurocoder list`, e.g.
#        split-fashion-task, permuted-mnist), MODELS (default "mlp neurocoder-released neurocoder"; also nsm, moe), STRATEGIES (default "adam-naive adagrad-naive
#        ewc online-ewc"), EXTRA_SET (more --set flags, e.g. "--set freeze_programs=5")
# Runs every (strategy, model) pair into OUT/<strategy>-<model>, two at a time with one thread each
# (2 cores), resumes any that an earlier call left unfinished, then writes OUT/report.
# importance_with_orthogonality=true is the released code's protocol (see README); it changes
# nothing for the plain MLP.
set -euo pipefail
cd "$(dirname "$0")/.."
repeats="${1:-10}"
out="${2:-runs/r1}"
neurocoder="${NEUROCODER:-.venv/bin/neurocoder}"
preset="${PRESET:-split-mnist-domain}"
mkdir -p "$out"
strategies="${STRATEGIES:-adam-naive adagrad-naive ewc online-ewc}"
declare -A flags=(
  [adam-naive]="--set strategy=naive --set optimizer=adam"
  [adagrad-naive]="--set strategy=naive --set optimizer=adagrad"
  [sgd-naive]="--set strategy=naive --set optimizer=sgd"
  [ewc]="--set strategy=ewc" [online-ewc]="--set strategy=online-ewc" [l2]="--set strategy=l2"
  [si]="--set strategy=si" [mas]="--set strategy=mas" [rehearsal]="--set strategy=rehearsal"
  [offline]="--set strategy=offline")
jobs=()
for model in ${MODELS:-mlp neurocoder-released neurocoder}; do
  for strategy in $strategies; do
    jobs+=("$model $strategy ${flags[$strategy]} ${EXTRA_SET:-}")
  done
done
run_one() {
  model=$1; name=$2; shift 2
  dir="$out/$name-$model"
  [ -f "$dir/results.json" ] && { echo "done: $dir"; return 0; }
  resume=""; [ -f "$dir/config.json" ] && resume="--resume"
  "$neurocoder" run "$preset" "$@" --set model="$model" --set repeats="$repeats" --set threads=1 \
      --set importance_with_orthogonality=true --out "$dir" $resume > "$out/$name-$model.log" 2>&1 \
    && tail -n 1 "$out/$name-$model.log"
}
export -f run_one; export out repeats neurocoder preset
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'run_one {}'
"$neurocoder" report "$out" --out "$out/report"
