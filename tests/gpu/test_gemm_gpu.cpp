// GPU tests of the FP8 products (cuda.h): INT4 codes converted to FP8 operands (plain and
// transposed) decode to the codes with zero padding; the exact int32 mode equals gemm_s32_ref bit
// for bit over odd shapes, adversarial rows (-8/7 alternating, all -8) and K up to 65536; the
// scaled product with bias and bf16/fp32 output equals the CPU's gemm_scaled.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "int4train/cuda.h"
#include "int4train/gemm.h"
#include "int4train/int4.h"

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

Operand to_operand(const std::vector<uint8_t>& packed, int64_t rows, int64_t cols, bool transpose) {
  DevBuf dp = gputest::upload(packed);
  const int64_t out_rows = transpose ? cols : rows, k = transpose ? rows : cols;
  const int64_t kp = fp8_padded_cols(k);
  Operand op{DevBuf(static_cast<size_t>(std::max<int64_t>(1, out_rows * kp))), {}};
  op.buf.poison();
  op.view = make_matrix(op.buf.get(), DType::kFloat8E4M3, out_rows, kp);
  codes_to_fp8_cuda(make_matrix(dp.get(), DType::kInt4Packed, rows, cols), transpose, op.view,
                    nullptr);
  cudaDeviceSynchronize();
  return op;
}

// ---- codes -> FP8 operand: every byte decodes to the code (or to zero in the padding).
void test_to_fp8(int64_t rows, int64_t cols, bool transpose) {
  const auto codes = make_codes(rows, cols, Fill::kRandom, 7 + rows * 31 + cols);
  Operand op = to_operand(pack(codes, rows, cols), rows, cols, transpose);
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
      const float got = gputest::decode_e4m3(bytes[static_cast<size_t>(r * kp + c)]);
      if (!(got == want)) ++bad;
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " operand bytes differ");
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

void test_scaled(int64_t m, int64_t n, int64_t k, bool out_bf16, BiasKind bias_kind,
                 bool one_scale) {
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

  Operand a = to_operand(pa, m, k, false), b = to_operand(pb, n, k, false);
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
  gemm_fp8_cuda(a.view, b.view, sa_v, sb_v, bias_view, make_matrix(dout.get(), odt, m, n), alloc,
                nullptr);
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
  std::printf("    scaled M=%lld N=%lld K=%lld %s %s %s: %lld/%lld bit-exact, max %lld ulp\n",
              static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
              out_bf16 ? "bf16" : "fp32", bias_name(bias_kind), one_scale ? "1scale" : "2scales",
              static_cast<long long>(exact), static_cast<long long>(m * n),
              static_cast<long long>(max_ulp));
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
}

const bool registered = [] {
  using gputest::add_case;
  struct S {
    int64_t m, n, k;
  };
  for (bool t : {false, true}) {
    for (S s : {S{1, 1, 1}, S{5, 3, 17}, S{37, 1, 100}, S{64, 48, 256}, S{129, 77, 33}}) {
      add_case("fp8_operand/" + std::string(t ? "transposed/" : "plain/") + std::to_string(s.m) +
                   "x" + std::to_string(s.k),
               false, [=] { test_to_fp8(s.m, s.k, t); });
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
                   false, [=] { test_scaled(s.m, s.n, s.k, bf16, bk, one); });
        }
      }
    }
  }
  add_case("gemm_errors/arguments", false, test_arg_errors);
  return true;
}();

}  // namespace
