#!/usr/bin/env bash
# Video games (issue 6): the MinAtar table, 5 games x 2 variants (plain, nc-heads) x SEEDS seeds
# at FRAMES frames each (default 1M: 3-10 minutes per seed on one core by machine; the whole table
# 1-3 hours on 2 cores; session 15's AVX-512 machine ran 15 seed-runs in about 32 minutes). Resumable: run it again and it continues every unfinished run from its
# last checkpoint (agent, optimiser, environments, RNG states), skipping finished ones.
#   bash scripts/reproduce_minatar.sh [SEEDS] [OUT]
#   env: GAMES (default "breakout space-invaders freeway asterix seaquest"), VARIANTS (default
#        "plain nc-heads"; also nc-fc), FRAMES (default 1000000), WORKERS (default 2), EXTRA_SET
#        (more --set options for every run; Neurocoder settings such as layer_options or
#        routing_lr_scale are refused by the plain agent, so run plain apart from them)
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-3}"
out="${2:-runs/minatar}"
frames="${FRAMES:-1000000}"
neurocoder="${NEUROCODER:-.venv/bin/neurocoder}"
mkdir -p "$out"
jobs=()
for game in ${GAMES:-breakout space-invaders freeway asterix seaquest}; do
  for variant in ${VARIANTS:-plain nc-heads}; do
    jobs+=("$game $variant ${EXTRA_SET:-}")
  done
done
run_one() {
  game=$1; variant=$2; shift 2
  dir="$out/$game-$variant"
  [ -f "$dir/results.json" ] && [ "$(ls "$dir/seeds" | wc -l)" -ge "$seeds" ] && { echo "done: $dir"; return 0; }
  resume=""; [ -f "$dir/config.json" ] && resume="--resume"
  "$neurocoder" run "minatar-$game" --set variant="$variant" --set seeds="$seeds" --set total_frames="$frames" \
      --set threads=1 "$@" --out "$dir" $resume > "$dir.log" 2>&1 && tail -n 1 "$dir.log"
}
export -f run_one; export out neurocoder seeds frames
printf '%s\n' "${jobs[@]}" | xargs -P "${WORKERS:-2}" -I{} bash -c 'run_one {}'
"$neurocoder" report "$out" --out "$out/report"
