// int4train core: leverage score sampling (ALGORITHM.md, backward step 3): scores, water-filling
// probabilities for a budget, power-of-two rounding within a row capacity, a stratified selection
// of at most that many rows, and importance weights.
//
// The estimator: each of n rows is kept with probability p_i and a kept row is weighted by 1 / p_i,
// so the sum over kept rows is unbiased for the sum over all rows (whatever the joint law of the
// selections: the paper draws independent Bernoullis, this library a stratified draw of a fixed
// maximum size, below). Rounding p_i to a power of two
// p'_i = 2^-k_i (any p' > 0 keeps the estimator unbiased) makes the weight 2^k_i exact in every
// arithmetic the products use, so the sampled products stay integer products (see linear.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "int4train/common.h"
#include "int4train/philox.h"

namespace int4train {

// Euclidean norm of each row, fp32 out (accumulated in fp64 on the CPU). in: fp32, bf16, int8 codes or
// kInt4Packed codes (rows x cols); norms: fp32 vector of `rows`.
void row_norms(const TensorView& in, TensorView norms);

// Water-filling: p_i = min(1, kappa * c_i) with kappa chosen so that sum p_i = budget. Deterministic:
//   sat = {}; repeat { kappa = (budget - |sat|) / sum_{i not in sat, c_i > 0} c_i;
//                      add every i with kappa * c_i >= 1 to sat } until nothing is added;
//   p_i = float(kappa * c_i) for the rest (fp64 products, one rounding to fp32).
// Rows with c_i = 0 get p_i = 0. If budget >= the number of positive scores, every positive score gets
// p = 1. scores: fp32 >= 0 (a negative or non-finite score is an Error naming `scores`); budget > 0
// (or 0 when there are no scores); probs: fp32, same length.
//
// The sums are fp64 in one fixed order, the same on the CPU and the GPU (lss_sample_cuda), so both
// get the same kappa bit for bit: L = kLssSumLanes lanes, lane t adds the terms of indices t, t + L,
// t + 2L, ... in index order starting from 0.0; then a tree: within each group of 32
// consecutive lanes, for s = 16, 8, ..., 1 every lane t < s of the group does lane[t] += lane[t + s];
// then the same tree over the 32 group sums (group g's sum is its first lane). One GPU block of L
// threads runs exactly this with warp shuffles; a plain index-order sum would be a serial chain of n
// additions there.
constexpr int kLssSumLanes = 1024;
void lss_probabilities(const TensorView& scores, double budget, TensorView probs);

// ---- Fixed-size selection. The probabilities are rounded to powers of two p' = 2^-k that fit a
// row capacity M (sum p' <= M), then one stratified draw keeps at most M rows with P(keep i) = p'_i
// exactly, so the sampled products run with M rows known on the host (the GPU compacts the kept
// rows; cuBLASLt takes shapes on the host) and the estimator stays unbiased.
//
// Exponent of one probability for a threshold tau in (0, 1): the largest k with p * tau * 2^k <= 1,
// clamped to [0, max_exponent]; p = 0 gives -1 (never kept, weight 0). q = double(p) * tau (one
// fp64 rounding) is normal for every p > 0, so with q = m 2^E, m in [1/2, 1): k = -E, or 1 - E when
// m = 1/2, read from q's bits (no logarithm). tau = kLssTau0 (the fp64 nearest 2^-1/2) is rounding
// to the nearest power of two in the log domain.
constexpr double kLssTau0 = 0x1.6a09e667f3bcdp-1;
INT4TRAIN_HD int lss_exponent(float p, double tau, int max_exponent) {
  if (!(p > 0.0f)) return -1;
  const double q = static_cast<double>(p) * tau;
#if defined(__CUDA_ARCH__)
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(q));
#else
  uint64_t bits = 0;
  std::memcpy(&bits, &q, sizeof q);
#endif
  const int k =
      1022 - static_cast<int>((bits >> 52) & 0x7FFu) + ((bits & 0xFFFFFFFFFFFFFull) == 0 ? 1 : 0);
  return k < 0 ? 0 : (k > max_exponent ? max_exponent : k);
}

