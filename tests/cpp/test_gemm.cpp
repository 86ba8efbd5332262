// Tests of the CPU matrix products (gemm.h): every integer kernel this CPU can run equals the
// scalar reference bit for bit over a shape sweep, extreme values and strided views; results do not
// depend on threading; the scaled epilogue and the fp32 GEMM against fp64 references; transposes;
// argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "../../src/cpu/gemm_kernels.h"
#include "int4train/gemm.h"
#include "int4train/int4.h"
#include "int4train/numeric.h"

namespace int4train {
namespace {

using detail::GemmIsa;

// ------------------------------------------------------------------------------------- operands

// An integer GEMM operand: its logical codes (rows x cols, contiguous) and the storage a view sees
// (int8 with row stride `stride`, the gap filled with junk; or packed INT4, written here with
// pack_int4_pair so that the tests do not depend on pack_int4).
struct IntMatrix {
  DType dtype = DType::kInt8;
  int64_t rows = 0, cols = 0, stride = 0;
  std::vector<int8_t> codes;
  std::vector<uint8_t> bytes;

  int code(int64_t r, int64_t c) const { return codes[static_cast<size_t>(r * cols + c)]; }
  TensorView view() const {
    TensorView v = make_matrix(const_cast<uint8_t*>(bytes.data()), dtype, rows, cols);
    if (dtype == DType::kInt8) v.strides[0] = stride;
    return v;
  }
};

IntMatrix make_int(DType dtype, int64_t rows, int64_t cols, std::vector<int8_t> codes,
                   int64_t stride = -1) {
  IntMatrix m;
  m.dtype = dtype;
  m.rows = rows;
  m.cols = cols;
  m.codes = std::move(codes);
  if (dtype == DType::kInt8) {
    m.stride = stride < 0 ? cols : stride;
    m.bytes.assign(static_cast<size_t>(std::max<int64_t>(1, rows * m.stride)), 0xA5);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        m.bytes[static_cast<size_t>(r * m.stride + c)] = static_cast<uint8_t>(m.code(r, c));
  } else {
    const int64_t rb = packed_row_bytes(cols);
    m.stride = cols;
    m.bytes.assign(static_cast<size_t>(std::max<int64_t>(1, rows * rb)), 0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; c += 2)
        m.bytes[static_cast<size_t>(r * rb + c / 2)] =
            pack_int4_pair(m.code(r, c), c + 1 < cols ? m.code(r, c + 1) : 0);
  }
  return m;
}

std::vector<int8_t> random_codes(DType dtype, int64_t n, uint32_t seed) {
  const int lo = dtype == DType::kInt8 ? -128 : kInt4Min;
  const int hi = dtype == DType::kInt8 ? 127 : kInt4Max;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<int8_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<int8_t>(dist(rng));
  return v;
}

IntMatrix random_int(DType dtype, int64_t rows, int64_t cols, uint32_t seed, int64_t stride = -1) {
  return make_int(dtype, rows, cols, random_codes(dtype, rows * cols, seed), stride);
}

// An int32 output with row stride ldc >= n; the gap holds a sentinel that must survive.
constexpr int32_t kSentinel = 0x13579BDF;
struct IntOut {
  int64_t m, n, ldc;
  std::vector<int32_t> data;
  IntOut(int64_t m_, int64_t n_, int64_t ldc_ = -1)
      : m(m_),
        n(n_),
        ldc(ldc_ < 0 ? n_ : ldc_),
        data(static_cast<size_t>(std::max<int64_t>(1, m_ * ldc)), kSentinel) {}
  TensorView view() {
    TensorView v = make_matrix(data.data(), DType::kInt32, m, n);
    v.strides[0] = ldc;
    return v;
  }
  int32_t at(int64_t i, int64_t j) const { return data[static_cast<size_t>(i * ldc + j)]; }
};

std::string dtype_tag(DType d) { return d == DType::kInt8 ? "int8" : "int4"; }

// fast == reference bit for bit, for every kernel that runs here (parallel and, for small products,
// serial), and for the public gemm_s32.
void expect_all_kernels_match(const IntMatrix& a, const IntMatrix& b, int64_t ldc = -1) {
  IntOut ref(a.rows, b.rows, ldc);
  gemm_s32_ref(a.view(), b.view(), ref.view());
  auto check = [&](const IntOut& got, const std::string& what) {
    int64_t bad = 0;
    for (int64_t i = 0; i < ref.m; ++i)
      for (int64_t j = 0; j < ref.ldc; ++j)
        if (got.at(i, j) != ref.at(i, j) && bad++ < 3)
          ADD_FAILURE() << what << ": c[" << i << ", " << j << "] = " << got.at(i, j)
                        << ", reference " << ref.at(i, j);
    EXPECT_EQ(bad, 0) << what;
  };
  for (GemmIsa isa : detail::gemm_s32_isas()) {
    IntOut got(a.rows, b.rows, ldc);
    detail::gemm_s32_with(isa, true, a.view(), b.view(), got.view());
    check(got, std::string(detail::gemm_isa_name(isa)) + " parallel");
  }
  IntOut got(a.rows, b.rows, ldc);
  gemm_s32(a.view(), b.view(), got.view());
  check(got, "gemm_s32");
}

// ------------------------------------------------------------------- shape sweep (bit exactness)

using ShapeParam = std::tuple<int64_t, int64_t, int64_t, DType>;  // M, N, K, operand dtype

class GemmS32Shapes : public ::testing::TestWithParam<ShapeParam> {};

TEST_P(GemmS32Shapes, AllKernelsEqualReference) {
  const auto [m, n, k, dtype] = GetParam();
  const IntMatrix a = random_int(dtype, m, k, static_cast<uint32_t>(m * 131 + k));
  const IntMatrix b = random_int(dtype, n, k, static_cast<uint32_t>(n * 977 + k + 7));
  expect_all_kernels_match(a, b);
}

std::string shape_name(const ::testing::TestParamInfo<ShapeParam>& info) {
  const auto [m, n, k, dtype] = info.param;
  return "M" + std::to_string(m) + "_N" + std::to_string(n) + "_K" + std::to_string(k) + "_" +
         dtype_tag(dtype);
}

INSTANTIATE_TEST_SUITE_P(Sweep, GemmS32Shapes,
                         ::testing::Combine(::testing::Values(1, 3, 127, 1000),
                                            ::testing::Values(1, 3, 127, 1000),
                                            ::testing::Values(1, 3, 127, 1000),
                                            ::testing::Values(DType::kInt8, DType::kInt4Packed)),
                         shape_name);

// Tile, panel and K-block boundaries (MR 4/6, NR 16/64, MC 96, NC 256, KC 512) and odd K.
INSTANTIATE_TEST_SUITE_P(Boundaries, GemmS32Shapes,
                         ::testing::Values(ShapeParam{6, 64, 4, DType::kInt4Packed},
                                           ShapeParam{7, 65, 5, DType::kInt4Packed},
                                           ShapeParam{97, 257, 513, DType::kInt4Packed},
                                           ShapeParam{96, 256, 512, DType::kInt8},
                                           ShapeParam{193, 513, 1025, DType::kInt8},
                                           ShapeParam{5, 17, 2, DType::kInt8},
                                           ShapeParam{2, 2, 1023, DType::kInt4Packed}),
                         shape_name);

INSTANTIATE_TEST_SUITE_P(Large, GemmS32Shapes,
                         ::testing::Values(ShapeParam{512, 768, 1000, DType::kInt4Packed},
                                           ShapeParam{512, 768, 1000, DType::kInt8},
                                           ShapeParam{1000, 1000, 4097, DType::kInt4Packed}),
                         shape_name);

// ------------------------------------------------------------------------------ extreme values

// A closed form for constant or periodic rows, independent of the reference.
TEST(GemmS32Extremes, Int8AllMinus128) {
  const int64_t m = 5, n = 70, k = 1001;
  const IntMatrix a = make_int(DType::kInt8, m, k, std::vector<int8_t>(m * k, -128));
  const IntMatrix b = make_int(DType::kInt8, n, k, std::vector<int8_t>(n * k, -128));
  IntOut c(m, n);
  gemm_s32(a.view(), b.view(), c.view());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) ASSERT_EQ(c.at(i, j), 16384 * k);
  expect_all_kernels_match(a, b);
}

TEST(GemmS32Extremes, Int8AlternatingRows) {
  // Rows of A alternate -128/127 along K, rows of B are -128 everywhere, 127 everywhere, or the
  // same alternation shifted by one: every signed extreme product (+16384, -16256, +16129) occurs.
  const int64_t m = 13, n = 67, k = 999;
  std::vector<int8_t> ac(m * k), bc(n * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t t = 0; t < k; ++t) ac[i * k + t] = ((t + i) % 2 == 0) ? -128 : 127;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t t = 0; t < k; ++t)
      bc[j * k + t] = j % 3 == 0 ? -128 : (j % 3 == 1 ? 127 : (((t + j) % 2 == 0) ? 127 : -128));
  const IntMatrix a = make_int(DType::kInt8, m, k, ac), b = make_int(DType::kInt8, n, k, bc);
  IntOut c(m, n);
  gemm_s32(a.view(), b.view(), c.view());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t expect = 0;
      for (int64_t t = 0; t < k; ++t) expect += int64_t{ac[i * k + t]} * bc[j * k + t];
      ASSERT_EQ(c.at(i, j), expect) << i << ", " << j;
    }
  expect_all_kernels_match(a, b);
}

