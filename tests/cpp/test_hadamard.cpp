// Tests of the block Hadamard transform (hadamard.h): the fast path equals the scalar reference bit
// for bit for every block size and dtype pair; both equal the dense Sylvester matrix product in
// fp64 within the fp32 rounding bound; orthonormality, involution, in place, strides and argument
// errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "../cpu/hadamard_internal.h"  // the SIMD kernels, to test each ISA on this machine
#include "cpu_features.h"
#include "int4train/hadamard.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"

namespace int4train {
namespace {

// A row-major fp32 or bf16 matrix with an optional row stride, owning its bytes.
struct Mat {
  DType dtype;
  int64_t rows, cols, stride;
  std::vector<uint8_t> bytes;

  Mat(DType dt, int64_t r, int64_t c, int64_t s = -1, uint8_t fill = 0xCD)
      : dtype(dt), rows(r), cols(c), stride(s < 0 ? c : s) {
    bytes.assign(static_cast<size_t>(std::max<int64_t>(rows * stride, 1)) * dtype_size(dt), fill);
  }
  size_t offset(int64_t r, int64_t c) const { return static_cast<size_t>(r * stride + c); }
  float get(int64_t r, int64_t c) const {
    if (dtype == DType::kFloat32) {
      float v;
      std::memcpy(&v, bytes.data() + offset(r, c) * 4, 4);
      return v;
    }
    BFloat16 h;
    std::memcpy(&h, bytes.data() + offset(r, c) * 2, 2);
    return bf16_to_float(h);
  }
  void set(int64_t r, int64_t c, float v) {
    if (dtype == DType::kFloat32) {
      std::memcpy(bytes.data() + offset(r, c) * 4, &v, 4);
    } else {
      const BFloat16 h = float_to_bf16(v);
      std::memcpy(bytes.data() + offset(r, c) * 2, &h, 2);
    }
  }
  TensorView view() {
    TensorView v = make_matrix(bytes.data(), dtype, rows, cols);
    v.strides[0] = stride;
    return v;
  }
};

const char* short_name(DType d) { return d == DType::kFloat32 ? "f32" : "bf16"; }

// Values of widely varying magnitude (2^-20 .. 2^20) with exact zeros, negative zeros and
// subnormals, so that the butterflies round often and in every way.
Mat random_mat(DType dtype, int64_t rows, int64_t cols, uint32_t seed, int64_t stride = -1) {
  Mat m(dtype, rows, cols, stride);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> expo(-20, 20);
  std::uniform_int_distribution<int> kind(0, 99);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int k = kind(rng);
      float v = std::ldexp(normal(rng), expo(rng));
      if (k == 0) v = 0.0f;
      if (k == 1) v = -0.0f;
      if (k == 2) v = 3.0e-39f * normal(rng);  // subnormal
      m.set(r, c, v);
    }
  }
  return m;
}

