// Tests of the quantizers (quantize.h): fast paths bit-exact against the _ref quantizers and direct
// formulas over odd and large shapes, packed vs int8 outputs, non-finite inputs, LSQ gradients
// against the formula and finite differences, the compact LSQ state, and unbiasedness of the
// stochastic gradient quantizers (error shrinking like 1/sqrt(draws)).
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "expect_error.h"
#include "int4train/int4.h"
#include "int4train/numeric.h"
#include "int4train/philox.h"
#include "int4train/quantize.h"

namespace int4train {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// A host matrix of fp32 or bf16 with an optional row stride larger than cols.
struct HostMatrix {
  int64_t rows = 0, cols = 0, stride = 0;
  DType dtype = DType::kFloat32;
  std::vector<float> f32;
  std::vector<BFloat16> bf16;

  HostMatrix(int64_t r, int64_t c, DType dt = DType::kFloat32, int64_t pad = 0)
      : rows(r), cols(c), stride(c + pad), dtype(dt) {
    const size_t n = static_cast<size_t>(std::max<int64_t>(r * stride, 1));
    if (dt == DType::kFloat32)
      f32.assign(n, 0.0f);
    else
      bf16.assign(n, BFloat16{0});
  }
  void set(int64_t i, int64_t j, float v) {
    if (dtype == DType::kFloat32)
      f32[i * stride + j] = v;
    else
      bf16[i * stride + j] = float_to_bf16(v);
  }
  float get(int64_t i, int64_t j) const {
    return dtype == DType::kFloat32 ? f32[i * stride + j] : bf16_to_float(bf16[i * stride + j]);
  }
  TensorView view() {
    TensorView v = make_matrix(
        dtype == DType::kFloat32 ? static_cast<void*>(f32.data()) : static_cast<void*>(bf16.data()),
        dtype, rows, cols);
    v.strides[0] = stride;
    return v;
  }
};

// Codes as int8 (row stride = cols) or packed; codes(i, j) reads either.
struct Codes {
  int64_t rows, cols;
  DType dtype;
  std::vector<int8_t> i8;
  std::vector<uint8_t> packed;
  Codes(int64_t r, int64_t c, DType dt) : rows(r), cols(c), dtype(dt) {
    if (dt == DType::kInt8)
      i8.assign(static_cast<size_t>(std::max<int64_t>(r * c, 1)), 99);
    else
      packed.assign(static_cast<size_t>(std::max<int64_t>(r * packed_row_bytes(c), 1)), 0xEE);
  }
  TensorView view() {
    return make_matrix(
        dtype == DType::kInt8 ? static_cast<void*>(i8.data()) : static_cast<void*>(packed.data()),
        dtype, rows, cols);
  }
  int at(int64_t i, int64_t j) const {
    if (dtype == DType::kInt8) return i8[i * cols + j];
    const uint8_t b = packed[i * packed_row_bytes(cols) + j / 2];
    return (j & 1) ? unpack_int4_hi(b) : unpack_int4_lo(b);
  }
  // For odd cols, the padding nibble of each row's last byte.
  int padding(int64_t i) const { return packed[i * packed_row_bytes(cols) + cols / 2] >> 4; }
};

TensorView scalar_view(float* f) { return make_scalar(f, DType::kFloat32); }

HostMatrix random_matrix(int64_t rows, int64_t cols, uint32_t seed, float sigma,
                         DType dt = DType::kFloat32, int64_t pad = 0) {
  HostMatrix m(rows, cols, dt, pad);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) m.set(i, j, normal(rng));
  return m;
}

RandomKey key(uint64_t seed) { return RandomKey{seed, make_stream(3, 5, RandomPurpose::kTest)}; }

// ------------------------------------------------------------------- fast vs _ref, many shapes

enum class Layout { kContiguous, kStrided, kBf16 };
struct ShapeCase {
  int64_t rows, cols;
  Layout layout;
};

std::string layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous:
      return "f32";
    case Layout::kStrided:
      return "f32strided";
    default:
      return "bf16";
  }
}

class QuantizeShapes : public ::testing::TestWithParam<ShapeCase> {
 protected:
  HostMatrix input(uint32_t seed, float sigma) const {
    const ShapeCase c = GetParam();
    return random_matrix(c.rows, c.cols, seed, sigma,
                         c.layout == Layout::kBf16 ? DType::kBFloat16 : DType::kFloat32,
                         c.layout == Layout::kStrided ? 5 : 0);
  }
};

TEST_P(QuantizeShapes, LsqFastEqualsRefAndFormula) {
  const ShapeCase c = GetParam();
  HostMatrix x = input(11, 1.3f);
  float s = 0.37f;
  const float inv = 1.0f / s;
  for (DType dt : {DType::kInt8, DType::kInt4Packed}) {
    Codes fast(c.rows, c.cols, dt), ref(c.rows, c.cols, dt);
    EXPECT_EQ(lsq_quantize(x.view(), scalar_view(&s), fast.view()), 0);
    EXPECT_EQ(lsq_quantize_ref(x.view(), scalar_view(&s), ref.view()), 0);
    if (dt == DType::kInt8) {
      EXPECT_EQ(fast.i8, ref.i8);
    } else {
      EXPECT_EQ(fast.packed, ref.packed);
    }
    int64_t mismatches = 0;
    for (int64_t i = 0; i < c.rows; ++i) {
      for (int64_t j = 0; j < c.cols; ++j) {
        const float v = x.get(i, j) * inv;
        const int expect = static_cast<int>(std::min(7.0f, std::max(-8.0f, std::nearbyint(v))));
        mismatches += fast.at(i, j) != expect;
      }
      if (dt == DType::kInt4Packed && (c.cols & 1)) {
        EXPECT_EQ(fast.padding(i), 0);
      }
    }
    EXPECT_EQ(mismatches, 0) << dtype_name(dt);
  }
}

