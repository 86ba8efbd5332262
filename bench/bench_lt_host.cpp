// The host cost of the cuBLASLt descriptors that gemm_fp8.cpp builds for every product (run_lt's
// make_descs: a matmul descriptor, its attributes, three layouts, then their destruction), against
// setting only the per-call pointers on a kept descriptor (what a descriptor cache would leave).
// Host-side cuBLASLt calls only: runs without a GPU. Built where the CUDA toolkit is
// (bench/CMakeLists.txt: int4train_bench_lt_host).
#include <benchmark/benchmark.h>
#include <cublasLt.h>

#include <cstdint>
#include <cstdlib>

namespace {

void check(cublasStatus_t st, const char* what, benchmark::State& state) {
  if (st != CUBLAS_STATUS_SUCCESS) state.SkipWithError(what);
}

// The forward's FP8 product with scale and bf16 bias, as make_descs sets it up.
void BM_LtDescriptorsPerCall(benchmark::State& state) {
  const float scale = 1.0f;
  const float* scale_ptr = &scale;
  const void* bias_ptr = &scale;
  for (auto _ : state) {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    check(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate", state);
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const int8_t fast = 0;
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const int32_t bias_type = CUDA_R_16BF;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_ptr,
                                   sizeof scale_ptr);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr,
                                   sizeof bias_ptr);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                   sizeof bias_type);
    check(cublasLtMatrixLayoutCreate(&a, CUDA_R_8F_E4M3, 4096, 4096, 4096), "layout A", state);
    check(cublasLtMatrixLayoutCreate(&b, CUDA_R_8F_E4M3, 4096, 8192, 4096), "layout B", state);
    check(cublasLtMatrixLayoutCreate(&d, CUDA_R_16BF, 4096, 8192, 4096), "layout D", state);
    cublasLtMatrixLayoutDestroy(d);
    cublasLtMatrixLayoutDestroy(b);
    cublasLtMatrixLayoutDestroy(a);
    cublasLtMatmulDescDestroy(op);
  }
}
BENCHMARK(BM_LtDescriptorsPerCall);

// A kept descriptor: the scale and bias pointers set again, as every call would.
void BM_LtPointersOnKeptDescriptor(benchmark::State& state) {
  cublasLtMatmulDesc_t op = nullptr;
  check(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate", state);
  const float scale = 1.0f;
  const float* scale_ptr = &scale;
  const void* bias_ptr = &scale;
  for (auto _ : state) {
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_ptr,
                                   sizeof scale_ptr);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr,
                                   sizeof bias_ptr);
    benchmark::ClobberMemory();
  }
  cublasLtMatmulDescDestroy(op);
}
BENCHMARK(BM_LtPointersOnKeptDescriptor);

}  // namespace

BENCHMARK_MAIN();
