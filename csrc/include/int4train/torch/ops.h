// int4train for LibTorch: C++ entry points of the torch.ops.int4train.* operators. Each function calls
// its op through the dispatcher, so CPU and CUDA tensors, autograd (linear, hadamard_transform) and
// autocast (linear) work as they do from Python. Link the int4train_torch library to register them.
//
// Conventions shared by every op (docs/pytorch.md has the full table):
//   - packed INT4 codes are uint8 tensors (..., ceil(K / 2)), two codes a byte, low nibble first
//     (int4train/int4.h);
//   - seeds and random streams are int64 values reinterpreted as the core's uint64 (philox.h);
//   - `step` is an integer scalar tensor holding the training step (its low 32 bits key the random
//     streams); `layer` is the layer id of the random streams;
//   - recipes are named "fp", "int8", "lsq_luq", "hq", "hq_bs", "hq_lss" (int4train/linear.h);
//   - bad arguments raise c10::ValueError / c10::TypeError (Python: ValueError / TypeError).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace int4train::pt {

// ---------------------------------------------------------------- the quantized linear layer

// y = x weight^T + bias under `recipe`, differentiable in x, weight, bias and both LSQ steps (the
// backward is the recipe's quantized backward). x: (..., D) fp32 or bf16, weight (C, D) and bias (C)
// of x's dtype; input_step / weight_step: one-element float tensors, required by the LSQ recipes
// (lsq_luq, hq, hq_bs, hq_lss) and ignored by fp / int8; the quantizers use |step| in fp32 (floored
// at the smallest normal float, so an optimizer update across zero mirrors the step rather than
// breaking the layer); hadamard_block: a power of two dividing D for the hq recipes, 1 otherwise.
// Returns (..., C) in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& input_step,
                  const std::optional<at::Tensor>& weight_step, const std::string& recipe,
                  int64_t hadamard_block, int64_t seed, const at::Tensor& step, int64_t layer);

// The forward alone (not differentiable). x: (N, D). Returns (y (N, C), codes, aux, scale,
// saved_step): what the backward needs, shaped by int4train::linear_saved_shapes: LSQ recipes save
// uint8 (N, ceil(D/2)) packed codes and uint8 aux bits; int8 saves int8 (N, D) codes and its fp32
// scale; fp saves an empty (0, 0) codes tensor (its backward takes x). scale is always an fp32 0-dim
// tensor; saved_step an int64 0-dim copy of `step`, to pass as the backward's step.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& input_step, const std::optional<at::Tensor>& weight_step,
    const std::string& recipe, int64_t hadamard_block, int64_t seed, const at::Tensor& step,
    int64_t layer);

// The backward alone. grad_y: (N, C); x: the forward input (fp recipe only); codes, aux, scale: as
// linear_forward returned them; output_mask selects (grad_x, grad_weight, grad_bias,
// grad_input_step, grad_weight_step); an unselected output is an empty (0,) tensor. The sixth output
// is int64 (2,): rows kept by the input- and weight-gradient sampling (hq_lss; zeros otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const at::Tensor& codes,
    const at::Tensor& aux, const at::Tensor& scale, const at::Tensor& weight,
    const std::optional<at::Tensor>& input_step, const std::optional<at::Tensor>& weight_step,
    const std::string& recipe, int64_t hadamard_block, int64_t seed, const at::Tensor& step,
    int64_t layer, std::array<bool, 5> output_mask);

// ---------------------------------------------------------------- components

// x (..., D) times blockdiag(H_block, ...), fp32 or bf16, differentiable (the transform is its own
// inverse and transpose).
at::Tensor hadamard_transform(const at::Tensor& x, int64_t block);
// The block size a layer would pick on this first batch: (int64 0-dim block, fp64 errors of the
// candidates 1, 2, 4, ... that divide D, up to max_block).
std::tuple<at::Tensor, at::Tensor> select_hadamard_block(const at::Tensor& x, const at::Tensor& w,
                                                         int64_t max_block = 256);
// LSQ first-batch step 2 mean|x| / sqrt(7), fp32 0-dim.
at::Tensor lsq_init_step(const at::Tensor& x);
// The step minimising x's 4-bit reconstruction error on a fixed grid (quantize.h, lsq_mse_step), fp32
// 0-dim on x's device; the same bits on every device.
at::Tensor lsq_mse_step(const at::Tensor& x);
// LSQ codes of x (..., D): int8 (..., D), or uint8 (..., ceil(D/2)) packed; and the int64 0-dim
// count of non-finite inputs.
std::tuple<at::Tensor, at::Tensor> lsq_quantize(const at::Tensor& x, const at::Tensor& step,
                                                bool packed = false);
// Unbiased bit splitting of a gradient g (..., C): (hi, lo, scale) with g ~ scale (16 hi + lo).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_bitsplit(const at::Tensor& g, int64_t seed,
                                                                 int64_t stream,
                                                                 bool packed = false);
// int8 codes in [-8, 7] (..., K) <-> uint8 (..., ceil(K/2)).
at::Tensor pack_int4(const at::Tensor& codes);
at::Tensor unpack_int4(const at::Tensor& packed, int64_t cols);
// Exact int32 a b^T of int8 codes, or of packed INT4 (uint8) rows. a: (M, K), b: (N, K).
at::Tensor gemm_s32(const at::Tensor& a, const at::Tensor& b);
// Water-filled keep probabilities min(1, kappa c_i) summing to budget. scores: fp32 (n,).
at::Tensor lss_probabilities(const at::Tensor& scores, double budget);

}  // namespace int4train::pt