// Bitwise equality of the logical elements (padding excluded).
void expect_bit_equal(const Mat& a, const Mat& b, const std::string& what) {
  ASSERT_EQ(a.dtype, b.dtype);
  const size_t es = dtype_size(a.dtype);
  int64_t bad = 0;
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t c = 0; c < a.cols; ++c) {
      if (std::memcmp(a.bytes.data() + a.offset(r, c) * es, b.bytes.data() + b.offset(r, c) * es,
                      es) != 0) {
        if (bad++ < 5) {
          ADD_FAILURE() << what << ": differs at [" << r << ", " << c << "]: " << a.get(r, c)
                        << " vs " << b.get(r, c);
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

template <typename Fn>
void expect_error_naming(Fn fn, const std::string& arg, ErrorKind kind = ErrorKind::kValue) {
  try {
    fn();
    ADD_FAILURE() << "expected an Error naming '" << arg << "'";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(arg + ":", 0), 0u) << e.what();
    EXPECT_EQ(e.kind(), kind) << e.what();
  }
}

const int32_t kBlocks[] = {1, 2, 4, 8, 16, 32, 64, 128, 256};

// ---------------------------------------------------------------- fast == reference, bit for bit
using ExactParam = std::tuple<int32_t, DType, DType>;

class HadamardExact : public ::testing::TestWithParam<ExactParam> {};

TEST_P(HadamardExact, FastEqualsReference) {
  const auto [block, din, dout] = GetParam();
  for (const int64_t rows : {1, 3, 137, 1000}) {
    for (const int64_t mult : {1, 3, 5}) {
      const int64_t d = block * mult;
      Mat x = random_mat(din, rows, d, static_cast<uint32_t>(rows * 7 + mult));
      Mat ref(dout, rows, d), fast(dout, rows, d);
      hadamard_transform_ref(x.view(), ref.view(), block);
      hadamard_transform(x.view(), fast.view(), block);
      expect_bit_equal(fast, ref, std::to_string(rows) + "x" + std::to_string(d));
    }
  }
}

// Rows that span several of the fast path's 4096-value work units, with a partial last unit.
TEST_P(HadamardExact, LongRows) {
  const auto [block, din, dout] = GetParam();
  const int64_t d = 2 * 4096 + 5 * 256;
  for (const int64_t rows : {1, 3}) {
    Mat x = random_mat(din, rows, d, 11u);
    Mat ref(dout, rows, d), fast(dout, rows, d);
    hadamard_transform_ref(x.view(), ref.view(), block);
    hadamard_transform(x.view(), fast.view(), block);
    expect_bit_equal(fast, ref, std::to_string(rows) + "x" + std::to_string(d));
  }
}

// Padded rows on both sides: results equal the contiguous reference, padding is never written.
TEST_P(HadamardExact, StridedRows) {
  const auto [block, din, dout] = GetParam();
  const int64_t rows = 9, d = 3 * block;
  Mat x = random_mat(din, rows, d, 5u, d + 7);
  Mat dense(din, rows, d);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d; ++c) dense.set(r, c, x.get(r, c));
  Mat ref(dout, rows, d);
  hadamard_transform_ref(dense.view(), ref.view(), block);
  for (const bool fast_path : {false, true}) {
    Mat out(dout, rows, d, d + 3, 0xAB);
    if (fast_path) {
      hadamard_transform(x.view(), out.view(), block);
    } else {
      hadamard_transform_ref(x.view(), out.view(), block);
    }
    expect_bit_equal(out, ref, fast_path ? "fast" : "ref");
    const size_t es = dtype_size(dout);
    for (int64_t r = 0; r + 1 < rows; ++r) {
      for (int64_t c = d; c < d + 3; ++c) {
        for (size_t b = 0; b < es; ++b) ASSERT_EQ(out.bytes[out.offset(r, c) * es + b], 0xAB);
      }
    }
  }
}

std::string exact_name(const ::testing::TestParamInfo<ExactParam>& info) {
  return "g" + std::to_string(std::get<0>(info.param)) + "_" + short_name(std::get<1>(info.param)) +
         "_to_" + short_name(std::get<2>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Blocks, HadamardExact,
                         ::testing::Combine(::testing::ValuesIn(kBlocks),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16)),
                         exact_name);

// Each ISA's kernels on their own: the dispatcher runs only the widest one the CPU has, so the
// AVX2 kernels would otherwise go untested on an AVX-512 machine.
class HadamardKernels : public ::testing::TestWithParam<std::tuple<std::string, int32_t>> {};

TEST_P(HadamardKernels, EqualReference) {
  const auto [isa, block] = GetParam();
  const detail::CpuFeatures& cpu = detail::cpu_features();
  const bool available = isa == "avx2"     ? cpu.avx2
                         : isa == "avx512" ? cpu.avx512
                                           : detail::hadamard_cpu_has_avx512_bf16();
  if (!available) GTEST_SKIP() << isa << " not available (or off)";
  for (const DType din : {DType::kFloat32, DType::kBFloat16}) {
    for (const DType dout : {DType::kFloat32, DType::kBFloat16}) {
      const detail::HadamardSpanFn kernel =
          isa == "avx2"     ? detail::hadamard_span_avx2(block, din, dout)
          : isa == "avx512" ? detail::hadamard_span_avx512(block, din, dout)
                            : detail::hadamard_span_avx512_bf16(block, din, dout);
      if (isa == "avx512bf16" && dout == DType::kFloat32) {
        EXPECT_EQ(kernel, nullptr);  // only bf16 outputs have these kernels
        continue;
      }
      ASSERT_NE(kernel, nullptr);
      const int64_t d = block * 37;  // not a multiple of 8 or 16 values for small blocks: a tail
      Mat x = random_mat(din, 1, d, 31u);
      Mat ref(dout, 1, d), got(dout, 1, d);
      hadamard_transform_ref(x.view(), ref.view(), block);
      const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
      kernel(x.bytes.data(), got.bytes.data(), d, scale);
      expect_bit_equal(got, ref, std::string(short_name(din)) + " to " + short_name(dout));
      if (din == dout) {
        kernel(x.bytes.data(), x.bytes.data(), d, scale);
        expect_bit_equal(x, ref, "in place");
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Isas, HadamardKernels,
    ::testing::Combine(::testing::Values("avx2", "avx512", "avx512bf16"),
                       ::testing::ValuesIn(kBlocks)),
    [](const ::testing::TestParamInfo<std::tuple<std::string, int32_t>>& info) {
      return std::get<0>(info.param) + "_g" + std::to_string(std::get<1>(info.param));
    });

// ---------------------------------------------------------------- the math
// H_g of hadamard.h in fp64: Sylvester's recursion, scaled by 1/sqrt(g).
std::vector<double> sylvester(int32_t g) {
  std::vector<double> h(static_cast<size_t>(g) * g);
  h[0] = 1.0;
  for (int32_t n = 1; n < g; n *= 2) {
    for (int32_t i = 0; i < n; ++i) {
      for (int32_t j = 0; j < n; ++j) {
        const double v = h[i * g + j];
        h[i * g + j + n] = v;
        h[(i + n) * g + j] = v;
        h[(i + n) * g + j + n] = -v;
      }
    }
  }
  for (auto& v : h) v /= std::sqrt(static_cast<double>(g));
  return h;
}

class HadamardMath : public ::testing::TestWithParam<std::tuple<int32_t, DType>> {};

// Each output is a signed sum of the block's g inputs, computed by a tree of log2(g) fp32
// additions, then multiplied by the fp32-rounded constant 1/sqrt(g). The standard bound for
// summation along a tree of depth k (Higham, Accuracy and Stability, ch. 4) gives |fl(y) - y| <=
// gamma_k sum|x_i| with gamma_k = k u / (1 - k u), u = 2^-24; the constant's and the product's
// roundings add 2 to k. So |y~_j - y_j| <= gamma_{log2 g + 2} * sum_i |x_i| / sqrt(g), plus 2^-149
// for a subnormal product. bf16 outputs add their own rounding, at most 2^-8 |y_j| (8-bit
// significand, round to nearest).
double output_bound(int32_t g, double abs_sum, double y, DType out) {
  const double k = std::log2(static_cast<double>(g)) + 2.0;
  const double u = std::ldexp(1.0, -24);
  double bound = k * u / (1.0 - k * u) * abs_sum / std::sqrt(static_cast<double>(g));
  bound += std::ldexp(1.0, -149);
  if (out == DType::kBFloat16) bound += std::ldexp(1.0, -8) * (std::fabs(y) + bound);
  return bound;
}

TEST_P(HadamardMath, EqualsDenseSylvesterProduct) {
  const auto [g, dout] = GetParam();
  const std::vector<double> h = sylvester(g);
  const int64_t rows = 5, d = 3 * g;
  Mat x = random_mat(DType::kFloat32, rows, d, 77u);
  for (const bool fast_path : {false, true}) {
    Mat y(dout, rows, d);
    if (fast_path) {
      hadamard_transform(x.view(), y.view(), g);
    } else {
      hadamard_transform_ref(x.view(), y.view(), g);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b0 = 0; b0 < d; b0 += g) {
        double abs_sum = 0.0;
        for (int32_t i = 0; i < g; ++i) abs_sum += std::fabs(static_cast<double>(x.get(r, b0 + i)));
        for (int32_t j = 0; j < g; ++j) {
          double want = 0.0;  // (x B_g)_j = sum_i x_i H_ij
          for (int32_t i = 0; i < g; ++i)
            want += static_cast<double>(x.get(r, b0 + i)) * h[i * g + j];
          const double got = y.get(r, b0 + j);
          ASSERT_LE(std::fabs(got - want), output_bound(g, abs_sum, want, dout))
              << (fast_path ? "fast" : "ref") << " row " << r << " col " << b0 + j;
        }
      }
    }
  }
}

// ||x B_g|| = ||x|| blockwise: with the bound above, ||y~ - y|| <= sqrt(g) gamma sum|x| / sqrt(g)
// <= sqrt(g) gamma ||x|| (Cauchy-Schwarz), so the relative change of the norm is at most
// sqrt(g) gamma (bf16: plus 2^-8). Applying the transform twice returns x within twice that.
TEST_P(HadamardMath, OrthonormalAndSelfInverse) {
  const auto [g, dtype] = GetParam();
  const int64_t rows = 7, d = 5 * g;
  Mat x = random_mat(dtype, rows, d, 3u);
  Mat y(dtype, rows, d), z(dtype, rows, d);
  hadamard_transform(x.view(), y.view(), g);
  hadamard_transform(y.view(), z.view(), g);
  const double k = std::log2(static_cast<double>(g)) + 2.0;
  const double u = std::ldexp(1.0, -24);
  double rel = std::sqrt(static_cast<double>(g)) * k * u / (1.0 - k * u);
  if (dtype == DType::kBFloat16) rel += std::ldexp(1.0, -8);
  rel *= 1.01;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b0 = 0; b0 < d; b0 += g) {
      double nx = 0, ny = 0, nd = 0;
      for (int32_t i = 0; i < g; ++i) {
        const double xv = x.get(r, b0 + i), yv = y.get(r, b0 + i), zv = z.get(r, b0 + i);
        nx += xv * xv;
        ny += yv * yv;
        nd += (zv - xv) * (zv - xv);
      }
      nx = std::sqrt(nx);
      ny = std::sqrt(ny);
      ASSERT_LE(std::fabs(ny - nx), rel * nx) << "norm, row " << r << " block " << b0 / g;
      ASSERT_LE(std::sqrt(nd), (2.0 * rel + rel * rel) * nx)
          << "involution, row " << r << " block " << b0 / g;
    }
  }
}

// In place (same pointer, dtype and strides) gives the out-of-place reference's bits, fast or not.
class HadamardInPlace : public HadamardMath {};

TEST_P(HadamardInPlace, EqualsOutOfPlaceReference) {
  const auto [block, din] = GetParam();
  const DType dout = din;
  const int64_t rows = 37, d = 5 * block;
  Mat x = random_mat(din, rows, d, 23u, d + 1);
  Mat ref(dout, rows, d);
  hadamard_transform_ref(x.view(), ref.view(), block);
  Mat a = x, b = x;
  hadamard_transform(a.view(), a.view(), block);
  hadamard_transform_ref(b.view(), b.view(), block);
  expect_bit_equal(a, ref, "fast in place");
  expect_bit_equal(b, ref, "ref in place");
}

std::string one_dtype_name(const ::testing::TestParamInfo<std::tuple<int32_t, DType>>& info) {
  return "g" + std::to_string(std::get<0>(info.param)) + "_" + short_name(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Blocks, HadamardMath,
                         ::testing::Combine(::testing::ValuesIn(kBlocks),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16)),
                         one_dtype_name);
INSTANTIATE_TEST_SUITE_P(Blocks, HadamardInPlace,
                         ::testing::Combine(::testing::ValuesIn(kBlocks),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16)),
                         one_dtype_name);

