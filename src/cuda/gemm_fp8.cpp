// int4train CUDA path: the products of 4-bit codes on Hopper's FP8 tensor cores through cuBLASLt
// (C = A B^T in gemm.h's vocabulary), with device-pointer scales, an optional bias and bf16 or fp32
// output, plus the exact int32-result mode that the tests hold equal to gemm_s32_ref; and the INT8
// product with int32 accumulation for operands whose terms FP8 cannot sum exactly (cuda.h).
//
// Mapping: cuBLASLt is column-major and its FP8 kernels need the "TN" form. A row-major M x N
// output is a column-major N x M matrix D = B' A' with B' = our b (N x K row-major = K x N
// column-major, op T) and A' = our a (K x M column-major, op N), so cuBLASLt's A is our b and its
// B is our a; m = N, n = M, k = Kp.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda_common.h"
#include "int4train/cuda.h"
#include "kernels.h"

namespace int4train {
namespace {

using cuda_detail::aligned;
using cuda_detail::as_stream;
using cuda_detail::current_device;
using cuda_detail::DeviceBuffer;
using cuda_detail::row_stride;

// The most scratch gemm_s8_cuda takes for its int32 product (whole rows at a time, at least one).
constexpr int64_t kMaxS8Temp = int64_t{256} << 20;

// cuBLASLt's preferred workspace on Hopper (TransformerEngine uses the same).
constexpr size_t kLtMaxWorkspace = size_t{32} << 20;

void lt_check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw_error(ErrorKind::kRuntime,
                std::string("cuBLASLt error ") + std::to_string(status) + " in " + what);
  }
}

// One cuBLASLt handle per device for the process's lifetime (handles are thread-safe).
cublasLtHandle_t lt_handle() {
  static std::mutex mu;
  static std::map<int, cublasLtHandle_t> handles;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(dev);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t h = nullptr;
  lt_check(cublasLtCreate(&h), "cublasLtCreate");
  handles[dev] = h;
  return h;
}

// Largest power of two (<= 256) dividing the address: the alignment the heuristic may assume.
uint32_t alignment_of(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

// One product as cuBLASLt sees it (after the operand swap).
struct LtProblem {
  cudaDataType_t ab_type;  // CUDA_R_8F_E4M3 (fp32 accumulation) or CUDA_R_8I (int32)
  int64_t m, n, k;         // cuBLASLt's m = our N, n = our M
  const void* a;    // our b
  int64_t lda;
  const void* b;  // our a
  int64_t ldb;
  const float* scale_a;  // scale of cuBLASLt's A (our scale_b), may be null
  const float* scale_b;  // scale of cuBLASLt's B (our scale_a), may be null
  const void* bias;      // length m, may be null
  cudaDataType_t bias_type;
  void* d;
  int64_t ldd;
  cudaDataType_t d_type;
};

// What the chosen algorithm depends on; the pointers themselves are set on every call.
using AlgoKey = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int,
                           int, int, uint32_t, uint32_t, uint32_t>;

struct Descs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  ~Descs() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

bool is_s8(const LtProblem& p) { return p.ab_type == CUDA_R_8I; }

void make_descs(const LtProblem& p, Descs& ds) {
  lt_check(is_s8(p) ? cublasLtMatmulDescCreate(&ds.op, CUBLAS_COMPUTE_32I, CUDA_R_32I)
                    : cublasLtMatmulDescCreate(&ds.op, CUBLAS_COMPUTE_32F, CUDA_R_32F),
           "MatmulDescCreate");
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta),
           "TRANSA");
  lt_check(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb),
           "TRANSB");
  // FP8: default accumulation (fast accumulation would keep partial sums in the tensor core's
  // reduced precision for longer and lose integer exactness).
  const int8_t fast = 0;
  if (!is_s8(p)) {
    lt_check(
        cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast),
        "FAST_ACCUM");
  }
  if (p.scale_a != nullptr) {
    lt_check(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p.scale_a,
                                            sizeof p.scale_a),
             "A_SCALE_POINTER");
  }
  if (p.scale_b != nullptr) {
    lt_check(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &p.scale_b,
                                            sizeof p.scale_b),
             "B_SCALE_POINTER");
  }
  if (p.bias != nullptr) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    lt_check(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi),
             "EPILOGUE");
    lt_check(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias,
                                            sizeof p.bias),
             "BIAS_POINTER");
    const int32_t bt = static_cast<int32_t>(p.bias_type);
    lt_check(
        cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt),
        "BIAS_DATA_TYPE");
  }
  lt_check(cublasLtMatrixLayoutCreate(&ds.a, p.ab_type, static_cast<uint64_t>(p.k),
                                      static_cast<uint64_t>(p.m), p.lda),
           "layout A");
  lt_check(cublasLtMatrixLayoutCreate(&ds.b, p.ab_type, static_cast<uint64_t>(p.k),
                                      static_cast<uint64_t>(p.n), p.ldb),
           "layout B");
  lt_check(cublasLtMatrixLayoutCreate(&ds.d, p.d_type, static_cast<uint64_t>(p.m),
                                      static_cast<uint64_t>(p.n), p.ldd),
           "layout D");
}

