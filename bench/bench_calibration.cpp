// Benchmark of a layer's first-batch calibration on the host (the work behind a training run's
// first step, on every device): the error-minimising LSQ step search (quantize.h, lsq_mse_step) and
// the Hadamard block search (hadamard.h, select_hadamard_block), at the full lm preset's shapes
// (8,192 tokens of 384 features; the qkv weight 1,152 x 384). Thread count: INT4TRAIN_NUM_THREADS.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../src/core/parallel.h"  // the pool's thread count, for the label
#include "int4train/hadamard.h"
#include "int4train/quantize.h"

namespace {

using int4train::DType;

std::vector<float> normal_values(int64_t n, float sigma, unsigned seed) {
  std::vector<float> v(static_cast<size_t>(n));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  for (float& e : v) e = normal(rng);
  return v;
}

std::string threads_label() {
  return std::to_string(int4train::detail::num_threads()) + " threads";
}

void BM_LsqMseStep(benchmark::State& state) {
  const int64_t rows = 8192, cols = 384;
  std::vector<float> x = normal_values(rows * cols, 1.0f, 1);
  const int4train::TensorView v = int4train::make_matrix(x.data(), DType::kFloat32, rows, cols);
  for (auto _ : state) benchmark::DoNotOptimize(int4train::lsq_mse_step(v));
  state.SetLabel("fp32 8192x384 (sampled to 2^20 elements), " + threads_label());
}

void BM_SelectHadamardBlock(benchmark::State& state) {
  const int64_t rows = 8192, cols = 384, out = 1152;
  std::vector<float> x = normal_values(rows * cols, 1.0f, 1);
  std::vector<float> w = normal_values(out * cols, 0.05f, 2);
  const int4train::TensorView xv = int4train::make_matrix(x.data(), DType::kFloat32, rows, cols);
  const int4train::TensorView wv = int4train::make_matrix(w.data(), DType::kFloat32, out, cols);
  for (auto _ : state)
    benchmark::DoNotOptimize(int4train::select_hadamard_block(xv, wv, 256).block);
  state.SetLabel("fp32 x 8192x384, w 1152x384, blocks 1..128, " + threads_label());
}

BENCHMARK(BM_LsqMseStep)->Unit(benchmark::kMillisecond)->MinTime(2.0);
BENCHMARK(BM_SelectHadamardBlock)->Unit(benchmark::kMillisecond)->MinTime(2.0);

}  // namespace
