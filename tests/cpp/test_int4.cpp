// Tests of the packed INT4 storage format (int4.h): pack/unpack round trips and the byte layout
// against the header's written nibble rule, the zero padding of odd rows, out-of-range codes, and
// transpose_int4 against unpack -> transpose -> pack. All of it is integer: every check is exact.
#include <gtest/gtest.h>

#include <cstdint>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "int4train/int4.h"

namespace int4train {
namespace {

struct Shape {
  int64_t rows, cols;
};

std::string shape_name(const Shape& s) {
  return std::to_string(s.rows) + "x" + std::to_string(s.cols);
}
void PrintTo(const Shape& s, std::ostream* os) { *os << shape_name(s); }

std::vector<int8_t> random_codes(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(kInt4Min, kInt4Max);
  std::vector<int8_t> v(static_cast<size_t>(n));
  for (auto& c : v) c = static_cast<int8_t>(dist(rng));
  return v;
}

// The layout of int4.h written out independently: element 2j in the low nibble of byte j, element
// 2j+1 in the high nibble, each nibble the code's low 4 bits (two's complement), zero padding.
std::vector<uint8_t> pack_by_rule(const std::vector<int8_t>& codes, int64_t rows, int64_t cols) {
  const int64_t rb = (cols + 1) / 2;
  std::vector<uint8_t> out(static_cast<size_t>(rows * rb), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t nibble = static_cast<uint8_t>(codes[r * cols + c]) & 0x0F;
      out[r * rb + c / 2] |= static_cast<uint8_t>(c % 2 == 0 ? nibble : nibble << 4);
    }
  }
  return out;
}

TensorView packed_view(std::vector<uint8_t>& p, int64_t rows, int64_t cols) {
  return make_matrix(p.data(), DType::kInt4Packed, rows, cols);
}

// Expects fn to throw int4train::Error whose message starts with "<arg>:".
template <typename Fn>
void expect_error_naming(Fn fn, const std::string& arg) {
  try {
    fn();
    FAIL() << "expected an Error naming '" << arg << "'";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(arg + ":", 0), 0u) << e.what();
  }
}

// ---------------------------------------------------------------- the written rule, by hand
TEST(Int4Layout, NibbleOrderMatchesHeader) {
  // codes 1, -2, 7, -8, 0 -> bytes (hi:lo) 0xE:0x1, 0x8:0x7, padding 0:0x0.
  std::vector<int8_t> codes = {1, -2, 7, -8, 0};
  std::vector<uint8_t> packed(3, 0xAA);
  pack_int4(make_matrix(codes.data(), DType::kInt8, 1, 5), packed_view(packed, 1, 5));
  EXPECT_EQ(packed[0], 0xE1);
  EXPECT_EQ(packed[1], 0x87);
  EXPECT_EQ(packed[2], 0x00);
  EXPECT_EQ(pack_int4_pair(1, -2), 0xE1);
  EXPECT_EQ(unpack_int4_lo(0xE1), 1);
  EXPECT_EQ(unpack_int4_hi(0xE1), -2);
  for (int c = kInt4Min; c <= kInt4Max; ++c) {
    EXPECT_EQ(unpack_int4_lo(pack_int4_pair(c, 0)), c);
    EXPECT_EQ(unpack_int4_hi(pack_int4_pair(0, c)), c);
  }
}

// ---------------------------------------------------------------- round trips over shapes
class Int4RoundTrip : public ::testing::TestWithParam<Shape> {};

TEST_P(Int4RoundTrip, PackMatchesRuleAndUnpackInverts) {
  const Shape s = GetParam();
  const std::vector<int8_t> codes =
      random_codes(s.rows * s.cols, 17u + static_cast<uint32_t>(s.cols));
  const int64_t rb = packed_row_bytes(s.cols);
  std::vector<uint8_t> packed(static_cast<size_t>(s.rows * rb), 0xFF);  // padding must be rewritten
  std::vector<int8_t> in = codes;
  pack_int4(make_matrix(in.data(), DType::kInt8, s.rows, s.cols),
            packed_view(packed, s.rows, s.cols));
  EXPECT_EQ(packed, pack_by_rule(codes, s.rows, s.cols));
  if (s.cols % 2 == 1) {
    for (int64_t r = 0; r < s.rows; ++r) ASSERT_EQ(packed[r * rb + rb - 1] >> 4, 0) << "row " << r;
  }
  std::vector<int8_t> back(codes.size(), 99);
  unpack_int4(packed_view(packed, s.rows, s.cols),
              make_matrix(back.data(), DType::kInt8, s.rows, s.cols));
  EXPECT_EQ(back, codes);
}