// Finds (and caches) an algorithm; false when cuBLASLt has none for this configuration.
bool find_algo(const LtProblem& p, const Descs& ds, cublasLtMatmulHeuristicResult_t* out) {
  static std::mutex mu;
  static std::map<AlgoKey, std::pair<bool, cublasLtMatmulHeuristicResult_t>> cache;
  const uint32_t al_a = alignment_of(p.a), al_b = alignment_of(p.b), al_d = alignment_of(p.d);
  const AlgoKey key{current_device(),
                    static_cast<int>(p.ab_type),
                    p.m,
                    p.n,
                    p.k,
                    p.lda,
                    p.ldb,
                    p.ldd,
                    static_cast<int>(p.d_type),
                    p.bias != nullptr ? static_cast<int>(p.bias_type) : -1,
                    p.scale_a != nullptr,
                    p.scale_b != nullptr,
                    al_a,
                    al_b,
                    al_d};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      *out = it->second.second;
      return it->second.first;
    }
  }
  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
  const uint64_t ws = kLtMaxWorkspace;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                       sizeof ws);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a,
                                       sizeof al_a);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b,
                                       sizeof al_b);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d,
                                       sizeof al_d);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d,
                                       sizeof al_d);
  cublasLtMatmulHeuristicResult_t result;
  std::memset(&result, 0, sizeof result);
  int returned = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_handle(), ds.op, ds.a, ds.b, ds.d,
                                                           ds.d, pref, 1, &result, &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  const bool ok = st == CUBLAS_STATUS_SUCCESS && returned > 0;
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = {ok, result};
  *out = result;
  return ok;
}

// Runs the product; false (nothing launched) when cuBLASLt has no algorithm for it.
bool run_lt(const LtProblem& p, const CudaAllocator& alloc, void* stream) {
  Descs ds;
  make_descs(p, ds);
  cublasLtMatmulHeuristicResult_t h;
  if (!find_algo(p, ds, &h)) return false;
  DeviceBuffer ws(alloc, h.workspaceSize, stream);
  const float one = 1.0f, zero = 0.0f;
  const int32_t one_i = 1, zero_i = 0;  // the scale type of CUBLAS_COMPUTE_32I
  const void* alpha = is_s8(p) ? static_cast<const void*>(&one_i) : &one;
  const void* beta = is_s8(p) ? static_cast<const void*>(&zero_i) : &zero;
  lt_check(cublasLtMatmul(lt_handle(), ds.op, alpha, p.a, ds.a, p.b, ds.b, beta, p.d, ds.d, p.d,
                          ds.d, &h.algo, ws.get(), h.workspaceSize, as_stream(stream)),
           "cublasLtMatmul");
  return true;
}

struct GemmShape {
  int64_t m, n, kp;
};

// kmax: the exactness bound on the padded K (gemm.h, cuda.h), 0 for the dtype's default.
GemmShape check_operands(const TensorView& a, const TensorView& b, DType dtype, int64_t kmax = 0) {
  cuda_detail::check_gemm_operand(a, "a", dtype);
  cuda_detail::check_gemm_operand(b, "b", dtype);
  if (a.shape[1] != b.shape[1]) {
    throw_error(ErrorKind::kValue, "b: expected the padded width of a (" +
                                       std::to_string(a.shape[1]) + "), got " +
                                       std::to_string(b.shape[1]));
  }
  const bool s8 = dtype == DType::kInt8;
  if (kmax <= 0) kmax = s8 ? kMaxKInt8 : kMaxKFp8Int4;
  if (a.shape[1] > kmax) {
    throw_error(ErrorKind::kValue, "a: padded K = " + std::to_string(a.shape[1]) +
                                       " exceeds the exact " + (s8 ? "INT8" : "FP8") +
                                       " bound of these values, " + std::to_string(kmax));
  }
  return GemmShape{a.shape[0], b.shape[0], a.shape[1]};
}

