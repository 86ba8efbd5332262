// Can a fused-epilogue INT8 GEMM be built on CUTLASS instead of cuBLASLt? Times CUTLASS 4.2's
// Hopper s8 x s8 -> s32 GEMMs (C++ 3.x API: CollectiveBuilder for Sm90, TMA warp-specialized
// kernels, GemmUniversalAdapter) against cuBLASLt's INT8 product on the backward's two INT8
// products of int4train's layer at issue 4's five shapes (tokens T x in I -> out O): the input
// gradient dX (M=T, N=I, K=O) and the weight gradient dW (M=O, N=I, K=T). All in the TN form of
// src/cuda/gemm_fp8.cpp: out = a b^T with a M x K and b N x K row-major int8 (both K-major), out
// M x N row-major int32; cuBLASLt called as there (CUBLAS_COMPUTE_32I, transa T, transb N, our a
// and b swapped, the heuristic's first algorithm, 32 MiB workspace).
//
// CUTLASS configurations (tile M x N x K, cluster, kernel schedule; stages chosen by the builder,
// StageCountAutoCarveout with the epilogue's shared storage):
//   c1 128x256x128 1x1x1 cooperative   c2 128x256x128 2x1x1 cooperative
//   c3  64x256x128 1x1x1 pingpong      c4 128x128x128 1x1x1 cooperative
//   c5 128x128x128 2x1x1 pingpong
// c1-c3 keep one output row's 256 columns in one wgmma accumulator (m64n256k32), as a fused
// epilogue wants; c4-c5 are tiles like those cuBLASLt usually picks. Epilogue: the TMA
// warp-specialized one (the schedule that matches the kernel's, the one CUTLASS's epilogue fusion
// builds on) with fusion::LinearCombination<int32, int32, void C> and alpha 1: D = acc in int32
// arithmetic, no source read, exact.
//
// Operands: a random in [-127, 127], b random in [-8, 7] (a fixed LCG), so |sum| < 2^31: exact.
// Timing: 3 warm-ups each; then 7 rounds, each timing 20 back-to-back launches of every candidate
// in turn, each round starting one candidate later (so that a drift of the clocks hits all alike);
// the median round's time per launch. Every CUTLASS output is compared with cuBLASLt's bit for bit.
//
//   cmake target int4train_cutlass_s8 (bench/gpu; only where the CUTLASS headers are found:
//   INT4TRAIN_CUTLASS_INCLUDE as a cache or environment variable, or the nvidia-cutlass wheel's
//   cutlass_library), or
//   nvcc -O3 -DNDEBUG -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//     -I<cutlass>/include -o cutlass_s8 bench/gpu/cutlass_s8.cu -lcublasLt
//   ./cutlass_s8
//
// Prints the device and one markdown table: per product cuBLASLt's time and TOPS (2 M N K / t),
// each configuration's time and ratio (cuBLASLt time / its time: > 1 means CUTLASS is faster), and
// "bits": "same" when every configuration that ran gave cuBLASLt's bits, else the number of
// differing int32 elements per configuration that was compared, "-" when none was. A
// configuration that CUTLASS refuses for a product (can_implement, initialize or a launch failing)
// is listed above the table and shows "-". Exit status 1 when any output differs, 2 when none
// differs but a configuration did not run, 3 on an error of the program itself (CUDA, cuBLASLt).
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "bench_common.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/version.h"

namespace {

void check(int status, const char* what) {
  int4train_bench::check_status(status, "cutlass_s8", what, 3);
}

struct Product {
  std::string name;
  int m, n, k;  // a is m x k, b is n x k, out m x n (row-major)
};

// One way to compute out = a b^T: set up once per product, then launched many times.
class Candidate {
 public:
  virtual ~Candidate() = default;
  virtual const char* name() const = 0;
  // "" when the product is set up, else what failed.
  virtual std::string setup(const Product& p, const int8_t* a, const int8_t* b, int32_t* out) = 0;
  // Launches the product on the default stream; "" or what failed.
  virtual std::string run() = 0;
};

// cuBLASLt as src/cuda/gemm_fp8.cpp calls it: column-major, so its A is our b (k x n, op T), its B
// our a (k x m, op N), its D our out (n x m column-major = m x n row-major).
class LtCandidate final : public Candidate {
 public:
  LtCandidate() {
    check(cublasLtCreate(&lt_), "cublasLtCreate");
    check(cudaMalloc(&ws_, kWorkspace), "cudaMalloc workspace");
  }
  ~LtCandidate() override {
    destroy();
    cudaFree(ws_);
    cublasLtDestroy(lt_);
  }
  const char* name() const override { return "cuBLASLt"; }

