#!/usr/bin/env bash
# The one check of the CUDA path on a GPU machine: configure and build (sm_90a, -j16), run the GPU
# tests, run compute-sanitizer memcheck over the kernel tests (--quick shapes), run the benchmark,
# and print a short table last. Logs go to $OUT (or /tmp/int4train_gpu_check).
# Usage: scripts/gpu_check.sh [--no-bench] [--no-memcheck]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/int4train_gpu_check}
BUILD=${BUILD:-build-gpu}
ARCH=${INT4TRAIN_CUDA_ARCH:-90a}
mkdir -p "$OUT"
# CUTLASS's headers where scripts/cutlass_headers.sh put them (the GPU machine has no PyPI).
if [ -z "${INT4TRAIN_CUTLASS_INCLUDE:-}" ] && [ -d out/cutlass/include ]; then
  export INT4TRAIN_CUTLASS_INCLUDE=$PWD/out/cutlass/include
fi
run_bench=1
run_memcheck=1
for a in "$@"; do
  case "$a" in
    --no-bench) run_bench=0 ;;
    --no-memcheck) run_memcheck=0 ;;
  esac
done

device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
echo "device: $device"
echo "nvcc: $(nvcc --version | tail -2 | head -1)"

gen=()
command -v ninja > /dev/null && gen=(-G Ninja)
t0=$(date +%s)
if ! cmake -S tests/gpu -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "$OUT/configure.log" 2>&1; then
  tail -40 "$OUT/configure.log"
  exit 1
fi
if ! cmake --build "$BUILD" -j16 > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" -A4 "$OUT/build.log" | head -80
  exit 1
fi
t1=$(date +%s)
echo "build: $((t1 - t0)) s"
for exe in "$BUILD/int4train_gpu_tests" "$BUILD/bench_gpu/int4train_gpu_bench"; do
  [ -x "$exe" ] || { echo "build produced no $exe"; tail -20 "$OUT/build.log"; exit 1; }
done

# The graph-capture case alone first: its capture is then the process's first sampling call.
"$BUILD/int4train_gpu_tests" lss_sample/graph_first_call > "$OUT/tests_first_call.log" 2>&1
first_rc=$?
tail -1 "$OUT/tests_first_call.log"
"$BUILD/int4train_gpu_tests" 2>&1 | tee "$OUT/tests.log" | grep -v "^\[  OK  \]"
test_rc=${PIPESTATUS[0]}
[ "$first_rc" = 0 ] || test_rc=$first_rc
t2=$(date +%s)

mc_line="not run"
if [ "$run_memcheck" = 1 ]; then
  compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
    "$BUILD/int4train_gpu_tests" --quick > "$OUT/memcheck.log" 2>&1
  mc_rc=$?
  mc_line="rc=$mc_rc; $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1); \
$(grep -E '^[0-9]+ passed' "$OUT/memcheck.log" | tail -1)"
fi
t3=$(date +%s)

if [ "$run_bench" = 1 ]; then
  "$BUILD/bench_gpu/int4train_gpu_bench" > "$OUT/bench.log" 2>&1
  bench_rc=$?
fi
t4=$(date +%s)

echo
echo "==================== int4train GPU check ===================="
echo "device    : $device"
echo "tests     : rc=$test_rc; $(grep -E '^[0-9]+ passed' "$OUT/tests.log" | tail -1) ($((t2 - t1)) s); \
graph capture as the first sampling call: $(tail -1 "$OUT/tests_first_call.log")"
echo "memcheck  : $mc_line ($((t3 - t2)) s)"
if [ "$run_bench" = 1 ]; then
  echo "bench     : rc=$bench_rc ($((t4 - t3)) s)"
  sed -n '/==== summary/,$p' "$OUT/bench.log"
fi
[ "$test_rc" = 0 ] || exit 1
