// GPU tests of the products (cuda.h): INT4 codes converted to FP8 operands (plain and transposed)
// decode to the codes with zero padding; the FP8 exact int32 mode equals gemm_s32_ref bit for bit
// over odd shapes, adversarial rows (-8/7 alternating, all -8) and K up to 65536; the scaled
// product with bias and bf16/fp32 output equals the CPU's gemm_scaled; the INT8 product equals
// gemm_s32_ref over odd shapes, full-range values and K up to kMaxKInt8; and both products stay
// exact on data built to defeat an accumulator narrower than their exactness argument assumes.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "int4train/cuda.h"
#include "int4train/gemm.h"
#include "int4train/int4.h"
#include "int4train/lss.h"

namespace {

using namespace int4train;
using gputest::DevBuf;

enum class Fill { kRandom, kAlternating, kAllMin };

const char* fill_name(Fill f) {
  return f == Fill::kRandom ? "random" : (f == Fill::kAlternating ? "alt_m8_7" : "all_m8");
}

std::vector<int8_t> make_codes(int64_t rows, int64_t cols, Fill fill, uint64_t seed) {
  std::vector<int8_t> c(static_cast<size_t>(rows * cols));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dist(-8, 7);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      int v = 0;
      switch (fill) {
        case Fill::kRandom:
          v = dist(rng);
          break;
        case Fill::kAlternating:
          v = ((k + r) & 1) ? 7 : -8;
          break;
        case Fill::kAllMin:
          v = -8;
          break;
      }
      c[static_cast<size_t>(r * cols + k)] = static_cast<int8_t>(v);
    }
  }
  return c;
}

std::vector<uint8_t> pack(const std::vector<int8_t>& codes, int64_t rows, int64_t cols) {
  std::vector<uint8_t> p(static_cast<size_t>(std::max<int64_t>(1, rows * packed_row_bytes(cols))));
  pack_int4(make_matrix(const_cast<int8_t*>(codes.data()), DType::kInt8, rows, cols),
            make_matrix(p.data(), DType::kInt4Packed, rows, cols));
  return p;
}

// Device FP8 operand of the codes (rows x padded K), via the packed format and codes_to_fp8_cuda.
struct Operand {
  DevBuf buf;
  TensorView view;
};

// The FP8 operand of packed codes (s8: the INT8 operand of the INT8 engine).
Operand to_operand(const std::vector<uint8_t>& packed, int64_t rows, int64_t cols, bool transpose,
                   bool s8 = false) {
  DevBuf dp = gputest::upload(packed);
  const int64_t out_rows = transpose ? cols : rows, k = transpose ? rows : cols;
  const int64_t kp = fp8_padded_cols(k);
  Operand op{DevBuf(static_cast<size_t>(std::max<int64_t>(1, out_rows * kp))), {}};
  op.buf.poison();
  op.view = make_matrix(op.buf.get(), s8 ? DType::kInt8 : DType::kFloat8E4M3, out_rows, kp);
  const TensorView codes = make_matrix(dp.get(), DType::kInt4Packed, rows, cols);
  if (s8) {
    codes_to_s8_cuda(codes, TensorView{}, transpose, op.view, TensorView{}, nullptr);
  } else {
    codes_to_fp8_cuda(codes, transpose, op.view, nullptr);
  }
  cudaDeviceSynchronize();
  return op;
}

