// int4train GPU benchmark (CUDA events, medians, inputs rotated past L2): each quantization
// kernel's GB/s beside a device-to-device copy, and the FP8 product of INT4 codes (and the whole
// quantized forward) beside cuBLAS bf16 on the transformer shapes of docs/cuda.md. Prints one
// table.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "int4train/cuda.h"
#include "int4train/int4.h"
#include "int4train/linear.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"

namespace {

using namespace int4train;

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error %s in %s\n", cudaGetErrorString(e), what);
    std::exit(2);
  }
}
void ck(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "cuBLASLt error %d in %s\n", static_cast<int>(s), what);
    std::exit(2);
  }
}

struct Buf {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Buf(size_t b) : bytes(b) { ck(cudaMalloc(&p, std::max<size_t>(b, 1)), "cudaMalloc"); }
  ~Buf() { cudaFree(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// Random data (never zeros: see METHOD.md), cut from one host pool of normal values per type with a
// seed-dependent offset, so that large inputs are cheap to make and the rotated sets differ.
constexpr size_t kPool = size_t{1} << 24;

template <typename T>
void fill_from_pool(Buf& b, size_t n, const std::vector<T>& pool, uint64_t seed) {
  size_t off = static_cast<size_t>(seed * 7919) % (kPool / 2), done = 0;
  while (done < n) {
    const size_t len = std::min(n - done, kPool - off);
    ck(cudaMemcpy(b.as<T>() + done, pool.data() + off, len * sizeof(T), cudaMemcpyHostToDevice),
       "upload");
    done += len;
    off = 0;
  }
}
const std::vector<float>& normal_pool() {
  static const std::vector<float> pool = [] {
    std::mt19937_64 rng(1);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> v(kPool);
    for (auto& x : v) x = nd(rng);
    return v;
  }();
  return pool;
}
void fill_random_bf16(Buf& b, size_t n, uint64_t seed) {
  static const std::vector<uint16_t> pool = [] {
    std::vector<uint16_t> v(kPool);
    for (size_t i = 0; i < kPool; ++i) v[i] = float_to_bf16(normal_pool()[i]).bits;
    return v;
  }();
  fill_from_pool(b, n, pool, seed);
}
void fill_random_f32(Buf& b, size_t n, uint64_t seed) { fill_from_pool(b, n, normal_pool(), seed); }
void fill_random_codes_s8(Buf& b, size_t n, uint64_t seed) {
  // int8 bytes of uniform INT4 codes (the INT8 engine's operands).
  static const std::vector<int8_t> pool = [] {
    std::mt19937_64 rng(3);
    std::vector<int8_t> v(kPool);
    for (auto& x : v) x = static_cast<int8_t>(static_cast<int>(rng() & 15) - 8);
    return v;
  }();
  fill_from_pool(b, n, pool, seed);
}
void fill_random_codes_fp8(Buf& b, size_t n, uint64_t seed) {
  // e4m3 bytes of uniform INT4 codes (the bit patterns of -8..7).
  static const std::vector<uint8_t> pool = [] {
    static const uint8_t kE4m3[16] = {0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E,
                                      0xD0, 0xCE, 0xCC, 0xCA, 0xC8, 0xC4, 0xC0, 0xB8};
    std::mt19937_64 rng(2);
    std::vector<uint8_t> v(kPool);
    for (auto& x : v) x = kE4m3[rng() & 15];
    return v;
  }();
  fill_from_pool(b, n, pool, seed);
}

// Median milliseconds per call: `inner` calls between two events, repeated `outer` times, after a
// warm-up; fn(i) gets the call index (to rotate inputs).
double time_ms(const std::function<void(int)>& fn, int inner = 10, int outer = 15) {
  for (int i = 0; i < 3; ++i) fn(i);
  ck(cudaDeviceSynchronize(), "warmup");
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<double> t;
  int call = 0;
  for (int o = 0; o < outer; ++o) {
    cudaEventRecord(a);
    for (int i = 0; i < inner; ++i) fn(call++);
    cudaEventRecord(b);
    ck(cudaEventSynchronize(b), "event");
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms / inner);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Row {
  std::string what;
  double ms, rate;
  std::string unit, note;
};
std::vector<Row> g_rows;

void report(const std::string& what, double ms, double rate, const std::string& unit,
            const std::string& note = "") {
  g_rows.push_back(Row{what, ms, rate, unit, note});
  std::printf("%-58s %9.4f ms %9.1f %s %s\n", what.c_str(), ms, rate, unit.c_str(), note.c_str());
  std::fflush(stdout);
}

// ---- cuBLAS bf16 baseline: y (M x N, bf16) = x (M x K) w (N x K)^T + bias, the same TN mapping.
struct Bf16Gemm {
  cublasLtHandle_t h = nullptr;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
  cublasLtMatmulAlgo_t algo;
  size_t ws_size = 0;
  void* ws = nullptr;
  Bf16Gemm(int64_t m, int64_t n, int64_t k, const void* bias) {
    ck(cublasLtCreate(&h), "create");
    ck(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
    const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof nn);
    if (bias) {
      const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    }
    ck(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, n, k), "la");
    ck(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, m, k), "lb");
    ck(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, m, n), "ld");
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    const uint64_t wsmax = 32u << 20;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsmax,
                                         sizeof wsmax);
    cublasLtMatmulHeuristicResult_t r;
    int count = 0;
    ck(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, ld, ld, pref, 1, &r, &count), "heuristic");
    if (count == 0) throw std::runtime_error("no bf16 algorithm");
    cublasLtMatmulPreferenceDestroy(pref);
    algo = r.algo;
    ws_size = r.workspaceSize;
    ck(cudaMalloc(&ws, std::max<size_t>(ws_size, 1)), "ws");
  }
  ~Bf16Gemm() {
    cudaFree(ws);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatmulDescDestroy(op);
    cublasLtDestroy(h);
  }
  void run(const void* x, const void* w, void* y) {
    const float one = 1.0f, zero = 0.0f;
    ck(cublasLtMatmul(h, op, &one, w, la, x, lb, &zero, y, ld, y, ld, &algo, ws, ws_size, nullptr),
       "bf16 matmul");
  }
};