// Units of a kept-row exponent k in a capacity of 2^K units per row (K = max_exponent): 2^(K - k).
INT4TRAIN_HD int64_t lss_units(int k, int max_exponent) {
  return k < 0 ? 0 : int64_t{1} << (max_exponent - k);
}

// The row capacity of a selection over `rows` rows with water-filling budget `budget` (B * N for
// the layers): min(rows, ceil(budget)).
inline int64_t lss_capacity(double budget, int64_t rows) {
  const double c = std::ceil(budget);
  return c >= static_cast<double>(rows) ? rows : static_cast<int64_t>(c);
}

// Power-of-two exponents within a row capacity M: the exponents of one threshold, k_i =
// lss_exponent(p_i, tau, K), with the unit sum S(tau) = sum_i lss_units(k_i, K) <= M 2^K:
//   if S(kLssTau0) <= M 2^K: k_i = lss_exponent(p_i, kLssTau0, K) (nearest rounding);
//   else lo = the first of kLssTau0 2^-j (j = 1 .. K, exact halvings) with S(lo) <= M 2^K, hi = 2
//   lo; kLssTauSteps times: mid = (lo + hi) * 0.5 (fp64); S(mid) <= M 2^K ? lo = mid : hi = mid;
//   then the rows whose exponent differs between lo and hi take hi's exponent (twice the units) in
//   index order as long as the sum of those extra units so far is at most M 2^K - S(lo), lo's
//   after.
// The last step spends the room a single threshold leaves where many rows share one (every
// saturated row has p = 1, so a threshold below 1/2 would halve them all at once). S is exact
// (integers), so the CPU and the GPU choose the same exponents. At j = K every positive row has k =
// K (one unit), so M 2^K >= n (checked: an Error naming `max_rows`) makes the search always
// succeed. probs: fp32 in [0, 1] (anything else is an Error naming `probs`); max_exponent in [0,
// 30]; exponents: int8.
//
// kLssMaxExponent is the layers' K: p' >= 1/16, so an importance weight is at most 16. Any p' > 0
// keeps the estimator unbiased; the floor keeps rows of tiny p more often than p asks (variance
// down) and bounds every weighted code, 2^k times a 4-bit code, to [-128, 112]: an int8, so the GPU
// folds the weights of the weight gradient's tokens into its INT8 operands (cuda.h).
constexpr int kLssMaxExponent = 4;
constexpr int kLssTauSteps = 6;
void lss_round_pow2(const TensorView& probs, int max_exponent, int64_t max_rows,
                    TensorView exponents);

// Stratified selection of the rows with exponents k_i (K = max_exponent): row i takes
// u_i = lss_units(k_i, K) units of a line of units laid out in "dyadic order" (every row of k = 0
// in index order, then every row of k = 1, ..., then k = K), so row i starts at
//   a_i = sum_{k' < k_i} n_k' 2^(K - k') + 2^(K - k_i) * (rows of exponent k_i before i),
// and its units never cross a multiple of 2^K. Stratum m (units [m 2^K, (m + 1) 2^K)) draws
// v_m = the top K bits of random_u32(rng.seed, rng.stream, m) (0 when K = 0); row i is kept iff
// a_i mod 2^K <= v_m < a_i mod 2^K + u_i with m = a_i / 2^K, and goes to slot m. So
// P(keep i) = u_i / 2^K = 2^-k_i, at most one row per stratum is kept, and the kept rows fill slots
// 0 .. ceil(S / 2^K) - 1 (only the last can be empty), S = sum u_i <= capacity 2^K after
// lss_round_pow2. A kept row's importance weight is 2^k_i.
// exponents: int8 in [-1, max_exponent]; max_exponent in [0, 30]; slot_rows: int32, at least
// ceil(S / 2^K) entries (an Error naming `slot_rows` otherwise), every entry written: the row kept
// in that slot or -1. Returns the number of rows kept.
int64_t lss_select(const TensorView& exponents, int max_exponent, const RandomKey& rng,
                   TensorView slot_rows);

}  // namespace int4train