// The transform of a unit vector is a column of H_g: exact +-1/sqrt(g) (one nonzero term per sum).
TEST(Hadamard, UnitVectorsGiveScaledSigns) {
  const std::vector<double> h = sylvester(16);
  Mat x(DType::kFloat32, 16, 16);
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t c = 0; c < 16; ++c) x.set(r, c, r == c ? 1.0f : 0.0f);
  Mat y(DType::kFloat32, 16, 16);
  hadamard_transform(x.view(), y.view(), 16);
  for (int64_t r = 0; r < 16; ++r)
    for (int64_t c = 0; c < 16; ++c) EXPECT_EQ(y.get(r, c), static_cast<float>(h[r * 16 + c]));
}

// With block 1 the transform is a multiply by 1.0f, exact, so fp32 -> bf16 output is numeric.h's
// float_to_bf16 of the input: checked on every low half-word under high halves that cover zero and
// subnormals, ties, overflow to infinity, infinities and NaN payloads (signalling ones included).
TEST(Hadamard, Bf16OutputRoundsLikeNumericH) {
  const uint32_t highs[] = {0x0000, 0x8000, 0x0001, 0x3F80, 0xBF81, 0x7F7F, 0xFF7F, 0x7F80, 0xFFC0};
  const int64_t n = 65536;
  for (const uint32_t hi : highs) {
    std::vector<float> x(n);
    for (int64_t lo = 0; lo < n; ++lo)
      x[lo] = float_from_bits(hi << 16 | static_cast<uint32_t>(lo));
    std::vector<BFloat16> fast(n), ref(n);
    hadamard_transform(make_matrix(x.data(), DType::kFloat32, 1, n),
                       make_matrix(fast.data(), DType::kBFloat16, 1, n), 1);
    hadamard_transform_ref(make_matrix(x.data(), DType::kFloat32, 1, n),
                           make_matrix(ref.data(), DType::kBFloat16, 1, n), 1);
    for (int64_t lo = 0; lo < n; ++lo) {
      const uint16_t want = float_to_bf16(x[lo]).bits;
      ASSERT_EQ(fast[lo].bits, want) << std::hex << "input bits " << float_bits(x[lo]);
      ASSERT_EQ(ref[lo].bits, want) << std::hex << "input bits " << float_bits(x[lo]);
    }
  }
}