TEST(GemmS32Extremes, Int4AdversarialRows) {
  // Rows all -8, all 7, and alternating -8/7 in both phases: products 64, -56, 49.
  const int64_t m = 9, n = 131, k = 1027;
  auto pattern = [](int64_t row, int64_t t) -> int8_t {
    switch (row % 4) {
      case 0:
        return -8;
      case 1:
        return 7;
      case 2:
        return t % 2 == 0 ? -8 : 7;
      default:
        return t % 2 == 0 ? 7 : -8;
    }
  };
  std::vector<int8_t> ac(m * k), bc(n * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t t = 0; t < k; ++t) ac[i * k + t] = pattern(i, t);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t t = 0; t < k; ++t) bc[j * k + t] = pattern(j / 2, t);
  const IntMatrix a = make_int(DType::kInt4Packed, m, k, ac);
  const IntMatrix b = make_int(DType::kInt4Packed, n, k, bc);
  IntOut c(m, n);
  gemm_s32(a.view(), b.view(), c.view());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t expect = 0;
      for (int64_t t = 0; t < k; ++t) expect += int64_t{ac[i * k + t]} * bc[j * k + t];
      ASSERT_EQ(c.at(i, j), expect) << i << ", " << j;
    }
  expect_all_kernels_match(a, b);
}

