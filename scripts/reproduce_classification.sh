#!/usr/bin/env bash
# Object recognition (issue 4): every (data set, backbone, variant) of the table, SEEDS seeds each.
#   bash scripts/reproduce_classification.sh [SEEDS] [OUT]
#   env: DATASETS (default "mnist1d mnist fashion-mnist"), BACKBONES (default all: "mlp cnn1d lenet
#        resnet20"), RESNET_SEEDS (default SEEDS; ResNet-20 costs ~40 s per MNIST epoch and ~4-5
#        minutes per Fashion-MNIST epoch on one core here, ~2 s and ~15 s on a GPU),
#        WORKERS (runs at a time, default 2), EXTRA_SET (more --set flags for every run, e.g.
#        "--set device=cuda"), DRY_RUN=1 (list the runs and stop)
# Runs WORKERS at a time with one thread each (2 cores); resumes any run an earlier call left
# unfinished (skips finished ones), then writes OUT/report (tables + figures).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-5}"
out="${2:-runs/classification}"
neurocoder="${NEUROCODER:-.venv/bin/neurocoder}"
mkdir -p "$out"
declare -A backbones=([mnist1d]="mlp cnn1d" [mnist]="mlp lenet resnet20" [fashion-mnist]="mlp lenet resnet20")
declare -A variants=([mlp]="plain nc-head nc-fc nsm-head moe-head" [cnn1d]="plain nc-head nc-conv nsm-head moe-head"
                     [lenet]="plain nc-head nc-fc nc-conv nsm-head moe-head" [resnet20]="plain nc-head nc-conv nsm-head moe-head")
# Cheap, central comparisons first (plain and Neurocoder head everywhere), the costly ones
# (convolutions, ResNet-20) last, so a run cut short still leaves the core of the table.
jobs=()
for stage in "plain nc-head" "nc-fc nsm-head moe-head" "nc-conv"; do
  for backbone in ${BACKBONES:-mlp cnn1d lenet resnet20}; do
    for dataset in ${DATASETS:-mnist1d mnist fashion-mnist}; do
      case " ${backbones[$dataset]} " in *" $backbone "*) ;; *) continue ;; esac
      n=$seeds; [ "$backbone" = resnet20 ] && n="${RESNET_SEEDS:-$seeds}"
      for variant in ${variants[$backbone]}; do
        case " $stage " in *" $variant "*) jobs+=("$dataset $backbone $variant $n ${EXTRA_SET:-}") ;; esac
      done
    done
  done
done
if [ -n "${DRY_RUN:-}" ]; then printf '%s\n' "${jobs[@]}"; exit 0; fi
run_one() {
  dataset=$1; backbone=$2; variant=$3; n=$4; shift 4
  dir="$out/$dataset-$backbone-$variant"
  [ -f "$dir/results.json" ] && { echo "done: $dir"; return 0; }
  resume=""; [ -f "$dir/config.json" ] && resume="--resume"
  preset="classify-$dataset"; [ "$dataset" = fashion-mnist ] && preset=classify-fashion
  "$neurocoder" run "$preset" --set backbone="$backbone" --set variant="$variant" --set seeds="$n" \
      --set threads=1 "$@" --out "$dir" $resume > "$dir.log" 2>&1 && tail -n 1 "$dir.log"
}
export -f run_one; export out neurocoder
printf '%s\n' "${jobs[@]}" | xargs -P "${WORKERS:-2}" -I{} bash -c 'run_one {}'
"$neurocoder" report "$out" --out "$out/report"
