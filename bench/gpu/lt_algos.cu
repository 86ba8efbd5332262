// Does timing cuBLASLt's candidate algorithms beat its heuristic's first choice on issue 4's
// products? For each product of int4train's layer at the five benchmark shapes (the forward's FP8
// product with bf16 output, bf16 bias and a device scale, as gemm_fp8_cuda calls it; the
// backward's two INT8 products with int32 output, as the hq_bs backward calls them), in the same
// TN mapping as src/cuda/gemm_fp8.cpp: every candidate of cublasLtMatmulAlgoGetHeuristic (up to
// 16) timed (3 warm-ups; then 5 rounds that time 10 launches of each candidate in turn; the median
// round), and its output compared with the first candidate's, bit for bit. Operands: random 4-bit
// codes (-8..7) as e4m3 or int8, so every sum is an integer of at most 64 K < 2^24 in magnitude:
// exact in fp32 in any order, so any correct algorithm gives the same bits (a correctness check,
// as the library's exactness bound promises; not a search for a more exact one).
//
//   cmake target int4train_lt_algos (bench/gpu), or
//   nvcc -O2 -std=c++17 -arch=sm_90a -o lt_algos bench/gpu/lt_algos.cu -lcublasLt
//   ./lt_algos
//
// Prints one line per product: the number of candidates, the first's and the best's index and time,
// how many of those that ran gave the first's bits, and every candidate's time (-1: refused).
#include <cublasLt.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "bench_common.cuh"

namespace {

void check(int status, const char* what) {
  int4train_bench::check_status(status, "lt_algos", what, 1);
}

struct Product {
  const char* name;
  bool s8;          // INT8 operands, int32 out; else FP8 e4m3, bf16 out with bias and scale
  int64_t m, n, k;  // int4train's: a is m x k, b is n x k, out m x n (gemm.h)
};

std::vector<uint8_t> random_codes(size_t count, bool s8, std::mt19937& rng) {
  std::vector<uint8_t> v(count);
  for (auto& e : v) {
    const int c = static_cast<int>(rng() % 16) - 8;
    e = s8 ? static_cast<uint8_t>(static_cast<int8_t>(c))
           : __nv_fp8_e4m3(static_cast<float>(c)).__x;
  }
  return v;
}

}  // namespace

