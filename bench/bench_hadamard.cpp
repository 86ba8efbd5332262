// Benchmark of the CPU block Hadamard transform (hadamard.h) against its floor, a copy of the same
// bytes: GB/s counts bytes read + written. Copies (one thread, and all threads through the
// library's own pool) are timed in the same loop, interleaved with the transform, so that the ratio
// vs_memcpy stays meaningful on a shared, noisy machine. Inputs (64 MiB fp32) exceed the caches.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../src/core/parallel.h"  // the transform's thread pool, for the threaded copy
#include "int4train/hadamard.h"
#include "int4train/numeric.h"

namespace {

using int4train::DType;
using Clock = std::chrono::steady_clock;

template <typename Fn>
double seconds_of(const Fn& fn) {
  const auto t0 = Clock::now();
  fn();
  benchmark::ClobberMemory();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void BM_Hadamard(benchmark::State& state) {
  const DType dtype = state.range(0) == 0 ? DType::kFloat32 : DType::kBFloat16;
  const int32_t block = static_cast<int32_t>(state.range(1));
  const int64_t rows = 4096, cols = 4096;
  const size_t bytes = static_cast<size_t>(rows * cols) * int4train::dtype_size(dtype);
  std::vector<char> in(bytes), out(bytes);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float v = normal(rng);
    if (dtype == DType::kFloat32) {
      std::memcpy(in.data() + i * 4, &v, 4);
    } else {
      const int4train::BFloat16 h = int4train::float_to_bf16(v);
      std::memcpy(in.data() + i * 2, &h, 2);
    }
  }
  const int4train::TensorView x = int4train::make_matrix(in.data(), dtype, rows, cols);
  const int4train::TensorView y = int4train::make_matrix(out.data(), dtype, rows, cols);
  auto copy_serial = [&] { std::memcpy(out.data(), in.data(), bytes); };
  auto copy_threaded = [&] {
    const int64_t chunk = int64_t{1} << 20;
    const int64_t n = static_cast<int64_t>(bytes);
    int4train::detail::parallel_for((n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
      const int64_t b = c0 * chunk, e = std::min(n, c1 * chunk);
      std::memcpy(out.data() + b, in.data() + b, static_cast<size_t>(e - b));
    });
  };
  auto transform = [&] { int4train::hadamard_transform(x, y, block); };
  copy_serial();  // warm up: page in, fill TLBs, start the pool
  copy_threaded();
  transform();
  std::vector<double> t_serial, t_threaded, t_transform;
  for (auto _ : state) {
    t_serial.push_back(seconds_of(copy_serial));
    t_threaded.push_back(seconds_of(copy_threaded));
    t_transform.push_back(seconds_of(transform));
    state.SetIterationTime(t_transform.back());
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double moved = 2.0 * static_cast<double>(bytes) * 1e-9;  // GB read + written
  const double gbps = moved / median(t_transform);
  const double copy_gbps = moved / std::min(median(t_serial), median(t_threaded));
  state.SetBytesProcessed(static_cast<int64_t>(2 * bytes) * state.iterations());
  state.counters["GBps"] = gbps;
  state.counters["memcpy_GBps"] = copy_gbps;
  state.counters["vs_memcpy"] = gbps / copy_gbps;
  state.SetLabel(std::string(dtype == DType::kFloat32 ? "fp32" : "bf16") + " 4096x4096 block " +
                 std::to_string(block) + ", " + std::to_string(int4train::detail::num_threads()) +
                 " threads");
}

BENCHMARK(BM_Hadamard)
    ->ArgNames({"bf16", "block"})
    ->ArgsProduct({{0, 1}, {256, 64}})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime()
    ->MinTime(1.0);

}  // namespace