// ---- codes -> FP8 (or INT8, s8) operand: every byte decodes to the code (or to zero in the
// padding).
void test_to_fp8(int64_t rows, int64_t cols, bool transpose, bool s8 = false) {
  const auto codes = make_codes(rows, cols, Fill::kRandom, 7 + rows * 31 + cols);
  Operand op = to_operand(pack(codes, rows, cols), rows, cols, transpose, s8);
  const int64_t out_rows = op.view.shape[0], kp = op.view.shape[1];
  const auto bytes = gputest::download<uint8_t>(op.buf, static_cast<size_t>(out_rows * kp));
  int64_t bad = 0;
  for (int64_t r = 0; r < out_rows; ++r) {
    for (int64_t c = 0; c < kp; ++c) {
      const int64_t k_len = transpose ? rows : cols;
      float want = 0.0f;
      if (c < k_len) {
        want = transpose ? codes[static_cast<size_t>(c * cols + r)]
                         : codes[static_cast<size_t>(r * cols + c)];
      }
      const uint8_t byte = bytes[static_cast<size_t>(r * kp + c)];
      const float got =
          s8 ? static_cast<float>(static_cast<int8_t>(byte)) : gputest::decode_e4m3(byte);
      if (!(got == want)) ++bad;
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << (s8 ? " INT8" : " FP8") << " operand bytes differ");
}

// INT8 operands from int8 values (codes_to_s8_cuda with kInt8 codes: hq_bs's q = 16 hi + lo and its
// transpose): every byte, the zero padding included. ld: the source's row stride (a multiple of 16
// with 16-byte rows takes the tiled transpose, anything else the generic one).
void test_s8_copy(int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  std::mt19937_64 rng(17 + rows * 131 + cols);
  std::vector<int8_t> v(static_cast<size_t>(std::max<int64_t>(1, rows * ld)));
  for (auto& x : v) x = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
  const DevBuf dv = gputest::upload(v);
  TensorView src = make_matrix(dv.get(), DType::kInt8, rows, cols);
  src.strides[0] = ld;
  const int64_t out_rows = transpose ? cols : rows, k = transpose ? rows : cols;
  const int64_t kp = fp8_padded_cols(k);
  DevBuf dout(static_cast<size_t>(std::max<int64_t>(1, out_rows * kp)));
  dout.poison();
  codes_to_s8_cuda(src, TensorView{}, transpose,
                   make_matrix(dout.get(), DType::kInt8, out_rows, kp), TensorView{}, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<int8_t>(dout, static_cast<size_t>(out_rows * kp));
  int64_t bad = 0;
  for (int64_t r = 0; r < out_rows; ++r) {
    for (int64_t c = 0; c < kp; ++c) {
      int want = 0;
      if (c < k) {
        want = transpose ? v[static_cast<size_t>(c * ld + r)] : v[static_cast<size_t>(r * ld + c)];
      }
      bad += got[static_cast<size_t>(r * kp + c)] != want;
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " INT8 operand bytes differ");
}

// ---- exact integer products
void test_exact(int64_t m, int64_t n, int64_t k, Fill fill) {
  const auto ca = make_codes(m, k, fill, 1000 + m * 7 + k);
  const auto cb =
      make_codes(n, k, fill == Fill::kAlternating ? Fill::kAlternating : fill, 2000 + n * 13 + k);
  const auto pa = pack(ca, m, k), pb = pack(cb, n, k);
  std::vector<int32_t> want(static_cast<size_t>(m * n));
  gemm_s32_ref(make_matrix(const_cast<uint8_t*>(pa.data()), DType::kInt4Packed, m, k),
               make_matrix(const_cast<uint8_t*>(pb.data()), DType::kInt4Packed, n, k),
               make_matrix(want.data(), DType::kInt32, m, n));
  Operand a = to_operand(pa, m, k, false), b = to_operand(pb, n, k, false);
  // Output with a row stride past N, poisoned, so that the stride and every element are checked.
  const int64_t ldc = n + 3;
  DevBuf dc(static_cast<size_t>(std::max<int64_t>(1, m * ldc)) * 4);
  dc.poison();
  TensorView c = make_matrix(dc.get(), DType::kInt32, m, n);
  c.strides[0] = ldc;
  const CudaAllocator alloc = default_cuda_allocator();
  gemm_fp8_s32_cuda(a.view, b.view, c, alloc, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<int32_t>(dc, static_cast<size_t>(m * ldc));
  int64_t bad = 0, max_abs = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int32_t w = want[static_cast<size_t>(i * n + j)];
      max_abs = std::max<int64_t>(max_abs, std::abs(static_cast<int64_t>(w)));
      if (got[static_cast<size_t>(i * ldc + j)] != w) {
        if (bad == 0) {
          gputest::fail(__FILE__, __LINE__,
                        "first mismatch at (" + std::to_string(i) + "," + std::to_string(j) +
                            "): got " + std::to_string(got[static_cast<size_t>(i * ldc + j)]) +
                            " want " + std::to_string(w));
        }
        ++bad;
      }
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " of " << m * n << " differ (max |ref| " << max_abs << ")");
}

// Every (i, j) of an m x n result: got(i, j) == want(i, j) (integers), else the count and the
// first.
template <typename Want, typename Got>
void expect_equal(int64_t m, int64_t n, Want want, Got got) {
  int64_t bad = 0;
  std::string first;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t w = want(i, j), g = got(i, j);
      if (g != w && bad++ == 0) {
        first = "(" + std::to_string(i) + "," + std::to_string(j) + "): got " + std::to_string(g) +
                " want " + std::to_string(w);
      }
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " of " << m * n << " differ, first " << first);
}

// ---- INT8 products: full-range int8 operands (rows x padded K, row stride a multiple of 16)
// against gemm_s32_ref; the output with a row stride past N (the copy-out path) or contiguous
// (direct).
enum class Fill8 { kRandom, kAllMin, kAlternating };

const char* fill8_name(Fill8 f) {
  return f == Fill8::kRandom ? "random" : (f == Fill8::kAllMin ? "all_m128" : "alt_m128_127");
}

std::vector<int8_t> make_s8(int64_t rows, int64_t cols, int64_t ld, Fill8 fill, uint64_t seed) {
  std::vector<int8_t> v(static_cast<size_t>(std::max<int64_t>(1, rows * ld)), 0);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> dist(-128, 127);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < cols; ++k) {
      int x = -128;
      if (fill == Fill8::kRandom) x = dist(rng);
      if (fill == Fill8::kAlternating) x = ((k + r) & 1) ? 127 : -128;
      v[static_cast<size_t>(r * ld + k)] = static_cast<int8_t>(x);
    }
  }
  return v;
}