constexpr int kSets = 3;  // rotated input sets

void bench_copy() {
  const size_t bytes = size_t{512} << 20;
  Buf a(bytes), b(bytes);
  ck(cudaMemset(a.p, 1, bytes), "memset");
  const double ms =
      time_ms([&](int) { cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice); });
  report("copy D2D 512 MiB (read+write)", ms, 2.0 * bytes / ms / 1e6, "GB/s");
}

void bench_quant(int64_t rows, int64_t cols) {
  const int64_t numel = rows * cols;
  const int64_t kp = fp8_padded_cols(cols);
  std::vector<std::unique_ptr<Buf>> xb, xf;
  for (int s = 0; s < kSets; ++s) {
    xb.emplace_back(new Buf(numel * 2));
    fill_random_bf16(*xb.back(), numel, 10 + s);
    xf.emplace_back(new Buf(numel * 4));
    fill_random_f32(*xf.back(), numel, 20 + s);
  }
  Buf op(rows * kp), packed(numel / 2 + 1), aux(compact_aux_bytes(rows, cols)), cnt(8), step(4);
  const float sv = 0.4f;
  ck(cudaMemcpy(step.p, &sv, 4, cudaMemcpyHostToDevice), "step");
  ck(cudaMemset(cnt.p, 0, 8), "cnt");
  const std::string shape = std::to_string(rows) + "x" + std::to_string(cols);
  const RandomKey key{1, 2};
  for (bool bf16 : {true, false}) {
    for (int32_t g : {256, 64, 16, 1}) {
      const double ms = time_ms([&](int i) {
        const Buf& x = bf16 ? *xb[i % kSets] : *xf[i % kSets];
        hadamard_lsq_quantize_cuda(
            make_matrix(x.p, bf16 ? DType::kBFloat16 : DType::kFloat32, rows, cols), g,
            make_scalar(step.p, DType::kFloat32), key,
            make_matrix(op.p, DType::kFloat8E4M3, rows, kp),
            make_matrix(packed.p, DType::kInt4Packed, rows, cols),
            make_vector(aux.p, DType::kUInt8, compact_aux_bytes(rows, cols)),
            make_scalar(cnt.p, DType::kInt64), nullptr);
      });
      const double bytes = numel * ((bf16 ? 2.0 : 4.0) + 1.0 + 0.5 + 0.125);
      report("hadamard_lsq X " + shape + (bf16 ? " bf16" : " fp32") + " g" + std::to_string(g) +
                 " -> fp8+int4+aux",
             ms, bytes / ms / 1e6, "GB/s");
    }
  }
  {
    const double ms = time_ms([&](int i) {
      hadamard_lsq_quantize_cuda(make_matrix(xb[i % kSets]->p, DType::kBFloat16, rows, cols), 256,
                                 make_scalar(step.p, DType::kFloat32), key,
                                 make_matrix(op.p, DType::kFloat8E4M3, rows, kp), TensorView{},
                                 TensorView{}, make_scalar(cnt.p, DType::kInt64), nullptr);
    });
    report("hadamard_lsq W " + shape + " bf16 g256 -> fp8 only", ms, numel * 3.0 / ms / 1e6,
           "GB/s");
    // The backward's W pass: the codes as the transposed INT8 operand, through the tiles.
    Buf opt(static_cast<size_t>(cols * fp8_padded_cols(rows)));
    const CudaAllocator alloc = default_cuda_allocator();
    const double ms_t = time_ms([&](int i) {
      hadamard_lsq_codes_t_cuda(make_matrix(xb[i % kSets]->p, DType::kBFloat16, rows, cols), 256,
                                make_scalar(step.p, DType::kFloat32),
                                make_matrix(opt.p, DType::kInt8, cols, fp8_padded_cols(rows)),
                                alloc, nullptr);
    });
    report("hadamard_lsq W " + shape + " bf16 g256 -> int8 transposed", ms_t,
           numel * 3.0 / ms_t / 1e6, "GB/s");
  }
  {
    Buf out(numel * 4);
    const double ms = time_ms([&](int i) {
      hadamard_transform_cuda(make_matrix(xf[i % kSets]->p, DType::kFloat32, rows, cols),
                              make_matrix(out.p, DType::kFloat32, rows, cols), 256, nullptr);
    });
    report("hadamard_transform " + shape + " fp32->fp32 g256", ms, numel * 8.0 / ms / 1e6, "GB/s");
  }
  const CudaAllocator alloc = default_cuda_allocator();
  {
    Buf op2(2 * rows * kp), hi(numel / 2 + 1), lo(numel / 2 + 1), sq(2 * rows * 4), sc(4);
    const double ms = time_ms([&](int i) {
      quantize_bitsplit_cuda(make_matrix(xb[i % kSets]->p, DType::kBFloat16, rows, cols), key,
                             make_matrix(op2.p, DType::kFloat8E4M3, 2 * rows, kp),
                             make_matrix(hi.p, DType::kInt4Packed, rows, cols),
                             make_matrix(lo.p, DType::kInt4Packed, rows, cols),
                             make_vector(sq.p, DType::kInt32, 2 * rows),
                             make_scalar(sc.p, DType::kFloat32), TensorView{}, alloc, nullptr);
    });
    // Two reads of G (absmax, then quantize) + operand (2 B) + hi/lo (1 B).
    report("bitsplit G " + shape + " bf16 -> fp8 hi/lo + int4 + sumsq", ms,
           numel * (2.0 * 2 + 2.0 + 1.0) / ms / 1e6, "GB/s", "(2 reads of G)");
    // hq_bs's pass: the INT8 operand q = 16 hi + lo, and the bias gradient from the reduction pass.
    Buf q8(rows * kp), q8t(cols * fp8_padded_cols(rows)), sums(cols * 2);
    const double ms_q = time_ms([&](int i) {
      quantize_bitsplit_q8_cuda(make_matrix(xb[i % kSets]->p, DType::kBFloat16, rows, cols), key,
                                make_matrix(q8.p, DType::kInt8, rows, kp), TensorView{},
                                make_scalar(sc.p, DType::kFloat32),
                                make_vector(sums.p, DType::kBFloat16, cols), alloc, nullptr);
    });
    report("bitsplit G " + shape + " bf16 -> int8 q + column sums", ms_q,
           numel * (2.0 * 2 + 1.0) / ms_q / 1e6, "GB/s", "(2 reads of G)");
    // hq_bs's pass as the layer runs it: q and q^T (the weight gradient's operand) together.
    const double ms_qt = time_ms([&](int i) {
      quantize_bitsplit_q8_cuda(make_matrix(xb[i % kSets]->p, DType::kBFloat16, rows, cols), key,
                                make_matrix(q8.p, DType::kInt8, rows, kp),
                                make_matrix(q8t.p, DType::kInt8, cols, fp8_padded_cols(rows)),
                                make_scalar(sc.p, DType::kFloat32),
                                make_vector(sums.p, DType::kBFloat16, cols), alloc, nullptr);
    });
    report("bitsplit G " + shape + " bf16 -> int8 q, q^T + column sums", ms_qt,
           numel * (2.0 * 2 + 2.0) / ms_qt / 1e6, "GB/s", "(2 reads of G)");
    // grad_scale=row: the rows' maxima from the same reduction pass, then each row's exponent.
    Buf rexp(rows);
    const double ms_qr = time_ms([&](int i) {
      quantize_bitsplit_q8_cuda(make_matrix(xb[i % kSets]->p, DType::kBFloat16, rows, cols), key,
                                make_matrix(q8.p, DType::kInt8, rows, kp),
                                make_matrix(q8t.p, DType::kInt8, cols, fp8_padded_cols(rows)),
                                make_scalar(sc.p, DType::kFloat32),
                                make_vector(sums.p, DType::kBFloat16, cols), alloc, nullptr,
                                make_vector(rexp.p, DType::kInt8, rows));
    });
    report("bitsplit G " + shape + " bf16 -> int8 q, q^T + col sums, row scales", ms_qr,
           numel * (2.0 * 2 + 2.0) / ms_qr / 1e6, "GB/s", "(2 reads of G)");
    Buf amax(4);
    const double ms2 = time_ms([&](int i) {
      absmax_bits_cuda(make_matrix(xb[i % kSets]->p, DType::kBFloat16, rows, cols),
                       make_scalar(amax.p, DType::kInt32), nullptr);
    });
    report("absmax G " + shape + " bf16", ms2, numel * 2.0 / ms2 / 1e6, "GB/s");
  }
  {
    Buf gs(4), gx(numel * 4);
    const double ms = time_ms([&](int i) {
      lsq_backward_compact_cuda(make_matrix(packed.p, DType::kInt4Packed, rows, cols),
                                make_vector(aux.p, DType::kUInt8, compact_aux_bytes(rows, cols)),
                                make_matrix(xf[i % kSets]->p, DType::kFloat32, rows, cols),
                                make_matrix(gx.p, DType::kFloat32, rows, cols),
                                make_scalar(gs.p, DType::kFloat32), alloc, nullptr);
    });
    report("lsq_backward_compact " + shape + " fp32", ms, numel * (4.0 + 4.0 + 0.625) / ms / 1e6,
           "GB/s");
  }
}