// cuBLASLt's FP8 kernels were seen to refuse row counts N of b (its m) that are not a multiple of
// 8 (docs/cuda.md): such a b is copied into a temporary with zero rows up to a multiple of 16.
constexpr int64_t kRowAlign = 16;

struct PaddedB {
  const void* data;
  int64_t ld, rows;
};

PaddedB pad_b(const TensorView& b, const GemmShape& s, DeviceBuffer& tmp, void* stream) {
  if (s.n % kRowAlign == 0) return PaddedB{b.data, row_stride(b), s.n};
  const int64_t np = (s.n + kRowAlign - 1) / kRowAlign * kRowAlign;
  char* dst = tmp.as<char>();
  const cudaStream_t st = as_stream(stream);
  INT4TRAIN_CUDA_CHECK(
      cudaMemcpy2DAsync(dst, s.kp, b.data, row_stride(b), s.kp, s.n, cudaMemcpyDeviceToDevice, st));
  INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(dst + s.n * s.kp, 0, (np - s.n) * s.kp, st));
  return PaddedB{dst, s.kp, np};
}

size_t pad_b_bytes(const GemmShape& s) {
  if (s.n % kRowAlign == 0) return 0;
  return static_cast<size_t>((s.n + kRowAlign - 1) / kRowAlign * kRowAlign * s.kp);
}

// The raw fp32 accumulator a b^T (no scales, no bias) into a temporary of rows x ld, ld the padded
// row count of b.
void raw_product(const TensorView& a, const PaddedB& b, const GemmShape& s, float* d,
                 const CudaAllocator& alloc, void* stream) {
  LtProblem p{CUDA_R_8F_E4M3, b.rows,  s.m,     s.kp,    b.data,     b.ld, a.data,
              row_stride(a),  nullptr, nullptr, nullptr, CUDA_R_32F, d,    b.rows,
              CUDA_R_32F};
  if (!run_lt(p, alloc, stream)) {
    throw_error(ErrorKind::kNotImplemented,
                "gemm_fp8_cuda: cuBLASLt has no FP8 algorithm for M=" + std::to_string(s.m) +
                    " N=" + std::to_string(s.n) + " K=" + std::to_string(s.kp));
  }
}

// The scaled products' other arguments (out M x N fp32 or bf16, optional scales and bias); true for
// a bf16 bias.
bool check_scaled_args(const GemmShape& s, const TensorView& scale_a, const TensorView& scale_b,
                       const TensorView& bias, const TensorView& out) {
  check_dtype(out, "out", {DType::kFloat32, DType::kBFloat16});
  cuda_detail::check_device_matrix(out, "out");
  check_shape(out, "out", s.m, s.n);
  if (scale_a.data != nullptr)
    cuda_detail::check_device_scalar(scale_a, "scale_a", DType::kFloat32);
  if (scale_b.data != nullptr)
    cuda_detail::check_device_scalar(scale_b, "scale_b", DType::kFloat32);
  if (bias.data != nullptr) {
    check_dtype(bias, "bias", {DType::kFloat32, DType::kBFloat16});
    check_vector(bias, "bias", s.n);
  }
  return bias.data != nullptr && bias.dtype == DType::kBFloat16;
}

}  // namespace