// Codes whose rows are padded (row stride > K) on both sides of the round trip.
TEST_P(Int4RoundTrip, StridedCodeRows) {
  const Shape s = GetParam();
  const int64_t stride = s.cols + 5;
  const std::vector<int8_t> dense = random_codes(s.rows * s.cols, 5u);
  std::vector<int8_t> strided(static_cast<size_t>(s.rows * stride), 42);
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t c = 0; c < s.cols; ++c) strided[r * stride + c] = dense[r * s.cols + c];
  TensorView cv = make_matrix(strided.data(), DType::kInt8, s.rows, s.cols);
  cv.strides[0] = stride;
  std::vector<uint8_t> packed(static_cast<size_t>(s.rows * packed_row_bytes(s.cols)));
  pack_int4(cv, packed_view(packed, s.rows, s.cols));
  EXPECT_EQ(packed, pack_by_rule(dense, s.rows, s.cols));

  std::vector<int8_t> out(static_cast<size_t>(s.rows * stride), 42);
  TensorView ov = make_matrix(out.data(), DType::kInt8, s.rows, s.cols);
  ov.strides[0] = stride;
  unpack_int4(packed_view(packed, s.rows, s.cols), ov);
  EXPECT_EQ(out, strided);  // codes equal and the 5 padding bytes of each row untouched
}

const Shape kShapes[] = {{1, 1},  {1, 3},   {3, 127},  {7, 1000},  {129, 4097},
                         {2, 64}, {16, 65}, {33, 130}, {2, 70001}, {1, 0},
                         {0, 5},  {64, 64}, {5, 129},  {1000, 1}};

std::string shape_param_name(const ::testing::TestParamInfo<Shape>& info) {
  return shape_name(info.param);
}

INSTANTIATE_TEST_SUITE_P(Shapes, Int4RoundTrip, ::testing::ValuesIn(kShapes), shape_param_name);

// ---------------------------------------------------------------- transpose
class Int4Transpose : public ::testing::TestWithParam<Shape> {};

TEST_P(Int4Transpose, EqualsUnpackTransposePack) {
  const Shape s = GetParam();
  const std::vector<int8_t> codes =
      random_codes(s.rows * s.cols, 99u + static_cast<uint32_t>(s.rows));
  std::vector<uint8_t> packed = pack_by_rule(codes, s.rows, s.cols);
  std::vector<int8_t> codes_t(codes.size());
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t c = 0; c < s.cols; ++c) codes_t[c * s.rows + r] = codes[r * s.cols + c];
  const std::vector<uint8_t> expected = pack_by_rule(codes_t, s.cols, s.rows);

  std::vector<uint8_t> out(static_cast<size_t>(s.cols * packed_row_bytes(s.rows)), 0xFF);
  transpose_int4(packed_view(packed, s.rows, s.cols), packed_view(out, s.cols, s.rows));
  ASSERT_EQ(out, expected);  // includes the zero padding nibble of odd-M output rows

  std::vector<uint8_t> back(packed.size(), 0xFF);
  transpose_int4(packed_view(out, s.cols, s.rows), packed_view(back, s.rows, s.cols));
  EXPECT_EQ(back, packed);
}

INSTANTIATE_TEST_SUITE_P(Shapes, Int4Transpose,
                         ::testing::Values(Shape{1, 1}, Shape{1, 3}, Shape{3, 127}, Shape{7, 1000},
                                           Shape{129, 4097}, Shape{16, 16}, Shape{32, 48},
                                           Shape{17, 33}, Shape{48, 64}, Shape{64, 130},
                                           Shape{4096, 40}, Shape{15, 17}, Shape{0, 4},
                                           Shape{300, 200}, Shape{529, 257}, Shape{1000, 64},
                                           Shape{256, 128}),
                         shape_param_name);