TEST_P(QuantizeShapes, BitsplitFastEqualsRef) {
  const ShapeCase c = GetParam();
  HostMatrix g = input(12, 0.01f);
  Codes hi8(c.rows, c.cols, DType::kInt8), lo8(c.rows, c.cols, DType::kInt8);
  Codes hi8r(c.rows, c.cols, DType::kInt8), lo8r(c.rows, c.cols, DType::kInt8);
  Codes hip(c.rows, c.cols, DType::kInt4Packed), lop(c.rows, c.cols, DType::kInt4Packed);
  Codes hipr(c.rows, c.cols, DType::kInt4Packed), lopr(c.rows, c.cols, DType::kInt4Packed);
  float s1 = -1, s2 = -1, s3 = -1, s4 = -1;
  quantize_bitsplit(g.view(), key(7), hi8.view(), lo8.view(), scalar_view(&s1));
  quantize_bitsplit_ref(g.view(), key(7), hi8r.view(), lo8r.view(), scalar_view(&s2));
  quantize_bitsplit(g.view(), key(7), hip.view(), lop.view(), scalar_view(&s3));
  quantize_bitsplit_ref(g.view(), key(7), hipr.view(), lopr.view(), scalar_view(&s4));
  EXPECT_EQ(float_bits(s1), float_bits(s2));
  EXPECT_EQ(float_bits(s1), float_bits(s3));
  EXPECT_EQ(float_bits(s1), float_bits(s4));
  EXPECT_EQ(hi8.i8, hi8r.i8);
  EXPECT_EQ(lo8.i8, lo8r.i8);
  EXPECT_EQ(hip.packed, hipr.packed);
  EXPECT_EQ(lop.packed, lopr.packed);
  int64_t bad = 0;
  for (int64_t i = 0; i < c.rows; ++i) {
    for (int64_t j = 0; j < c.cols; ++j) {
      const int h = hi8.at(i, j), l = lo8.at(i, j);
      bad += h < -7 || h > 7 || l < -8 || l > 7;
      bad += hip.at(i, j) != h || lop.at(i, j) != l;  // packed and int8 agree
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST_P(QuantizeShapes, StochasticPackedEqualsInt8) {
  const ShapeCase c = GetParam();
  HostMatrix g = input(13, 2.0f);
  Codes q8(c.rows, c.cols, DType::kInt8), qp(c.rows, c.cols, DType::kInt4Packed);
  float s1 = 0, s2 = 0;
  quantize_stochastic(g.view(), 7, key(3), q8.view(), scalar_view(&s1));
  quantize_stochastic(g.view(), 7, key(3), qp.view(), scalar_view(&s2));
  EXPECT_EQ(float_bits(s1), float_bits(s2));
  int64_t bad = 0;
  for (int64_t i = 0; i < c.rows; ++i)
    for (int64_t j = 0; j < c.cols; ++j)
      bad += q8.at(i, j) != qp.at(i, j) || std::abs(q8.at(i, j)) > 7;
  EXPECT_EQ(bad, 0);
}

std::vector<ShapeCase> shape_cases() {
  std::vector<ShapeCase> v;
  for (int64_t r : {1, 3, 127, 1000})
    for (int64_t c : {1, 3, 127, 1000}) v.push_back({r, c, Layout::kContiguous});
  for (int64_t r : {3, 127}) {
    for (int64_t c : {1, 3, 1000}) {
      v.push_back({r, c, Layout::kStrided});
      v.push_back({r, c, Layout::kBf16});
    }
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, QuantizeShapes, ::testing::ValuesIn(shape_cases()),
                         [](const ::testing::TestParamInfo<ShapeCase>& info) {
                           return "r" + std::to_string(info.param.rows) + "_c" +
                                  std::to_string(info.param.cols) + "_" +
                                  layout_name(info.param.layout);
                         });

// ------------------------------------------------------------------- non-finite inputs

TEST(QuantizeNonFinite, LsqMapsNaNToZeroAndClampsInfinities) {
  HostMatrix x(2, 5);
  const float vals[10] = {kNaN, kInf, -kInf, 1.0f, -1.0f, 0.0f, 100.0f, -100.0f, kNaN, 0.26f};
  for (int k = 0; k < 10; ++k) x.set(k / 5, k % 5, vals[k]);
  float s = 0.5f;
  const int expect[10] = {0, 7, -8, 2, -2, 0, 7, -8, 0, 1};
  for (DType dt : {DType::kInt8, DType::kInt4Packed}) {
    Codes fast(2, 5, dt), ref(2, 5, dt);
    EXPECT_EQ(lsq_quantize(x.view(), scalar_view(&s), fast.view()), 4);
    EXPECT_EQ(lsq_quantize_ref(x.view(), scalar_view(&s), ref.view()), 4);
    for (int k = 0; k < 10; ++k) {
      EXPECT_EQ(fast.at(k / 5, k % 5), expect[k]) << k;
      EXPECT_EQ(ref.at(k / 5, k % 5), expect[k]) << k;
    }
  }
}

TEST(QuantizeNonFinite, AbsmaxPropagatesNaNAndInf) {
  HostMatrix g = random_matrix(17, 33, 1, 1.0f);
  EXPECT_FALSE(std::isnan(absmax(g.view())));
  g.set(16, 32, -kInf);
  EXPECT_EQ(absmax(g.view()), kInf);
  g.set(0, 0, kNaN);
  EXPECT_TRUE(std::isnan(absmax(g.view())));
  HostMatrix h = random_matrix(3, 7, 2, 1.0f, DType::kBFloat16);
  h.set(1, 1, kNaN);
  EXPECT_TRUE(std::isnan(absmax(h.view())));
}

TEST(QuantizeNonFinite, GradientScalesBecomeNonFinite) {
  HostMatrix g = random_matrix(9, 20, 3, 1.0f);
  g.set(4, 4, kNaN);
  Codes hi(9, 20, DType::kInt8), lo(9, 20, DType::kInt8), hir(9, 20, DType::kInt8),
      lor(9, 20, DType::kInt8), q(9, 20, DType::kInt8);
  float s = 0, sr = 0, sq = 0;
  quantize_bitsplit(g.view(), key(1), hi.view(), lo.view(), scalar_view(&s));
  quantize_bitsplit_ref(g.view(), key(1), hir.view(), lor.view(), scalar_view(&sr));
  EXPECT_TRUE(std::isnan(s));
  EXPECT_TRUE(std::isnan(sr));
  EXPECT_EQ(hi.i8, hir.i8);
  EXPECT_EQ(lo.i8, lor.i8);
  g.set(4, 4, kInf);
  quantize_stochastic(g.view(), 127, key(1), q.view(), scalar_view(&sq));
  EXPECT_EQ(sq, kInf);
  for (int8_t c : q.i8) EXPECT_EQ(c, 0);  // finite / inf = 0, inf / inf = NaN -> 0
}

// ------------------------------------------------------------------- absmax INT8, dequantize

TEST(QuantizeAbsmax, MatchesFormula) {
  HostMatrix x = random_matrix(31, 45, 4, 3.0f);
  Codes q(31, 45, DType::kInt8);
  float s = 0;
  quantize_absmax(x.view(), 127, q.view(), scalar_view(&s));
  float amax = 0;
  for (int64_t i = 0; i < 31; ++i)
    for (int64_t j = 0; j < 45; ++j) amax = std::max(amax, std::fabs(x.get(i, j)));
  EXPECT_EQ(s, amax / 127.0f);
  const float inv = 1.0f / s;
  for (int64_t i = 0; i < 31; ++i)
    for (int64_t j = 0; j < 45; ++j)
      ASSERT_EQ(q.at(i, j), static_cast<int>(std::nearbyint(x.get(i, j) * inv)));
  HostMatrix z(4, 4);
  Codes qz(4, 4, DType::kInt8);
  quantize_absmax(z.view(), 127, qz.view(), scalar_view(&s));
  EXPECT_EQ(s, 1.0f);
  for (int8_t c : qz.i8) EXPECT_EQ(c, 0);
}

TEST(QuantizeDequantize, Int8PackedFp32Bf16) {
  HostMatrix g = random_matrix(5, 9, 5, 1.0f);
  Codes q8(5, 9, DType::kInt8), qp(5, 9, DType::kInt4Packed);
  float s = 0, s2 = 0;
  quantize_stochastic(g.view(), 7, key(2), q8.view(), scalar_view(&s));
  quantize_stochastic(g.view(), 7, key(2), qp.view(), scalar_view(&s2));
  HostMatrix a(5, 9), b(5, 9, DType::kBFloat16);
  dequantize(q8.view(), scalar_view(&s), a.view());
  dequantize(qp.view(), scalar_view(&s), b.view());
  for (int64_t i = 0; i < 5; ++i) {
    for (int64_t j = 0; j < 9; ++j) {
      EXPECT_EQ(a.get(i, j), s * static_cast<float>(q8.at(i, j)));
      EXPECT_EQ(b.get(i, j), bf16_to_float(float_to_bf16(s * static_cast<float>(q8.at(i, j)))));
    }
  }
}

// ------------------------------------------------------------------- LSQ step initialisation

TEST(LsqInitStep, Formula) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    HostMatrix x = random_matrix(37, 129, 6, 0.8f, dt);
    double sum = 0;
    for (int64_t i = 0; i < 37; ++i)
      for (int64_t j = 0; j < 129; ++j) sum += std::fabs(static_cast<double>(x.get(i, j)));
    const double mean = sum / (37.0 * 129.0);
    EXPECT_NEAR(lsq_init_step(x.view()), 2.0 * mean / std::sqrt(7.0), 1e-6 * mean);
    EXPECT_NEAR(lsq_init_step(x.view(), 127), 2.0 * mean / std::sqrt(127.0), 1e-6 * mean);
  }
}

TEST(LsqInitStep, AllZeroGivesOneAndNonFiniteThrows) {
  HostMatrix z(3, 4);
  EXPECT_EQ(lsq_init_step(z.view()), 1.0f);
  for (float bad : {kNaN, kInf, -kInf}) {
    HostMatrix x = random_matrix(3, 4, 7, 1.0f);
    x.set(2, 3, bad);
    expect_error([&] { lsq_init_step(x.view()); }, "x");
  }
}

// The 4-bit reconstruction error sum (s q - x)^2 of x at step s, straight from the formula.
double lsq_error(const HostMatrix& x, float s) {
  double e = 0.0;
  for (int64_t i = 0; i < x.rows; ++i)
    for (int64_t j = 0; j < x.cols; ++j) {
      const float v = x.get(i, j);
      const double d = static_cast<double>(s) * round_clamp(v * (1.0f / s), -8, 7) - v;
      e += d * d;
    }
  return e;
}

TEST(LsqMseStep, NoGridStepHasASmallerError) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    HostMatrix x = random_matrix(61, 97, 11, 1.7f, dt);
    const float s = lsq_mse_step(x.view());
    // m0 as the header defines it: the fp64 sum of |x| in index order.
    double sum = 0.0;
    for (int64_t i = 0; i < x.rows; ++i)
      for (int64_t j = 0; j < x.cols; ++j) sum += std::fabs(static_cast<double>(x.get(i, j)));
    const float m0 =
        static_cast<float>(2.0 * (sum / static_cast<double>(x.rows * x.cols)) / std::sqrt(7.0));
    const double e = lsq_error(x, s);
    // The coarse grid of the header, its best factor, then the fine grid around it: s is one of the
    // candidates and none has a smaller error.
    double coarse_best = std::numeric_limits<double>::infinity();
    float f_best = 0.0f;
    for (int i = 0; i <= 90; ++i) {
      const float f = static_cast<float>(0.20 + 0.02 * i);
      const double ei = lsq_error(x, m0 * f);
      EXPECT_LE(e, ei) << i;
      if (ei < coarse_best) coarse_best = ei, f_best = f;
    }
    bool on_grid = s == m0 * f_best;
    for (int j = -9; j <= 9; ++j) {
      const float sj = m0 * static_cast<float>(static_cast<double>(f_best) + 0.002 * j);
      EXPECT_LE(e, lsq_error(x, sj)) << j;
      on_grid = on_grid || s == sj;
    }
    EXPECT_TRUE(on_grid) << s;
    EXPECT_LT(e, lsq_error(x, m0));
    // The header's sequential search (coarse grid, then the fine one around its best; the first
    // smallest error wins): the same step bit for bit, although the library evaluates the
    // candidates on the pool's threads.
    float seq_s = m0, seq_f = 0.0f;
    double seq_e = std::numeric_limits<double>::infinity();
    const auto consider = [&](float f) {
      const float st = m0 * f;
      if (!(st >= FLT_MIN) || !std::isfinite(st)) return;
      const double ei = lsq_error(x, st);
      if (ei < seq_e) seq_e = ei, seq_f = f, seq_s = st;
    };
    for (int i = 0; i <= 90; ++i) consider(static_cast<float>(0.20 + 0.02 * i));
    const double centre = seq_f;
    for (int j = -9; j <= 9; ++j) {
      if (j != 0) consider(static_cast<float>(centre + 0.002 * j));
    }
    EXPECT_EQ(float_bits(s), float_bits(seq_s)) << s << " vs " << seq_s;
  }
}