// At the largest allowed K the exact sums come within 2^16 of INT32_MAX; the offset kernels wrap
// internally and must still land on the exact value.
TEST(GemmS32Extremes, Int8AtMaxK) {
  const int64_t k = kMaxKInt8;
  std::vector<int8_t> ac(2 * k, -128), bc(3 * k, -128);
  for (int64_t t = 0; t < k; ++t) {
    ac[k + t] = 127;      // row 1 of A: all 127
    bc[2 * k + t] = 127;  // row 2 of B: all 127
  }
  const IntMatrix a = make_int(DType::kInt8, 2, k, ac), b = make_int(DType::kInt8, 3, k, bc);
  IntOut c(2, 3);
  gemm_s32(a.view(), b.view(), c.view());
  EXPECT_EQ(c.at(0, 0), int64_t{16384} * k);
  EXPECT_EQ(c.at(0, 2), int64_t{-16256} * k);
  EXPECT_EQ(c.at(1, 0), int64_t{-16256} * k);
  EXPECT_EQ(c.at(1, 2), int64_t{16129} * k);
  expect_all_kernels_match(a, b);
}

TEST(GemmS32Extremes, Int4AtMaxK) {
  const int64_t k = kMaxKInt4;  // odd
  std::vector<int8_t> ac(static_cast<size_t>(k), -8), bc(static_cast<size_t>(2 * k), -8);
  for (int64_t t = 0; t < k; ++t) bc[k + t] = 7;
  const IntMatrix a = make_int(DType::kInt4Packed, 1, k, ac);
  const IntMatrix b = make_int(DType::kInt4Packed, 2, k, bc);
  for (GemmIsa isa : detail::gemm_s32_isas()) {
    IntOut c(1, 2);
    detail::gemm_s32_with(isa, true, a.view(), b.view(), c.view());
    EXPECT_EQ(c.at(0, 0), int64_t{64} * k) << detail::gemm_isa_name(isa);
    EXPECT_EQ(c.at(0, 1), int64_t{-56} * k) << detail::gemm_isa_name(isa);
  }
}

// ------------------------------------------------------------------ strides, K = 0, threading

TEST(GemmS32Layout, RowStridesExceedColumns) {
  for (int64_t k : {1, 37, 300}) {
    const IntMatrix a = random_int(DType::kInt8, 101, k, 11, k + 5);
    const IntMatrix b = random_int(DType::kInt8, 150, k, 12, k + 64);
    SCOPED_TRACE("K = " + std::to_string(k));
    expect_all_kernels_match(a, b, 150 + 3);  // the sentinel columns of c must stay untouched
  }
  const IntMatrix a4 = random_int(DType::kInt4Packed, 33, 77, 13);
  const IntMatrix b4 = random_int(DType::kInt4Packed, 70, 77, 14);
  expect_all_kernels_match(a4, b4, 71);
}