  std::string setup(const Product& p, const int8_t* a, const int8_t* b, int32_t* out) override {
    destroy();
    a_ = a;
    b_ = b;
    out_ = out;
    check(cublasLtMatmulDescCreate(&op_, CUBLAS_COMPUTE_32I, CUDA_R_32I), "MatmulDescCreate");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    check(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TA");
    check(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TB");
    check(cublasLtMatrixLayoutCreate(&la_, CUDA_R_8I, p.k, p.n, p.k), "layout A");
    check(cublasLtMatrixLayoutCreate(&lb_, CUDA_R_8I, p.k, p.m, p.k), "layout B");
    check(cublasLtMatrixLayoutCreate(&ld_, CUDA_R_32I, p.n, p.m, p.n), "layout D");
    cublasLtMatmulPreference_t pref = nullptr;
    check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
    const uint64_t ws_pref = kWorkspace;
    check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                               &ws_pref, sizeof ws_pref),
          "MAX_WORKSPACE_BYTES");
    int count = 0;
    check(
        cublasLtMatmulAlgoGetHeuristic(lt_, op_, la_, lb_, ld_, ld_, pref, 1, &heuristic_, &count),
        "AlgoGetHeuristic");
    cublasLtMatmulPreferenceDestroy(pref);
    return count > 0 ? "" : "no algorithm";
  }

  std::string run() override {
    const int32_t one = 1, zero = 0;  // the scale type of CUBLAS_COMPUTE_32I
    const cublasStatus_t st = cublasLtMatmul(lt_, op_, &one, b_, la_, a_, lb_, &zero, out_, ld_,
                                             out_, ld_, &heuristic_.algo, ws_, kWorkspace, nullptr);
    return st == CUBLAS_STATUS_SUCCESS ? "" : "cublasLtMatmul status " + std::to_string(st);
  }

 private:
  static constexpr size_t kWorkspace = size_t{32} << 20;  // gemm_fp8.cpp's kLtMaxWorkspace

  void destroy() {
    if (ld_) cublasLtMatrixLayoutDestroy(ld_);
    if (lb_) cublasLtMatrixLayoutDestroy(lb_);
    if (la_) cublasLtMatrixLayoutDestroy(la_);
    if (op_) cublasLtMatmulDescDestroy(op_);
    ld_ = lb_ = la_ = nullptr;
    op_ = nullptr;
  }

  cublasLtHandle_t lt_ = nullptr;
  void* ws_ = nullptr;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t la_ = nullptr, lb_ = nullptr, ld_ = nullptr;
  cublasLtMatmulHeuristicResult_t heuristic_{};
  const int8_t* a_ = nullptr;
  const int8_t* b_ = nullptr;
  int32_t* out_ = nullptr;
};

// A CUTLASS sm90 s8 x s8 -> s32 GEMM: a row-major (K-major), b column-major as CUTLASS sees B
// (K x N, i.e. our n x k row-major: K-major), out row-major; alignment 16 for a and b, 4 for out.
template <class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
class CutlassCandidate final : public Candidate {
 public:
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, int32_t, void,
      cutlass::layout::RowMajor, 4, int32_t, cutlass::layout::RowMajor, 4, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<int32_t, int32_t, void, int32_t>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16,
      int8_t, cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static constexpr int kStages = CollectiveMainloop::DispatchPolicy::Stages;
  static constexpr int kSmemBytes = Kernel::SharedStorageSize;

  CutlassCandidate(const char* name, int sm_count) : name_(name), sm_count_(sm_count) {}
  ~CutlassCandidate() override { cudaFree(ws_); }
  const char* name() const override { return name_; }