// A NaN or infinity spoils its own block and nothing else; fast and reference agree on where.
TEST(Hadamard, NonFiniteStaysInItsBlock) {
  for (const float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    for (const int32_t g : {4, 64}) {
      const int64_t rows = 3, d = 4 * g;
      Mat x = random_mat(DType::kFloat32, rows, d, 9u);
      x.set(1, g + 1, bad);  // row 1, block 1
      Mat ref(DType::kFloat32, rows, d), fast(DType::kFloat32, rows, d);
      hadamard_transform_ref(x.view(), ref.view(), g);
      hadamard_transform(x.view(), fast.view(), g);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < d; ++c) {
          const bool spoiled = r == 1 && c / g == 1;
          EXPECT_EQ(std::isfinite(fast.get(r, c)), !spoiled) << r << ", " << c;
          EXPECT_EQ(std::isnan(fast.get(r, c)), std::isnan(ref.get(r, c))) << r << ", " << c;
          if (!spoiled) {
            EXPECT_EQ(fast.get(r, c), ref.get(r, c));
          }
        }
      }
    }
  }
}

TEST(Hadamard, EmptyMatricesAreNoOps) {
  for (const auto& shape : {std::pair<int64_t, int64_t>{0, 64}, {5, 0}}) {
    Mat x(DType::kFloat32, shape.first, shape.second),
        y(DType::kFloat32, shape.first, shape.second);
    EXPECT_NO_THROW(hadamard_transform(x.view(), y.view(), 64));
    EXPECT_NO_THROW(hadamard_transform_ref(x.view(), y.view(), 64));
  }
}