TEST(GemmS32Layout, KZeroWritesZeros) {
  for (DType dtype : {DType::kInt8, DType::kInt4Packed}) {
    const IntMatrix a = make_int(dtype, 4, 0, {}), b = make_int(dtype, 70, 0, {});
    for (GemmIsa isa : detail::gemm_s32_isas()) {
      IntOut c(4, 70, 72);
      detail::gemm_s32_with(isa, true, a.view(), b.view(), c.view());
      for (int64_t i = 0; i < 4; ++i) {
        for (int64_t j = 0; j < 70; ++j) ASSERT_EQ(c.at(i, j), 0);
        for (int64_t j = 70; j < 72; ++j) ASSERT_EQ(c.at(i, j), kSentinel);
      }
    }
  }
}

TEST(GemmS32Layout, EmptyOutputs) {
  const IntMatrix a = random_int(DType::kInt8, 0, 5, 1), b = random_int(DType::kInt8, 3, 5, 2);
  IntOut c(0, 3);
  EXPECT_NO_THROW(gemm_s32(a.view(), b.view(), c.view()));
  EXPECT_NO_THROW(gemm_s32(b.view(), a.view(), IntOut(3, 0).view()));
}

// The tiling is fixed, so the pool only decides which thread computes which tile; serial and
// parallel runs of every kernel must agree bit for bit (here with many tiles and K blocks).
TEST(GemmS32Layout, ThreadCountIndependent) {
  const IntMatrix a = random_int(DType::kInt4Packed, 301, 1111, 21);
  const IntMatrix b = random_int(DType::kInt4Packed, 700, 1111, 22);
  for (GemmIsa isa : detail::gemm_s32_isas()) {
    IntOut serial(301, 700), parallel(301, 700);
    detail::gemm_s32_with(isa, false, a.view(), b.view(), serial.view());
    detail::gemm_s32_with(isa, true, a.view(), b.view(), parallel.view());
    EXPECT_EQ(serial.data, parallel.data) << detail::gemm_isa_name(isa);
  }
}

// -------------------------------------------------------------------------------- gemm_scaled

struct ScaledCase {
  bool row_scale, bias, bias_bf16, accumulate, out_bf16;
};

class GemmScaled : public ::testing::TestWithParam<ScaledCase> {};

TEST_P(GemmScaled, MatchesFp64AndTheDocumentedFp32Order) {
  const ScaledCase p = GetParam();
  const int64_t m = 77, n = 133, k = 515;
  const IntMatrix a = random_int(DType::kInt4Packed, m, k, 31);
  const IntMatrix b = random_int(DType::kInt4Packed, n, k, 32);
  std::mt19937 rng(33);
  std::uniform_real_distribution<float> uni(-2.0f, 2.0f);
  std::vector<float> rs(m), bias32(n), out0(m * n);
  std::vector<BFloat16> bias16(n);
  for (auto& v : rs) v = uni(rng) * 0.01f;
  for (int64_t j = 0; j < n; ++j) {
    bias16[j] = float_to_bf16(uni(rng));
    bias32[j] = p.bias_bf16 ? bf16_to_float(bias16[j]) : uni(rng);
  }
  for (auto& v : out0) v = uni(rng);
  Epilogue ep;
  ep.alpha = 0.0371f;
  if (p.row_scale) ep.row_scale = make_vector(rs.data(), DType::kFloat32, m);
  if (p.bias) {
    ep.bias = p.bias_bf16 ? make_vector(bias16.data(), DType::kBFloat16, n)
                          : make_vector(bias32.data(), DType::kFloat32, n);
  }
  ep.accumulate = p.accumulate;
  std::vector<float> out32(out0);
  std::vector<BFloat16> out16(m * n, BFloat16{0x7FC0});
  const TensorView out = p.out_bf16 ? make_matrix(out16.data(), DType::kBFloat16, m, n)
                                    : make_matrix(out32.data(), DType::kFloat32, m, n);
  gemm_scaled(a.view(), b.view(), ep, out);

  IntOut acc(m, n);
  gemm_s32_ref(a.view(), b.view(), acc.view());
  const double u = std::ldexp(1.0, -24);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const size_t e = static_cast<size_t>(i * n + j);
      const double s = double{ep.alpha} * (p.row_scale ? rs[i] : 1.0f);
      const double prod = s * acc.at(i, j), bb = p.bias ? bias32[j] : 0.0;
      const double prev = p.accumulate ? out0[e] : 0.0;
      const double exact = prod + bb + prev;
      const double got = p.out_bf16 ? bf16_to_float(out16[e]) : out32[e];
      // fp32: a rounding in alpha * row_scale, float(acc), the product and each addition (5 u);
      // bf16 out adds one rounding to 8 significant bits.
      const double tol = 5 * u * (std::fabs(prod) + std::fabs(bb) + std::fabs(prev)) +
                         (p.out_bf16 ? std::ldexp(std::fabs(exact), -8) : 0.0) + 1e-30;
      ASSERT_LE(std::fabs(got - exact), tol) << i << ", " << j;
      // The header's evaluation order, in fp32, from the reference accumulator: bit for bit.
      float v = (p.row_scale ? ep.alpha * rs[i] : ep.alpha) * static_cast<float>(acc.at(i, j));
      if (p.bias) v = v + bias32[j];
      if (p.accumulate) v = v + out0[e];
      if (p.out_bf16) {
        ASSERT_EQ(out16[e].bits, float_to_bf16(v).bits) << i << ", " << j;
      } else {
        ASSERT_EQ(float_bits(out32[e]), float_bits(v)) << i << ", " << j;
      }
    }
}