TEST(LsqMseStep, GaussianDataGetsTheKnownOptimalStep) {
  // The error-minimising uniform 16-level step for N(0, sigma^2) is about 0.335 sigma (Max, 1960);
  // LSQ's 2 mean|x| / sqrt(7) is 0.60 sigma.
  HostMatrix x = random_matrix(512, 512, 5, 0.25f);
  const float s = lsq_mse_step(x.view());
  EXPECT_GT(s, 0.31f * 0.25f);
  EXPECT_LT(s, 0.36f * 0.25f);
  EXPECT_NEAR(lsq_init_step(x.view()), 0.603f * 0.25f, 0.01f * 0.25f);
}

TEST(LsqMseStep, LargeInputsUseWholeRowsAtAStride) {
  // 2200 x 1000 > kLsqMseSample: 1048 rows fit, so rows 0, 3, 6, ... (t = 3), each whole, with a row
  // pad; 1000 is a multiple of 2 and 4, so an element stride would have kept only some columns.
  const int64_t rows = 2200, cols = 1000;
  ASSERT_GT(rows * cols, kLsqMseSample);
  const int64_t per = kLsqMseSample / cols, t = (rows + per - 1) / per;
  ASSERT_EQ(t, 3);
  EXPECT_EQ(lsq_mse_sample_stride(rows, cols), t);
  EXPECT_EQ(lsq_mse_sample_stride(1024, 1024), 1);  // exactly kLsqMseSample: all of it
  EXPECT_EQ(lsq_mse_sample_stride(3, kLsqMseSample), 3);  // a row wider than the sample: one row
  HostMatrix x = random_matrix(rows, cols, 8, 0.5f, DType::kBFloat16, 3);
  for (int64_t i = 0; i < rows; ++i) x.set(i, 7, 40.0f * (1 + i % 5));  // an outlier channel
  HostMatrix sample((rows + t - 1) / t, cols, DType::kBFloat16);
  for (int64_t i = 0; i < rows; i += t)
    for (int64_t j = 0; j < cols; ++j) sample.set(i / t, j, x.get(i, j));
  const float s = lsq_mse_step(x.view());
  EXPECT_EQ(s, lsq_mse_step(sample.view()));
  // The outlier channel is in the sample: without it the step is another.
  HostMatrix bulk = sample;
  for (int64_t i = 0; i < bulk.rows; ++i) bulk.set(i, 7, 0.0f);
  EXPECT_NE(s, lsq_mse_step(bulk.view()));
  // Rows outside the sample do not count, except that they must be finite.
  x.set(1, 1, 1e6f);
  EXPECT_EQ(lsq_mse_step(x.view()), s);
  x.set(1, 1, kInf);
  expect_error([&] { lsq_mse_step(x.view()); }, "x");
}

