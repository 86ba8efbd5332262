// Benchmark of the CPU integer GEMM (gemm.h) against OpenBLAS sgemm of the same shape: INT4
// operands packed two codes per byte with an int32 result, C = A B^T with A M x K and B N x K.
// OpenBLAS runs with the same thread count as the int4train pool, and is timed in the same run
// (counter vs_sgemm).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "int4train/gemm.h"
#include "int4train/int4.h"

namespace {

using int4train::DType;

// The thread count of the int4train pool (INT4TRAIN_NUM_THREADS, else all hardware threads), given
// to OpenBLAS too so that both sides use the same cores.
int bench_threads() {
  if (const char* env = std::getenv("INT4TRAIN_NUM_THREADS")) {
    const int v = std::atoi(env);
    if (v >= 1) return v;
  }
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

double gops(int64_t m, int64_t n, int64_t k) {
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) * 1e-9;
}

struct Sgemm {
  int64_t m, n, k;
  std::vector<float> a, b, c;
  Sgemm(int64_t m_, int64_t n_, int64_t k_) : m(m_), n(n_), k(k_), a(m * k), b(n * k), c(m * n) {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& v : a) v = normal(rng);
    for (auto& v : b) v = normal(rng);
    openblas_set_num_threads(bench_threads());
  }
  void run() {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), 1.0f, a.data(), static_cast<int>(k), b.data(),
                static_cast<int>(k), 0.0f, c.data(), static_cast<int>(n));
  }
  // Median GOP/s of several calls after a warm-up.
  double median_gops() {
    run();
    std::vector<double> t;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      run();
      benchmark::ClobberMemory();
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(t.begin(), t.end());
    return gops(m, n, k) / t[t.size() / 2];
  }
};

void set_shape_label(benchmark::State& state, const char* what, int64_t m, int64_t n, int64_t k) {
  state.SetLabel(std::string(what) + " " + std::to_string(m) + "x" + std::to_string(n) + "x" +
                 std::to_string(k) + " threads " + std::to_string(bench_threads()));
}

// GOPs: this benchmark's rate (2 M N K per call); sgemm_GOPs: OpenBLAS on the same shape, timed
// just before; vs_sgemm: their ratio (> 1: faster than sgemm).
void report(benchmark::State& state, int64_t m, int64_t n, int64_t k,
            std::chrono::steady_clock::time_point t0, double sgemm_gops) {
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double rate = gops(m, n, k) * static_cast<double>(state.iterations()) / seconds;
  state.counters["GOPs"] = rate;
  state.counters["sgemm_GOPs"] = sgemm_gops;
  state.counters["vs_sgemm"] = rate / sgemm_gops;
}

void BM_Sgemm(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  Sgemm s(m, n, k);
  s.run();
  for (auto _ : state) {
    s.run();
    benchmark::ClobberMemory();
  }
  state.counters["GOPs"] = benchmark::Counter(
      gops(m, n, k) * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  set_shape_label(state, "openblas sgemm fp32", m, n, k);
}

// range(3): 0 = packed INT4 operands, 1 = int8 operands.
void BM_GemmS32(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  const bool int4 = state.range(3) == 0;
  const DType dtype = int4 ? DType::kInt4Packed : DType::kInt8;
  const int64_t row_bytes = int4 ? int4train::packed_row_bytes(k) : k;
  std::vector<uint8_t> a(static_cast<size_t>(m * row_bytes)), b(static_cast<size_t>(n * row_bytes));
  std::vector<int32_t> c(static_cast<size_t>(m * n));
  std::mt19937 rng(1);
  // Uniform random bytes are valid codes in both formats (odd K leaves a random pad nibble, so K is
  // even here).
  for (auto& v : a) v = static_cast<uint8_t>(rng());
  for (auto& v : b) v = static_cast<uint8_t>(rng());
  const auto av = int4train::make_matrix(a.data(), dtype, m, k);
  const auto bv = int4train::make_matrix(b.data(), dtype, n, k);
  const auto cv = int4train::make_matrix(c.data(), DType::kInt32, m, n);
  const double sgemm_gops = Sgemm(m, n, k).median_gops();
  int4train::gemm_s32(av, bv, cv);  // warm up: page in, start the pool
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    int4train::gemm_s32(av, bv, cv);
    benchmark::ClobberMemory();
  }
  report(state, m, n, k, t0, sgemm_gops);
  set_shape_label(state, int4 ? "int4train gemm_s32 int4" : "int4train gemm_s32 int8", m, n, k);
}

void BM_GemmF32(benchmark::State& state) {
  const int64_t m = state.range(0), n = state.range(1), k = state.range(2);
  Sgemm s(m, n, k);
  const double sgemm_gops = s.median_gops();
  const auto av = int4train::make_matrix(s.a.data(), DType::kFloat32, m, k);
  const auto bv = int4train::make_matrix(s.b.data(), DType::kFloat32, n, k);
  const auto cv = int4train::make_matrix(s.c.data(), DType::kFloat32, m, n);
  int4train::gemm_f32(av, bv, 1.0f, false, cv);
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    int4train::gemm_f32(av, bv, 1.0f, false, cv);
    benchmark::ClobberMemory();
  }
  report(state, m, n, k, t0, sgemm_gops);
  set_shape_label(state, "int4train gemm_f32", m, n, k);
}

BENCHMARK(BM_Sgemm)
    ->Args({1024, 1024, 1024})
    ->Args({4096, 4096, 1024})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);
BENCHMARK(BM_GemmS32)
    ->Args({1024, 1024, 1024, 0})
    ->Args({4096, 4096, 1024, 0})
    ->Args({1024, 1024, 1024, 1})
    ->Args({4096, 4096, 1024, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);
BENCHMARK(BM_GemmF32)
    ->Args({1024, 1024, 1024})
    ->Args({4096, 4096, 1024})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1.0);

}  // namespace

// int4train_bench is one binary built from every bench/*.cpp; main is weak here so that a main in
// another benchmark source (e.g. BENCHMARK_MAIN()) takes precedence without a link conflict.
__attribute__((weak)) int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
