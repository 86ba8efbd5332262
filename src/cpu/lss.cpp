// int4train core: leverage score sampling on the CPU (lss.h): row norms, the deterministic
// water-filling probabilities, power-of-two rounding within a row capacity and the stratified
// selection. Everything here is exact or fixed-order, so the same inputs and seed select the same
// rows on every machine.
#include "int4train/lss.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "int4train/int4.h"
#include "int4train/numeric.h"
#include "parallel.h"
#include "quantize_kernels.h"

namespace int4train {
namespace {

// A contiguous 1-D (or any contiguous) view of n elements of the given dtype.
int64_t check_flat(const TensorView& t, const char* arg, DType dtype) {
  check_dtype(t, arg, {dtype});
  if (t.ndim < 1 || t.ndim > 2 || !t.is_contiguous()) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected a contiguous vector");
  }
  check_not_null(t, arg);
  return t.numel();
}

// Sum of squares of packed codes, byte by byte: lo^2 + hi^2 of each byte.
struct PackedSquares {
  uint8_t table[256];
  PackedSquares() {
    for (int b = 0; b < 256; ++b) {
      const int lo = unpack_int4_lo(static_cast<uint8_t>(b));
      const int hi = unpack_int4_hi(static_cast<uint8_t>(b));
      table[b] = static_cast<uint8_t>(lo * lo + hi * hi);
    }
  }
};

double row_sumsq(const TensorView& in, int64_t i, int64_t cols) {
  switch (in.dtype) {
    case DType::kFloat32: {
      // Fixed lanes (as the quantizers' sums): a vectorisable loop with a fixed result.
      const float* x = in.ptr<const float>() + i * in.strides[0];
      double acc[detail::kSumLanes] = {};
      for (int64_t j = 0; j < cols; ++j) {
        const double v = x[j];
        acc[j % detail::kSumLanes] += v * v;
      }
      double s = 0.0;
      for (double a : acc) s += a;
      return s;
    }
    case DType::kBFloat16: {
      const BFloat16* x = in.ptr<const BFloat16>() + i * in.strides[0];
      double acc[detail::kSumLanes] = {};
      for (int64_t j = 0; j < cols; ++j) {
        const double v = bf16_to_float(x[j]);
        acc[j % detail::kSumLanes] += v * v;
      }
      double s = 0.0;
      for (double a : acc) s += a;
      return s;
    }
    case DType::kInt8: {
      // Exact: int32 blocks of at most 2^16 squares (each <= 2^14), summed in int64.
      const int8_t* x = in.ptr<const int8_t>() + i * in.strides[0];
      int64_t total = 0;
      for (int64_t j0 = 0; j0 < cols; j0 += 65536) {
        const int64_t j1 = std::min(cols, j0 + 65536);
        int32_t block = 0;
        for (int64_t j = j0; j < j1; ++j) block += static_cast<int32_t>(x[j]) * x[j];
        total += block;
      }
      return static_cast<double>(total);
    }
    default: {
      static const PackedSquares squares;
      const uint8_t* x = in.ptr<const uint8_t>() + i * packed_row_bytes(cols);
      int64_t total = 0;
      for (int64_t b = 0; b < packed_row_bytes(cols); ++b) total += squares.table[x[b]];
      return static_cast<double>(total);  // odd cols: the padding nibble is 0
    }
  }
}

// lss.h's tree over kLssSumLanes lane sums (overwritten): the water-filling's total.
double lane_tree(double* lanes) {
  // Within each group of 32 lanes, then over the 32 group sums: the tree s = 16, ..., 1.
  auto tree32 = [](double* v, int stride) {
    for (int s = 16; s >= 1; s /= 2) {
      for (int t = 0; t < s; ++t) v[t * stride] += v[(t + s) * stride];
    }
  };
  for (int w = 0; w < kLssSumLanes / 32; ++w) tree32(lanes + 32 * w, 1);
  tree32(lanes, 32);
  return lanes[0];
}

}  // namespace

void row_norms(const TensorView& in, TensorView norms) {
  check_matrix(in, "in");
  check_dtype(in, "in", {DType::kFloat32, DType::kBFloat16, DType::kInt8, DType::kInt4Packed});
  const int64_t rows = in.shape[0], cols = in.shape[1];
  check_dtype(norms, "norms", {DType::kFloat32});
  check_vector(norms, "norms", rows);
  float* out = norms.ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  detail::parallel_for(rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      out[i] = static_cast<float>(std::sqrt(row_sumsq(in, i, cols)));
    }
  });
}