TEST(LsqMseStep, ZerosNonFiniteAndQp) {
  HostMatrix z(3, 4);
  EXPECT_EQ(lsq_mse_step(z.view()), 1.0f);
  HostMatrix e(0, 4);
  EXPECT_EQ(lsq_mse_step(e.view()), 1.0f);
  HostMatrix x = random_matrix(3, 4, 7, 1.0f);
  x.set(1, 2, kNaN);
  expect_error([&] { lsq_mse_step(x.view()); }, "x");
  expect_error([&] { lsq_mse_step(z.view(), 0); }, "qp");
}

// ------------------------------------------------------------------- LSQ backward

// Exact LSQ backward in fp64 from the header's formula.
struct LsqExact {
  std::vector<float> grad_x;
  double grad_step;  // already times gamma
};
LsqExact lsq_exact(const HostMatrix& x, float s, const std::vector<float>& g) {
  const float inv = 1.0f / s;
  LsqExact r{std::vector<float>(g.size()), 0.0};
  double sum = 0;
  for (int64_t i = 0; i < x.rows; ++i) {
    for (int64_t j = 0; j < x.cols; ++j) {
      const float v = x.get(i, j) * inv;
      const size_t e = static_cast<size_t>(i * x.cols + j);
      const bool inside = v >= -8.0f && v <= 7.0f;
      const double rr =
          v < -8.0f ? -8.0 : (v > 7.0f ? 7.0 : std::nearbyint(v) - static_cast<double>(v));
      r.grad_x[e] = inside ? g[e] : 0.0f;
      sum += static_cast<double>(g[e]) * rr;
    }
  }
  r.grad_step = sum / std::sqrt(static_cast<double>(x.rows * x.cols) * 7.0);
  return r;
}

std::vector<float> random_vector(size_t n, uint32_t seed, float sigma) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

TEST(LsqBackward, MatchesFormula) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    HostMatrix x = random_matrix(67, 301, 8, 3.0f, dt);
    float s = 0.61f;
    std::vector<float> g = random_vector(67 * 301, 9, 1.0f);
    std::vector<float> gx(g.size(), -1.0f);
    float gs = 0;
    lsq_backward(x.view(), scalar_view(&s), make_matrix(g.data(), DType::kFloat32, 67, 301),
                 make_matrix(gx.data(), DType::kFloat32, 67, 301), scalar_view(&gs));
    const LsqExact ex = lsq_exact(x, s, g);
    EXPECT_EQ(gx, ex.grad_x);
    EXPECT_NEAR(gs, ex.grad_step, 1e-6 * std::fabs(ex.grad_step) + 1e-12);
    // bf16 output, in-place fp32 output, and skipping outputs.
    std::vector<BFloat16> gxb(g.size());
    lsq_backward(x.view(), scalar_view(&s), make_matrix(g.data(), DType::kFloat32, 67, 301),
                 make_matrix(gxb.data(), DType::kBFloat16, 67, 301), TensorView{});
    for (size_t e = 0; e < g.size(); ++e) ASSERT_EQ(gxb[e].bits, float_to_bf16(ex.grad_x[e]).bits);
    float gs2 = 0;
    std::vector<float> inplace = g;
    TensorView ip = make_matrix(inplace.data(), DType::kFloat32, 67, 301);
    lsq_backward(x.view(), scalar_view(&s), ip, ip, scalar_view(&gs2));
    EXPECT_EQ(inplace, ex.grad_x);
    EXPECT_EQ(gs2, gs);
  }
}

// With the straight-through estimator, d/ds of L(s) = sum c * s * Q(x / s) is sum c * r. L itself
// is piecewise linear in s with slope sum c * Q(x / s) away from rounding boundaries, so the
// central difference of L plus the STE term -sum_inside c * v must give the LSQ step gradient /
// gamma.
TEST(LsqBackward, StepGradientMatchesFiniteDifference) {
  std::mt19937 rng(10);
  std::uniform_int_distribution<int> level(-11, 10);
  std::uniform_real_distribution<float> frac(0.06f, 0.44f);
  std::bernoulli_distribution sign(0.5);
  const int64_t rows = 7, cols = 13;
  const float s = 0.25f;
  HostMatrix x(rows, cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      x.set(i, j, s * (static_cast<float>(level(rng)) + (sign(rng) ? 1.0f : -1.0f) * frac(rng)));
  std::vector<float> c = random_vector(rows * cols, 11, 1.0f);
  auto loss = [&](double sd) {
    double l = 0;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        const double q = std::min(7.0, std::max(-8.0, std::nearbyint(x.get(i, j) / sd)));
        l += c[i * cols + j] * sd * q;
      }
    }
    return l;
  };
  const double h = 1e-5;
  double ste = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const double v = x.get(i, j) / static_cast<double>(s);
      if (v >= -8.0 && v <= 7.0) ste += c[i * cols + j] * v;
    }
  }
  const double expected = (loss(s + h) - loss(s - h)) / (2 * h) - ste;
  float sv = s, gs = 0;
  lsq_backward(x.view(), scalar_view(&sv), make_matrix(c.data(), DType::kFloat32, rows, cols),
               TensorView{}, scalar_view(&gs));
  const double gamma = 1.0 / std::sqrt(rows * cols * 7.0);
  EXPECT_NEAR(gs / gamma, expected, 1e-4 * (1.0 + std::fabs(expected)));
}

// ------------------------------------------------------------------- compact LSQ state

struct CompactState {
  Codes codes;
  std::vector<uint8_t> aux;
  int64_t bad;
};
CompactState compact(HostMatrix& x, float s, uint64_t seed) {
  CompactState st{
      Codes(x.rows, x.cols, DType::kInt4Packed),
      std::vector<uint8_t>(static_cast<size_t>(compact_aux_bytes(x.rows, x.cols)), 0xFF), 0};
  st.bad = lsq_quantize_compact(
      x.view(), scalar_view(&s), key(seed), st.codes.view(),
      make_vector(st.aux.data(), DType::kUInt8, static_cast<int64_t>(st.aux.size())));
  return st;
}

float compact_step_grad(CompactState& st, std::vector<float>& g, std::vector<float>* gx) {
  float gs = 0;
  const int64_t r = st.codes.rows, c = st.codes.cols;
  lsq_backward_compact(
      st.codes.view(),
      make_vector(st.aux.data(), DType::kUInt8, static_cast<int64_t>(st.aux.size())),
      make_matrix(g.data(), DType::kFloat32, r, c),
      gx ? make_matrix(gx->data(), DType::kFloat32, r, c) : TensorView{}, scalar_view(&gs));
  return gs;
}

