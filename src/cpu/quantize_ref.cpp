// int4train core: the scalar references of the hot quantizers (lsq_quantize_ref,
// quantize_bitsplit_ref), written straight from quantize.h one element at a time. The fast versions
// in quantize.cpp are judged only against these: their codes and scales must match bit for bit.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "int4train/int4.h"
#include "int4train/numeric.h"
#include "int4train/philox.h"
#include "int4train/quantize.h"
#include "quantize_kernels.h"

// One rounding per operation, exactly as written: no fused multiply-add (CPU and GPU must agree).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace int4train {
namespace {

float load(const TensorView& t, int64_t i, int64_t j) {
  const int64_t off = i * t.strides[0] + j;
  if (t.dtype == DType::kFloat32) return t.ptr<const float>()[off];
  return bf16_to_float(t.ptr<const BFloat16>()[off]);
}

// Writes one row of codes to an int8 or packed matrix.
void store_row(const TensorView& codes, int64_t i, const std::vector<int>& row) {
  const int64_t cols = static_cast<int64_t>(row.size());
  if (codes.dtype == DType::kInt8) {
    for (int64_t j = 0; j < cols; ++j) {
      codes.ptr<int8_t>()[i * codes.strides[0] + j] = static_cast<int8_t>(row[j]);
    }
    return;
  }
  uint8_t* bytes = codes.ptr<uint8_t>() + i * packed_row_bytes(cols);
  for (int64_t j = 0; j < cols; j += 2) {
    bytes[j / 2] = pack_int4_pair(row[j], j + 1 < cols ? row[j + 1] : 0);
  }
}

bool finite(float v) { return std::isfinite(v); }

}  // namespace

int64_t lsq_quantize_ref(const TensorView& x, const TensorView& step, TensorView codes) {
  detail::check_float_matrix(x, "x");
  const float s = detail::read_lsq_step(step, "step");
  const int64_t rows = x.shape[0], cols = x.shape[1];
  detail::check_codes_out(codes, "codes", rows, cols, true);
  const float inv_scale = 1.0f / s;
  int64_t nonfinite = 0;
  std::vector<int> row(static_cast<size_t>(cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const float xv = load(x, i, j);
      if (!finite(xv)) ++nonfinite;
      row[static_cast<size_t>(j)] = round_clamp(xv * inv_scale, -kLsqQn, kLsqQp);
    }
    store_row(codes, i, row);
  }
  return nonfinite;
}

void quantize_bitsplit_ref(const TensorView& g, const RandomKey& rng, TensorView hi, TensorView lo,
                           TensorView scale) {
  detail::check_float_matrix(g, "g");
  detail::check_scale_out(scale, "scale");
  const int64_t rows = g.shape[0], cols = g.shape[1];
  detail::check_codes_out(hi, "hi", rows, cols, true);
  detail::check_codes_out(lo, "lo", rows, cols, true);
  // max |G|, NaN if any element is NaN.
  float amax = 0.0f;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const float a = std::fabs(load(g, i, j));
      if (std::isnan(a)) amax = std::numeric_limits<float>::quiet_NaN();
      if (!std::isnan(amax) && a > amax) amax = a;
    }
  }
  const float levels = static_cast<float>(kBitSplitLevels);
  const bool zero = amax == 0.0f;
  const float inv_scale = zero ? 0.0f : levels / amax;
  std::vector<int> row_hi(static_cast<size_t>(cols)), row_lo(static_cast<size_t>(cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      int q = 0;
      if (!zero) {
        const float u = random_uniform(rng.seed, rng.stream, static_cast<uint64_t>(i * cols + j));
        q = stochastic_round_clamp(load(g, i, j) * inv_scale, u, -kBitSplitLevels, kBitSplitLevels);
      }
      const int h = static_cast<int>(std::floor((q + 8) / 16.0));
      row_hi[static_cast<size_t>(j)] = h;
      row_lo[static_cast<size_t>(j)] = q - 16 * h;
    }
    store_row(hi, i, row_hi);
    store_row(lo, i, row_lo);
  }
  *scale.ptr<float>() = zero ? 0.0f : amax / levels;
}

}  // namespace int4train