// The layer's forward arguments (bf16 x m x k, w n x k, bias, y m x n; steps = scales[0], [1]) and
// its backward arguments (bf16 grad_y m x n; every gradient asked for, bf16; the steps' gradients in
// gsteps[0], [1]).
LinearForwardArgs forward_args(const void* x, const void* w, const Buf& bias, const Buf& scales,
                               const Buf& y, const Buf& codes, const Buf& aux, int64_t m, int64_t k,
                               int64_t n) {
  LinearForwardArgs a;
  a.x = make_matrix(const_cast<void*>(x), DType::kBFloat16, m, k);
  a.w = make_matrix(const_cast<void*>(w), DType::kBFloat16, n, k);
  a.bias = make_vector(bias.p, DType::kBFloat16, n);
  a.step_x = make_scalar(scales.as<float>(), DType::kFloat32);
  a.step_w = make_scalar(scales.as<float>() + 1, DType::kFloat32);
  a.y = make_matrix(y.p, DType::kBFloat16, m, n);
  a.saved_codes = make_matrix(codes.p, DType::kInt4Packed, m, k);
  a.saved_aux = make_vector(aux.p, DType::kUInt8, compact_aux_bytes(m, k));
  return a;
}

LinearBackwardArgs backward_args(const Buf& gy, const LinearForwardArgs& f, const Buf& gx,
                                 const Buf& gw, const Buf& gbias, const Buf& gsteps, int64_t m,
                                 int64_t k, int64_t n) {
  LinearBackwardArgs a;
  a.grad_y = make_matrix(gy.p, DType::kBFloat16, m, n);
  a.saved_codes = f.saved_codes;
  a.saved_aux = f.saved_aux;
  a.w = f.w;
  a.step_x = f.step_x;
  a.step_w = f.step_w;
  a.grad_x = make_matrix(gx.p, DType::kBFloat16, m, k);
  a.grad_w = make_matrix(gw.p, DType::kBFloat16, n, k);
  a.grad_bias = make_vector(gbias.p, DType::kBFloat16, n);
  a.grad_step_x = make_scalar(gsteps.as<float>(), DType::kFloat32);
  a.grad_step_w = make_scalar(gsteps.as<float>() + 1, DType::kFloat32);
  return a;
}