void test_s8(int64_t m, int64_t n, int64_t k, Fill8 fill, bool strided_out) {
  const int64_t kp = fp8_padded_cols(k);
  const auto va = make_s8(m, k, kp, fill, 3000 + m * 7 + k), vb = make_s8(n, k, kp, fill, 4000 + n);
  std::vector<int32_t> want(static_cast<size_t>(std::max<int64_t>(1, m * n)));
  gemm_s32_ref(make_matrix(const_cast<int8_t*>(va.data()), DType::kInt8, m, kp),
               make_matrix(const_cast<int8_t*>(vb.data()), DType::kInt8, n, kp),
               make_matrix(want.data(), DType::kInt32, m, n));
  DevBuf da = gputest::upload(va), db = gputest::upload(vb);
  const int64_t ldc = strided_out ? n + 3 : n;
  DevBuf dc(static_cast<size_t>(std::max<int64_t>(1, m * ldc)) * 4);
  dc.poison();
  TensorView c = make_matrix(dc.get(), DType::kInt32, m, n);
  c.strides[0] = ldc;
  gemm_s8_s32_cuda(make_matrix(da.get(), DType::kInt8, m, kp),
                   make_matrix(db.get(), DType::kInt8, n, kp), c, default_cuda_allocator(),
                   nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<int32_t>(dc, static_cast<size_t>(m * ldc));
  expect_equal(
      m, n, [&](int64_t i, int64_t j) { return want[static_cast<size_t>(i * n + j)]; },
      [&](int64_t i, int64_t j) { return got[static_cast<size_t>(i * ldc + j)]; });
}

// ---- exactness on data built to defeat a narrow accumulator. Tokens (the reduction dimension, the
// code rows of the transposed operands, as in the weight gradient) whose products are large beside
// tokens whose products are 1: in halves (large first, small first), interleaved, and in blocks of
// 256 tokens (192 large, then 64 small). FP8 path: INT4 codes (large products 64 = -8 * -8) through
// codes_to_fp8_cuda and the FP8 product at K = kMaxKFp8Int4. INT8 path: the weight gradient's codes
// times the importance weight 16 (large products 1024) through codes_to_s8_cuda and the INT8
// product at K = kMaxKInt8 (rounded down to 16). Hopper's FP8 accumulator keeps about 14 bits
// between promotions to fp32 (cuda.h): the large products of the INT8 case lose the 1s there
// (measured), random data never shows it. Row i of a follows pattern i % 2, row j of b pattern j %
// 16, so the exact sums are computed once per pattern pair.
enum class Order { kLargeFirst, kSmallFirst, kInterleaved, kBlocks };

const char* order_name(Order o) {
  switch (o) {
    case Order::kLargeFirst:
      return "large_first";
    case Order::kSmallFirst:
      return "small_first";
    case Order::kInterleaved:
      return "interleaved";
    case Order::kBlocks:
      return "blocks_192_64";
  }
  return "";
}

bool large_token(Order o, int64_t t, int64_t k) {
  switch (o) {
    case Order::kLargeFirst:
      return t < k / 2;
    case Order::kSmallFirst:
      return t >= k / 2;
    case Order::kInterleaved:
      return t % 2 == 0;
    case Order::kBlocks:
      return t % 256 < 192;
  }
  return false;
}

// k = 0: the path's bound (kMaxKFp8Int4, kMaxKInt8 rounded down to 16). fp32_out (FP8 only): the
// product through gemm_fp8_cuda into fp32, as the layer's backward runs it, instead of the int32
// mode.
void test_adversarial(bool weighted, Order order, int64_t m, int64_t n, int64_t k = 0,
                      bool fp32_out = false) {
  constexpr int kPa = 2, kPb = 16;
  if (k == 0) k = weighted ? kMaxKInt8 / kFp8Align * kFp8Align : kMaxKFp8Int4;
  // Codes as (tokens x patterns), the layout of the weight gradient's code rows.
  std::vector<int8_t> a(static_cast<size_t>(k * kPa)), b(static_cast<size_t>(k * kPb));
  std::vector<int8_t> exps(static_cast<size_t>(k));
  for (int64_t t = 0; t < k; ++t) {
    const bool large = large_token(order, t, k);
    exps[static_cast<size_t>(t)] = static_cast<int8_t>(large ? kLssMaxExponent : 0);
    for (int64_t i = 0; i < kPa; ++i) {
      a[static_cast<size_t>(t * kPa + i)] = static_cast<int8_t>(large ? (i == 0 ? -8 : 7) : 1);
    }
    for (int64_t j = 0; j < kPb; ++j) {
      // column 0: -8 (products 64 / -56, x16 weighted), column 1: 1, the rest alternate with t.
      const int v = j == 0 ? -8 : (j == 1 ? 1 : ((t + j) % 2 == 0 ? 7 : -8));
      b[static_cast<size_t>(t * kPb + j)] = static_cast<int8_t>(large ? v : (j % 3 == 0 ? 1 : -1));
    }
  }
  std::vector<int64_t> want(kPa * kPb, 0);
  for (int64_t t = 0; t < k; ++t) {
    const int64_t w = weighted ? int64_t{1} << exps[static_cast<size_t>(t)] : 1;
    for (int i = 0; i < kPa; ++i) {
      for (int j = 0; j < kPb; ++j) {
        want[i * kPb + j] +=
            w * a[static_cast<size_t>(t * kPa + i)] * b[static_cast<size_t>(t * kPb + j)];
      }
    }
  }
  // The (tokens x m) and (tokens x n) code matrices: column i holds pattern i % 2 (j % 16).
  std::vector<int8_t> am(static_cast<size_t>(k * m)), bm(static_cast<size_t>(k * n));
  for (int64_t t = 0; t < k; ++t) {
    for (int64_t i = 0; i < m; ++i)
      am[static_cast<size_t>(t * m + i)] = a[static_cast<size_t>(t * kPa + i % kPa)];
    for (int64_t j = 0; j < n; ++j)
      bm[static_cast<size_t>(t * n + j)] = b[static_cast<size_t>(t * kPb + j % kPb)];
  }
  DevBuf pa = gputest::upload(pack(am, k, m)), pb = gputest::upload(pack(bm, k, n)),
         de = gputest::upload(exps);
  const int64_t kp = fp8_padded_cols(k);
  const DType op = weighted ? DType::kInt8 : DType::kFloat8E4M3;
  DevBuf oa(static_cast<size_t>(m * kp)), ob(static_cast<size_t>(n * kp)),
      out(static_cast<size_t>(m * n) * 4);
  out.poison();
  const TensorView va = make_matrix(oa.get(), op, m, kp), vb = make_matrix(ob.get(), op, n, kp);
  const TensorView codes_a = make_matrix(pa.get(), DType::kInt4Packed, k, m);
  const TensorView codes_b = make_matrix(pb.get(), DType::kInt4Packed, k, n);
  const TensorView c = make_matrix(out.get(), DType::kInt32, m, n);
  const CudaAllocator alloc = default_cuda_allocator();
  if (weighted) {
    codes_to_s8_cuda(codes_a, make_vector(de.get(), DType::kInt8, k), true, va, TensorView{},
                     nullptr);
    codes_to_s8_cuda(codes_b, TensorView{}, true, vb, TensorView{}, nullptr);
    gemm_s8_s32_cuda(va, vb, c, alloc, nullptr);
  } else {
    codes_to_fp8_cuda(codes_a, true, va, nullptr);
    codes_to_fp8_cuda(codes_b, true, vb, nullptr);
    if (fp32_out) {
      gemm_fp8_cuda(va, vb, TensorView{}, TensorView{}, TensorView{},
                    make_matrix(out.get(), DType::kFloat32, m, n), alloc, nullptr);
    } else {
      gemm_fp8_s32_cuda(va, vb, c, alloc, nullptr);
    }
  }
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<int32_t> got(static_cast<size_t>(m * n));
  if (fp32_out) {  // integers below 2^24: exact in fp32
    const auto f = gputest::download<float>(out, static_cast<size_t>(m * n));
    for (size_t i = 0; i < f.size(); ++i) got[i] = static_cast<int32_t>(f[i]);
  } else {
    got = gputest::download<int32_t>(out, static_cast<size_t>(m * n));
  }
  expect_equal(
      m, n, [&](int64_t i, int64_t j) { return want[(i % kPa) * kPb + j % kPb]; },
      [&](int64_t i, int64_t j) { return got[static_cast<size_t>(i * n + j)]; });
}

// ---- scaled products: out = (sa * sb) * acc + bias, as gemm_scaled with alpha = sa * sb.
enum class BiasKind { kNone, kF32, kBf16, kBf16Unaligned };

const char* bias_name(BiasKind b) {
  switch (b) {
    case BiasKind::kNone:
      return "nobias";
    case BiasKind::kF32:
      return "bias_f32";
    case BiasKind::kBf16:
      return "bias_bf16";
    default:
      return "bias_bf16_unaligned";
  }
}

// gemm_fp8_cuda (s8: gemm_s8_cuda, the INT8 engine's) against the CPU's gemm_scaled.
void test_scaled(int64_t m, int64_t n, int64_t k, bool out_bf16, BiasKind bias_kind, bool one_scale,
                 bool s8) {
  const auto ca = make_codes(m, k, Fill::kRandom, 300 + m + k),
             cb = make_codes(n, k, Fill::kRandom, 400 + n + k);
  const auto pa = pack(ca, m, k), pb = pack(cb, n, k);
  std::mt19937_64 rng(m * 1000 + n);
  std::uniform_real_distribution<float> sdist(0.001f, 0.1f), bdist(-3.0f, 3.0f);
  const float sa = sdist(rng), sb = sdist(rng);
  std::vector<float> bias_f(static_cast<size_t>(n));
  for (auto& v : bias_f) v = bdist(rng);
  std::vector<uint16_t> bias_h = gputest::to_bf16(bias_f);
  // The CPU reference: gemm_scaled with alpha = sa * sb (one fp32 rounding).
  Epilogue ep;
  ep.alpha = sa * sb;
  if (bias_kind == BiasKind::kF32) ep.bias = make_vector(bias_f.data(), DType::kFloat32, n);
  if (bias_kind == BiasKind::kBf16 || bias_kind == BiasKind::kBf16Unaligned) {
    ep.bias = make_vector(bias_h.data(), DType::kBFloat16, n);
  }
  const DType odt = out_bf16 ? DType::kBFloat16 : DType::kFloat32;
  const size_t esz = out_bf16 ? 2 : 4;
  std::vector<uint8_t> want(static_cast<size_t>(m * n) * esz);
  gemm_scaled(make_matrix(const_cast<uint8_t*>(pa.data()), DType::kInt4Packed, m, k),
              make_matrix(const_cast<uint8_t*>(pb.data()), DType::kInt4Packed, n, k), ep,
              make_matrix(want.data(), odt, m, n));

  Operand a = to_operand(pa, m, k, false, s8), b = to_operand(pb, n, k, false, s8);
  const float prod = sa * sb;
  std::vector<float> scales =
      one_scale ? std::vector<float>{prod, 1.0f} : std::vector<float>{sa, sb};
  DevBuf ds = gputest::upload(scales);
  DevBuf dbias(static_cast<size_t>(n + 8) * 4);
  TensorView bias_view;
  if (bias_kind == BiasKind::kF32) {
    cudaMemcpy(dbias.get(), bias_f.data(), static_cast<size_t>(n) * 4, cudaMemcpyHostToDevice);
    bias_view = make_vector(dbias.get(), DType::kFloat32, n);
  } else if (bias_kind != BiasKind::kNone) {
    // The unaligned variant starts 2 bytes in, which forces the separate epilogue pass.
    char* p = static_cast<char*>(dbias.get()) + (bias_kind == BiasKind::kBf16Unaligned ? 2 : 0);
    cudaMemcpy(p, bias_h.data(), static_cast<size_t>(n) * 2, cudaMemcpyHostToDevice);
    bias_view = make_vector(p, DType::kBFloat16, n);
  }
  DevBuf dout(static_cast<size_t>(m * n) * esz);
  dout.poison();
  const CudaAllocator alloc = default_cuda_allocator();
  const TensorView sa_v = make_scalar(ds.as<float>(), DType::kFloat32);
  const TensorView sb_v =
      one_scale ? TensorView{} : make_scalar(ds.as<float>() + 1, DType::kFloat32);
  (s8 ? gemm_s8_cuda : gemm_fp8_cuda)(a.view, b.view, sa_v, sb_v, bias_view,
                                      make_matrix(dout.get(), odt, m, n), alloc, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<uint8_t>(dout, want.size());
  int64_t exact = 0, max_ulp = 0;
  for (int64_t e = 0; e < m * n; ++e) {
    float g, w;
    if (out_bf16) {
      uint16_t gb, wb;
      std::memcpy(&gb, &got[static_cast<size_t>(e) * 2], 2);
      std::memcpy(&wb, &want[static_cast<size_t>(e) * 2], 2);
      g = bf16_to_float(BFloat16{gb});
      w = bf16_to_float(BFloat16{wb});
      if (gb == wb) ++exact;
      max_ulp = std::max<int64_t>(max_ulp, gputest::ulp_distance(g, w) >> 16);
    } else {
      std::memcpy(&g, &got[static_cast<size_t>(e) * 4], 4);
      std::memcpy(&w, &want[static_cast<size_t>(e) * 4], 4);
      if (gputest::bits_of(g) == gputest::bits_of(w)) ++exact;
      max_ulp = std::max<int64_t>(max_ulp, gputest::ulp_distance(g, w));
    }
  }
  std::printf("    scaled%s M=%lld N=%lld K=%lld %s %s %s: %lld/%lld bit-exact, max %lld ulp\n",
              s8 ? " s8" : "", static_cast<long long>(m), static_cast<long long>(n),
              static_cast<long long>(k), out_bf16 ? "bf16" : "fp32", bias_name(bias_kind),
              one_scale ? "1scale" : "2scales", static_cast<long long>(exact),
              static_cast<long long>(m * n), static_cast<long long>(max_ulp));
  GPU_CHECK_MSG(exact == m * n, "scaled product differs from gemm_scaled: "
                                    << m * n - exact << " elements, max " << max_ulp << " ulp");
}

void test_arg_errors() {
  const CudaAllocator alloc = default_cuda_allocator();
  DevBuf buf(4096);
  TensorView a = make_matrix(buf.get(), DType::kFloat8E4M3, 4, 24);  // width not a multiple of 16
  TensorView b = make_matrix(buf.get(), DType::kFloat8E4M3, 4, 32);
  TensorView c = make_matrix(buf.get(), DType::kInt32, 4, 4);
  bool threw = false;
  try {
    gemm_fp8_s32_cuda(a, b, c, alloc, nullptr);
  } catch (const Error& e) {
    threw = std::string(e.what()).find("a:") == 0;
  }
  GPU_CHECK_MSG(threw, "a misaligned operand width must be an Error naming a");
  threw = false;
  try {
    gemm_fp8_s32_cuda(b, make_matrix(buf.get(), DType::kFloat8E4M3, 4, 48), c, alloc, nullptr);
  } catch (const Error& e) {
    threw = std::string(e.what()).find("b:") == 0;
  }
  GPU_CHECK_MSG(threw, "mismatched K must be an Error naming b");
  threw = false;
  try {  // an FP8 operand handed to the INT8 product
    gemm_s8_s32_cuda(b, make_matrix(buf.get(), DType::kInt8, 4, 32), c, alloc, nullptr);
  } catch (const Error& e) {
    threw = std::string(e.what()).find("a:") == 0;
  }
  GPU_CHECK_MSG(threw, "an FP8 operand given to gemm_s8_s32_cuda must be an Error naming a");
  threw = false;
  try {  // K past kMaxKInt8
    const int64_t kbig = fp8_padded_cols(kMaxKInt8 + 1);
    gemm_s8_s32_cuda(make_matrix(buf.get(), DType::kInt8, 0, kbig),
                     make_matrix(buf.get(), DType::kInt8, 0, kbig), c, alloc, nullptr);
  } catch (const Error& e) {
    threw = std::string(e.what()).find("a: padded K") == 0;
  }
  GPU_CHECK_MSG(threw, "K beyond kMaxKInt8 must be an Error naming a");
  threw = false;
  try {  // one exponent short
    codes_to_s8_cuda(make_matrix(buf.get(), DType::kInt4Packed, 8, 32),
                     make_vector(buf.get(), DType::kInt8, 7), false,
                     make_matrix(buf.get(), DType::kInt8, 8, 32), TensorView{}, nullptr);
  } catch (const Error& e) {
    threw = std::string(e.what()).find("row_exponents:") == 0;
  }
  GPU_CHECK_MSG(threw, "a short exponent vector must be an Error naming row_exponents");
  threw = false;
  try {  // int8 codes are copied as they are: exponents would overflow them
    codes_to_s8_cuda(make_matrix(buf.get(), DType::kInt8, 8, 32),
                     make_vector(buf.get(), DType::kInt8, 8), false,
                     make_matrix(buf.get(), DType::kInt8, 8, 32), TensorView{}, nullptr);
  } catch (const Error& e) {
    threw = std::string(e.what()).find("row_exponents:") == 0;
  }
  GPU_CHECK_MSG(threw, "exponents with int8 codes must be an Error naming row_exponents");
}

const bool registered = [] {
  using gputest::add_case;
  struct S {
    int64_t m, n, k;
  };
  for (bool t : {false, true}) {
    for (S s : {S{1, 1, 1}, S{5, 3, 17}, S{37, 1, 100}, S{64, 48, 256}, S{129, 77, 33},
                S{45, 1, 264}, S{300, 1, 520}}) {
      add_case("fp8_operand/" + std::string(t ? "transposed/" : "plain/") + std::to_string(s.m) +
                   "x" + std::to_string(s.k),
               false, [=] { test_to_fp8(s.m, s.k, t); });
    }
  }
  // Packed codes to the INT8 operand, transposed (hq_bs's X^T): rows of a multiple of 64 codes
  // take the register-transposing kernel (partial position tiles, padding, several column tiles),
  // the others the generic tiles.
  for (S s : {S{1, 1, 64}, S{5, 1, 128}, S{129, 1, 256}, S{300, 1, 4096}, S{4100, 1, 320},
              S{1000, 1, 64}, S{128, 1, 192}, S{37, 1, 100}, S{64, 1, 48}}) {
    add_case("s8_codes_operand/transposed/" + std::to_string(s.m) + "x" + std::to_string(s.k),
             false, [=] { test_to_fp8(s.m, s.k, true, true); });
  }
  struct C {
    int64_t rows, cols, ld;
  };
  for (bool t : {false, true}) {
    for (C c : {C{1, 1, 16}, C{5, 3, 7}, C{64, 48, 48}, C{129, 80, 96}, C{300, 4096, 4096},
                C{37, 100, 112}}) {
      add_case("s8_operand/" + std::string(t ? "transposed/" : "plain/") + std::to_string(c.rows) +
                   "x" + std::to_string(c.cols) + "/ld" + std::to_string(c.ld),
               false, [=] { test_s8_copy(c.rows, c.cols, c.ld, t); });
    }
  }
  struct E {
    int64_t m, n, k;
    Fill f;
    bool big;
  };
  for (E e : {E{1, 1, 1, Fill::kRandom, false}, E{5, 17, 33, Fill::kRandom, false},
              E{3, 7, 15, Fill::kRandom, false}, E{64, 64, 64, Fill::kRandom, false},
              E{257, 129, 1000, Fill::kRandom, false}, E{128, 256, 4096, Fill::kRandom, true},
              E{1000, 1000, 768, Fill::kRandom, true}, E{16, 16, 65536, Fill::kAlternating, true},
              E{16, 16, 65536, Fill::kAllMin, true}, E{8, 24, 65536, Fill::kRandom, true},
              E{33, 40, 65521, Fill::kAlternating, true}, E{64, 64, 4096, Fill::kAllMin, false},
              E{256, 256, 16384, Fill::kAlternating, true}}) {
    add_case("gemm_exact/" + std::to_string(e.m) + "x" + std::to_string(e.n) + "x" +
                 std::to_string(e.k) + "/" + fill_name(e.f),
             e.big, [=] { test_exact(e.m, e.n, e.k, e.f); });
  }
  for (bool bf16 : {false, true}) {
    for (BiasKind bk :
         {BiasKind::kNone, BiasKind::kF32, BiasKind::kBf16, BiasKind::kBf16Unaligned}) {
      for (bool one : {false, true}) {
        for (S s : {S{5, 17, 33}, S{256, 128, 1024}}) {
          add_case("gemm_scaled/" + std::to_string(s.m) + "x" + std::to_string(s.n) + "x" +
                       std::to_string(s.k) + "/" + (bf16 ? "bf16/" : "fp32/") + bias_name(bk) +
                       (one ? "/1scale" : "/2scales"),
                   false, [=] { test_scaled(s.m, s.n, s.k, bf16, bk, one, false); });
        }
      }
      // The INT8 engine's product (int32, then the scale-and-bias pass): odd N (the padded b and
      // the one-element pass), N a multiple of 16 (cuBLASLt writes the temporary directly, the
      // four-column pass).
      for (S s : {S{5, 17, 33}, S{256, 128, 1024}, S{64, 48, 200}}) {
        add_case("gemm_scaled_s8/" + std::to_string(s.m) + "x" + std::to_string(s.n) + "x" +
                     std::to_string(s.k) + "/" + (bf16 ? "bf16/" : "fp32/") + bias_name(bk),
                 false, [=] { test_scaled(s.m, s.n, s.k, bf16, bk, false, true); });
      }
    }
  }
  // An int32 product wider than gemm_s8_cuda's 256 MiB of scratch: two blocks of rows (2,048 and
  // 52), each with its own product and pass.
  add_case("gemm_scaled_s8/2100x32768x64/bf16/bias_bf16/row_blocks", true,
           [] { test_scaled(2100, 32768, 64, true, BiasKind::kBf16, false, true); });
  struct E8 {
    int64_t m, n, k;
    Fill8 f;
    bool strided, big;
  };
  for (E8 e :
       {E8{1, 1, 1, Fill8::kRandom, true, false}, E8{1, 16, 32, Fill8::kRandom, false, false},
        E8{5, 17, 33, Fill8::kRandom, true, false}, E8{3, 7, 15, Fill8::kAllMin, false, false},
        E8{64, 64, 64, Fill8::kRandom, false, false},
        E8{257, 129, 1000, Fill8::kRandom, true, false},
        E8{128, 256, 4096, Fill8::kRandom, false, true},
        E8{64, 48, 4096, Fill8::kAlternating, false, false},
        E8{16, 16, kMaxKInt8 / 16 * 16, Fill8::kAllMin, false, true},
        E8{8, 24, kMaxKInt8 / 16 * 16, Fill8::kRandom, true, true},
        E8{256, 256, 16384, Fill8::kAlternating, false, true}}) {
    add_case("gemm_s8/" + std::to_string(e.m) + "x" + std::to_string(e.n) + "x" +
                 std::to_string(e.k) + "/" + fill8_name(e.f) +
                 (e.strided ? "/ldc_n_plus_3" : "/ldc_n"),
             e.big, [=] { test_s8(e.m, e.n, e.k, e.f, e.strided); });
  }
  for (bool weighted : {false, true}) {
    for (Order o : {Order::kLargeFirst, Order::kSmallFirst, Order::kInterleaved, Order::kBlocks}) {
      for (int64_t mn : {int64_t{16}, int64_t{128}}) {
        add_case(std::string(weighted ? "s8_weighted_exact/" : "fp8_int4_exact/") + order_name(o) +
                     "/" + std::to_string(mn == 16 ? 2 : mn) + "x" + std::to_string(mn),
                 true, [=] { test_adversarial(weighted, o, mn == 16 ? 2 : mn, mn); });
      }
    }
  }
  // Layer-sized outputs, where cuBLASLt picks its large-tile kernels: FP8 as the backward runs it
  // (fp32 out), and the INT8 path.
  for (Order o : {Order::kInterleaved, Order::kBlocks}) {
    add_case(std::string("fp8_int4_exact/") + order_name(o) + "/4096x4096/k16384/fp32_out", true,
             [=] { test_adversarial(false, o, 4096, 4096, 16384, true); });
    add_case(std::string("s8_weighted_exact/") + order_name(o) + "/4096x4096/k16384", true,
             [=] { test_adversarial(true, o, 4096, 4096, 16384); });
  }
  add_case("gemm_errors/arguments", false, test_arg_errors);
  return true;
}();

}  // namespace