  std::string setup(const Product& p, const int8_t* a, const int8_t* b, int32_t* out) override {
    ready_ = false;
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = sm_count_;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {p.m, p.n, p.k, 1},
                                  {a, k_major<typename Kernel::StrideA>(p.k, int64_t{p.m} * p.k), b,
                                   k_major<typename Kernel::StrideB>(p.k, int64_t{p.n} * p.k)},
                                  {{},
                                   nullptr,
                                   k_major<typename Kernel::StrideC>(p.n, int64_t{p.m} * p.n),
                                   out,
                                   k_major<typename Kernel::StrideD>(p.n, int64_t{p.m} * p.n)},
                                  hw};
    args.epilogue.thread.alpha = 1;
    args.epilogue.thread.beta = 0;
    cutlass::Status st = Gemm::can_implement(args);
    if (st != cutlass::Status::kSuccess) {
      return std::string("can_implement: ") + cutlassGetStatusString(st);
    }
    const size_t ws_bytes = Gemm::get_workspace_size(args);
    if (ws_bytes > ws_bytes_) {
      cudaFree(ws_);
      ws_ = nullptr;
      ws_bytes_ = 0;
      if (cudaMalloc(&ws_, ws_bytes) != cudaSuccess) {
        return "cudaMalloc of a " + std::to_string(ws_bytes) + "-byte workspace";
      }
      ws_bytes_ = ws_bytes;
    }
    st = gemm_.initialize(args, ws_);
    if (st != cutlass::Status::kSuccess) {
      return std::string("initialize: ") + cutlassGetStatusString(st);
    }
    ready_ = true;
    return "";
  }

  std::string run() override {
    if (!ready_) return "not set up";
    const cutlass::Status st = gemm_.run();
    if (st != cutlass::Status::kSuccess) return std::string("run: ") + cutlassGetStatusString(st);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : std::string("launch: ") + cudaGetErrorString(err);
  }

 private:
  // cute's packed (ld, 1, batch stride) for a K-major operand or a row-major out, as CUTLASS's
  // make_cute_packed_stride makes it.
  template <class Stride>
  static Stride k_major(int64_t ld, int64_t batch) {
    static_assert(std::is_same_v<Stride, cute::Stride<int64_t, cute::Int<1>, int64_t>>);
    return Stride{ld, cute::Int<1>{}, batch};
  }

  const char* name_;
  int sm_count_;
  Gemm gemm_;
  bool ready_ = false;
  void* ws_ = nullptr;
  size_t ws_bytes_ = 0;
};

using cute::_1;
using cute::_128;
using cute::_2;
using cute::_256;
using cute::_64;
using cute::Shape;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpiCoop = cutlass::epilogue::TmaWarpSpecializedCooperative;
using EpiPingpong = cutlass::epilogue::TmaWarpSpecialized;

using C1 = CutlassCandidate<Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, EpiCoop>;
using C2 = CutlassCandidate<Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, EpiCoop>;
using C3 = CutlassCandidate<Shape<_64, _256, _128>, Shape<_1, _1, _1>, Pingpong, EpiPingpong>;
using C4 = CutlassCandidate<Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, EpiCoop>;
using C5 = CutlassCandidate<Shape<_128, _128, _128>, Shape<_2, _1, _1>, Pingpong, EpiPingpong>;

template <class C>
void describe(const char* name, const char* config) {
  std::printf("- %s: %s, %d stages, %d B shared memory, %d threads\n", name, config, C::kStages,
              C::kSmemBytes, static_cast<int>(C::Kernel::MaxThreadsPerBlock));
}

// count values uniform-ish in [lo, hi] from a 64-bit LCG (Knuth's MMIX constants).
std::vector<int8_t> random_s8(size_t count, int lo, int hi, uint64_t seed) {
  std::vector<int8_t> v(count);
  uint64_t s = seed;
  const uint64_t span = static_cast<uint64_t>(hi - lo + 1);
  for (auto& e : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    e = static_cast<int8_t>(lo + static_cast<int>((s >> 33) % span));
  }
  return v;
}

}  // namespace