TEST(LsqCompact, CodesBitsAndMaskFollowTheHeader) {
  // (8200 x 3: some tiles, also ones run by different threads, end mid-byte of the aux vector.)
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{37, 1}, {37, 3}, {37, 1000}, {8200, 3}}) {
    HostMatrix x = random_matrix(rows, cols, 12, 2.5f, DType::kFloat32, 3);
    x.set(0, 0, kNaN);
    x.set(rows - 1, cols - 1, -kInf);
    float s = 0.5f;
    CompactState st = compact(x, s, 99);
    EXPECT_EQ(st.bad, 2);
    Codes ref(rows, cols, DType::kInt4Packed);
    lsq_quantize_ref(x.view(), scalar_view(&s), ref.view());
    EXPECT_EQ(st.codes.packed, ref.packed);
    // The aux bit of every element, straight from the header.
    const float inv = 1.0f / s;
    int64_t wrong = 0;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t e = i * cols + j;
        const float v = x.get(i, j) * inv;
        const int code = ref.at(i, j);
        int bit;
        if (code == -8)
          bit = v < -8.0f;
        else if (code == 7)
          bit = v > 7.0f;
        else if (std::isnan(v))
          bit = 0;
        else {
          const float u = random_uniform(99, key(99).stream, static_cast<uint64_t>(e));
          bit = std::floor((std::nearbyint(v) - v + 0.5f) + u) >= 1.0f;
        }
        wrong += ((st.aux[e / 8] >> (e % 8)) & 1) != bit;
      }
    }
    EXPECT_EQ(wrong, 0);
    const int64_t n = rows * cols;
    if (n % 8) {
      EXPECT_EQ(st.aux.back() >> (n % 8), 0);  // unused trailing bits are 0
    }
    // The mask equals the exact mask: grad_x is bit-identical to lsq_backward's.
    std::vector<float> g = random_vector(static_cast<size_t>(n), 13, 1.0f);
    std::vector<float> gx(g.size()), gx_exact(g.size());
    compact_step_grad(st, g, &gx);
    lsq_backward(x.view(), scalar_view(&s), make_matrix(g.data(), DType::kFloat32, rows, cols),
                 make_matrix(gx_exact.data(), DType::kFloat32, rows, cols), TensorView{});
    // (A NaN input, reported by the returned count, is stored as an interior 0 code: mask 1.)
    gx[0] = gx_exact[0];
    EXPECT_TRUE(std::isnan(x.get(0, 0)));
    EXPECT_EQ(gx, gx_exact);
  }
}

// Mean and RMS error of `replicates` independent means of `draws` draws each.
template <class Draw>
double rms_error_of_means(Draw&& draw, double exact, int replicates, int draws, uint64_t first) {
  double sq = 0;
  for (int r = 0; r < replicates; ++r) {
    double sum = 0;
    for (int d = 0; d < draws; ++d) sum += draw(first + static_cast<uint64_t>(r) * draws + d);
    const double err = sum / draws - exact;
    sq += err * err;
  }
  return std::sqrt(sq / replicates);
}

TEST(LsqCompact, StepGradientUnbiasedWithoutBoundaryCodes) {
  const int64_t rows = 8, cols = 64;
  const float s = 0.5f;
  HostMatrix x(rows, cols);
  std::mt19937 rng(14);
  std::uniform_real_distribution<float> v(-7.45f, 6.45f);  // interior codes only
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x.set(i, j, s * v(rng));
  std::vector<float> g = random_vector(rows * cols, 15, 1.0f);
  const LsqExact ex = lsq_exact(x, s, g);
  // Per-draw variance: r_hat - r has variance 1/4 - r^2 per element.
  double var = 0;
  for (int64_t e = 0; e < rows * cols; ++e) {
    const float vv = x.get(e / cols, e % cols) * (1.0f / s);
    const double r = std::nearbyint(vv) - vv;
    var += static_cast<double>(g[e]) * g[e] * (0.25 - r * r);
  }
  const double sigma = std::sqrt(var / (rows * cols * 7.0));
  auto draw = [&](uint64_t seed) {
    CompactState st = compact(x, s, seed);
    return static_cast<double>(compact_step_grad(st, g, nullptr));
  };
  const int replicates = 200, d = 16;
  const double e1 = rms_error_of_means(draw, ex.grad_step, replicates, d, 1000);
  const double e4 = rms_error_of_means(draw, ex.grad_step, replicates, 4 * d, 100000);
  EXPECT_NEAR(e1 / e4, 2.0, 0.5) << e1 << " " << e4;
  EXPECT_NEAR(e4 / (sigma / std::sqrt(4.0 * d)), 1.0, 0.35);
}

TEST(LsqCompact, BoundaryCodeBiasIsBounded) {
  const int64_t rows = 8, cols = 64;
  const float s = 0.5f;
  HostMatrix x(rows, cols);
  std::mt19937 rng(16);
  std::uniform_real_distribution<float> v(-9.0f, 8.0f);  // many boundary codes, some clipped
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x.set(i, j, s * v(rng));
  std::vector<float> g = random_vector(rows * cols, 17, 1.0f);
  const LsqExact ex = lsq_exact(x, s, g);
  const double gamma = 1.0 / std::sqrt(rows * cols * 7.0);
  // The compact estimator's expectation: exact except unclipped boundary codes, which use the
  // midpoint -+1/4 of their residual's half interval.
  double expect = 0, bound = 0, var = 0;
  int64_t boundary = 0;
  for (int64_t e = 0; e < rows * cols; ++e) {
    const float vv = x.get(e / cols, e % cols) * (1.0f / s);
    const double q = std::min(7.0, std::max(-8.0, static_cast<double>(std::nearbyint(vv))));
    double r_mean;
    if (vv < -8.0f)
      r_mean = -8.0;
    else if (vv > 7.0f)
      r_mean = 7.0;
    else if (q == -8.0 || q == 7.0) {
      r_mean = q == -8.0 ? -0.25 : 0.25;
      bound += 0.25 * std::fabs(g[e]);
      ++boundary;
    } else {
      const double r = std::nearbyint(vv) - vv;
      r_mean = r;
      var += static_cast<double>(g[e]) * g[e] * (0.25 - r * r);
    }
    expect += g[e] * r_mean;
  }
  ASSERT_GT(boundary, 10);
  expect *= gamma;
  bound *= gamma;
  const int draws = 2000;
  double sum = 0;
  for (int d = 0; d < draws; ++d) {
    CompactState st = compact(x, s, 5000 + d);
    sum += compact_step_grad(st, g, nullptr);
  }
  const double mean = sum / draws;
  const double tol = 5.0 * gamma * std::sqrt(var / draws);
  EXPECT_NEAR(mean, expect, tol);  // the documented bias, and nothing else
  EXPECT_LE(std::fabs(mean - ex.grad_step), bound + tol);
}

// ------------------------------------------------------------------- stochastic gradient
// quantizers

// Draws dequantized values of g under seed d.
using DrawFn = std::function<void(const HostMatrix& g, uint64_t seed, std::vector<double>& out)>;

// RMS over elements of (mean of draws - g) / sd, for `draws` draws from seed `first`; sd is the
// per-draw standard deviation of each element. Elements with sd = 0 must come out exact.
double rms_error(const HostMatrix& g, const DrawFn& draw, const std::vector<double>& sd, int draws,
                 uint64_t first) {
  const size_t n = static_cast<size_t>(g.rows * g.cols);
  std::vector<double> acc(n, 0.0), one(n);
  for (int d = 0; d < draws; ++d) {
    draw(g, first + d, one);
    for (size_t e = 0; e < n; ++e) acc[e] += one[e];
  }
  double sq = 0;
  size_t counted = 0;
  for (size_t e = 0; e < n; ++e) {
    const double err = acc[e] / draws - g.get(e / g.cols, e % g.cols);
    if (sd[e] == 0.0) {
      EXPECT_EQ(err, 0.0) << "element " << e << " has no rounding noise";
      continue;
    }
    sq += (err / sd[e]) * (err / sd[e]);
    ++counted;
  }
  return std::sqrt(sq / static_cast<double>(counted));
}

