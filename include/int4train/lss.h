// int4train core: leverage score sampling (ALGORITHM.md, backward step 3): scores, water-filling
// probabilities for a budget, power-of-two rounding, Bernoulli selection and importance weights.
//
// The estimator: each of n rows is kept with probability p_i and a kept row is weighted by 1 / p_i, so
// the sum over kept rows is unbiased for the sum over all rows. Rounding p_i to a power of two
// p'_i = 2^-k_i (any p' > 0 keeps the estimator unbiased) makes the weight 2^k_i exact in every
// arithmetic the products use, so the sampled products stay integer products (see linear.h).
#pragma once

#include <cstdint>

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

// Round each probability to a power of two p' = 2^-k, k = round(-log2 p) (nearest in the log domain),
// clamped to [0, max_exponent] (0..32); p = 0 gives k = -1 (never kept, weight 0). probs: fp32 in
// [0, 1] (anything else is an Error naming `probs`); exponents: int8. The rounding is exact (no log):
// with p = m 2^E, m in [1/2, 1), k = 1 - E if m^2 < 1/2 else -E.
//
// kLssMaxExponent is the layers' cap (linear.h, hq_lss): p' >= 1/16, so an importance weight is at
// most 16. Any p' > 0 keeps the estimator unbiased; the cap keeps rows of tiny p more often than p
// asks (variance down, the expected count up by at most 1/16 per such row) and bounds every weighted
// code, 2^k times a 4-bit code, to [-128, 112]: an int8, so the GPU folds the weights of the weight
// gradient's tokens into its INT8 operands (cuda.h) and keeps one product per gradient.
constexpr int kLssMaxExponent = 4;
void lss_round_pow2(const TensorView& probs, int max_exponent, TensorView exponents);

// Bernoulli selection: row i is kept iff bernoulli_pow2(random_u32(rng.seed, rng.stream, i), k_i).
// Writes the kept row indices in ascending order into `indices` (int32, capacity >= n) and returns
// their count. A kept row's importance weight is 2^k_i. exponents: int8 in [-1, 32].
int64_t lss_select(const TensorView& exponents, const RandomKey& rng, TensorView indices);

}  // namespace int4train
