// int4train core: every quantizer of the method. Forward: LSQ (learned step size) to signed INT4 and
// the absmax INT8 baseline. Backward (gradients): unbiased bit splitting into two INT4 matrices, plain
// stochastic 4/8-bit, and LUQ (the 4-bit logarithmic baseline). All are per-tensor.
//
// Shapes: every function takes a matrix (rows x cols, row-contiguous). Rounding follows numeric.h.
// Non-finite inputs: a NaN maps to code 0 and +-Inf clamps to the end of the grid, so no integer
// conversion ever sees a non-finite value. Scales computed from the data (absmax) become non-finite when
// the data holds a non-finite value, so dequantized results are non-finite too and the problem
// surfaces (AMP's GradScaler skips such a step) instead of being hidden. For learned steps, where the
// scale does not see the data, the quantizer reports how many non-finite inputs it met.
#pragma once

#include <cstdint>

#include "int4train/common.h"
#include "int4train/philox.h"

namespace int4train {

// ---------------------------------------------------------------- LSQ (forward, learned step)
// Q_N = 8, Q_P = 7 for signed INT4.
constexpr int kLsqQn = 8;
constexpr int kLsqQp = 7;

// The step a layer quantizes with, from its learned parameter p: |p| floored at the smallest normal
// float, so that an optimizer update carrying p across zero mirrors the step instead of breaking
// the quantizers (which need s > 0); NaN stays NaN. lsq_step_param_grad is the chain rule back to p
// as PyTorch differentiates clamp_min(abs(p), floor): g * 1[|p| >= floor] * sign(p), sign being 0
// at +-0 and NaN. The PyTorch layer applies both (csrc/autograd.cpp); the core's functions below
// take the step itself.
constexpr float kLsqStepFloor = 0x1p-126f;
INT4TRAIN_HD float lsq_step_of_param(float p) {
  const float a = p < 0.0f ? -p : p;
  return a < kLsqStepFloor ? kLsqStepFloor : a;
}
INT4TRAIN_HD float lsq_step_param_grad(float p, float g) {
  const float a = p < 0.0f ? -p : p;
  const float sign = p > 0.0f ? 1.0f : (p < 0.0f ? -1.0f : 0.0f);
  return (a >= kLsqStepFloor ? g : 0.0f) * sign;
}

// First-batch initial step: s = 2 * mean|x| / sqrt(Q_P), mean accumulated in fp64. An all-zero x gives
// s = 1 (any positive step quantizes zeros exactly). A non-finite x is an Error naming `x`.
float lsq_init_step(const TensorView& x, int qp = kLsqQp);

// First-batch initial step that minimises the 4-bit reconstruction error instead (LSQ+'s choice):
//   s = argmin over the grid of sum_k (s * clamp(round_half_even(x_k * (1/s)), -Q_N, Q_P) - x_k)^2
// (Q_N = qp + 1). The data: all of x if it has at most kLsqMseSample elements, else its whole rows
// 0, t, 2t, ... with t = ceil(rows / max(1, floor(kLsqMseSample / cols))) (rows are tokens or output
// units; every column is in the sample, so outlier channels count as often as in x): a sample that a
// caller holding x on another device can gather itself and pass as a matrix to get the same step. In
// row-major order, with m0 = 2 mean|sample| / sqrt(qp) (the lsq_init_step of the sample) the grid is
// m0 * f for f = 0.20, 0.22, ..., 2.00, then f* + 0.002 j (j = -9..9) around the best f*; every
// candidate step is the fp32 product float(m0) * float(f), errors are fp64 sums in index order, the
// first smallest wins. Why: the mean-abs rule is tuned for heavy-tailed data; after a Hadamard
// rotation the data is near Gaussian and the rule's step is ~1.5x the error-minimising one
// (docs/method.md). An all-zero sample gives 1; a non-finite value anywhere in x (not only in the
// sample) is an Error naming `x`.
constexpr int64_t kLsqMseSample = int64_t{1} << 20;
float lsq_mse_step(const TensorView& x, int qp = kLsqQp);
// The row stride t of lsq_mse_step's sample of a rows x cols matrix (1: all of it).
constexpr int64_t lsq_mse_sample_stride(int64_t rows, int64_t cols) {
  const int64_t per = cols > 0 && kLsqMseSample / cols > 1 ? kLsqMseSample / cols : 1;
  return rows * cols <= kLsqMseSample ? 1 : (rows + per - 1) / per;
}

// codes = clamp(round_half_even(x * (1/s)), -8, 7). step: fp32 scalar (> 0 and finite, else Error).
// codes: int8 (rows x cols) or kInt4Packed. Returns the number of non-finite values met in x.
int64_t lsq_quantize(const TensorView& x, const TensorView& step, TensorView codes);
int64_t lsq_quantize_ref(const TensorView& x, const TensorView& step, TensorView codes);

// Full-information LSQ backward (straight-through estimator), v = x * (1/s):
//   grad_x = grad_xhat * 1[-Q_N <= v <= Q_P]
//   grad_step += gamma * sum(grad_xhat * r), r = round(v) - v inside, -Q_N below, Q_P above,
//   gamma = 1 / sqrt(numel(x) * Q_P); the sum is accumulated in fp64 and written as fp32.
// grad_xhat: fp32 same shape as x; grad_x: fp32 or bf16 (may be grad_xhat itself, fp32, in place;
// any other overlap is an Error); grad_step: fp32
// scalar, overwritten (not accumulated). Either output may have a null data pointer to skip it.
void lsq_backward(const TensorView& x, const TensorView& step, const TensorView& grad_xhat,
                  TensorView grad_x, TensorView grad_step);

// Compact LSQ state saved for backward (0.5 + 0.125 byte per element): packed INT4 codes plus one
// auxiliary bit per element, flat row-major index e in bit (e % 8) of byte e / 8.
//   interior codes (-7..6): the bit is a Bernoulli(r + 1/2) draw (stream kLsqAux, index e), so that
//     r_hat = bit - 1/2 is an unbiased estimate of the rounding residual r in [-1/2, 1/2]; drawn by
//     numeric.h's stochastic rounding, bit = min(1, floor((r + 1/2) + u)), r = rint(v) - v, all fp32,
//     u = random_uniform(rng.seed, rng.stream, e) (a NaN input is stored as code 0, bit 0);
//   boundary codes (-8, 7): the bit is 1 iff the value was clipped (v < -8 or v > 7); when not
//     clipped, r is known to lie in [-1/2, 0] (code -8) or [0, 1/2] (code 7) and r_hat is the
//     midpoint -1/4 or +1/4 (a bias of at most 1/4 on these rare elements; documented in docs/).
// aux: uint8 vector of ceil(rows * cols / 8) bytes; unused trailing bits are written 0.
int64_t compact_aux_bytes(int64_t rows, int64_t cols);
int64_t lsq_quantize_compact(const TensorView& x, const TensorView& step, const RandomKey& rng,
                             TensorView packed_codes, TensorView aux);
// The backward of the compact state: grad_x = grad_xhat * mask, grad_step = gamma * sum(grad_xhat *
// r_hat) with mask and r_hat decoded from (codes, aux) as above. Same conventions as lsq_backward.
void lsq_backward_compact(const TensorView& packed_codes, const TensorView& aux,
                          const TensorView& grad_xhat, TensorView grad_x, TensorView grad_step);

// ---------------------------------------------------------------- absmax (INT8 baseline forward)
// scale = max|x| / qmax (fp32; 1 when x is all zero), codes = clamp(round_half_even(x / scale)).
// codes: int8. scale: fp32 scalar out.
void quantize_absmax(const TensorView& x, int qmax, TensorView codes, TensorView scale);

// ---------------------------------------------------------------- gradients (backward)
// max |g| over the tensor in fp32 (NaN if g holds a NaN, +Inf if it holds an infinity).
float absmax(const TensorView& g);

// Unbiased bit splitting (ALGORITHM.md, backward step 1): s = max|G| / 119,
// q = clamp(floor(G * (119 / max|G|) + u), -119, 119) with u from (rng, flat index),
// hi = floor((q + 8) / 16) in [-7, 7], lo = q - 16 hi in [-8, 7], so G ~ s (16 hi + lo), E = G.
// An all-zero G gives s = 0 and zero codes. hi, lo: int8 or kInt4Packed (rows x cols); scale: fp32.
constexpr int kBitSplitLevels = 119;
void quantize_bitsplit(const TensorView& g, const RandomKey& rng, TensorView hi, TensorView lo,
                       TensorView scale);
// Bit splitting with a power-of-two refinement per row (hq_bs / hq_lss with grad_scale=row,
// linear.h): s = max|G| / 119 as above, but row i is quantized at s * 2^-k_i, where k_i is the
// largest k <= max_exponent with max|G_i| * 2^k <= max|G| (every k_i is 0 when max|G| is 0 or not
// finite): q = clamp(floor(G_ij * ((119 / max|G|) * 2^k_i) + u), -119, 119), split as above, so
// G_i ~ s 2^-k_i (16 hi + lo) with E = G. A row whose largest entry is 2^-k of the tensor's keeps
// k more bits. max_exponent in [0, kGradRowMaxExponent]; row_exp: int8 vector of N, out (k_i).
constexpr int kGradRowMaxExponent = 4;
void quantize_bitsplit_rows(const TensorView& g, int max_exponent, const RandomKey& rng,
                            TensorView hi, TensorView lo, TensorView scale, TensorView row_exp);
void quantize_bitsplit_ref(const TensorView& g, const RandomKey& rng, TensorView hi, TensorView lo,
                           TensorView scale);

// Plain unbiased stochastic quantizer: s = max|G| / qmax, q = clamp(floor(G / s + u), -qmax, qmax).
// qmax = 7 is the "hq" recipe's 4-bit gradient, 127 the INT8 baseline's. codes: int8 or kInt4Packed
// (qmax <= 7 only). An all-zero G gives s = 0 and zero codes.
void quantize_stochastic(const TensorView& g, int qmax, const RandomKey& rng, TensorView codes,
                         TensorView scale);

// LUQ (Chmiel et al. 2023), the 4-bit logarithmic gradient of the lsq_luq baseline: alpha = max|G|,
// magnitudes alpha * 2^-k for k = 0..6 and 0. A |g| below alpha 2^-6 becomes alpha 2^-6 with
// probability |g| / (alpha 2^-6), else 0 (stochastic underflow); a |g| between two levels rounds to
// one of them with probabilities linear in the distance (unbiased). Codes c in [-7, 7] (int8): 0 is
// zero, otherwise value = sign(c) * alpha * 2^(|c| - 7). scale: fp32 alpha (0, with zero codes, for an
// all-zero G). In fp32: y = |g| * (1 / alpha) * 64; y < 1 gives |c| = floor(y + u), otherwise
// y = 2^e (1 + t) exactly and |c| = min(7, 1 + e + floor(t + u)).
constexpr int kLuqLevels = 7;
void quantize_luq(const TensorView& g, const RandomKey& rng, TensorView codes, TensorView scale);
// values = decoded LUQ codes (fp32).
void dequantize_luq(const TensorView& codes, const TensorView& scale, TensorView values);

// values = scale * codes for int8 or kInt4Packed codes; values fp32 or bf16.
void dequantize(const TensorView& codes, const TensorView& scale, TensorView values);

}  // namespace int4train