// Unbiased: the error of the mean shrinks like 1/sqrt(draws) (ratio 2 from D to 4D draws) and sits
// at the predicted per-draw standard deviation / sqrt(draws) (a bias would add a floor to both).
void expect_unbiased(const HostMatrix& g, const DrawFn& draw, const std::vector<double>& sd,
                     int d) {
  const double e1 = rms_error(g, draw, sd, d, 1);
  const double e4 = rms_error(g, draw, sd, 4 * d, 100000);
  EXPECT_NEAR(e1 / e4, 2.0, 0.25) << "errors " << e1 << " and " << e4;
  EXPECT_NEAR(e4 * std::sqrt(4.0 * d), 1.0, 0.12);
}

HostMatrix gradient_like(uint32_t seed) {
  // Heavy-tailed rows like output gradients.
  HostMatrix g = random_matrix(32, 64, seed, 1e-3f);
  for (int64_t j = 0; j < 64; ++j) g.set(5, j, g.get(5, j) * 30.0f);
  return g;
}

// Per-element standard deviation of stochastic rounding on a grid of spacing `step`.
std::vector<double> sr_sd(const HostMatrix& g, float inv, double step) {
  std::vector<double> sd;
  for (int64_t i = 0; i < g.rows; ++i) {
    for (int64_t j = 0; j < g.cols; ++j) {
      const double v = static_cast<double>(g.get(i, j) * inv);
      const double f = v - std::floor(v);
      sd.push_back(step * std::sqrt(f * (1 - f)));
    }
  }
  return sd;
}

TEST(BitSplit, UnbiasedAndInRange) {
  HostMatrix g = gradient_like(20);
  float s_ref = 0;
  DrawFn draw = [&](const HostMatrix& m, uint64_t seed, std::vector<double>& out) {
    Codes hi(m.rows, m.cols, DType::kInt4Packed), lo(m.rows, m.cols, DType::kInt4Packed);
    HostMatrix& mm = const_cast<HostMatrix&>(m);
    quantize_bitsplit(mm.view(), key(seed), hi.view(), lo.view(), scalar_view(&s_ref));
    for (int64_t e = 0; e < m.rows * m.cols; ++e) {
      const int h = hi.at(e / m.cols, e % m.cols), l = lo.at(e / m.cols, e % m.cols);
      ASSERT_TRUE(h >= -7 && h <= 7 && l >= -8 && l <= 7);
      out[e] = static_cast<double>(s_ref) * (16 * h + l);
    }
  };
  std::vector<double> tmp(32 * 64);
  draw(g, 0, tmp);
  const float inv = static_cast<float>(kBitSplitLevels) / absmax(g.view());
  expect_unbiased(g, draw, sr_sd(g, inv, s_ref), 150);
}

TEST(BitSplit, ExactWhenIntegralAndZeroForZeros) {
  // s = 0.5 (max |G| = 59.5): G / s = 2 G is an integer, so every draw reconstructs G exactly.
  HostMatrix g(3, 80);
  for (int64_t j = 0; j < 80; ++j) {
    g.set(0, j, 0.5f * static_cast<float>(j - 40));
    g.set(1, j, 0.5f * static_cast<float>((j * 37) % 239 - 119));
    g.set(2, j, j == 0 ? 59.5f : -0.5f * static_cast<float>(j % 3));
  }
  for (uint64_t seed = 0; seed < 5; ++seed) {
    Codes hi(3, 80, DType::kInt8), lo(3, 80, DType::kInt8);
    float s = 0;
    quantize_bitsplit(g.view(), key(seed), hi.view(), lo.view(), scalar_view(&s));
    ASSERT_EQ(s, 0.5f);
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t j = 0; j < 80; ++j)
        ASSERT_EQ(s * static_cast<float>(16 * hi.at(i, j) + lo.at(i, j)), g.get(i, j));
  }
  HostMatrix z(4, 9);
  Codes hi(4, 9, DType::kInt4Packed), lo(4, 9, DType::kInt8);
  float s = -1;
  quantize_bitsplit(z.view(), key(1), hi.view(), lo.view(), scalar_view(&s));
  EXPECT_EQ(s, 0.0f);
  for (int64_t e = 0; e < 36; ++e) {
    EXPECT_EQ(hi.at(e / 9, e % 9), 0);
    EXPECT_EQ(lo.at(e / 9, e % 9), 0);
  }
  HostMatrix v(4, 9);
  dequantize(lo.view(), scalar_view(&s), v.view());
  for (float f : v.f32) EXPECT_EQ(f, 0.0f);
}