void bench_gemm(int64_t tokens, int64_t in, int64_t out) {
  const int64_t m = tokens, k = in, n = out;
  const std::string shape =
      std::to_string(tokens) + "x" + std::to_string(in) + "->" + std::to_string(out);
  std::vector<std::unique_ptr<Buf>> a8, b8, a16, b16;
  for (int s = 0; s < kSets; ++s) {
    a8.emplace_back(new Buf(m * k));
    fill_random_codes_fp8(*a8.back(), m * k, 100 + s);
    b8.emplace_back(new Buf(n * k));
    fill_random_codes_fp8(*b8.back(), n * k, 200 + s);
    a16.emplace_back(new Buf(m * k * 2));
    fill_random_bf16(*a16.back(), m * k, 300 + s);
    b16.emplace_back(new Buf(n * k * 2));
    fill_random_bf16(*b16.back(), n * k, 400 + s);
  }
  Buf y(m * n * 2), bias(n * 2), scales(8);
  fill_random_bf16(bias, n, 5);
  const float sv[2] = {0.3f, 0.02f};
  ck(cudaMemcpy(scales.p, sv, 8, cudaMemcpyHostToDevice), "scales");
  const double flops = 2.0 * m * n * k;
  Bf16Gemm base(m, n, k, bias.p);
  const double ms16 = time_ms([&](int i) { base.run(a16[i % kSets]->p, b16[i % kSets]->p, y.p); });
  report("cuBLAS bf16 " + shape + " (+bias, bf16 out)", ms16, flops / ms16 / 1e9, "TFLOP/s");
  const CudaAllocator alloc = default_cuda_allocator();
  // A scaled product of code operands (gemm_fp8_cuda or the INT8 engine's gemm_s8_cuda) into y.
  const auto time_scaled = [&](auto gemm, DType dtype, const std::vector<std::unique_ptr<Buf>>& as,
                               const std::vector<std::unique_ptr<Buf>>& bs) {
    return time_ms([&](int i) {
      gemm(make_matrix(as[i % kSets]->p, dtype, m, k), make_matrix(bs[i % kSets]->p, dtype, n, k),
           make_scalar(scales.as<float>(), DType::kFloat32),
           make_scalar(scales.as<float>() + 1, DType::kFloat32),
           make_vector(bias.p, DType::kBFloat16, n), make_matrix(y.p, DType::kBFloat16, m, n),
           alloc, nullptr);
    });
  };
  const double ms8 = time_scaled(gemm_fp8_cuda, DType::kFloat8E4M3, a8, b8);
  char note[64];
  std::snprintf(note, sizeof note, "%.2fx bf16", ms16 / ms8);
  report("FP8(INT4 codes) gemm_fp8_cuda " + shape, ms8, flops / ms8 / 1e9, "TFLOP/s", note);
  // The whole quantized forward (X and W quantized from bf16, product, NaN check).
  Buf codes(m * packed_row_bytes(k)), auxb(compact_aux_bytes(m, k));
  LinearConfig cfg;
  cfg.recipe = Recipe::kHqLss;
  cfg.hadamard_block = 256;
  const double msf = time_ms([&](int i) {
    linear_forward_cuda(cfg,
                        forward_args(a16[i % kSets]->p, b16[i % kSets]->p, bias, scales, y, codes,
                                     auxb, m, k, n),
                        alloc, nullptr);
  });
  std::snprintf(note, sizeof note, "%.2fx bf16 GEMM", ms16 / msf);
  report("linear_forward_cuda hq_lss g256 " + shape, msf, flops / msf / 1e9, "TFLOP/s", note);
  // The backward (hq_bs: the 8-bit gradient q = 16 hi + lo in one INT8 row per token, so each
  // product has the FLOPs of a bf16 backward's), beside 2x the bf16 product above (the bf16
  // backward's cost).
  Buf gy(m * n * 2), gx(m * k * 2), gw(n * k * 2), gbias(n * 2), gsteps(8);
  fill_random_bf16(gy, m * n, 7);
  cfg.recipe = Recipe::kHqBs;
  const double msb = time_ms(
      [&](int i) {
        const LinearForwardArgs f =
            forward_args(a16[i % kSets]->p, b16[i % kSets]->p, bias, scales, y, codes, auxb, m, k, n);
        linear_backward_cuda(cfg, backward_args(gy, f, gx, gw, gbias, gsteps, m, k, n), alloc,
                             nullptr);
      },
      3, 7);
  std::snprintf(note, sizeof note, "%.2fx (2x bf16 GEMM)", 2.0 * ms16 / msb);
  report("linear_backward_cuda hq_bs g256 " + shape, msb, 2.0 * flops / msb / 1e9, "TFLOP/s", note);
  std::snprintf(note, sizeof note, "%.2fx (3x bf16 GEMM)", 3.0 * ms16 / (msf + msb));
  report("layer fwd+bwd hq_bs g256 " + shape, msf + msb, 3.0 * flops / (msf + msb) / 1e9, "TFLOP/s",
         note);
  // hq_lss (the default recipe): hq_bs's products, the LSS selection on the device (scores, the
  // water-filling block, the weighted transposed operands). TFLOP/s as for the bf16 backward.
  std::vector<int64_t> kept_host(2);
  Buf kept(16);
  cfg.recipe = Recipe::kHqLss;
  const double msl = time_ms(
      [&](int i) {
        const LinearForwardArgs f =
            forward_args(a16[i % kSets]->p, b16[i % kSets]->p, bias, scales, y, codes, auxb, m, k, n);
        LinearBackwardArgs b = backward_args(gy, f, gx, gw, gbias, gsteps, m, k, n);
        b.rows_kept = make_vector(kept.p, DType::kInt64, 2);
        linear_backward_cuda(cfg, b, alloc, nullptr);
      },
      3, 7);
  ck(cudaMemcpy(kept_host.data(), kept.p, 16, cudaMemcpyDeviceToHost), "kept");
  std::snprintf(note, sizeof note, "%.2fx (2x bf16 GEMM); kept %lld, %lld of %lld rows",
                2.0 * ms16 / msl, static_cast<long long>(kept_host[0]),
                static_cast<long long>(kept_host[1]), static_cast<long long>(2 * m));
  report("linear_backward_cuda hq_lss g256 " + shape, msl, 2.0 * flops / msl / 1e9, "TFLOP/s",
         note);
  std::snprintf(note, sizeof note, "%.2fx (3x bf16 GEMM)", 3.0 * ms16 / (msf + msl));
  report("layer fwd+bwd hq_lss g256 " + shape, msf + msl, 3.0 * flops / (msf + msl) / 1e9,
         "TFLOP/s", note);
  // The INT8 engine (GemmEngine::kInt8, the products of devices without FP8: A100, RTX 30xx), timed
  // here on this device's INT8 tensor cores: the product with its scale-and-bias pass, the forward
  // and hq_lss's backward (hq_bs's backward is INT8 with either engine).
  {
    std::vector<std::unique_ptr<Buf>> as8, bs8;
    for (int s = 0; s < kSets; ++s) {
      as8.emplace_back(new Buf(m * k));
      fill_random_codes_s8(*as8.back(), m * k, 500 + s);
      bs8.emplace_back(new Buf(n * k));
      fill_random_codes_s8(*bs8.back(), n * k, 600 + s);
    }
    const double mss8 = time_scaled(gemm_s8_cuda, DType::kInt8, as8, bs8);
    std::snprintf(note, sizeof note, "%.2fx bf16", ms16 / mss8);
    report("INT8(INT4 codes) gemm_s8_cuda " + shape, mss8, flops / mss8 / 1e9, "TFLOP/s", note);
  }
  cfg.gemm = GemmEngine::kInt8;
  const double msf8 = time_ms([&](int i) {
    linear_forward_cuda(
        cfg,
        forward_args(a16[i % kSets]->p, b16[i % kSets]->p, bias, scales, y, codes, auxb, m, k, n),
        alloc, nullptr);
  });
  std::snprintf(note, sizeof note, "%.2fx bf16 GEMM", ms16 / msf8);
  report("linear_forward_cuda hq_lss g256 int8 " + shape, msf8, flops / msf8 / 1e9, "TFLOP/s",
         note);
  const double msl8 = time_ms(
      [&](int i) {
        const LinearForwardArgs f = forward_args(a16[i % kSets]->p, b16[i % kSets]->p, bias, scales,
                                                 y, codes, auxb, m, k, n);
        linear_backward_cuda(cfg, backward_args(gy, f, gx, gw, gbias, gsteps, m, k, n), alloc,
                             nullptr);
      },
      3, 7);
  std::snprintf(note, sizeof note, "%.2fx (2x bf16 GEMM)", 2.0 * ms16 / msl8);
  report("linear_backward_cuda hq_lss g256 int8 " + shape, msl8, 2.0 * flops / msl8 / 1e9,
         "TFLOP/s", note);
  std::snprintf(note, sizeof note, "%.2fx (3x bf16 GEMM)", 3.0 * ms16 / (msf8 + msb));
  report("layer fwd+bwd hq_bs g256 int8 " + shape, msf8 + msb, 3.0 * flops / (msf8 + msb) / 1e9,
         "TFLOP/s", note);
}