TEST(Hadamard, ValidBlocks) {
  for (int32_t b = -3; b <= 600; ++b) {
    const bool pow2 = b > 0 && (b & (b - 1)) == 0;
    EXPECT_EQ(is_valid_hadamard_block(b), pow2 && b <= kMaxHadamardBlock) << b;
  }
}

// ---------------------------------------------------------------- errors
class HadamardErrors : public ::testing::TestWithParam<bool> {};

TEST_P(HadamardErrors, NameTheArgument) {
  const bool fast = GetParam();
  auto run = [fast](const TensorView& in, const TensorView& out, int32_t block) {
    if (fast) {
      hadamard_transform(in, out, block);
    } else {
      hadamard_transform_ref(in, out, block);
    }
  };
  Mat x = random_mat(DType::kFloat32, 4, 96, 1u);
  Mat y(DType::kFloat32, 4, 96);
  for (const int32_t block : {0, -4, 3, 6, 257, 512}) {
    expect_error_naming([&] { run(x.view(), y.view(), block); }, "block");
  }
  expect_error_naming([&] { run(x.view(), y.view(), 64); }, "block");  // 64 does not divide 96
  Mat y_wrong(DType::kFloat32, 4, 64);
  expect_error_naming([&] { run(x.view(), y_wrong.view(), 32); }, "out");
  Mat y_rows(DType::kFloat32, 3, 96);
  expect_error_naming([&] { run(x.view(), y_rows.view(), 32); }, "out");
  expect_error_naming([&] { run(make_matrix(nullptr, DType::kFloat32, 4, 96), y.view(), 32); },
                      "in");
  expect_error_naming([&] { run(x.view(), make_matrix(nullptr, DType::kFloat32, 4, 96), 32); },
                      "out");
  std::vector<int8_t> i8(4 * 96);
  expect_error_naming([&] { run(make_matrix(i8.data(), DType::kInt8, 4, 96), y.view(), 32); }, "in",
                      ErrorKind::kType);
  std::vector<double> f64(4 * 96);
  expect_error_naming([&] { run(x.view(), make_matrix(f64.data(), DType::kFloat64, 4, 96), 32); },
                      "out", ErrorKind::kType);
  expect_error_naming(
      [&] { run(make_view(x.bytes.data(), DType::kFloat32, {4 * 96}), y.view(), 32); }, "in");
  // Overlap other than the very same view: shifted by one element, or reinterpreted as bf16.
  std::vector<float> buf(4 * 96 + 1);
  expect_error_naming(
      [&] {
        run(make_matrix(buf.data(), DType::kFloat32, 4, 96),
            make_matrix(buf.data() + 1, DType::kFloat32, 4, 96), 32);
      },
      "out");
  expect_error_naming(
      [&] {
        run(make_matrix(buf.data(), DType::kFloat32, 4, 96),
            make_matrix(buf.data(), DType::kBFloat16, 4, 96), 32);
      },
      "out");
}