std::string scaled_name(const ::testing::TestParamInfo<ScaledCase>& info) {
  const ScaledCase& p = info.param;
  std::string s = p.row_scale ? "RowScale" : "NoRowScale";
  s += p.bias ? (p.bias_bf16 ? "_BiasBf16" : "_BiasF32") : "_NoBias";
  s += p.accumulate ? "_Accumulate" : "";
  s += p.out_bf16 ? "_OutBf16" : "_OutF32";
  return s;
}

INSTANTIATE_TEST_SUITE_P(Epilogues, GemmScaled,
                         ::testing::Values(ScaledCase{false, false, false, false, false},
                                           ScaledCase{true, false, false, false, false},
                                           ScaledCase{true, true, false, false, false},
                                           ScaledCase{true, true, true, false, false},
                                           ScaledCase{false, true, false, true, false},
                                           ScaledCase{true, true, false, true, false},
                                           ScaledCase{true, true, true, false, true},
                                           ScaledCase{false, false, false, false, true}),
                         scaled_name);

TEST(GemmScaledInt8, LargeAccumulatorsAndKZero) {
  // int8 sums beyond 2^24 lose bits in float(acc); the documented order still holds exactly.
  const int64_t m = 3, n = 5, k = 4000;
  const IntMatrix a = make_int(DType::kInt8, m, k, std::vector<int8_t>(m * k, -128));
  const IntMatrix b = make_int(DType::kInt8, n, k, random_codes(DType::kInt8, n * k, 41));
  std::vector<float> out(m * n);
  Epilogue ep;
  ep.alpha = 1.0f / 3.0f;
  gemm_scaled(a.view(), b.view(), ep, make_matrix(out.data(), DType::kFloat32, m, n));
  IntOut acc(m, n);
  gemm_s32_ref(a.view(), b.view(), acc.view());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      EXPECT_EQ(float_bits(out[i * n + j]),
                float_bits(ep.alpha * static_cast<float>(acc.at(i, j))));

  const IntMatrix a0 = make_int(DType::kInt8, 2, 0, {}), b0 = make_int(DType::kInt8, 3, 0, {});
  std::vector<float> bias = {1.5f, -2.0f, 0.25f}, out0(6, 9.0f);
  ep.bias = make_vector(bias.data(), DType::kFloat32, 3);
  gemm_scaled(a0.view(), b0.view(), ep, make_matrix(out0.data(), DType::kFloat32, 2, 3));
  for (int64_t i = 0; i < 2; ++i)
    for (int64_t j = 0; j < 3; ++j) EXPECT_EQ(out0[i * 3 + j], bias[j]);
}

// ---------------------------------------------------------------------------------- gemm_f32

struct F32Data {
  int64_t m, n, k;
  std::vector<float> a, b;
};

F32Data random_f32(int64_t m, int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  F32Data d{m, n, k, std::vector<float>(m * k), std::vector<float>(n * k)};
  for (auto& v : d.a) v = normal(rng);
  for (auto& v : d.b) v = normal(rng);
  return d;
}

using F32Param = std::tuple<int64_t, int64_t, int64_t>;
class GemmF32 : public ::testing::TestWithParam<F32Param> {};