void lss_probabilities(const TensorView& scores, double budget, TensorView probs) {
  const int64_t n = check_flat(scores, "scores", DType::kFloat32);
  // An empty score vector has nothing to distribute: a zero budget (an empty batch) is fine there.
  if (!(budget > 0.0 || (n == 0 && budget == 0.0)) || !std::isfinite(budget)) {
    throw_error(ErrorKind::kValue,
                "budget: expected a positive finite row budget, got " + std::to_string(budget));
  }
  check_dtype(probs, "probs", {DType::kFloat32});
  check_vector(probs, "probs", n);
  const float* c = scores.ptr<const float>();
  float* p = probs.ptr<float>();
  std::vector<int64_t> active;  // positive, unsaturated scores, ascending
  for (int64_t i = 0; i < n; ++i) {
    if (!(c[i] >= 0.0f) || !std::isfinite(c[i])) {
      throw_error(ErrorKind::kValue, "scores: expected finite non-negative scores, got " +
                                         std::to_string(c[i]) + " at index " + std::to_string(i));
    }
    if (c[i] > 0.0f) active.push_back(i);
  }
  for (int64_t i = 0; i < n; ++i) p[i] = 0.0f;
  if (budget >= static_cast<double>(active.size())) {
    for (int64_t i : active) p[i] = 1.0f;
    return;
  }
  // The water-filling loop of lss.h, sums in fp64 in its fixed lane order.
  int64_t saturated = 0;
  double kappa = 0.0;
  std::vector<double> lanes(kLssSumLanes);
  for (;;) {
    std::fill(lanes.begin(), lanes.end(), 0.0);
    for (int64_t i : active) lanes[static_cast<size_t>(i % kLssSumLanes)] += static_cast<double>(c[i]);
    const double rest = lane_tree(lanes.data());
    kappa = (budget - static_cast<double>(saturated)) / rest;
    std::vector<int64_t> keep;
    keep.reserve(active.size());
    for (int64_t i : active) {
      if (kappa * static_cast<double>(c[i]) >= 1.0) {
        p[i] = 1.0f;
        ++saturated;
      } else {
        keep.push_back(i);
      }
    }
    if (keep.size() == active.size()) break;
    active.swap(keep);
  }
  for (int64_t i : active) p[i] = static_cast<float>(kappa * static_cast<double>(c[i]));
}

void lss_round_pow2(const TensorView& probs, int max_exponent, int64_t max_rows,
                    TensorView exponents) {
  const int64_t n = check_flat(probs, "probs", DType::kFloat32);
  if (max_exponent < 0 || max_exponent > 30) {
    throw_error(ErrorKind::kValue, "max_exponent: expected an integer in [0, 30], got " +
                                       std::to_string(max_exponent));
  }
  check_dtype(exponents, "exponents", {DType::kInt8});
  check_vector(exponents, "exponents", n);
  // Every row at one unit must fit: then the search below always ends feasible.
  if (max_rows < 0 || max_rows > INT32_MAX || (max_rows << max_exponent) < n) {
    throw_error(ErrorKind::kValue,
                "max_rows: expected a row capacity in [ceil(n / 2^max_exponent), "
                "2^31 - 1] = [" +
                    std::to_string((n + (int64_t{1} << max_exponent) - 1) >> max_exponent) +
                    ", 2147483647] for n = " + std::to_string(n) + " rows, got " +
                    std::to_string(max_rows));
  }
  const float* p = probs.ptr<const float>();
  for (int64_t i = 0; i < n; ++i) {
    if (!(p[i] >= 0.0f && p[i] <= 1.0f)) {
      throw_error(ErrorKind::kValue, "probs: expected probabilities in [0, 1], got " +
                                         std::to_string(p[i]) + " at index " + std::to_string(i));
    }
  }
  const int64_t cap = max_rows << max_exponent;  // in units (lss.h)
  auto units = [&](double tau) {
    int64_t s = 0;
    for (int64_t i = 0; i < n; ++i)
      s += lss_units(lss_exponent(p[i], tau, max_exponent), max_exponent);
    return s;
  };
  int8_t* k = exponents.ptr<int8_t>();
  if (units(kLssTau0) <= cap) {
    for (int64_t i = 0; i < n; ++i) {
      k[i] = static_cast<int8_t>(lss_exponent(p[i], kLssTau0, max_exponent));
    }
    return;
  }
  double lo = kLssTau0, hi = kLssTau0;
  int64_t at_lo = 0;  // S(lo), kept from the pass that tested lo
  for (int j = 1; j <= max_exponent; ++j) {
    hi = lo;
    lo *= 0.5;
    at_lo = units(lo);
    if (at_lo <= cap) break;
  }
  for (int s = 0; s < kLssTauSteps; ++s) {
    const double mid = (lo + hi) * 0.5;
    const int64_t at_mid = units(mid);
    if (at_mid <= cap) {
      lo = mid;
      at_lo = at_mid;
    } else {
      hi = mid;
    }
  }
  // The rows whose exponent differs between lo and hi take hi's in index order while the units fit.
  const int64_t slack = cap - at_lo;
  int64_t taken = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int klo = lss_exponent(p[i], lo, max_exponent),
              khi = lss_exponent(p[i], hi, max_exponent);
    taken += lss_units(khi, max_exponent) - lss_units(klo, max_exponent);
    k[i] = static_cast<int8_t>(taken <= slack ? khi : klo);
  }
}