INSTANTIATE_TEST_SUITE_P(Paths, HadamardErrors, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "fast" : "ref";
                         });

// ---------------------------------------------------------------- block-size selection
// Activations with a few outlier channels (x100): a per-tensor 4-bit grid spends its range on them,
// and the Hadamard transform spreads them over a block (ALGORITHM.md, forward steps 1-2).
struct SelectProblem {
  Mat x, w;
};

SelectProblem outlier_problem(int64_t n, int64_t c, int64_t d, uint32_t seed, DType dtype) {
  SelectProblem p{Mat(dtype, n, d), Mat(dtype, c, d)};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const bool outlier = j % (d / 4) == 7;  // 4 outlier channels
      p.x.set(i, j, normal(rng) * (outlier ? 100.0f : 1.0f));
    }
  }
  for (int64_t i = 0; i < c; ++i)
    for (int64_t j = 0; j < d; ++j) p.w.set(i, j, normal(rng) * 0.05f);
  return p;
}

// ||T - s Q||_F for block 1 straight from the spec (quantize.h, numeric.h), independently of the
// library: s = 2 mean|t| / sqrt(7), codes = clamp(round_half_even(t * (1/s)), -8, 7).
double lsq_error_spec(const Mat& t) {
  double sum = 0.0;
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c) sum += std::fabs(static_cast<double>(t.get(r, c)));
  const float s =
      static_cast<float>(2.0 * (sum / static_cast<double>(t.rows * t.cols)) / std::sqrt(7.0));
  const float inv = 1.0f / s;
  double err = 0.0;
  for (int64_t r = 0; r < t.rows; ++r) {
    for (int64_t c = 0; c < t.cols; ++c) {
      const float v = t.get(r, c) * inv;
      const double q = std::min(7.0f, std::max(-8.0f, std::nearbyint(v)));
      const double e = static_cast<double>(t.get(r, c)) - static_cast<double>(s) * q;
      err += e * e;
    }
  }
  return std::sqrt(err);
}

