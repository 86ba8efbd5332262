// int4train core: the quantized linear layer as two composable functions, forward (HQ-MM) and
// backward (LSS-MM), for every recipe of ALGORITHM.md's baseline list.
//
// Shapes (the layer's vocabulary): x is N x D (N tokens, D = in_features), w is C x D (C =
// out_features), bias is C, y = x w^T + b is N x C, grad_y is N x C. The forward product is the GEMM
// of gemm.h with M = N, GEMM-N = C, K = D; the input-gradient product has M = N, GEMM-N = D, K = C;
// the weight-gradient product has M = C, GEMM-N = D, K = (sampled) tokens.
//
// Recipes:
//   fp       no quantization: fp32 products.
//   int8     per-tensor absmax INT8 forward (round to nearest), per-tensor stochastic INT8 gradient.
//   lsq_luq  LSQ 4-bit forward without Hadamard (block 1); LUQ 4-bit logarithmic gradient.
//   hq       Hadamard + LSQ 4-bit forward; plain stochastic 4-bit gradient (qmax 7).
//   hq_bs    Hadamard + LSQ forward; bit-split gradient, all 2N rows (what the reference code ran).
//   hq_lss   Hadamard + LSQ forward; bit split + leverage score sampling (the paper's method).
// In the LSQ recipes every product runs on INT4 codes with exact int32 accumulation; the backward
// products reuse the forward codes of x (the compact state of quantize.h) and the codes of w, which
// are recomputed from the weight (a parameter, unchanged until the optimizer step) together with its
// exact clip mask and residual; results are rotated back by the Hadamard transform.
//
// hq_lss sampling: the 2N bit-split rows R = [16 s hi ; s lo] get scores ||R_i|| (input gradient) and
// ||R_i|| * ||x_hat_(i mod N)|| (weight gradient), water-filled to budget lss_budget * N, rounded to
// powers of two within the capacity ceil(lss_budget * N) and drawn by the stratified selection (lss.h;
// k <= kLssMaxExponent; at most that many rows kept). Input gradient: kept rows, one INT4 product,
// scaled per output row by 2^k (x16 for hi rows) and summed into their token's row. Weight gradient:
// kept rows grouped by their exponent e = k (+4 for hi rows); one INT4 product per group, summed
// exactly in int64 with weight 2^e. (The GPU path, cuda.h, computes the same integers another way:
// one product over the kept rows' slots with 2^k folded into their codes and the x16 of hi rows into
// their tokens' codes.)
#pragma once

#include <cstdint>
#include <string>

#include "int4train/common.h"

