#!/usr/bin/env bash
# One short, prepared check for a machine with a GPU: the CUDA tests, the layer benchmark on the
# GPU and a profile of one training step there (results in $OUT or benchmarks/results/). Needs
# python3 with torch (CUDA) on that machine; uses pytest-xdist when it is installed there.
# The working tree that travels must stay under 64 MiB: results/ is larger (see README, GPU).
#   OUT=/tmp/out bash scripts/device_check.sh        (PARTS=triton: the Triton kernels' part only)
set -uo pipefail
cd "$(dirname "$0")/.."
# Packages the machine lacks (the classification test's MNIST-1D generator) travel as wheels in
# .whl/: python3 -m pip download --no-deps -d .whl mnist1d, then carry .whl.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } 2>&1 | tee "$out/machine.txt"
python3 -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA device" >&2; exit 1; }
parallel=""; python3 -c "import xdist" 2>/dev/null && parallel="-n 8"
# First the Triton kernels (neurocoder.triton_layer), the newest and least checked: their benchmark
# (which first checks one training step against the fast path), then their tests on CUDA against
# the Python Function (each kernel variant compiles on first use: ~100 compilations). Skipped
# where Triton is missing.
if python3 -c "import triton" 2>/dev/null; then
  timeout "${TRITON_BENCH_TIMEOUT:-150}" python3 benchmarks/bench_triton.py --repeats "${REPEATS:-30}" \
    --out "$out/triton-cuda.json" > "$out/bench-triton.log" 2>&1
  echo "triton benchmark: exit $? after $SECONDS s" | tee -a "$out/machine.txt"
  cat "$out/bench-triton.log"
  timeout "${TRITON_TESTS_TIMEOUT:-150}" python3 -m pytest -o addopts= -p no:cacheprovider -rfE -q $parallel \
    tests/test_triton.py > "$out/triton-tests.log" 2>&1
  echo "triton tests: exit $? after $SECONDS s" | tee -a "$out/machine.txt"
  tail -n 8 "$out/triton-tests.log"
  [ "${PARTS:-all}" = triton ] && exit 0
fi
timeout "${TESTS_TIMEOUT:-270}" python3 -m pytest -o addopts= -p no:cacheprovider -rfE $parallel tests/test_cuda.py tests/test_layers.py \
  tests/test_fused.py tests/test_classification.py -k "cuda or split_long" > "$out/cuda-tests.log" 2>&1
echo "cuda tests: exit $? after $SECONDS s" | tee -a "$out/machine.txt"
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_layers.py --device cuda --repeats "${REPEATS:-30}" \
  --out "$out/layers-cuda.json" > "$out/bench-cuda.log" 2>&1
echo "layer benchmark: exit $? after $SECONDS s" | tee -a "$out/machine.txt"
timeout 60 python3 benchmarks/profile_layer.py --device cuda --rows 30 > "$out/profile-cuda.log" 2>&1
echo "profile: exit $? after $SECONDS s" | tee -a "$out/machine.txt"
tail -n 5 "$out/cuda-tests.log"; cat "$out/bench-cuda.log"; head -n 45 "$out/profile-cuda.log"