// --profile-step [TOKENS IN OUT [RECIPE]]: one forward and one backward (hq_lss, or RECIPE) of a
// layer shape (default the first, 8192x4096->4096) after one warm-up call each, nothing else, so
// that a profiler (ncu, nsys) sees every kernel of one step.
void profile_step(int64_t m, int64_t k, int64_t n, Recipe recipe) {
  Buf x(m * k * 2), w(n * k * 2), bias(n * 2), y(m * n * 2), scales(8);
  fill_random_bf16(x, m * k, 1);
  fill_random_bf16(w, n * k, 2);
  fill_random_bf16(bias, n, 3);
  const float sv[2] = {0.3f, 0.02f};
  ck(cudaMemcpy(scales.p, sv, 8, cudaMemcpyHostToDevice), "scales");
  Buf codes(m * packed_row_bytes(k)), auxb(compact_aux_bytes(m, k));
  Buf gy(m * n * 2), gx(m * k * 2), gw(n * k * 2), gbias(n * 2), gsteps(8);
  fill_random_bf16(gy, m * n, 4);
  const CudaAllocator alloc = default_cuda_allocator();
  LinearConfig cfg;
  cfg.hadamard_block = 256;
  for (int i = 0; i < 2; ++i) {
    const LinearForwardArgs f = forward_args(x.p, w.p, bias, scales, y, codes, auxb, m, k, n);
    cfg.recipe = recipe;
    linear_forward_cuda(cfg, f, alloc, nullptr);
    linear_backward_cuda(cfg, backward_args(gy, f, gx, gw, gbias, gsteps, m, k, n), alloc, nullptr);
    ck(cudaDeviceSynchronize(), "profile step");
  }
  std::printf("profile step %lldx%lld->%lld %s: done\n", static_cast<long long>(m),
              static_cast<long long>(k), static_cast<long long>(n), recipe_name(recipe));
}

}  // namespace

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "";
  if (arg == "--profile-step") {
    if (argc != 2 && argc != 5 && argc != 6) {
      std::fprintf(stderr, "usage: %s --profile-step [TOKENS IN OUT [RECIPE]]\n", argv[0]);
      return 2;
    }
    const auto dim = [&](int i, int64_t dflt) { return argc >= 5 ? std::atoll(argv[i]) : dflt; };
    profile_step(dim(2, 8192), dim(3, 4096), dim(4, 4096),
                 argc == 6 ? parse_recipe(argv[5]) : Recipe::kHqLss);
    return 0;
  }
  const bool quick = arg == "--quick";
  cudaDeviceProp prop;
  ck(cudaGetDeviceProperties(&prop, 0), "props");
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  bench_copy();
  bench_quant(8192, 4096);
  struct G {
    int64_t t, i, o;
  };
  for (G g : {G{8192, 4096, 4096}, G{8192, 4096, 16384}, G{8192, 16384, 4096}, G{16384, 1024, 4096},
              G{4096, 768, 3072}}) {
    bench_gemm(g.t, g.i, g.o);
    if (quick) break;
  }
  std::printf("\n==== summary (median per call) ====\n");
  for (const Row& r : g_rows) {
    std::printf("| %-58s | %9.4f ms | %9.1f %-7s | %s\n", r.what.c_str(), r.ms, r.rate,
                r.unit.c_str(), r.note.c_str());
  }
  return 0;
}