TEST_P(GemmF32, WithinTheRecursiveSummationBoundOfFp64) {
  const auto [m, n, k] = GetParam();
  const F32Data d = random_f32(m, n, k, static_cast<uint32_t>(m + 3 * n + 7 * k));
  const TensorView av = make_matrix(const_cast<float*>(d.a.data()), DType::kFloat32, m, k);
  const TensorView bv = make_matrix(const_cast<float*>(d.b.data()), DType::kFloat32, n, k);
  std::vector<float> prev(m * n);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : prev) v = normal(rng);
  const float alpha = 0.75f;
  const double u = std::ldexp(1.0, -24);
  std::vector<std::vector<float>> results;
  for (GemmIsa isa : detail::gemm_f32_isas()) {
    for (bool accumulate : {false, true}) {
      std::vector<float> out(prev);
      detail::gemm_f32_with(isa, true, av, bv, alpha, accumulate,
                            make_matrix(out.data(), DType::kFloat32, m, n));
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double exact = 0, mag = 0;
          for (int64_t t = 0; t < k; ++t) {
            const double p = double{d.a[i * k + t]} * d.b[j * k + t];
            exact += p;
            mag += std::fabs(p);
          }
          const double before = accumulate ? prev[i * n + j] : 0.0;
          exact = alpha * exact + before;
          // Fused multiply-adds in sequence: |error| <= K u sum|a b| to first order (Higham,
          // recursive summation of exact products), then one rounding each for alpha and the add.
          const double tol = (k + 2) * u * 1.01 * (alpha * mag + std::fabs(before)) + 1e-30;
          ASSERT_LE(std::fabs(out[i * n + j] - exact), tol)
              << detail::gemm_isa_name(isa) << " " << i << ", " << j;
        }
      if (!accumulate) results.push_back(out);
    }
  }
  // Every kernel evaluates the same fma chain over ascending k, so all agree to the bit.
  for (size_t r = 1; r < results.size(); ++r) {
    EXPECT_EQ(0, std::memcmp(results[r].data(), results[0].data(), results[0].size() * 4))
        << detail::gemm_isa_name(detail::gemm_f32_isas()[r]);
  }
}

std::string f32_name(const ::testing::TestParamInfo<F32Param>& info) {
  const auto [m, n, k] = info.param;
  return "M" + std::to_string(m) + "_N" + std::to_string(n) + "_K" + std::to_string(k);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmF32,
                         ::testing::Values(F32Param{1, 1, 1}, F32Param{3, 127, 1},
                                           F32Param{127, 3, 1000}, F32Param{7, 65, 129},
                                           F32Param{97, 257, 300}, F32Param{200, 300, 1000},
                                           F32Param{1, 1000, 127}, F32Param{5, 5, 0}),
                         f32_name);

TEST(GemmF32Layout, StridesAndThreadCountIndependence) {
  const int64_t m = 211, n = 530, k = 333, lda = 340, ldb = 401, ldo = 533;
  const F32Data d = random_f32(m, n, lda > k ? lda : k, 51);
  std::vector<float> bpad(n * ldb);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t t = 0; t < ldb; ++t) bpad[j * ldb + t] = t < k ? d.b[j * k + t] : 1e30f;
  std::vector<float> apad(m * lda);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t t = 0; t < lda; ++t) apad[i * lda + t] = t < k ? d.a[i * k + t] : 1e30f;
  TensorView av = make_matrix(apad.data(), DType::kFloat32, m, k);
  av.strides[0] = lda;
  TensorView bv = make_matrix(bpad.data(), DType::kFloat32, n, k);
  bv.strides[0] = ldb;
  for (GemmIsa isa : detail::gemm_f32_isas()) {
    std::vector<float> serial(m * ldo, -7.0f), parallel(m * ldo, -7.0f);
    TensorView os = make_matrix(serial.data(), DType::kFloat32, m, n);
    TensorView op = make_matrix(parallel.data(), DType::kFloat32, m, n);
    os.strides[0] = op.strides[0] = ldo;
    detail::gemm_f32_with(isa, false, av, bv, 1.0f, false, os);
    detail::gemm_f32_with(isa, true, av, bv, 1.0f, false, op);
    EXPECT_EQ(0, std::memcmp(serial.data(), parallel.data(), serial.size() * 4))
        << detail::gemm_isa_name(isa);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = n; j < ldo; ++j) ASSERT_EQ(parallel[i * ldo + j], -7.0f);
      for (int64_t j = 0; j < n; j += 37) {
        double exact = 0, mag = 0;
        for (int64_t t = 0; t < k; ++t) {
          exact += double{apad[i * lda + t]} * bpad[j * ldb + t];
          mag += std::fabs(double{apad[i * lda + t]} * bpad[j * ldb + t]);
        }
        ASSERT_LE(std::fabs(parallel[i * ldo + j] - exact), (k + 2) * std::ldexp(mag, -24));
      }
    }
  }
}

// ---------------------------------------------------------------------------------- transpose

using TransposeParam = std::tuple<DType, int64_t, int64_t>;
class Transpose : public ::testing::TestWithParam<TransposeParam> {};