int main() {
  const std::vector<Product> products = {
      {"fwd fp8 8192x4096->4096", false, 8192, 4096, 4096},
      {"fwd fp8 8192x4096->16384", false, 8192, 16384, 4096},
      {"fwd fp8 8192x16384->4096", false, 8192, 4096, 16384},
      {"fwd fp8 16384x1024->4096", false, 16384, 4096, 1024},
      {"fwd fp8 4096x768->3072", false, 4096, 3072, 768},
      {"dX s8 8192x4096->4096", true, 8192, 4096, 4096},
      {"dW s8 8192x4096->4096", true, 4096, 4096, 8192},
      {"dX s8 8192x4096->16384", true, 8192, 4096, 16384},
      {"dW s8 8192x4096->16384", true, 16384, 4096, 8192},
      {"dX s8 8192x16384->4096", true, 8192, 16384, 4096},
      {"dW s8 8192x16384->4096", true, 4096, 16384, 8192},
      {"dX s8 16384x1024->4096", true, 16384, 1024, 4096},
      {"dW s8 16384x1024->4096", true, 4096, 1024, 16384},
      {"dX s8 4096x768->3072", true, 4096, 768, 3072},
      {"dW s8 4096x768->3072", true, 3072, 768, 4096},
  };
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s; cuBLASLt %zu\n", prop.name, cublasLtGetVersion());
  cublasLtHandle_t lt = nullptr;
  check(cublasLtCreate(&lt), "cublasLtCreate");
  const size_t ws_bytes = size_t{32} << 20;  // gemm_fp8.cpp's kLtMaxWorkspace
  void* ws = nullptr;
  check(cudaMalloc(&ws, ws_bytes), "cudaMalloc ws");
  float* scale = nullptr;
  check(cudaMalloc(&scale, 256), "cudaMalloc scale");
  const float scale_value = 1.0f / 1024;
  check(cudaMemcpy(scale, &scale_value, sizeof scale_value, cudaMemcpyHostToDevice), "scale");
  unsigned long long* diff = nullptr;
  check(cudaMalloc(&diff, sizeof *diff), "cudaMalloc diff");
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "event");
  check(cudaEventCreate(&e1), "event");
  std::mt19937 rng(1);

  for (const Product& p : products) {
    const std::vector<uint8_t> ha = random_codes(p.m * p.k, p.s8, rng);
    const std::vector<uint8_t> hb = random_codes(p.n * p.k, p.s8, rng);
    const size_t out_bytes = static_cast<size_t>(p.m * p.n) * (p.s8 ? 4 : 2);
    void *a = nullptr, *b = nullptr, *bias = nullptr, *first = nullptr, *out = nullptr;
    check(cudaMalloc(&a, ha.size()), "cudaMalloc a");
    check(cudaMalloc(&b, hb.size()), "cudaMalloc b");
    check(cudaMalloc(&bias, p.n * 2), "cudaMalloc bias");
    check(cudaMalloc(&first, out_bytes), "cudaMalloc first");
    check(cudaMalloc(&out, out_bytes), "cudaMalloc out");
    check(cudaMemcpy(a, ha.data(), ha.size(), cudaMemcpyHostToDevice), "copy a");
    check(cudaMemcpy(b, hb.data(), hb.size(), cudaMemcpyHostToDevice), "copy b");
    check(cudaMemset(bias, 0, p.n * 2), "bias");

    // cuBLASLt is column-major: its A is our b (k x n, op T), its B our a (k x m, op N), its D
    // our out (n x m column-major = m x n row-major).
    cublasLtMatmulDesc_t op = nullptr;
    const cudaDataType_t ab = p.s8 ? CUDA_R_8I : CUDA_R_8F_E4M3;
    check(p.s8 ? cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32I, CUDA_R_32I)
               : cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F),
          "MatmulDescCreate");
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TA");
    check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TB");
    if (!p.s8) {
      const int8_t fast = 0;
      check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast),
            "FAST_ACCUM");
      check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale,
                                           sizeof scale),
            "B_SCALE_POINTER");
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi),
            "EPILOGUE");
      check(
          cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias),
          "BIAS_POINTER");
      const int32_t bias_type = CUDA_R_16BF;
      check(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                           sizeof bias_type),
            "BIAS_DATA_TYPE");
    }
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
    check(cublasLtMatrixLayoutCreate(&la, ab, p.k, p.n, p.k), "layout A");
    check(cublasLtMatrixLayoutCreate(&lb, ab, p.k, p.m, p.k), "layout B");
    check(cublasLtMatrixLayoutCreate(&ld, p.s8 ? CUDA_R_32I : CUDA_R_16BF, p.n, p.m, p.n),
          "layout D");
    cublasLtMatmulPreference_t pref = nullptr;
    check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
    const uint64_t ws_pref = ws_bytes;
    check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                               &ws_pref, sizeof ws_pref),
          "MAX_WORKSPACE_BYTES");
    cublasLtMatmulHeuristicResult_t cand[16];
    int count = 0;
    check(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref, 16, cand, &count),
          "AlgoGetHeuristic");

    const float one = 1.0f, zero = 0.0f;
    const int32_t one_i = 1, zero_i = 0;
    const void* alpha = p.s8 ? static_cast<const void*>(&one_i) : &one;
    const void* beta = p.s8 ? static_cast<const void*>(&zero_i) : &zero;
    auto run = [&](int i, void* d) {
      return cublasLtMatmul(lt, op, alpha, b, la, a, lb, beta, d, ld, d, ld, &cand[i].algo, ws,
                            ws_bytes, nullptr) == CUBLAS_STATUS_SUCCESS;
    };
    // Warm-ups, and each candidate's bits against the reference's: the first candidate that runs
    // (normally #0), whose output stays in `first`.
    std::vector<int> runs;  // the candidates that ran
    int same = 0;
    for (int i = 0; i < count; ++i) {
      void* dst = runs.empty() ? first : out;
      bool ok = true;
      for (int r = 0; r < 3; ++r) ok = ok && run(i, dst);
      if (!ok) continue;
      check(cudaDeviceSynchronize(), "warm-up");
      if (!runs.empty()) {
        same += int4train_bench::count_different_words(first, out, out_bytes / 4, diff, "lt_algos",
                                                       1) == 0;
      } else {
        same += 1;
      }
      runs.push_back(i);
    }
    // Timing: 5 rounds, each timing a group of 10 launches of every candidate in turn (so that a
    // drift of the clocks hits all alike); each candidate's median group.
    std::vector<std::vector<float>> groups(count);
    for (int g = 0; g < 5; ++g) {
      for (int i : runs) {
        bool ok = true;
        check(cudaEventRecord(e0), "record");
        for (int r = 0; r < 10; ++r) ok = run(i, out) && ok;
        check(cudaEventRecord(e1), "record");
        check(cudaEventSynchronize(e1), "synchronize");
        if (!ok) check(1, "a timed launch");
        float ms = 0.0f;
        check(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
        groups[i].push_back(ms / 10);
      }
    }
    std::vector<float> times(count, -1.0f);  // -1: refused
    float best_ms = 0.0f;
    int best = -1;
    for (int i : runs) {
      std::sort(groups[i].begin(), groups[i].end());
      times[i] = groups[i][2];
      if (best < 0 || times[i] < best_ms) {
        best_ms = times[i];
        best = i;
      }
    }
    const int ref = runs.empty() ? -1 : runs[0];
    const float ref_ms = ref < 0 ? 0.0f : times[ref];
    std::printf(
        "%-26s candidates %2d first #%d %.4f ms best #%d %.4f ms (%.3f of first) same bits "
        "%d/%zu |",
        p.name, count, ref, ref_ms, best, best_ms, ref_ms > 0 ? best_ms / ref_ms : 0.0, same,
        runs.size());
    for (float t : times) std::printf(" %.3f", t);
    std::printf("\n");
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatmulDescDestroy(op);
    for (void* ptr : {a, b, bias, first, out}) cudaFree(ptr);
  }
  return 0;
}