int64_t lss_select(const TensorView& exponents, int max_exponent, const RandomKey& rng,
                   TensorView slot_rows) {
  const int64_t n = check_flat(exponents, "exponents", DType::kInt8);
  if (max_exponent < 0 || max_exponent > 30) {
    throw_error(ErrorKind::kValue, "max_exponent: expected an integer in [0, 30], got " +
                                       std::to_string(max_exponent));
  }
  if (n > INT32_MAX) {
    throw_error(ErrorKind::kValue, "exponents: at most 2^31 - 1 rows can be indexed in int32");
  }
  const int8_t* k = exponents.ptr<const int8_t>();
  const int kmax = max_exponent;
  std::vector<int64_t> start(static_cast<size_t>(kmax) + 1, 0);  // per exponent: count, then a_i
  for (int64_t i = 0; i < n; ++i) {
    if (k[i] < -1 || k[i] > kmax) {
      throw_error(ErrorKind::kValue, "exponents: expected values in [-1, " + std::to_string(kmax) +
                                         "], got " + std::to_string(k[i]) + " at index " +
                                         std::to_string(i));
    }
    if (k[i] >= 0) ++start[static_cast<size_t>(k[i])];
  }
  int64_t total = 0;  // units, dyadic order: exponent 0 first
  for (int e = 0; e <= kmax; ++e) {
    const int64_t count = start[static_cast<size_t>(e)];
    start[static_cast<size_t>(e)] = total;
    total += count * lss_units(e, kmax);
  }
  const int64_t strata = (total + (int64_t{1} << kmax) - 1) >> kmax;
  check_dtype(slot_rows, "slot_rows", {DType::kInt32});
  if (slot_rows.ndim != 1 || !slot_rows.is_contiguous() || slot_rows.numel() < strata) {
    throw_error(ErrorKind::kValue, "slot_rows: expected a contiguous int32 vector of at least " +
                                       std::to_string(strata) +
                                       " elements (the strata of these "
                                       "exponents)");
  }
  if (slot_rows.numel() > 0) check_not_null(slot_rows, "slot_rows");
  int32_t* out = slot_rows.ptr<int32_t>();
  std::fill(out, out + slot_rows.numel(), -1);
  const int64_t mask = (int64_t{1} << kmax) - 1;
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (k[i] < 0) continue;
    const int64_t u = lss_units(k[i], kmax);
    const int64_t a = start[static_cast<size_t>(k[i])];
    start[static_cast<size_t>(k[i])] += u;
    const int64_t m = a >> kmax, o = a & mask;
    const int64_t v =
        kmax == 0 ? 0
                  : static_cast<int64_t>(
                        random_u32(rng.seed, rng.stream, static_cast<uint64_t>(m)) >> (32 - kmax));
    if (v >= o && v < o + u) {
      out[m] = static_cast<int32_t>(i);
      ++kept;
    }
  }
  return kept;
}

}  // namespace int4train