TEST_P(Transpose, MovesEveryElement) {
  const auto [dtype, rows, cols] = GetParam();
  const size_t es = dtype_size(dtype);
  const int64_t ldi = cols + 3, ldo = rows + 2;
  std::vector<uint8_t> in(static_cast<size_t>(rows * ldi) * es),
      out(static_cast<size_t>(cols * ldo) * es, 0xEE);
  std::mt19937 rng(static_cast<uint32_t>(rows * 7 + cols));
  for (auto& v : in) v = static_cast<uint8_t>(rng());
  TensorView iv = make_matrix(in.data(), dtype, rows, cols);
  iv.strides[0] = ldi;
  TensorView ov = make_matrix(out.data(), dtype, cols, rows);
  ov.strides[0] = ldo;
  transpose(iv, ov);
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r)
      ASSERT_EQ(0, std::memcmp(&out[(c * ldo + r) * es], &in[(r * ldi + c) * es], es))
          << r << ", " << c;
    for (int64_t r = rows; r < ldo; ++r) ASSERT_EQ(out[(c * ldo + r) * es], 0xEE);
  }
}

std::string transpose_name(const ::testing::TestParamInfo<TransposeParam>& info) {
  const auto [dtype, rows, cols] = info.param;
  return std::string(dtype == DType::kFloat32 ? "f32"
                                              : (dtype == DType::kInt8 ? "int8" : "int32")) +
         "_" + std::to_string(rows) + "x" + std::to_string(cols);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, Transpose,
    ::testing::Combine(::testing::Values(DType::kFloat32, DType::kInt8, DType::kInt32),
                       ::testing::Values(1, 3, 64, 127, 1000), ::testing::Values(1, 65, 300)),
    transpose_name);

// ----------------------------------------------------------------------------------- errors

// Runs fn, which must throw an Error of `kind` whose message starts with `arg` followed by ':'.
void expect_error(const std::function<void()>& fn, const std::string& arg, ErrorKind kind) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one naming " << arg;
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(arg + ":", 0), 0u) << e.what();
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << e.what();
  }
}

TEST(GemmErrors, S32Arguments) {
  const IntMatrix a = random_int(DType::kInt8, 4, 10, 1), b = random_int(DType::kInt8, 5, 10, 2);
  const IntMatrix b9 = random_int(DType::kInt8, 5, 9, 3);
  const IntMatrix a4 = random_int(DType::kInt4Packed, 4, 10, 4);
  IntOut c(4, 5);
  using F = void (*)(const TensorView&, const TensorView&, TensorView);
  for (F gemm : {F{gemm_s32}, F{gemm_s32_ref}}) {
    expect_error([&] { gemm(a.view(), b9.view(), c.view()); }, "b", ErrorKind::kValue);
    expect_error([&] { gemm(a.view(), a4.view(), c.view()); }, "b", ErrorKind::kType);
    expect_error([&] { gemm(a4.view(), b.view(), c.view()); }, "b", ErrorKind::kType);
    std::vector<float> f(40);
    expect_error([&] { gemm(make_matrix(f.data(), DType::kFloat32, 4, 10), b.view(), c.view()); },
                 "a", ErrorKind::kType);
    expect_error([&] { gemm(make_matrix(nullptr, DType::kInt8, 4, 10), b.view(), c.view()); }, "a",
                 ErrorKind::kValue);
    expect_error([&] { gemm(a.view(), make_matrix(nullptr, DType::kInt8, 5, 10), c.view()); }, "b",
                 ErrorKind::kValue);
    std::vector<float> cf(20);
    expect_error([&] { gemm(a.view(), b.view(), make_matrix(cf.data(), DType::kFloat32, 4, 5)); },
                 "c", ErrorKind::kType);
    expect_error([&] { gemm(a.view(), b.view(), IntOut(5, 4).view()); }, "c", ErrorKind::kValue);
    expect_error([&] { gemm(a.view(), b.view(), make_matrix(nullptr, DType::kInt32, 4, 5)); }, "c",
                 ErrorKind::kValue);
  }
}

TEST(GemmErrors, KBeyondExactnessBoundNamesA) {
  // Checked before any data is read, so one row of each suffices.
  std::vector<int8_t> big(static_cast<size_t>(kMaxKInt8 + 1));
  TensorView a8 = make_matrix(big.data(), DType::kInt8, 1, kMaxKInt8 + 1);
  IntOut c(1, 1);
  expect_error([&] { gemm_s32(a8, a8, c.view()); }, "a", ErrorKind::kValue);
  expect_error([&] { gemm_s32_ref(a8, a8, c.view()); }, "a", ErrorKind::kValue);
  std::vector<uint8_t> big4(static_cast<size_t>(packed_row_bytes(kMaxKInt4 + 1)));
  TensorView a4 = make_matrix(big4.data(), DType::kInt4Packed, 1, kMaxKInt4 + 1);
  expect_error([&] { gemm_s32(a4, a4, c.view()); }, "a", ErrorKind::kValue);
  std::vector<float> out(1);
  expect_error(
      [&] { gemm_scaled(a4, a4, Epilogue{}, make_matrix(out.data(), DType::kFloat32, 1, 1)); }, "a",
      ErrorKind::kValue);
}

