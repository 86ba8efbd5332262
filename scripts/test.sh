#!/usr/bin/env bash
# Runs every test that runs without a GPU: the C++ core suite and the LibTorch module suite (GoogleTest
# via ctest, with the CUDA code compiled wherever nvcc exists), the benchmarks' build, and the Python
# suite (pytest) against the installed package. Run scripts/setup.sh once first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}

cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DINT4TRAIN_BUILD_TESTS=ON -DINT4TRAIN_BUILD_BENCH=ON \
  -DINT4TRAIN_BUILD_TORCH=ON -DPython_EXECUTABLE="$(command -v "$PY")"
cmake --build "$BUILD" -j "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"

set +e
"$PY" -m pytest -q tests/python
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