TEST(HadamardSelect, OutlierChannelsChooseALargerBlock) {
  SelectProblem p = outlier_problem(256, 128, 512, 1u, DType::kFloat32);
  const HadamardChoice choice = select_hadamard_block(p.x.view(), p.w.view());
  ASSERT_EQ(choice.candidates, (std::vector<int32_t>{1, 2, 4, 8, 16, 32, 64, 128, 256}));
  ASSERT_EQ(choice.errors.size(), choice.candidates.size());
  EXPECT_GT(choice.block, 1);
  size_t chosen = 0;
  for (size_t i = 0; i < choice.candidates.size(); ++i) {
    if (choice.candidates[i] == choice.block) chosen = i;
  }
  EXPECT_LT(choice.errors[chosen], choice.errors[0]);
  for (size_t i = 0; i < choice.errors.size(); ++i) {
    EXPECT_GE(choice.errors[i], choice.errors[chosen]) << "block " << choice.candidates[i];
    if (i < chosen) {
      EXPECT_GT(choice.errors[i], choice.errors[chosen]);  // ties go to the smaller block
    }
  }
  // Block 1's product against the spec computed here (fp64 mean order may move s by an ulp).
  const double want = lsq_error_spec(p.x) * lsq_error_spec(p.w);
  EXPECT_NEAR(choice.errors[0], want, 1e-5 * want);
}

// The same bf16 values as bf16 or fp32 give the same choice and the same errors.
TEST(HadamardSelect, Bf16InputsLikeTheirFp32Values) {
  SelectProblem b = outlier_problem(64, 32, 256, 2u, DType::kBFloat16);
  Mat xf(DType::kFloat32, 64, 256), wf(DType::kFloat32, 32, 256);
  for (int64_t r = 0; r < 64; ++r)
    for (int64_t c = 0; c < 256; ++c) xf.set(r, c, b.x.get(r, c));
  for (int64_t r = 0; r < 32; ++r)
    for (int64_t c = 0; c < 256; ++c) wf.set(r, c, b.w.get(r, c));
  const HadamardChoice cb = select_hadamard_block(b.x.view(), b.w.view());
  const HadamardChoice cf = select_hadamard_block(xf.view(), wf.view());
  EXPECT_EQ(cb.block, cf.block);
  EXPECT_EQ(cb.candidates, cf.candidates);
  EXPECT_EQ(cb.errors, cf.errors);
}