void gemm_fp8_cuda(const TensorView& a, const TensorView& b, const TensorView& scale_a,
                   const TensorView& scale_b, const TensorView& bias, TensorView out,
                   const CudaAllocator& alloc, void* stream) {
  const GemmShape s = check_operands(a, b, DType::kFloat8E4M3);
  const bool bias_bf16 = check_scaled_args(s, scale_a, scale_b, bias, out);
  if (s.m == 0 || s.n == 0) return;
  const bool out_bf16 = out.dtype == DType::kBFloat16;
  const int64_t ldo = row_stride(out);
  const int64_t elem = out_bf16 ? 2 : 4;
  const cudaStream_t st = as_stream(stream);
  // One 256-byte-aligned scalar s = scale_a * scale_b (the CPU's alpha), the only scale cuBLASLt
  // sees: it was seen to refuse two scale pointers that are not 16-byte aligned. A 16-byte-aligned
  // scale_a without scale_b is that scalar already (s = scale_a * 1 = scale_a): no launch.
  const bool scaled = scale_a.data != nullptr || scale_b.data != nullptr;
  const bool one_scale = scale_b.data == nullptr && aligned(scale_a.data, 16);
  DeviceBuffer scale(alloc, scaled && !one_scale ? 256 : 0, stream);
  if (scaled && !one_scale) {
    cuda_detail::launch_scale_product(static_cast<const float*>(scale_a.data),
                                      static_cast<const float*>(scale_b.data), scale.as<float>(),
                                      st);
  }
  const float* sp = !scaled     ? nullptr
                    : one_scale ? static_cast<const float*>(scale_a.data)
                                : scale.as<const float>();

  // Fused: cuBLASLt applies the scale and (a bf16) bias and writes out directly; measured equal to
  // the CPU's epilogue bit for bit (docs/cuda.md). It needs an aligned output and N a multiple of
  // 16; an fp32 bias is added by the separate pass so that it is not rounded to bf16.
  const bool aligned_out = aligned(out.data, 16) && (s.m == 1 || (ldo * elem) % 16 == 0);
  const bool fusable_bias = bias.data == nullptr || (bias_bf16 && aligned(bias.data, 16));
  if (s.kp > 0 && s.n % kRowAlign == 0 && aligned_out && fusable_bias) {
    LtProblem p{CUDA_R_8F_E4M3,
                s.n,
                s.m,
                s.kp,
                b.data,
                row_stride(b),
                a.data,
                row_stride(a),
                nullptr,
                sp,
                bias.data,
                CUDA_R_16BF,
                out.data,
                s.m == 1 ? s.n : ldo,
                out_bf16 ? CUDA_R_16BF : CUDA_R_32F};
    if (run_lt(p, alloc, stream)) return;
  }
  // Unfused: raw accumulator in an fp32 temporary, then scale and bias in the CPU's order.
  DeviceBuffer bpad(alloc, pad_b_bytes(s), stream);
  const PaddedB pb = pad_b(b, s, bpad, stream);
  DeviceBuffer acc(alloc, s.kp > 0 ? static_cast<size_t>(s.m * pb.rows) * sizeof(float) : 0,
                   stream);
  if (s.kp > 0) raw_product(a, pb, s, acc.as<float>(), alloc, stream);
  cuda_detail::launch_scale_bias(s.kp > 0 ? acc.as<float>() : nullptr, pb.rows, sp, nullptr,
                                 bias.data, bias_bf16, out.data, out_bf16, ldo, s.m, s.n, st);
}

namespace {
// The int32 result c (M x N) of the exact modes; false when it is empty (nothing to do).
bool check_s32_out(const TensorView& c, const GemmShape& s) {
  check_dtype(c, "c", {DType::kInt32});
  cuda_detail::check_device_matrix(c, "c");
  check_shape(c, "c", s.m, s.n);
  return s.m > 0 && s.n > 0;
}
}  // namespace

void gemm_fp8_s32_cuda(const TensorView& a, const TensorView& b, TensorView c,
                       const CudaAllocator& alloc, void* stream) {
  const GemmShape s = check_operands(a, b, DType::kFloat8E4M3);
  if (!check_s32_out(c, s)) return;
  DeviceBuffer bpad(alloc, pad_b_bytes(s), stream);
  const PaddedB pb = pad_b(b, s, bpad, stream);
  DeviceBuffer acc(alloc, s.kp > 0 ? static_cast<size_t>(s.m * pb.rows) * sizeof(float) : 0,
                   stream);
  if (s.kp > 0) raw_product(a, pb, s, acc.as<float>(), alloc, stream);
  cuda_detail::launch_f32_to_s32(s.kp > 0 ? acc.as<float>() : nullptr, pb.rows, c.ptr<int32_t>(),
                                 row_stride(c), s.m, s.n, as_stream(stream));
}

