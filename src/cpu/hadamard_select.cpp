// int4train core: the per-layer choice of the Hadamard block size (ALGORITHM.md, forward step 2):
// every power of two dividing D up to the cap is tried on the first batch, and the block whose LSQ
// 4-bit reconstruction errors of X and W have the smallest product wins (the reference's
// criterion).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "int4train/hadamard.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"
#include "parallel.h"

namespace int4train {
namespace {

// Row-parallel loop with enough work per chunk to amortise a hand-off.
template <typename Fn>
void for_rows(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
  detail::parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

// The first non-finite element of a row, or -1.
int64_t first_nonfinite(const TensorView& t, int64_t r) {
  const int64_t cols = t.shape[1];
  const int64_t stride = t.shape[0] > 1 ? t.strides[0] : cols;
  if (t.dtype == DType::kFloat32) {
    const float* p = t.ptr<const float>() + r * stride;
    for (int64_t c = 0; c < cols; ++c) {
      if (!std::isfinite(p[c])) return c;
    }
  } else {
    const BFloat16* p = t.ptr<const BFloat16>() + r * stride;
    for (int64_t c = 0; c < cols; ++c) {
      if ((p[c].bits & 0x7F80u) == 0x7F80u) return c;  // exponent all ones: Inf or NaN
    }
  }
  return -1;
}

// The block is chosen once, from the first batch, and kept with the model: garbage in would be
// garbage kept, so a non-finite value is an error naming the argument.
void check_finite(const TensorView& t, const char* arg) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  std::vector<int64_t> first(static_cast<size_t>(rows), -1);
  for_rows(rows, cols, [&](int64_t r) { first[static_cast<size_t>(r)] = first_nonfinite(t, r); });
  for (int64_t r = 0; r < rows; ++r) {
    if (first[static_cast<size_t>(r)] >= 0) {
      throw_error(ErrorKind::kValue,
                  std::string(arg) + ": expected finite values to choose the Hadamard block, got " +
                      "a non-finite value at [" + std::to_string(r) + ", " +
                      std::to_string(first[static_cast<size_t>(r)]) + "]");
    }
  }
}

// ||t B_g - s Q||_F with s = lsq_init_step(t B_g) and Q = lsq_quantize(t B_g, s). `transformed`
// and `codes` are workspaces of at least rows * cols elements.
double reconstruction_error(const TensorView& t, const char* arg, int32_t g,
                            std::vector<float>& transformed, std::vector<int8_t>& codes) {
  const int64_t rows = t.shape[0], cols = t.shape[1];
  const TensorView tt = make_matrix(transformed.data(), DType::kFloat32, rows, cols);
  hadamard_transform(t, tt, g);
  // Finite inputs near the fp32 limit can still overflow in the butterflies' sums (the rows checked
  // in parallel, the first bad one reported).
  std::vector<int64_t> first(static_cast<size_t>(rows), -1);
  for_rows(rows, cols, [&](int64_t r) { first[static_cast<size_t>(r)] = first_nonfinite(tt, r); });
  for (int64_t r = 0; r < rows; ++r) {
    if (first[static_cast<size_t>(r)] >= 0) {
      throw_error(ErrorKind::kValue, std::string(arg) + ": its Hadamard transform (block " +
                                         std::to_string(g) + ") overflows fp32 in row " +
                                         std::to_string(r));
    }
  }
  float step = lsq_init_step(tt);
  lsq_quantize(tt, make_scalar(&step, DType::kFloat32),
               make_matrix(codes.data(), DType::kInt8, rows, cols));
  // Per-row sums in fp64, then added in row order: the result does not depend on the threads.
  std::vector<double> row_sq(static_cast<size_t>(rows), 0.0);
  const double s = step;
  for_rows(rows, cols, [&](int64_t r) {
    const float* v = transformed.data() + r * cols;
    const int8_t* q = codes.data() + r * cols;
    double acc = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const double e = static_cast<double>(v[c]) - s * static_cast<double>(q[c]);
      acc += e * e;
    }
    row_sq[static_cast<size_t>(r)] = acc;
  });
  double total = 0.0;
  for (const double v : row_sq) total += v;
  return std::sqrt(total);
}

}  // namespace

HadamardChoice select_hadamard_block(const TensorView& x, const TensorView& w, int32_t max_block) {
  check_matrix(x, "x");
  check_dtype(x, "x", {DType::kFloat32, DType::kBFloat16});
  check_matrix(w, "w");
  check_dtype(w, "w", {DType::kFloat32, DType::kBFloat16});
  const int64_t d = x.shape[1];
  if (w.shape[1] != d) {
    throw_error(ErrorKind::kValue, "w: expected " + std::to_string(d) +
                                       " columns (the D of x), got " + std::to_string(w.shape[1]));
  }
  if (!is_valid_hadamard_block(max_block)) {
    throw_error(ErrorKind::kValue, "max_block: expected a power of two in [1, " +
                                       std::to_string(kMaxHadamardBlock) + "], got " +
                                       std::to_string(max_block));
  }
  check_finite(x, "x");
  check_finite(w, "w");

  const size_t work = static_cast<size_t>(std::max(x.shape[0], w.shape[0]) * d);
  std::vector<float> transformed(std::max<size_t>(work, 1));
  std::vector<int8_t> codes(std::max<size_t>(work, 1));
  HadamardChoice choice;
  // The powers of two dividing D form a prefix of 1, 2, 4, ...: stop at the first that does not.
  for (int32_t g = 1; g <= max_block && d % g == 0; g *= 2) {
    const double ex = reconstruction_error(x, "x", g, transformed, codes);
    const double ew = reconstruction_error(w, "w", g, transformed, codes);
    choice.candidates.push_back(g);
    choice.errors.push_back(ex * ew);
  }
  size_t best = 0;
  for (size_t i = 1; i < choice.errors.size(); ++i) {
    if (choice.errors[i] < choice.errors[best]) best = i;  // strict: ties keep the smaller block
  }
  choice.block = choice.candidates[best];
  return choice;
}

}  // namespace int4train