// quantize_bitsplit_rows: each row's exponent follows the rule of quantize.h (boundaries included),
// its codes are the stochastic rounding of G * (119 / max|G|) * 2^k_i with the same uniforms as
// quantize_bitsplit, every output layout and input dtype gives the same codes, and max_exponent 0
// or a non-finite max|G| is quantize_bitsplit itself.
TEST(BitSplitRows, ExponentsAndCodesFollowTheRule) {
  const int64_t rows = 7, cols = 37;
  // Row maxima relative to max|G| (row 0): 1, 1/2 (k = 1 exactly), above 1/2 (k = 0),
  // 0.3 (k = 1), 1/16 (k = 4), 1e-3 (capped at 4), 0 (4).
  const float rel[rows] = {1.0f, 0.5f, 0.52f, 0.3f, 0.0625f, 1e-3f, 0.0f};
  const int want_k[rows] = {0, 1, 0, 1, 4, 4, 4};
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    HostMatrix g = random_matrix(rows, cols, 11, 1.0f, dt, 3);
    for (int64_t i = 0; i < rows; ++i) {
      float m = 0.0f;
      for (int64_t j = 0; j < cols; ++j) m = std::max(m, std::fabs(g.get(i, j)));
      for (int64_t j = 0; j < cols; ++j) g.set(i, j, g.get(i, j) / m * 8.0f * rel[i]);
      g.set(i, 5, rel[i] * 8.0f);  // the row's maximum, exactly (a power-of-two multiple of rel)
    }
    const float amax = 8.0f;
    ASSERT_EQ(absmax(g.view()), amax);
    Codes hi(rows, cols, DType::kInt8), lo(rows, cols, DType::kInt8);
    Codes hip(rows, cols, DType::kInt4Packed), lop(rows, cols, DType::kInt4Packed);
    std::vector<int8_t> k(rows, -1), kp(rows, -1);
    float s = 0, sp = 0;
    quantize_bitsplit_rows(g.view(), kGradRowMaxExponent, key(3), hi.view(), lo.view(),
                           scalar_view(&s), make_vector(k.data(), DType::kInt8, rows));
    quantize_bitsplit_rows(g.view(), kGradRowMaxExponent, key(3), hip.view(), lop.view(),
                           scalar_view(&sp), make_vector(kp.data(), DType::kInt8, rows));
    EXPECT_EQ(s, amax / kBitSplitLevels);
    EXPECT_EQ(sp, s);
    const float inv = static_cast<float>(kBitSplitLevels) / amax;
    for (int64_t i = 0; i < rows; ++i) {
      EXPECT_EQ(k[i], want_k[i]) << "row " << i;
      EXPECT_EQ(kp[i], k[i]);
      const float row_inv = std::ldexp(inv, k[i]);
      for (int64_t j = 0; j < cols; ++j) {
        const float u = random_uniform(3, key(3).stream, static_cast<uint64_t>(i * cols + j));
        const float v = std::floor(g.get(i, j) * row_inv + u);
        const int q = static_cast<int>(std::min(std::max(v, -119.0f), 119.0f));
        const int h = static_cast<int>(std::floor((q + 8) / 16.0));
        ASSERT_EQ(hi.at(i, j), h) << i << "," << j;
        ASSERT_EQ(lo.at(i, j), q - 16 * h) << i << "," << j;
        ASSERT_EQ(hip.at(i, j), h);
        ASSERT_EQ(lop.at(i, j), q - 16 * h);
      }
    }
    // max_exponent 0: quantize_bitsplit, every k 0.
    Codes h0(rows, cols, DType::kInt8), l0(rows, cols, DType::kInt8);
    Codes hb(rows, cols, DType::kInt8), lb(rows, cols, DType::kInt8);
    float s0 = 0, sb = 0;
    quantize_bitsplit_rows(g.view(), 0, key(3), h0.view(), l0.view(), scalar_view(&s0),
                           make_vector(k.data(), DType::kInt8, rows));
    quantize_bitsplit(g.view(), key(3), hb.view(), lb.view(), scalar_view(&sb));
    EXPECT_EQ(h0.i8, hb.i8);
    EXPECT_EQ(l0.i8, lb.i8);
    EXPECT_EQ(s0, sb);
    for (int64_t i = 0; i < rows; ++i) EXPECT_EQ(k[i], 0);
    // A NaN makes max|G| NaN: every k 0, the codes those of quantize_bitsplit.
    g.set(3, 2, std::numeric_limits<float>::quiet_NaN());
    quantize_bitsplit_rows(g.view(), kGradRowMaxExponent, key(3), h0.view(), l0.view(),
                           scalar_view(&s0), make_vector(k.data(), DType::kInt8, rows));
    quantize_bitsplit(g.view(), key(3), hb.view(), lb.view(), scalar_view(&sb));
    EXPECT_EQ(h0.i8, hb.i8);
    EXPECT_EQ(l0.i8, lb.i8);
    EXPECT_TRUE(std::isnan(s0));
    for (int64_t i = 0; i < rows; ++i) EXPECT_EQ(k[i], 0);
  }
  // All zeros: zero codes, scale 0, every k 0.
  HostMatrix z(3, 5);
  Codes hz(3, 5, DType::kInt8), lz(3, 5, DType::kInt8);
  std::vector<int8_t> kz(3, 7);
  float sz = -1;
  quantize_bitsplit_rows(z.view(), kGradRowMaxExponent, key(1), hz.view(), lz.view(),
                         scalar_view(&sz), make_vector(kz.data(), DType::kInt8, 3));
  EXPECT_EQ(sz, 0.0f);
  for (int8_t v : kz) EXPECT_EQ(v, 0);
  for (int8_t v : hz.i8) EXPECT_EQ(v, 0);
  for (int8_t v : lz.i8) EXPECT_EQ(v, 0);
  // Argument errors.
  std::vector<int8_t> short_k(2);
  expect_error(
      [&] {
        quantize_bitsplit_rows(z.view(), 5, key(1), hz.view(), lz.view(), scalar_view(&sz),
                               make_vector(kz.data(), DType::kInt8, 3));
      },
      "max_exponent");
  expect_error(
      [&] {
        quantize_bitsplit_rows(z.view(), -1, key(1), hz.view(), lz.view(), scalar_view(&sz),
                               make_vector(kz.data(), DType::kInt8, 3));
      },
      "max_exponent");
  expect_error(
      [&] {
        quantize_bitsplit_rows(z.view(), 4, key(1), hz.view(), lz.view(), scalar_view(&sz),
                               make_vector(short_k.data(), DType::kInt8, 2));
      },
      "row_exp");
}

// Unbiased: the mean of many draws of s 2^-k_i (16 hi + lo) approaches G, on a gradient whose rows
// span a factor of 32 (every exponent 0..4 occurs).
TEST(BitSplitRows, Unbiased) {
  HostMatrix g = random_matrix(32, 64, 21, 1e-3f);
  for (int64_t i = 0; i < g.rows; ++i)
    for (int64_t j = 0; j < g.cols; ++j) g.set(i, j, std::ldexp(g.get(i, j), -(i % 6)));
  // max|G| = 119 / 1024, so that s = 2^-10 and 119 / max|G| are exact and the expectation of a
  // draw is G itself, not G times (119 / max|G|) * (max|G| / 119) rounded.
  const float m = absmax(g.view()), top = 119.0f / 1024.0f;
  for (int64_t i = 0; i < g.rows; ++i)
    for (int64_t j = 0; j < g.cols; ++j) {
      const float v = g.get(i, j);
      g.set(i, j, std::fabs(v) == m ? std::copysign(top, v) : std::min(v / m * top, top));
    }
  ASSERT_EQ(absmax(g.view()), top);
  float s = 0;
  std::vector<int8_t> k(static_cast<size_t>(g.rows));
  DrawFn draw = [&](const HostMatrix& m, uint64_t seed, std::vector<double>& out) {
    Codes hi(m.rows, m.cols, DType::kInt8), lo(m.rows, m.cols, DType::kInt8);
    HostMatrix& mm = const_cast<HostMatrix&>(m);
    quantize_bitsplit_rows(mm.view(), kGradRowMaxExponent, key(seed), hi.view(), lo.view(),
                           scalar_view(&s), make_vector(k.data(), DType::kInt8, m.rows));
    for (int64_t e = 0; e < m.rows * m.cols; ++e) {
      const int64_t i = e / m.cols, j = e % m.cols;
      out[e] = std::ldexp(static_cast<double>(s), -k[i]) * (16 * hi.at(i, j) + lo.at(i, j));
    }
  };
  std::vector<double> tmp(static_cast<size_t>(g.rows * g.cols));
  draw(g, 0, tmp);
  std::vector<int> seen(kGradRowMaxExponent + 1, 0);
  for (int8_t v : k) seen[v] = 1;
  for (int e = 0; e <= kGradRowMaxExponent; ++e) EXPECT_EQ(seen[e], 1) << "exponent " << e;
  // Per-element sd of one draw: that of stochastic rounding at the row's own step.
  const float inv = static_cast<float>(kBitSplitLevels) / absmax(g.view());
  std::vector<double> sd;
  for (int64_t i = 0; i < g.rows; ++i) {
    const float row_inv = std::ldexp(inv, k[i]);
    const double step = std::ldexp(static_cast<double>(s), -k[i]);
    for (int64_t j = 0; j < g.cols; ++j) {
      const double v = static_cast<double>(g.get(i, j) * row_inv);
      const double f = v - std::floor(v);
      sd.push_back(step * std::sqrt(f * (1 - f)));
    }
  }
  expect_unbiased(g, draw, sd, 150);
}

class StochasticQmax : public ::testing::TestWithParam<int> {};