// ---------------------------------------------------------------- errors
class Int4OutOfRange : public ::testing::TestWithParam<int> {};

// A bad code anywhere (in the vector body or the scalar tail of a row) is reported, never wrapped.
TEST_P(Int4OutOfRange, IsAnErrorNamingCodes) {
  const int64_t rows = 3, cols = 301;
  for (const int64_t pos : {int64_t{0}, int64_t{63}, int64_t{64}, int64_t{299}, int64_t{300},
                            cols + 150, rows * cols - 1}) {
    std::vector<int8_t> codes = random_codes(rows * cols, 3u);
    codes[static_cast<size_t>(pos)] = static_cast<int8_t>(GetParam());
    std::vector<uint8_t> packed(static_cast<size_t>(rows * packed_row_bytes(cols)));
    try {
      pack_int4(make_matrix(codes.data(), DType::kInt8, rows, cols),
                packed_view(packed, rows, cols));
      FAIL() << "no error for code " << GetParam() << " at " << pos;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind("codes:", 0), 0u) << msg;
      EXPECT_NE(msg.find(std::to_string(GetParam())), std::string::npos) << msg;
      EXPECT_EQ(e.kind(), ErrorKind::kValue);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Values, Int4OutOfRange, ::testing::Values(8, 9, 127, -9, -128),
                         [](const ::testing::TestParamInfo<int>& info) {
                           const int v = info.param;
                           return v < 0 ? "minus" + std::to_string(-v) : "plus" + std::to_string(v);
                         });

TEST(Int4Errors, BadArguments) {
  std::vector<int8_t> codes(12, 0);
  std::vector<uint8_t> packed(6, 0);
  std::vector<float> f(12, 0.0f);
  const TensorView c = make_matrix(codes.data(), DType::kInt8, 3, 4);
  const TensorView p = packed_view(packed, 3, 4);
  expect_error_naming([&] { pack_int4(make_matrix(f.data(), DType::kFloat32, 3, 4), p); }, "codes");
  expect_error_naming([&] { pack_int4(c, make_matrix(packed.data(), DType::kUInt8, 3, 4)); },
                      "packed");
  expect_error_naming([&] { pack_int4(c, packed_view(packed, 4, 3)); }, "packed");
  expect_error_naming([&] { pack_int4(make_matrix(nullptr, DType::kInt8, 3, 4), p); }, "codes");
  expect_error_naming([&] { pack_int4(c, make_matrix(nullptr, DType::kInt4Packed, 3, 4)); },
                      "packed");
  expect_error_naming([&] { unpack_int4(p, make_matrix(codes.data(), DType::kInt8, 3, 3)); },
                      "codes");
  expect_error_naming([&] { unpack_int4(c, c); }, "packed");
  expect_error_naming([&] { unpack_int4(make_view(packed.data(), DType::kInt4Packed, {12}), c); },
                      "packed");
  std::vector<uint8_t> t(6, 0);
  expect_error_naming([&] { transpose_int4(p, packed_view(t, 3, 4)); }, "out");
  expect_error_naming([&] { transpose_int4(c, packed_view(t, 4, 3)); }, "in");
  std::vector<uint8_t> sq(8, 0);
  expect_error_naming([&] { transpose_int4(packed_view(sq, 4, 4), packed_view(sq, 4, 4)); }, "out");
  std::vector<uint8_t> big(16, 0);  // out starting inside in, then right after it
  expect_error_naming(
      [&] {
        transpose_int4(make_matrix(big.data(), DType::kInt4Packed, 4, 4),
                       make_matrix(big.data() + 7, DType::kInt4Packed, 4, 4));
      },
      "out");
  EXPECT_NO_THROW(transpose_int4(make_matrix(big.data(), DType::kInt4Packed, 4, 4),
                                 make_matrix(big.data() + 8, DType::kInt4Packed, 4, 4)));
}

}  // namespace
}  // namespace int4train