int main() {
  // Issue 4's layer shapes (T, I, O): dX = dY W (M=T, N=I, K=O), dW = dY^T X (M=O, N=I, K=T).
  const int shapes[][3] = {{8192, 4096, 4096},
                           {8192, 4096, 16384},
                           {8192, 16384, 4096},
                           {16384, 1024, 4096},
                           {4096, 768, 3072}};
  std::vector<Product> products;
  for (const auto& s : shapes) {
    const std::string tio =
        std::to_string(s[0]) + "x" + std::to_string(s[1]) + "->" + std::to_string(s[2]);
    products.push_back({"dX " + tio, s[0], s[1], s[2]});
    products.push_back({"dW " + tio, s[2], s[1], s[0]});
  }

  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  int clock_khz = 0, mem_clock_khz = 0;
  check(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0), "clock rate");
  check(cudaDeviceGetAttribute(&mem_clock_khz, cudaDevAttrMemoryClockRate, 0), "memory clock");
  std::printf(
      "device: %s (sm_%d%d, %d SMs), clock %d MHz, memory clock %d MHz; cuBLASLt %zu; CUTLASS "
      "%d.%d.%d\n\n",
      prop.name, prop.major, prop.minor, prop.multiProcessorCount, clock_khz / 1000,
      mem_clock_khz / 1000, cublasLtGetVersion(), CUTLASS_MAJOR, CUTLASS_MINOR, CUTLASS_PATCH);

  const int sms = prop.multiProcessorCount;
  std::vector<std::unique_ptr<Candidate>> cands;
  cands.push_back(std::make_unique<LtCandidate>());
  cands.push_back(std::make_unique<C1>("c1", sms));
  cands.push_back(std::make_unique<C2>("c2", sms));
  cands.push_back(std::make_unique<C3>("c3", sms));
  cands.push_back(std::make_unique<C4>("c4", sms));
  cands.push_back(std::make_unique<C5>("c5", sms));
  std::printf("CUTLASS configurations (tile MxNxK, cluster, schedule):\n");
  describe<C1>("c1", "128x256x128, 1x1x1, cooperative");
  describe<C2>("c2", "128x256x128, 2x1x1, cooperative");
  describe<C3>("c3", "64x256x128, 1x1x1, pingpong");
  describe<C4>("c4", "128x128x128, 1x1x1, cooperative");
  describe<C5>("c5", "128x128x128, 2x1x1, pingpong");
  std::printf("\n");

  // One pool of operand data for all products (each takes a prefix), one out per candidate.
  size_t max_a = 0, max_b = 0, max_out = 0;
  for (const Product& p : products) {
    max_a = std::max(max_a, size_t{1} * p.m * p.k);
    max_b = std::max(max_b, size_t{1} * p.n * p.k);
    max_out = std::max(max_out, size_t{1} * p.m * p.n);
  }
  const std::vector<int8_t> ha = random_s8(max_a, -127, 127, 1);
  const std::vector<int8_t> hb = random_s8(max_b, -8, 7, 2);
  int8_t *a = nullptr, *b = nullptr;
  check(cudaMalloc(&a, max_a), "cudaMalloc a");
  check(cudaMalloc(&b, max_b), "cudaMalloc b");
  check(cudaMemcpy(a, ha.data(), max_a, cudaMemcpyHostToDevice), "copy a");
  check(cudaMemcpy(b, hb.data(), max_b, cudaMemcpyHostToDevice), "copy b");
  std::vector<int32_t*> outs(cands.size(), nullptr);
  for (auto& o : outs) check(cudaMalloc(&o, max_out * sizeof(int32_t)), "cudaMalloc out");
  unsigned long long* diff = nullptr;
  check(cudaMalloc(&diff, sizeof *diff), "cudaMalloc diff");
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "event");
  check(cudaEventCreate(&e1), "event");

  constexpr int kWarmups = 3, kRounds = 7, kIters = 20;
  std::vector<std::string> failures, rows;
  bool any_diff = false;
  for (const Product& p : products) {
    const size_t out_count = size_t{1} * p.m * p.n;
    std::vector<bool> ok(cands.size(), false), compared(cands.size(), false);
    std::vector<long long> diffs(cands.size(), 0);
    auto fail = [&](size_t c, const std::string& what) {
      failures.push_back(std::string(cands[c]->name()) + " on " + p.name +
                         " (M=" + std::to_string(p.m) + " N=" + std::to_string(p.n) +
                         " K=" + std::to_string(p.k) + "): " + what);
      ok[c] = false;
    };
    // Set up, warm up, and compare each output with cuBLASLt's (outs[0]). Outputs start as a
    // pattern, cuBLASLt's another than the others', so that a kernel that writes nothing cannot
    // pass.
    for (size_t c = 0; c < cands.size(); ++c) {
      check(cudaMemset(outs[c], c == 0 ? 0xa5 : 0x5a, out_count * sizeof(int32_t)), "memset out");
      std::string err = cands[c]->setup(p, a, b, outs[c]);
      for (int r = 0; r < kWarmups && err.empty(); ++r) err = cands[c]->run();
      check(cudaDeviceSynchronize(), "warm-up");
      if (!err.empty()) {
        if (c == 0) {
          std::printf("cutlass_s8: cuBLASLt on %s: %s\n", p.name.c_str(), err.c_str());
          return 3;
        }
        fail(c, err);
        continue;
      }
      ok[c] = true;
      if (c > 0) {
        const unsigned long long n_diff = int4train_bench::count_different_words(
            outs[0], outs[c], out_count, diff, "cutlass_s8", 3);
        diffs[c] = static_cast<long long>(n_diff);
        compared[c] = true;
        any_diff = any_diff || n_diff != 0;
      }
    }
    // Timing: candidates in turns within each round, each round starting one candidate later;
    // each one's median round.
    std::vector<std::vector<float>> times(cands.size());
    for (int round = 0; round < kRounds; ++round) {
      for (size_t i = 0; i < cands.size(); ++i) {
        const size_t c = (i + static_cast<size_t>(round)) % cands.size();
        if (!ok[c]) continue;
        std::string err;
        check(cudaEventRecord(e0), "record");
        for (int r = 0; r < kIters && err.empty(); ++r) err = cands[c]->run();
        check(cudaEventRecord(e1), "record");
        check(cudaEventSynchronize(e1), "synchronize");
        if (!err.empty()) {
          if (c == 0) check(1, ("timed cuBLASLt launch: " + err).c_str());
          fail(c, "timed launch: " + err);
          continue;
        }
        float ms = 0.0f;
        check(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
        times[c].push_back(1000.0f * ms / kIters);
      }
    }
    std::vector<double> us(cands.size(), 0.0);
    for (size_t c = 0; c < cands.size(); ++c) {
      if (!ok[c]) continue;
      std::sort(times[c].begin(), times[c].end());
      us[c] = times[c][times[c].size() / 2];
    }
    // The row.
    char cell[96];
    std::snprintf(cell, sizeof cell, "| %s | %d %d %d | %.1f | %.0f |", p.name.c_str(), p.m, p.n,
                  p.k, us[0], 2.0 * p.m * p.n * p.k / (us[0] * 1e6));
    std::string row = cell, bits;
    bool any_compared = false;
    for (size_t c = 1; c < cands.size(); ++c) {
      if (ok[c]) {
        std::snprintf(cell, sizeof cell, " %.1f | %.3f |", us[c], us[0] / us[c]);
      } else {
        std::snprintf(cell, sizeof cell, " - | - |");
      }
      row += cell;
      any_compared = any_compared || compared[c];
      if (compared[c] && diffs[c] != 0) {
        bits += (bits.empty() ? "" : ", ") + std::string(cands[c]->name()) + ": " +
                std::to_string(diffs[c]);
      }
    }
    rows.push_back(row + " " + (!any_compared ? "-" : bits.empty() ? "same" : bits) + " |");
  }

  for (const std::string& f : failures) std::printf("did not run: %s\n", f.c_str());
  if (!failures.empty()) std::printf("\n");
  std::printf("| product | M N K | cuBLASLt us | TOPS |");
  for (size_t c = 1; c < cands.size(); ++c) {
    std::printf(" %s us | %s ratio |", cands[c]->name(), cands[c]->name());
  }
  std::printf(" bits |\n|---|---|--:|--:|");
  for (size_t c = 1; c < cands.size(); ++c) std::printf("--:|--:|");
  std::printf("---|\n");
  for (const std::string& r : rows) std::printf("%s\n", r.c_str());

  for (auto* o : outs) cudaFree(o);
  cudaFree(diff);
  cudaFree(a);
  cudaFree(b);
  if (any_diff) return 1;
  return failures.empty() ? 0 : 2;
}