TEST_P(StochasticQmax, Unbiased) {
  const int qmax = GetParam();
  HostMatrix g = gradient_like(21);
  float s = 0;
  DrawFn draw = [&](const HostMatrix& m, uint64_t seed, std::vector<double>& out) {
    Codes q(m.rows, m.cols, DType::kInt8);
    quantize_stochastic(const_cast<HostMatrix&>(m).view(), qmax, key(seed), q.view(),
                        scalar_view(&s));
    for (int64_t e = 0; e < m.rows * m.cols; ++e) {
      const int c = q.at(e / m.cols, e % m.cols);
      ASSERT_LE(std::abs(c), qmax);
      out[e] = static_cast<double>(s) * c;
    }
  };
  std::vector<double> tmp(32 * 64);
  draw(g, 0, tmp);
  EXPECT_EQ(s, absmax(g.view()) / static_cast<float>(qmax));
  expect_unbiased(g, draw, sr_sd(g, 1.0f / s, s), 150);
  HostMatrix z(2, 3);
  Codes q(2, 3, DType::kInt8);
  quantize_stochastic(z.view(), qmax, key(1), q.view(), scalar_view(&s));
  EXPECT_EQ(s, 0.0f);
  for (int8_t c : q.i8) EXPECT_EQ(c, 0);
}

INSTANTIATE_TEST_SUITE_P(Qmax, StochasticQmax, ::testing::Values(7, 127),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "qmax" + std::to_string(info.param);
                         });

TEST(Luq, UnbiasedOnTheLogGrid) {
  HostMatrix g = gradient_like(22);
  float alpha = 0;
  DrawFn draw = [&](const HostMatrix& m, uint64_t seed, std::vector<double>& out) {
    Codes q(m.rows, m.cols, DType::kInt8);
    quantize_luq(const_cast<HostMatrix&>(m).view(), key(seed), q.view(), scalar_view(&alpha));
    HostMatrix vals(m.rows, m.cols);
    dequantize_luq(q.view(), scalar_view(&alpha), vals.view());
    for (int64_t e = 0; e < m.rows * m.cols; ++e) {
      const int c = q.at(e / m.cols, e % m.cols);
      ASSERT_LE(std::abs(c), 7);
      const double expect =
          c == 0 ? 0.0 : (c > 0 ? 1 : -1) * alpha * std::ldexp(1.0, std::abs(c) - 7);
      ASSERT_EQ(vals.f32[e], expect);
      out[e] = vals.f32[e];
    }
  };
  std::vector<double> tmp(32 * 64);
  draw(g, 0, tmp);
  EXPECT_EQ(alpha, absmax(g.view()));
  // Per-element standard deviation: between levels L and 2L (or 0 and L = alpha 2^-6), P(up) = t.
  std::vector<double> sd;
  const double unit = alpha * std::ldexp(1.0, -6);
  for (int64_t e = 0; e < g.rows * g.cols; ++e) {
    const double y = std::fabs(g.get(e / g.cols, e % g.cols)) / unit;
    const double lower = y < 1 ? 0.0 : std::ldexp(1.0, static_cast<int>(std::floor(std::log2(y))));
    const double width = y < 1 ? 1.0 : lower;
    const double t = (y - lower) / width;
    sd.push_back(unit * width * std::sqrt(t * (1 - t)));
  }
  expect_unbiased(g, draw, sd, 150);
}

TEST(QuantizeEmpty, ZeroRowsOrColumns) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{0, 5}, {5, 0}, {0, 0}}) {
    TensorView x = make_matrix(nullptr, DType::kFloat32, rows, cols);
    TensorView q = make_matrix(nullptr, DType::kInt8, rows, cols);
    TensorView p = make_matrix(nullptr, DType::kInt4Packed, rows, cols);
    float s = 0.5f, out = -1.0f, gs = -1.0f;
    EXPECT_EQ(lsq_quantize(x, scalar_view(&s), p), 0);
    EXPECT_EQ(lsq_quantize_ref(x, scalar_view(&s), q), 0);
    quantize_bitsplit(x, key(1), q, p, scalar_view(&out));
    EXPECT_EQ(out, 0.0f);
    quantize_stochastic(x, 7, key(1), p, scalar_view(&out));
    EXPECT_EQ(out, 0.0f);
    EXPECT_EQ(absmax(x), 0.0f);
    EXPECT_EQ(lsq_init_step(x), 1.0f);
    lsq_backward(x, scalar_view(&s), x, x, scalar_view(&gs));
    EXPECT_EQ(gs, 0.0f);
  }
}

// ------------------------------------------------------------------- argument errors

TEST(QuantizeErrors, BadArguments) {
  HostMatrix x = random_matrix(4, 6, 1, 1.0f);
  Codes q(4, 6, DType::kInt8), qp(4, 6, DType::kInt4Packed), wrong(4, 5, DType::kInt8);
  float s = 0.5f, out = 0;
  for (float bad : {0.0f, -1.0f, kNaN, kInf}) {
    float b = bad;
    expect_error([&] { lsq_quantize(x.view(), scalar_view(&b), q.view()); }, "step");
    expect_error([&] { lsq_quantize_ref(x.view(), scalar_view(&b), q.view()); }, "step");
  }
  expect_error([&] { lsq_quantize(x.view(), scalar_view(&s), wrong.view()); }, "codes");
  std::vector<int32_t> i32(24);
  expect_error(
      [&] {
        lsq_quantize(x.view(), scalar_view(&s), make_matrix(i32.data(), DType::kInt32, 4, 6));
      },
      "codes", ErrorKind::kType);
  expect_error(
      [&] {
        lsq_quantize(make_matrix(i32.data(), DType::kInt32, 4, 6), scalar_view(&s), q.view());
      },
      "x", ErrorKind::kType);
  expect_error([&] { quantize_stochastic(x.view(), 127, key(1), qp.view(), scalar_view(&out)); },
               "codes", ErrorKind::kType);
  expect_error([&] { quantize_stochastic(x.view(), 0, key(1), q.view(), scalar_view(&out)); },
               "qmax");
  expect_error([&] { quantize_absmax(x.view(), 128, q.view(), scalar_view(&out)); }, "qmax");
  expect_error(
      [&] { quantize_bitsplit(x.view(), key(1), q.view(), wrong.view(), scalar_view(&out)); },
      "lo");
  std::vector<uint8_t> aux(2);
  expect_error(
      [&] {
        lsq_quantize_compact(x.view(), scalar_view(&s), key(1), qp.view(),
                             make_vector(aux.data(), DType::kUInt8, 2));
      },
      "aux");
  expect_error(
      [&] {
        lsq_quantize_compact(x.view(), scalar_view(&s), key(1), q.view(),
                             make_vector(aux.data(), DType::kUInt8, 3));
      },
      "packed_codes", ErrorKind::kType);
  q.i8[3] = 8;
  expect_error([&] { dequantize_luq(q.view(), scalar_view(&s), x.view()); }, "codes");
  std::vector<float> g(20);
  expect_error(
      [&] {
        lsq_backward(x.view(), scalar_view(&s), make_matrix(g.data(), DType::kFloat32, 4, 5),
                     TensorView{}, scalar_view(&out));
      },
      "grad_xhat");
  std::vector<float> g24(24);
  expect_error(
      [&] {
        lsq_backward(x.view(), scalar_view(&s), make_matrix(g24.data(), DType::kFloat32, 4, 6),
                     make_matrix(g24.data() + 1, DType::kFloat32, 4, 6), TensorView{});
      },
      "grad_x");
}

}  // namespace
}  // namespace int4train
