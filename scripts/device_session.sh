#!/usr/bin/env bash
# Everything one call on a lent GPU machine (one GPU, 16 CPU cores) does, within DEADLINE seconds:
#   1. the CUDA tests and the layer benchmark on the GPU (scripts/device_check.sh's checks);
#   2. the ResNet-20 rows of the object-recognition table on the GPU (MNIST and Fashion-MNIST,
#      every variant, 5 seeds), RESNET_WORKERS runs at a time;
#   3. the MinAtar table on the spare CPU cores (MINATAR_WORKERS runs at a time), stopped at the
#      deadline: unfinished runs come back with their checkpoints; finish them on any machine with
#      `bash scripts/reproduce_minatar.sh 3 runs/minatar` (it resumes them).
# Output (at most 8 files come back): $OUT/{logs.tgz (machine, test and benchmark logs, layers-cuda.json),
# resnet-mnist.tgz, resnet-fashion-mnist.tgz, minatar-GAME.tgz for each game}.
# Needs there: python3 with torch (CUDA); MinAtar as a wheel in .whl/ (installed into /tmp/site);
# the data sets in .data/ (NEUROCODER_DATA layout: fashion-mnist/*.gz, mnist-1.1.0.tgz).
#   OUT=/tmp/out DEADLINE=480 bash scripts/device_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:?set OUT to the folder that collects the results}"
deadline="${DEADLINE:-480}"
device="${DEVICE:-cuda}"
parts=" ${PARTS:-checks bench resnet minatar} "   # a later call can redo a part alone, e.g. PARTS=resnet
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NEUROCODER_DATA="$PWD/.data" OMP_NUM_THREADS=1
mkdir -p /tmp/nc-bin
printf '#!/bin/sh\nexec python3 -m neurocoder "$@"\n' > /tmp/nc-bin/neurocoder
chmod +x /tmp/nc-bin/neurocoder
export NEUROCODER=/tmp/nc-bin/neurocoder
{ nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"; } 2>&1 | tee "$out/machine.txt"

# 3. MinAtar on CPU cores, in its own process group so that the deadline can stop all of it.
minatar=0 resnet=0
if [[ $parts == *" minatar "* ]]; then
  setsid env WORKERS="${MINATAR_WORKERS:-10}" FRAMES="${FRAMES:-1000000}" \
    bash scripts/reproduce_minatar.sh 3 runs/minatar > "$out/minatar.log" 2>&1 &
  minatar=$!
fi
# 2. ResNet-20 on the GPU.
if [[ $parts == *" resnet "* ]]; then
  setsid env WORKERS="${RESNET_WORKERS:-5}" BACKBONES=resnet20 RESNET_SEEDS=5 DATASETS="mnist fashion-mnist" \
    EXTRA_SET="--set device=$device ${RESNET_EXTRA_SET:-}" \
    bash scripts/reproduce_classification.sh 5 runs/classification-gpu > "$out/resnet.log" 2>&1 &
  resnet=$!
fi
# 1. The CUDA checks, in the foreground.
if [[ $parts == *" checks "* ]]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_layers.py tests/test_fused.py \
    tests/test_classification.py -k "${CHECKS_K:-cuda or split_long}" > "$out/cuda-tests.log" 2>&1
  echo "cuda tests: exit $? after $SECONDS s" | tee -a "$out/machine.txt"
fi
if [[ $parts == *" bench "* ]]; then
  timeout 150 python3 benchmarks/bench_layers.py --device "$device" --repeats 30 --out "$out/layers-cuda.json" \
    > "$out/bench-cuda.log" 2>&1
  echo "layer benchmark: exit $? after $SECONDS s" | tee -a "$out/machine.txt"
fi

running() { [ "$1" != 0 ] && kill -0 "$1" 2>/dev/null; }
while [ "$SECONDS" -lt "$deadline" ] && { running "$minatar" || running "$resnet"; }; do
  sleep 5
done
for group in "$minatar" "$resnet"; do [ "$group" != 0 ] && kill -TERM -- "-$group" 2>/dev/null; done
sleep 3
for group in "$minatar" "$resnet"; do [ "$group" != 0 ] && kill -KILL -- "-$group" 2>/dev/null; done
echo "stopped after $SECONDS s" | tee -a "$out/machine.txt"
# Checkpoints are written atomically, so a run stopped mid-way resumes from its last one.
# ResNet runs: with the checkpoints of unfinished seeds when the archive stays under 15 MB.
for dataset in mnist fashion-mnist; do
  tar czf "$out/resnet-$dataset.tgz" runs/classification-gpu/$dataset-* 2>/dev/null
  if [ "$(stat -c %s "$out/resnet-$dataset.tgz")" -gt 15000000 ]; then
    tar czf "$out/resnet-$dataset.tgz" --exclude checkpoint.pt runs/classification-gpu/$dataset-* 2>/dev/null
  fi
done
# One archive per game (each must stay under the 16 MiB a returned file may have).
for game in breakout space-invaders freeway asterix seaquest; do
  tar czf "$out/minatar-$game.tgz" runs/minatar/$game-* 2>/dev/null
done
tail -n 3 "$out/cuda-tests.log"; tail -n 25 "$out/bench-cuda.log"; tail -n 12 "$out/resnet.log" "$out/minatar.log"
(cd "$out" && { logs=$(ls machine.txt cuda-tests.log bench-cuda.log layers-cuda.json minatar.log resnet.log 2>/dev/null); } \
  ; tar czf logs.tgz $logs && rm -f $logs)
ls -la "$out"
