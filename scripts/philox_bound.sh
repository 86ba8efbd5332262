#!/usr/bin/env bash
# An experiment, not a test: how much of the two stochastic quantize passes' time is Philox (the
# X pass's aux bits, the bit split's stochastic rounding). Builds int4train_gpu_bench, times
# `--quick` twice; then rebuilds it with every Philox block of those two passes replaced by a
# multiplicative hash (wrong randomness, the same memory traffic and arithmetic otherwise), times it
# twice again, restores the sources and prints the passes' rows. The difference bounds what fewer
# random bits per element could save (docs/cuda.md, "What is left").
# Usage (on the GPU machine): OUT=/tmp/pb bash scripts/philox_bound.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/int4train_philox_bound}
mkdir -p "$OUT"
BUILD=${BUILD:-build-gpu}
files=(src/cuda/hadamard_lsq.cu src/cuda/backward_quant.cu)
for f in "${files[@]}"; do cp "$f" "$OUT/$(basename "$f").orig"; done
restore() { for f in "${files[@]}"; do cp "$OUT/$(basename "$f").orig" "$f"; done; }
trap restore EXIT
gen=()
command -v ninja > /dev/null && gen=(-G Ninja)
cmake -S tests/gpu -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES=90a > "$OUT/configure.log" 2>&1 || { tail -20 "$OUT/configure.log"; exit 1; }
bench() {  # build the bench, time it twice into $OUT/$1-{1,2}.txt
  cmake --build "$BUILD" -j16 --target int4train_gpu_bench > "$OUT/build-$1.log" 2>&1 ||
    { grep -A5 error "$OUT/build-$1.log" | head -40; exit 1; }
  for i in 1 2; do "$BUILD/bench_gpu/int4train_gpu_bench" --quick > "$OUT/$1-$i.txt" 2>&1; done
}
bench philox
hash='__device__ __forceinline__ Philox4x32 hash_block(uint64_t, uint64_t, uint64_t b) { const uint32_t h = static_cast<uint32_t>(b) * 0x9E3779B9u; return Philox4x32{{h, h ^ 0x85EBCA6Bu, h * 3u, h + 0xC2B2AE35u}}; }'
for f in "${files[@]}"; do
  perl -0pi -e "s/constexpr int kThreads = 256;/constexpr int kThreads = 256;\n$hash/" "$f"
  perl -pi -e 's/random_block\(p\.seed, stream, b0/hash_block(p.seed, stream, b0/g' "$f"
  echo "$f: $(grep -c 'hash_block(p.seed' "$f") Philox blocks replaced"
done
bench hash
restore
for r in philox-1 philox-2 hash-1 hash-2; do
  echo "== $r"
  grep -E "^\| (copy|hadamard_lsq|bitsplit)" "$OUT/$r.txt"
done