namespace int4train {

enum class Recipe : int32_t { kFp = 0, kInt8 = 1, kLsqLuq = 2, kHq = 3, kHqBs = 4, kHqLss = 5 };
constexpr int kNumRecipes = 6;

const char* recipe_name(Recipe recipe);
// Accepts "fp", "int8", "lsq_luq", "hq", "hq_bs", "hq_lss"; anything else is an Error listing them.
Recipe parse_recipe(const std::string& name);
bool recipe_uses_lsq(Recipe recipe);       // lsq_luq, hq, hq_bs, hq_lss
bool recipe_uses_hadamard(Recipe recipe);  // hq, hq_bs, hq_lss

// lss_budget (used by hq_lss, checked for every recipe): how many of the 2N bit-split rows leverage
// score sampling keeps, in units of N: the water-filling budget is B = lss_budget * N and each
// sampled product has at most ceil(B) rows (lss.h: the power-of-two probabilities fit that capacity
// and the stratified selection never exceeds it). 1 is the paper's method (each sampled product
// costs one N-row product); 2 keeps every non-zero row with p = 1, which gives hq_bs's gradients
// bit for bit. In [1/8, 2] (an Error naming `lss_budget` otherwise): below 1/8 the probabilities'
// floor of 2^-kLssMaxExponent = 1/16 cannot fit 2N rows into the capacity.
constexpr double kLssDefaultBudget = 1.0;
constexpr double kLssMinBudget = 0.125;
constexpr double kLssMaxBudget = 2.0;

// The small-shape rule (docs/cuda.md, "The small-shape rule"): on Hopper a 4-bit product runs on
// 8-bit tensor cores at about 1.5-1.8x bf16's rate on large shapes, and the quantizers, the bit
// split and the fused epilogues add memory passes whose cost does not shrink with the product,
// so below some size a layer's quantized forward + backward is slower than the same layer in
// bf16. Measured on an H200 (bench/results/gpu-h200-2026-11-29-stop27.md and -stop28.md, one
// training step of the PyTorch layer against nn.Linear bf16, multiply-adds per call): hq_bs
// 0.43-0.44x at 9.7e9 (4096 x 768 -> 3072, BERT-base's MLP), 0.67-0.79x at 2^36 (16384 x 1024 ->
// 4096), 0.99-1.07x at 2^37, 1.19-1.25x at 2^38, 1.27-1.47x at 2^39; hq_lss, whose backward also
// selects rows, 0.38-0.40x, 0.58x, 0.78-0.88x, 0.99-1.09x and 1.17-1.29x at the same sizes
// (eager steps; from CUDA graphs the small shapes come closer). So 0.9x is crossed between 2^36
// and 2^37 for hq_bs and between 2^37 and 2^38 for hq_lss: dense_fallback_macs(recipe) is 2^38
// for hq_lss and 2^37 for the others (measured for hq_bs; the recipes without the fast kernels
// take its threshold). A module whose fallback threshold T > 0 computes a call on a CUDA device
// whose N x D x C (tokens x in_features x out_features) is below T as the plain product in the
// input's dtype (bf16 under bf16 autocast): no quantization, no step gradients, no memory saved
// for that call. The modules' default is T = dense_fallback_macs(recipe) (Python:
// Recipe.dense_fallback "auto"; LibTorch: Int4LinearOptions::dense_below_macs unset); "never" /
// 0 quantizes every call, a number is T. The CPU path never falls back (it is the reference, and
// slower than any product it replaces).
constexpr double kDenseFallbackMacs = 137438953472.0;       // 2^37, about 1.4e11
constexpr double kDenseFallbackMacsHqLss = 274877906944.0;  // 2^38, about 2.7e11
constexpr double dense_fallback_macs(Recipe recipe) {
  return recipe == Recipe::kHqLss ? kDenseFallbackMacsHqLss : kDenseFallbackMacs;
}
inline bool below_dense_threshold(int64_t tokens, int64_t in_features, int64_t out_features,
                                  double threshold_macs) {
  return static_cast<double>(tokens) * static_cast<double>(in_features) *
             static_cast<double>(out_features) <
         threshold_macs;
}

// Which 8-bit tensor-core format carries the 4-bit products on a CUDA device (linear_forward_cuda,
// linear_backward_cuda; cuda.h). The integers and so the results are the same bit for bit with
// either engine, and the CPU path ignores the choice:
//   kAuto  FP8 where the device has FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper
//          and later), INT8 otherwise (8.0-8.7: A100, A10, RTX 30xx);
//   kFp8   e4m3 operands, cuBLASLt's FP8 product; scale and bias fused into its epilogue. A device
//          without FP8 is an Error naming `gemm`;
//   kInt8  int8 operands, cuBLASLt's INT8 product with int32 accumulation, scale and bias in a
//          second pass over the output (cuBLASLt's INT8 kernels write no bf16).
// hq_bs's backward and hq_lss's weight gradient run on INT8 with either engine (cuda.h).
enum class GemmEngine : int32_t { kAuto = 0, kFp8 = 1, kInt8 = 2 };
const char* gemm_engine_name(GemmEngine engine);  // "auto", "fp8", "int8"

// The bit-split gradient's scale (hq_bs, hq_lss; recipe option grad_scale=tensor|row):
//   kTensor  the paper's one scale per tensor, s = max|G| / 119 (the default);
//   kRow     refined per token row by a power of two (quantize_bitsplit_rows, quantize.h): row i
//            at s 2^-k_i, k_i <= kGradRowMaxExponent = 4, so a token whose gradient is far below
//            the tensor's largest keeps up to 4 more bits. The products stay exact: 2^-k_i scales
//            an output row of the input gradient, and for the weight gradient (where it falls on
//            the reduction dimension) the kept rows are grouped by their whole exponent e + 4 - k_i
//            (the CPU: one product per group, int64 sums), then scaled by 2^-4 (the GPU, hq_bs:
//            2^(4 - k_i) folded into the tokens' x codes of one INT8 product; cuda.h).
//            LSS's scores are the rows' norms with 2^-k_i. docs/accuracy.md has what it buys.
enum class GradScaleMode : int32_t { kTensor = 0, kRow = 1 };

struct LinearConfig {
  Recipe recipe = Recipe::kHqLss;
  int32_t hadamard_block = 1;  // HQ recipes: a power of two dividing D; others: must be 1
  uint64_t seed = 0;
  uint32_t step = 0;   // training step, part of every random stream
  uint32_t layer = 0;  // layer id, part of every random stream
  double lss_budget = kLssDefaultBudget;  // hq_lss: kept rows per token (above)
  GemmEngine gemm = GemmEngine::kAuto;    // CUDA only: the products' tensor-core format (above)
  GradScaleMode grad_scale = GradScaleMode::kTensor;  // hq_bs, hq_lss: the bit split's scale
  // CUDA only (linear_forward_cuda / linear_backward_cuda), optional: the training step as an int64
  // device scalar, read by the kernels in place of `step` (its low 32 bits, as philox.h's streams
  // take them), so that the caller never reads it on the host (RandomKey::device_step).
  const int64_t* device_step = nullptr;
};

// Checks cfg.lss_budget: in [kLssMinBudget, kLssMaxBudget]; an Error naming `lss_budget` otherwise.
void check_lss_budget(double lss_budget);

// A recipe spec: a recipe name, optionally followed by options after a colon, comma-separated
// key=value pairs: hq_lss's lss_budget ("hq_lss:lss_budget=1.5") and the LSQ recipes' gemm = auto,
// fp8 or int8 ("hq_bs:gemm=int8", "hq_lss:lss_budget=1.5,gemm=int8"), and hq_bs's and hq_lss's
// grad_scale = tensor or row ("hq_lss:grad_scale=row"). This is how a recipe crosses
// string interfaces (the PyTorch ops take it as `str recipe`); lss_budget is parsed with strtod, so
// a value printed with round-trip precision (Python's repr) is exact. Sets cfg->recipe,
// cfg->lss_budget, cfg->gemm and cfg->grad_scale (kLssDefaultBudget, kAuto and kTensor when
// absent). An unknown name or key, a malformed value, a repeated key or an option the recipe does
// not take is an Error naming `recipe`.
void parse_recipe_spec(const std::string& spec, LinearConfig* cfg);

// What the forward saves for the backward, by recipe (the caller allocates; see
// linear_saved_shapes):
//   fp:    nothing (the backward takes the original x)
//   int8:  codes int8 N x D, scale fp32 scalar
//   LSQ:   codes kInt4Packed N x D, aux uint8 compact_aux_bytes(N, D); scale unused (s_x is a
//          parameter), written 0 where given
struct LinearSavedShapes {
  DType codes_dtype = DType::kInt4Packed;
  int64_t codes_rows = 0, codes_cols = 0;  // 0 x 0 when nothing is saved
  int64_t aux_bytes = 0;
  bool needs_input = false;  // fp: the backward needs x itself
  int64_t bytes() const;     // total bytes of codes + aux + scale
};
LinearSavedShapes linear_saved_shapes(Recipe recipe, int64_t n, int64_t d);

struct LinearForwardArgs {
  TensorView x;       // N x D, fp32 or bf16
  TensorView w;       // C x D, fp32 or bf16
  TensorView bias;    // C, fp32 or bf16, optional (data == nullptr)
  TensorView step_x;  // fp32 scalar, LSQ recipes
  TensorView step_w;  // fp32 scalar, LSQ recipes
  TensorView y;       // out: N x C, fp32 or bf16
  TensorView saved_codes;  // out, see LinearSavedShapes (ignored for fp)
  TensorView saved_aux;    // out, LSQ recipes
  TensorView saved_scale;  // out, int8 recipe: fp32 scalar; the other recipes write 0 (optional)
  // CUDA only (linear_forward_cuda), optional out: an int64 device scalar that gets the step the
  // call's random bits were keyed with (*LinearConfig::device_step, else `step`), for the backward,
  // so that the caller does not copy the step itself (a launch). The CPU rejects it.
  TensorView saved_step;
};

// Runs the forward. If x or w holds a non-finite value in an LSQ recipe (where the learned step never
// sees the data), y is filled with NaN so that the problem surfaces rather than being quantized away.
void linear_forward(const LinearConfig& config, const LinearForwardArgs& args);

// The bias gradient's summation order (the CPU core and the CUDA kernels follow it, so their results
// agree bit for bit; the PyTorch ops' device-generic path sums with ATen in fp64, within rounding of
// it): column j of grad_y in fp64, the rows taken in consecutive blocks of kBiasGradBlockRows (the
// last may be shorter), each block summed in row order starting from 0.0, the block sums added in
// block order starting from 0.0, then rounded once to grad_bias's dtype. Blocks let a GPU sum the
// rows of a column in parallel without changing the result.
constexpr int64_t kBiasGradBlockRows = 128;

struct LinearBackwardArgs {
  TensorView grad_y;  // N x C, fp32 or bf16
  TensorView x;       // fp recipe: the forward input (N x D); others: unused
  TensorView saved_codes, saved_aux, saved_scale;  // as written by linear_forward
  TensorView w;       // C x D, the same weight the forward saw
  TensorView step_x, step_w;
  TensorView grad_x;       // out N x D, fp32 or bf16; optional
  TensorView grad_w;       // out C x D, fp32 or bf16; optional
  TensorView grad_bias;    // out C, fp32 or bf16; optional: column sums of grad_y in the
                           // fixed order of kBiasGradBlockRows
  TensorView grad_step_x;  // out fp32 scalar, LSQ recipes; optional
  TensorView grad_step_w;  // out fp32 scalar, LSQ recipes; optional
  TensorView rows_kept;    // out int64 vector of 2: LinearBackwardStats' two counts (input, weight),
                           // in the memory of the other outputs (the device path's form); optional
};

// Statistics of the last backward's sampling, for logging and tests (hq_lss only; zero otherwise).
struct LinearBackwardStats {
  int64_t input_rows_kept = 0;   // of 2N
  int64_t weight_rows_kept = 0;  // of 2N
};

void linear_backward(const LinearConfig& config, const LinearBackwardArgs& args,
                     LinearBackwardStats* stats = nullptr);

}  // namespace int4train