TEST(GemmErrors, ScaledArguments) {
  const IntMatrix a = random_int(DType::kInt4Packed, 4, 9, 1);
  const IntMatrix b = random_int(DType::kInt4Packed, 5, 9, 2);
  std::vector<float> out(20), rs(4), bias(5);
  std::vector<BFloat16> out16(20);
  const TensorView o = make_matrix(out.data(), DType::kFloat32, 4, 5);
  Epilogue ep;
  ep.row_scale = make_vector(rs.data(), DType::kFloat32, 3);
  expect_error([&] { gemm_scaled(a.view(), b.view(), ep, o); }, "epilogue.row_scale",
               ErrorKind::kValue);
  ep.row_scale = make_vector(rs.data(), DType::kInt32, 4);
  expect_error([&] { gemm_scaled(a.view(), b.view(), ep, o); }, "epilogue.row_scale",
               ErrorKind::kType);
  ep = Epilogue{};
  ep.bias = make_vector(bias.data(), DType::kFloat32, 4);
  expect_error([&] { gemm_scaled(a.view(), b.view(), ep, o); }, "epilogue.bias", ErrorKind::kValue);
  ep.bias = make_vector(bias.data(), DType::kFloat64, 5);
  expect_error([&] { gemm_scaled(a.view(), b.view(), ep, o); }, "epilogue.bias", ErrorKind::kType);
  ep = Epilogue{};
  ep.accumulate = true;
  expect_error(
      [&] {
        gemm_scaled(a.view(), b.view(), ep, make_matrix(out16.data(), DType::kBFloat16, 4, 5));
      },
      "epilogue.accumulate", ErrorKind::kValue);
  ep = Epilogue{};
  expect_error(
      [&] { gemm_scaled(a.view(), b.view(), ep, make_matrix(out.data(), DType::kInt32, 4, 5)); },
      "out", ErrorKind::kType);
  expect_error(
      [&] { gemm_scaled(a.view(), b.view(), ep, make_matrix(out.data(), DType::kFloat32, 5, 4)); },
      "out", ErrorKind::kValue);
  const IntMatrix b8 = random_int(DType::kInt8, 5, 9, 3);
  expect_error([&] { gemm_scaled(a.view(), b8.view(), ep, o); }, "b", ErrorKind::kType);
}

TEST(GemmErrors, F32AndTransposeArguments) {
  std::vector<float> a(12), b(15), out(20);
  std::vector<int8_t> i8(12);
  const TensorView av = make_matrix(a.data(), DType::kFloat32, 4, 3);
  const TensorView bv = make_matrix(b.data(), DType::kFloat32, 5, 3);
  const TensorView ov = make_matrix(out.data(), DType::kFloat32, 4, 5);
  expect_error([&] { gemm_f32(av, make_matrix(b.data(), DType::kFloat32, 3, 5), 1.0f, false, ov); },
               "b", ErrorKind::kValue);
  expect_error([&] { gemm_f32(make_matrix(i8.data(), DType::kInt8, 4, 3), bv, 1.0f, false, ov); },
               "a", ErrorKind::kType);
  expect_error(
      [&] { gemm_f32(av, bv, 1.0f, false, make_matrix(out.data(), DType::kFloat32, 5, 4)); }, "out",
      ErrorKind::kValue);
  expect_error([&] { gemm_f32(av, make_matrix(nullptr, DType::kFloat32, 5, 3), 1.0f, false, ov); },
               "b", ErrorKind::kValue);
  expect_error([&] { transpose(av, make_matrix(out.data(), DType::kFloat32, 4, 3)); }, "out",
               ErrorKind::kValue);
  expect_error([&] { transpose(av, make_matrix(i8.data(), DType::kInt8, 3, 4)); }, "out",
               ErrorKind::kType);
  expect_error([&] { transpose(make_matrix(out.data(), DType::kBFloat16, 4, 5), ov); }, "in",
               ErrorKind::kType);
  expect_error([&] { transpose(make_view(a.data(), DType::kFloat32, {12}), ov); }, "in",
               ErrorKind::kValue);
}

}  // namespace
}  // namespace int4train
