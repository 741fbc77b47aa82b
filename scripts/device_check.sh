#!/usr/bin/env bash
# One short, prepared check for a machine with a GPU: the CUDA tests, then the layer benchmark
# on the GPU (results in $OUT or benchmarks/results/). Needs torch with CUDA on that machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_layers.py tests/test_fused.py tests/test_classification.py -k "cuda or split_long" 2>&1 | tee "$out/cuda-tests.log"
python3 benchmarks/bench_layers.py --device cuda --repeats 50 --out "$out/layers-cuda.json" 2>&1 | tee "$out/bench-cuda.log"