TEST(HadamardSelect, AllZeroTiesGoToBlockOne) {
  Mat x(DType::kFloat32, 4, 64, -1, 0), w(DType::kFloat32, 3, 64, -1, 0);
  const HadamardChoice choice = select_hadamard_block(x.view(), w.view());
  EXPECT_EQ(choice.block, 1);
  for (const double e : choice.errors) EXPECT_EQ(e, 0.0);
}

struct CandidateCase {
  int64_t d;
  int32_t max_block;
  std::vector<int32_t> expected;
};

class HadamardSelectCandidates : public ::testing::TestWithParam<CandidateCase> {};

TEST_P(HadamardSelectCandidates, ArePowersOfTwoDividingDUpToTheCap) {
  const CandidateCase& cc = GetParam();
  Mat x = random_mat(DType::kFloat32, 6, cc.d, 4u), w = random_mat(DType::kFloat32, 5, cc.d, 5u);
  const HadamardChoice choice = select_hadamard_block(x.view(), w.view(), cc.max_block);
  EXPECT_EQ(choice.candidates, cc.expected);
  EXPECT_EQ(choice.errors.size(), cc.expected.size());
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, HadamardSelectCandidates,
    ::testing::Values(CandidateCase{512, 256, {1, 2, 4, 8, 16, 32, 64, 128, 256}},
                      CandidateCase{1024, 256, {1, 2, 4, 8, 16, 32, 64, 128, 256}},
                      CandidateCase{96, 256, {1, 2, 4, 8, 16, 32}},
                      CandidateCase{40, 256, {1, 2, 4, 8}}, CandidateCase{7, 256, {1}},
                      CandidateCase{512, 16, {1, 2, 4, 8, 16}}, CandidateCase{512, 1, {1}}),
    [](const ::testing::TestParamInfo<CandidateCase>& info) {
      return "D" + std::to_string(info.param.d) + "_cap" + std::to_string(info.param.max_block);
    });

TEST(HadamardSelect, Errors) {
  Mat x = random_mat(DType::kFloat32, 8, 64, 1u), w = random_mat(DType::kFloat32, 4, 64, 2u);
  for (const float bad : {std::nanf(""), INFINITY}) {
    Mat xb = x;
    xb.set(3, 17, bad);
    expect_error_naming([&] { select_hadamard_block(xb.view(), w.view()); }, "x");
    Mat wb = w;
    wb.set(2, 63, -bad);
    expect_error_naming([&] { select_hadamard_block(x.view(), wb.view()); }, "w");
  }
  Mat xh = random_mat(DType::kBFloat16, 8, 64, 1u);
  xh.set(0, 0, std::nanf(""));
  expect_error_naming([&] { select_hadamard_block(xh.view(), w.view()); }, "x");
  for (const int32_t cap : {0, 3, 512, -2}) {
    expect_error_naming([&] { select_hadamard_block(x.view(), w.view(), cap); }, "max_block");
  }
  Mat w_wide = random_mat(DType::kFloat32, 4, 128, 2u);
  expect_error_naming([&] { select_hadamard_block(x.view(), w_wide.view()); }, "w");
  std::vector<int8_t> i8(8 * 64);
  expect_error_naming(
      [&] { select_hadamard_block(make_matrix(i8.data(), DType::kInt8, 8, 64), w.view()); }, "x",
      ErrorKind::kType);
  expect_error_naming(
      [&] { select_hadamard_block(x.view(), make_matrix(nullptr, DType::kFloat32, 4, 64)); }, "w");
  // Finite values whose butterflies overflow fp32 (3e38 + 3e38) in rows 5 and 6: block 1 is fine,
  // block 2 is an Error naming x and the first such row.
  Mat xo = x;
  for (const int64_t r : {6, 5}) {
    xo.set(r, 10, 3e38f);
    xo.set(r, 11, 3e38f);
  }
  try {
    select_hadamard_block(xo.view(), w.view());
    ADD_FAILURE() << "expected an Error for the overflowing transform";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("x:", 0), 0u) << msg;
    EXPECT_NE(msg.find("(block 2) overflows fp32 in row 5"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace int4train