namespace {
// c (int32, row stride ldc) = a b^T of INT8 operands whose shapes check_operands has checked.
void s8_product(const TensorView& a, const TensorView& b, const GemmShape& s, int32_t* c,
                int64_t ldc, const CudaAllocator& alloc, void* stream) {
  const cudaStream_t st = as_stream(stream);
  if (s.kp == 0) {
    INT4TRAIN_CUDA_CHECK(cudaMemset2DAsync(c, static_cast<size_t>(ldc) * 4, 0,
                                           static_cast<size_t>(s.n) * 4, s.m, st));
    return;
  }
  // Straight into c where cuBLASLt takes it (N a multiple of 16, aligned rows); else the product
  // of the zero-padded b into a temporary, whose first N columns are copied out.
  const bool direct = s.n % kRowAlign == 0 && aligned(c, 16) && ldc % 4 == 0;
  DeviceBuffer bpad(alloc, direct ? 0 : pad_b_bytes(s), stream);
  const PaddedB pb = direct ? PaddedB{b.data, row_stride(b), s.n} : pad_b(b, s, bpad, stream);
  DeviceBuffer acc(alloc, direct ? 0 : static_cast<size_t>(s.m * pb.rows) * sizeof(int32_t),
                   stream);
  void* d = direct ? static_cast<void*>(c) : acc.get();
  const int64_t ldd = direct ? ldc : pb.rows;
  LtProblem p{CUDA_R_8I, pb.rows, s.m,     s.kp,       pb.data, pb.ld, a.data,    row_stride(a),
              nullptr,   nullptr, nullptr, CUDA_R_32I, d,       ldd,   CUDA_R_32I};
  if (!run_lt(p, alloc, stream)) {
    throw_error(ErrorKind::kNotImplemented,
                "INT8 product: cuBLASLt has no INT8 algorithm for M=" + std::to_string(s.m) +
                    " N=" + std::to_string(s.n) + " K=" + std::to_string(s.kp));
  }
  if (!direct) {
    INT4TRAIN_CUDA_CHECK(
        cudaMemcpy2DAsync(c, static_cast<size_t>(ldc) * 4, d, static_cast<size_t>(pb.rows) * 4,
                          static_cast<size_t>(s.n) * 4, s.m, cudaMemcpyDeviceToDevice, st));
  }
}
}  // namespace

void gemm_s8_s32_cuda(const TensorView& a, const TensorView& b, TensorView c,
                      const CudaAllocator& alloc, void* stream, int64_t max_k) {
  if (max_k <= 0) throw_error(ErrorKind::kValue, "max_k: expected a positive bound on K");
  const GemmShape s = check_operands(a, b, DType::kInt8, max_k);
  if (!check_s32_out(c, s)) return;
  s8_product(a, b, s, c.ptr<int32_t>(), row_stride(c), alloc, stream);
}

void gemm_s8_cuda(const TensorView& a, const TensorView& b, const TensorView& scale_a,
                  const TensorView& scale_b, const TensorView& bias, TensorView out,
                  const CudaAllocator& alloc, void* stream) {
  const GemmShape s = check_operands(a, b, DType::kInt8, kMaxKInt4);
  const bool bias_bf16 = check_scaled_args(s, scale_a, scale_b, bias, out);
  if (s.m == 0 || s.n == 0) return;
  // The exact int32 product in a temporary (INT4 codes: |sum| <= 64 K < 2^31), then the scale and
  // bias pass in the CPU's order; in blocks of rows whose int32 rows fit kMaxS8Temp, so that a
  // wide output (a vocabulary projection) does not need four bytes per element of scratch.
  const int64_t row_bytes = s.n * static_cast<int64_t>(sizeof(int32_t));
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(s.m, kMaxS8Temp / row_bytes));
  DeviceBuffer acc(alloc, s.kp > 0 ? static_cast<size_t>(block * row_bytes) : 0, stream);
  const int64_t elem = out.dtype == DType::kBFloat16 ? 2 : 4;
  for (int64_t r0 = 0; r0 < s.m; r0 += block) {
    const int64_t rows = std::min(block, s.m - r0);
    if (s.kp > 0) {
      TensorView ar = a;
      ar.data = static_cast<char*>(a.data) + r0 * row_stride(a);
      ar.shape[0] = rows;
      s8_product(ar, b, GemmShape{rows, s.n, s.kp}, acc.as<int32_t>(), s.n, alloc, stream);
    }
    cuda_detail::launch_scale_bias(
        s.kp > 0 ? acc.as<const int32_t>() : nullptr, s.n, static_cast<const float*>(scale_a.data),
        static_cast<const float*>(scale_b.data), bias.data, bias_bf16,
        static_cast<char*>(out.data) + r0 * row_stride(out) * elem, out.dtype == DType::kBFloat16,
        row_stride(out), rows, s.n, as_stream(stream));
  }
}

}  // namespace int4train
