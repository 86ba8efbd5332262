// int4train core: the block-diagonal fast Walsh-Hadamard transform over the last dimension, and the
// per-layer choice of its block size (ALGORITHM.md, forward steps 1-2).
#pragma once

#include <cstdint>
#include <vector>

#include "int4train/common.h"

namespace int4train {

// Block sizes are powers of two from 1 (no transform) to kMaxHadamardBlock. 256 spreads an outlier
// over 256 channels (its magnitude drops 16x) and still fits one GPU warp's registers (8 values a lane).
constexpr int32_t kMaxHadamardBlock = 256;

// True iff block is a power of two in [1, kMaxHadamardBlock].
bool is_valid_hadamard_block(int32_t block);

// out = in * B_g, B_g = blockdiag(H_g, ..., H_g), H_g the orthonormal Sylvester matrix. Applied to each
// row of an M x D matrix; D must be a multiple of `block` (else Error naming `block`). Computed in fp32
// in this exact order, which every implementation (CPU fast path, CUDA) reproduces bit for bit:
//   for h = 1, 2, 4, ..., block/2:  for each pair (i, i + h) with i & h == 0 inside a block:
//        (a, b) <- (a + b, a - b)
//   then every value is multiplied by the fp32 constant float(1 / sqrt(double(block))).
// H_g is symmetric and orthonormal, so the same call inverts it. in/out: fp32 or bf16 (independently),
// same shape; out may alias in when both have the same dtype and strides. bf16 out rounds to nearest
// even. Non-finite values propagate through the arithmetic within their block, nothing else.
void hadamard_transform(const TensorView& in, TensorView out, int32_t block);
// The plain scalar reference (same order, same results); the fast path is judged against it.
void hadamard_transform_ref(const TensorView& in, TensorView out, int32_t block);

// Result of the block-size search: the chosen block and, for each candidate tried (ascending powers
// of two), the product of the reconstruction errors of X and W.
struct HadamardChoice {
  int32_t block = 1;
  std::vector<int32_t> candidates;
  std::vector<double> errors;
};

// Chooses g among the powers of two that divide D, from 1 up to max_block (<= kMaxHadamardBlock), by
// the smallest ||X~ - s_x Q_x||_F * ||W~ - s_w Q_w||_F, where X~ = X B_g, s is the LSQ first-batch
// initial step (lsq_init_step) and Q the 4-bit codes (the reference code's criterion). Ties go to
// the smaller block. x: N x D, w: C x D, fp32 or bf16. Non-finite values are an Error naming the
// argument (the choice is made once, on the first batch, and must not be garbage).
HadamardChoice select_hadamard_block(const TensorView& x, const TensorView& w,
                                     int32_t max_block = kMaxHadamardBlock);

}  // namespace int4train
