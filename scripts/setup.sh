#!/usr/bin/env bash
# Sets up a fresh Debian machine for int4train: system packages (compiler, CMake, GoogleTest, Google
# Benchmark, OpenBLAS, the Fashion-MNIST package), the Python dependencies, and builds and installs the
# package (C++ core + PyTorch extension, CUDA kernels wherever nvcc exists) into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

apt_packages=(build-essential cmake ninja-build libgtest-dev libgmock-dev libbenchmark-dev libopenblas-dev
              pkg-config dataset-fashion-mnist)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "setup.sh: please install: ${missing[*]} (apt-get, as root)" >&2
    exit 1
  fi
fi

# torch first (the extension is built against the installed torch, without build isolation).
"$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation .
"$PY" -c "import int4train, torch; print('int4train', int4train.__version__, 'torch', torch.__version__)"
