// int4train PyTorch binding: a device-generic implementation of the ops built from ATen operations,
// registered for CUDA tensors, and exposed as the debug ops torch.ops.int4train._generic_* (any
// device) so that it is tested against the core. Where the build has CUDA kernels (cuda_bridge.h),
// CUDA tensors take them instead: Philox words, the Hadamard transform, the LSQ recipes' forward and
// the hq_bs backward (all equal to the core bit for bit, as the ATen forms); the rest stays ATen.
//
// It reproduces the core's semantics (src/cpu/*.cpp are the spec): Philox4x32-10 in int64 ATen
// arithmetic (same bits for the same seed, stream and index), the Hadamard butterflies in the
// core's fp32 order, one rounding per fp32 operation (ATen runs one operation per kernel, so nothing
// fuses into an FMA), round half to even and floor(v + u) stochastic rounding, integer products
// exact through float64 matrix products (every partial sum stays below 2^53). The water-filling
// probabilities and the Hadamard block search, whose results hinge on sequential fp64 sums, run on
// the host through the core. Left to the device's own summation order: fp32 products (fp recipe,
// LUQ) and the fp64 sums of the step and bias gradients, which agree with the core to rounding.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <string>
#include <tuple>

#include "convert.h"
#include "cuda_bridge.h"
#include "int4train/gemm.h"
#include "int4train/hadamard.h"
#include "int4train/int4.h"
#include "int4train/linear.h"
#include "int4train/lss.h"
#include "int4train/philox.h"
#include "int4train/quantize.h"
#include "ops_internal.h"

namespace int4train::pt::generic {
namespace {

using at::Tensor;
using detail::call_core;

constexpr int64_t kMask32 = 0xFFFFFFFFLL;

// Shifts of non-negative int64 values (ATen has no shift operators on tensors).
Tensor shr(const Tensor& t, int64_t n) { return at::bitwise_right_shift(t, n); }
Tensor shr(const Tensor& t, const Tensor& n) { return at::bitwise_right_shift(t, n); }
Tensor shl(const Tensor& t, int64_t n) { return at::bitwise_left_shift(t, n); }
Tensor shl(const Tensor& t, const Tensor& n) { return at::bitwise_left_shift(t, n); }

// ---------------------------------------------------------------- Philox4x32-10 (philox.h)

// lo = (a * b) mod 2^32 and hi = (a * b) >> 32 for a 32-bit constant a and 32-bit values b, in
// int64 arithmetic that never overflows: b is split into 16-bit halves.
Tensor mulhilo(uint32_t a, const Tensor& b, Tensor* hi) {
  const int64_t a64 = a;
  const Tensor p_lo = (b & 0xFFFF) * a64;  // < 2^48
  const Tensor p_hi = shr(b, 16) * a64;     // < 2^48
  const Tensor t = p_hi + shr(p_lo, 16);    // a * b = t * 2^16 + (p_lo mod 2^16)
  *hi = shr(t, 16);
  return shl(t & 0xFFFF, 16) | (p_lo & 0xFFFF);
}

// Words random_u32(seed, stream, index) for index = 0 .. n-1, as int64 values in [0, 2^32).
// stream_hi is a 0-dim int64 tensor (the step, so that it may stay on the device).
Tensor philox_words(uint64_t seed, int64_t stream_lo, const Tensor& stream_hi, int64_t n,
                    const at::TensorOptions& device) {
  const auto opt = device.dtype(at::kLong);
  if (n == 0) return at::empty({0}, opt);
#ifdef INT4TRAIN_TORCH_CUDA
  // One kernel instead of ~260 ATen launches (the same words: tests compare with the core).
  if (cuda_bridge::runs_kernels(stream_hi)) {
    return cuda_bridge::philox_words(seed, static_cast<uint32_t>(stream_lo & kMask32), stream_hi, n);
  }
#endif
  const int64_t blocks = (n + 3) / 4;
  const Tensor block = at::arange(blocks, opt);
  Tensor c0 = block & kMask32;
  Tensor c1 = shr(block, 32);
  Tensor c2 = at::full({}, stream_lo & kMask32, opt);
  Tensor c3 = stream_hi.to(opt).reshape({}) & kMask32;
  const PhiloxKeys keys = philox_keys(seed);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    Tensor hi0, hi1;
    const Tensor lo0 = mulhilo(kPhiloxM0, c0, &hi0);
    const Tensor lo1 = mulhilo(kPhiloxM1, c2, &hi1);
    const Tensor n0 = (hi1 ^ c1) ^ static_cast<int64_t>(keys.k0[round]);
    const Tensor n2 = (hi0 ^ c3) ^ static_cast<int64_t>(keys.k1[round]);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  const Tensor words = at::stack({c0.expand({blocks}), c1.expand({blocks}), c2.expand({blocks}),
                                  c3.expand({blocks})},
                                 1);
  return words.reshape({-1}).narrow(0, 0, n);
}

// The stream of (step, layer, purpose) split as philox.h builds it: step in the high 32 bits.
int64_t stream_low(int64_t layer, RandomPurpose purpose) {
  return static_cast<int64_t>(make_stream(0, static_cast<uint32_t>(layer), purpose));
}

// random_uniform(seed, stream, index) for index = 0 .. n-1 (philox.h): the 16-bit halves of words
// 0 .. ceil(n / 2) - 1, a word's low half first, times 2^-16 (exact in fp32).
Tensor philox_uniforms(uint64_t seed, int64_t stream_lo, const Tensor& stream_hi, int64_t n,
                       const at::TensorOptions& device) {
  const Tensor words = philox_words(seed, stream_lo, stream_hi, (n + 1) / 2, device);
  const Tensor halves = at::stack({words & 0xFFFF, shr(words, 16)}, 1).reshape({-1});
  return halves.narrow(0, 0, n).to(at::kFloat) * 0x1.0p-16;
}

// ---------------------------------------------------------------- element rules (numeric.h)

Tensor round_clamp(const Tensor& v, int lo, int hi) {
  const Tensor r = at::round(v).clamp(lo, hi);  // round half to even
  return at::where(at::isnan(v), at::zeros_like(r), r).to(at::kChar);
}

Tensor stochastic_round_clamp(const Tensor& v, const Tensor& u, int lo, int hi) {
  const Tensor r = at::floor(v + u).clamp(lo, hi);
  return at::where(at::isnan(v), at::zeros_like(r), r).to(at::kChar);
}

// t / v, one correctly rounded division. The divisor is a tensor on t's device: CUDA divides by a
// host scalar as a multiplication by its reciprocal, which rounds differently.
Tensor divide(const Tensor& t, double v) { return t / at::full({}, v, t.options()); }

// 1 / s in fp32, one correctly rounded division.
Tensor inverse_of(const Tensor& s) { return at::ones_like(s) / s; }

// max |x| in fp32, NaN if x holds a NaN (the core's absmax).
Tensor absmax_of(const Tensor& x32) {
  if (x32.numel() == 0) return at::zeros({}, x32.options());
  return x32.abs().max();
}

// ---------------------------------------------------------------- layouts (int4.h, quantize.h)

// int8 codes (rows, k) -> uint8 (rows, ceil(k / 2)), element 2j low nibble, odd padding 0.
Tensor pack_codes(const Tensor& codes) {
  Tensor c = codes.to(at::kShort) & 0xF;
  if (c.size(1) % 2 == 1) c = at::constant_pad_nd(c, {0, 1});
  const Tensor lo = c.slice(1, 0, c.size(1), 2), hi = c.slice(1, 1, c.size(1), 2);
  return (lo | shl(hi, 4)).to(at::kByte);
}

Tensor unpack_codes(const Tensor& packed, int64_t k) {
  const Tensor p = packed.to(at::kShort);
  const Tensor lo = ((p & 0xF) ^ 8) - 8, hi = ((shr(p, 4) & 0xF) ^ 8) - 8;
  return at::stack({lo, hi}, 2).reshape({packed.size(0), -1}).narrow(1, 0, k).to(at::kChar);
}

// One bit per element (flat row-major index e in bit e % 8 of byte e / 8), trailing bits 0.
Tensor pack_bits(const Tensor& bits) {
  const int64_t n = bits.numel();
  Tensor b = bits.reshape({-1}).to(at::kLong);
  const int64_t padded = (n + 7) / 8 * 8;
  if (padded != n) b = at::constant_pad_nd(b, {0, padded - n});
  const Tensor shifts = at::arange(8, b.options());
  return shl(b.reshape({-1, 8}), shifts).sum(1).to(at::kByte);
}

Tensor unpack_bits(const Tensor& aux, int64_t n) {
  const Tensor shifts = at::arange(8, aux.options().dtype(at::kLong));
  const Tensor b = shr(aux.to(at::kLong).reshape({-1, 1}), shifts) & 1;
  return b.reshape({-1}).narrow(0, 0, n);
}

// ---------------------------------------------------------------- transform and products

void check_block(int64_t block, int64_t d) {
  TORCH_CHECK_VALUE(is_valid_hadamard_block(static_cast<int32_t>(block)),
                    "block: expected a power of two in [1, ", kMaxHadamardBlock, "], got ", block);
  TORCH_CHECK_VALUE(d % block == 0, "block: expected a divisor of the row length D = ", d,
                    ", got ", block);
}

// x (rows, d) fp32/bf16 -> x B_g in fp32, in the butterfly order of hadamard.h.
Tensor hadamard_fp32(const Tensor& x, int64_t g) {
  const int64_t rows = x.size(0), d = x.size(1);
#ifdef INT4TRAIN_TORCH_CUDA
  if (cuda_bridge::runs_kernels(x) && g > 1 && x.numel() > 0)
    return cuda_bridge::hadamard_fp32(x, g);
#endif
  Tensor v = x.to(at::kFloat).contiguous();
  if (g == 1 || v.numel() == 0) return v.clone();
  v = v.reshape({rows, d / g, g});
  for (int64_t h = 1; h < g; h *= 2) {
    const Tensor v5 = v.reshape({rows, d / g, g / (2 * h), 2, h});
    const Tensor a = v5.select(3, 0), b = v5.select(3, 1);
    v = at::stack({a + b, a - b}, 3).reshape({rows, d / g, g});
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(g)));
  return (v * static_cast<double>(scale)).reshape({rows, d});
}

// Exact a b^T of integer-valued tensors (codes, possibly times powers of two), in float64.
Tensor int_product(const Tensor& a, const Tensor& b) {
  return at::mm(a.to(at::kDouble), b.to(at::kDouble).t());
}

// gemm_scaled's epilogue: alpha * float(acc) (+ bias), then the output dtype (round to nearest even).
Tensor epilogue(const Tensor& acc, const Tensor& alpha, const std::optional<Tensor>& bias,
                at::ScalarType out_dtype) {
  Tensor v = acc.to(at::kFloat) * alpha;
  if (bias.has_value() && bias->defined()) v = v + bias->to(at::kFloat);
  return v.to(out_dtype);
}

// ---------------------------------------------------------------- quantizers

struct Codes {
  Tensor codes, scale;  // int8 codes and fp32 0-dim scale
};

// quantize_absmax (INT8 baseline forward).
Codes absmax_codes(const Tensor& x32, int qmax) {
  const Tensor amax = absmax_of(x32);
  const Tensor s = at::where(amax == 0, at::ones_like(amax), divide(amax, qmax));
  return {round_clamp(x32 * inverse_of(s), -qmax, qmax), s};
}

// quantize_stochastic (plain unbiased gradient quantizer).
Codes stochastic_codes(const Tensor& g32, int qmax, const Tensor& u) {
  const Tensor amax = absmax_of(g32);
  const Tensor zero = amax == 0;
  const Tensor s = divide(amax, qmax);
  const Tensor safe = at::where(zero, at::ones_like(s), s);
  const Tensor q = stochastic_round_clamp(g32 * inverse_of(safe), u, -qmax, qmax);
  return {at::where(zero, at::zeros_like(q), q), at::where(zero, at::zeros_like(s), s)};
}

struct BitSplit {
  Tensor hi, lo, scale;
  Tensor row;  // GradScaleMode::kRow: each row's factor 2^-k_i (fp64, N); undefined for kTensor
};

// quantize_bitsplit: q = clamp(floor(g * (119 / max|g|) + u)), hi = floor((q + 8) / 16).
BitSplit bitsplit_codes(const Tensor& g32, const Tensor& u, bool rows = false) {
  const Tensor amax = absmax_of(g32);
  const Tensor zero = amax == 0;
  const Tensor levels = at::full({}, static_cast<float>(kBitSplitLevels), g32.options());
  const Tensor inv = levels / at::where(zero, at::ones_like(amax), amax);
  Tensor v, row;
  if (rows) {
    // quantize_bitsplit_rows: k_i = the largest k <= 4 with max|G_i| 2^k <= max|G| (0 unless max|G|
    // is finite and non-zero); row i at inv 2^k_i.
    const Tensor rmax = g32.abs().amax(1);
    Tensor k = at::zeros({g32.size(0)}, g32.options());
    for (int j = 1; j <= kGradRowMaxExponent; ++j) {
      k = k + (rmax * static_cast<float>(std::ldexp(1.0, j)) <= amax).to(at::kFloat);
    }
    k = at::where(at::isfinite(amax) & (amax > 0), k, at::zeros_like(k));
    v = g32 * (inv * at::exp2(k)).unsqueeze(1);
    row = at::exp2(-k.to(at::kDouble));
  } else {
    v = g32 * inv;
  }
  Tensor q = stochastic_round_clamp(v, u, -kBitSplitLevels, kBitSplitLevels).to(at::kInt);
  q = at::where(zero, at::zeros_like(q), q);
  const Tensor hi = at::floor_divide(q + 8, 16);
  const Tensor lo = q - 16 * hi;
  return {hi.to(at::kChar), lo.to(at::kChar), at::where(zero, at::zeros_like(amax), amax / levels),
          row};
}

// quantize_luq codes and dequantize_luq values (fp32).
Tensor luq_values(const Tensor& g32, const Tensor& u) {
  const Tensor alpha = absmax_of(g32);
  const Tensor zero = alpha == 0;
  const Tensor inv = inverse_of(at::where(zero, at::ones_like(alpha), alpha));
  const Tensor y = (g32.abs() * inv) * 64.0;
  const Tensor bits = y.view(at::kInt).to(at::kLong);
  const Tensor e = (shr(bits, 23) & 0xFF) - 127;
  const Tensor t = ((bits & 0x007FFFFF) | 0x3F800000).to(at::kInt).view(at::kFloat) - 1.0;
  const Tensor upper = stochastic_round_clamp(t, u, 0, 1).to(at::kLong);
  Tensor mag = at::where(y < 1.0, stochastic_round_clamp(y, u, 0, 1).to(at::kLong),
                         at::clamp_max(e + 1 + upper, kLuqLevels));
  mag = at::where(at::isnan(y) | zero, at::zeros_like(mag), mag);
  // value = sign * alpha * 2^(mag - 7); the power of two built from its bits (exact).
  const Tensor pow2 = shl(mag - kLuqLevels + 127, 23).to(at::kInt).view(at::kFloat);
  const Tensor level = at::where(mag == 0, at::zeros_like(y), alpha * pow2);
  return at::where(at::signbit(g32) & (mag != 0), -level, level);
}

// LSQ codes (int8) of v = x * (1/s) and v itself.
std::pair<Tensor, Tensor> lsq_codes(const Tensor& x32, const Tensor& step) {
  const Tensor v = x32 * inverse_of(step);
  return {round_clamp(v, -kLsqQn, kLsqQp), v};
}

// The compact state's aux bit (quantize_kernels.h, lsq_aux_bit).
Tensor lsq_aux_bits(const Tensor& v, const Tensor& codes, const Tensor& u) {
  const Tensor r = at::round(v) - v;
  const Tensor interior = stochastic_round_clamp(r + 0.5, u, 0, 1).to(at::kLong);
  const Tensor low = (v < static_cast<double>(-kLsqQn)).to(at::kLong);
  const Tensor high = (v > static_cast<double>(kLsqQp)).to(at::kLong);
  return at::where(codes == -kLsqQn, low, at::where(codes == kLsqQp, high, interior));
}

double lsq_gamma(int64_t numel) {
  return numel > 0 ? 1.0 / std::sqrt(static_cast<double>(numel) * kLsqQp) : 0.0;
}

// lsq_backward_compact: (grad through the mask, gamma * sum(g * r_hat)) from codes and aux bits.
std::pair<Tensor, Tensor> lsq_backward_compact_of(const Tensor& codes, const Tensor& bits,
                                                  const Tensor& g) {
  const Tensor b = bits.reshape(codes.sizes()) != 0;
  const Tensor at_lo = codes == -kLsqQn, at_hi = codes == kLsqQp;
  const Tensor inside = at::logical_not((at_lo | at_hi) & b);
  const auto f = [&](double v) { return at::full({}, v, g.options()); };
  const Tensor r =
      at::where(at_lo, at::where(b, f(-kLsqQn), f(-0.25)),
                at::where(at_hi, at::where(b, f(kLsqQp), f(0.25)), at::where(b, f(0.5), f(-0.5))));
  const Tensor gx = at::where(inside, g, at::zeros_like(g));
  const Tensor sum = (g.to(at::kDouble) * r.to(at::kDouble)).sum();
  return {gx, (sum * lsq_gamma(g.numel())).to(at::kFloat)};
}

// lsq_backward (full information, the weight's): mask and residual from x~ and the step.
std::pair<Tensor, Tensor> lsq_backward_of(const Tensor& v, const Tensor& g) {
  const double lo = -kLsqQn, hi = kLsqQp;
  Tensor r = at::round(v) - v;
  r = at::where(v < lo, at::full_like(r, lo), r);
  r = at::where(v > hi, at::full_like(r, hi), r);
  const Tensor gx = at::where((v >= lo) & (v <= hi), g, at::zeros_like(g));
  const Tensor sum = (g.to(at::kDouble) * r.to(at::kDouble)).sum();
  return {gx, (sum * lsq_gamma(g.numel())).to(at::kFloat)};
}

// Euclidean norms of integer code rows (exact sums of squares, then sqrt in fp64, as row_norms).
Tensor code_row_norms(const Tensor& codes) {
  return codes.to(at::kLong).pow(2).sum(1).to(at::kDouble).sqrt().to(at::kFloat);
}

// ---------------------------------------------------------------- argument checks (linear.cpp)

LinearConfig make_config(c10::string_view recipe_name, int64_t hadamard_block, int64_t seed,
                         int64_t layer) {
  LinearConfig config = detail::config_from(recipe_name);
  config.hadamard_block = static_cast<int32_t>(hadamard_block);
  config.seed = static_cast<uint64_t>(seed);
  config.layer = static_cast<uint32_t>(layer);
  return config;
}

void check_recipe_block(const LinearConfig& cfg, int64_t d) {
  if (recipe_uses_hadamard(cfg.recipe)) {
    TORCH_CHECK_VALUE(is_valid_hadamard_block(cfg.hadamard_block) &&
                          (d == 0 || d % cfg.hadamard_block == 0),
                      "hadamard_block: expected a power of two <= ", kMaxHadamardBlock,
                      " dividing in_features = ", d, ", got ", cfg.hadamard_block);
  } else {
    TORCH_CHECK_VALUE(cfg.hadamard_block == 1, "hadamard_block: recipe ",
                      recipe_name(cfg.recipe), " uses no Hadamard transform, expected 1, got ",
                      cfg.hadamard_block);
  }
}

void check_float(const Tensor& t, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, arg,
                   ": expected float32 or bfloat16, got ", t.scalar_type());
}

Tensor stream_hi_of(const Tensor& step, const Tensor& like) {
  TORCH_CHECK_VALUE(step.numel() == 1, "int4train: step must hold one integer, got shape ",
                    step.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(step.scalar_type()),
                   "int4train: step must be an integer tensor, got ", step.scalar_type());
  const Tensor s = step.to(like.device(), at::kLong);
  return s.dim() == 0 ? s : s.reshape({});
}

// ---------------------------------------------------------------- the linear layer

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_forward(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& input_step, const std::optional<Tensor>& weight_step,
    c10::string_view recipe_name, int64_t hadamard_block, int64_t seed, const Tensor& step,
    int64_t layer) {
  constexpr const char* op = "int4train.linear_forward";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (N, in_features), got shape ", x.sizes());
  detail::check_linear_shapes(x, weight, bias, op);
  const LinearConfig cfg = make_config(recipe_name, hadamard_block, seed, layer);
  const int64_t n = x.size(0), d = x.size(1), c = weight.size(0);
  check_recipe_block(cfg, d);
  check_float(x, "x");
  check_float(weight, "w");
  if (bias.has_value() && bias->defined()) check_float(*bias, "bias");
#ifdef INT4TRAIN_TORCH_CUDA
  const bool device_kernels = cuda_bridge::runs_kernels(x) && recipe_uses_lsq(cfg.recipe);
#else
  const bool device_kernels = false;
#endif
  // The device kernels write every aux byte and the scale (cuda.h), and the saved step.
  detail::LinearTensors out = detail::allocate_linear_outputs(cfg.recipe, n, d, c, x.scalar_type(),
                                                              x.options(), !device_kernels);
  const Tensor stream_hi = stream_hi_of(step, x);
  Tensor sx, sw;
  if (recipe_uses_lsq(cfg.recipe)) {
    sx = detail::fp32_scalar(input_step, "input_step", op).to(x.device());
    sw = detail::fp32_scalar(weight_step, "weight_step", op).to(x.device());
    // The device kernels take a bad step on the device (y all NaN, as a non-finite input): reading
    // it here would synchronise with the host.
    if (!device_kernels) {
      TORCH_CHECK_VALUE(((sx > 0) & at::isfinite(sx) & (sw > 0) & at::isfinite(sw)).item<bool>(),
                        "step: expected a positive finite step size");
    }
  }
  if (n == 0 || d == 0 || c == 0) {
    out.y.zero_();
    if (bias.has_value() && bias->defined()) out.y.add_(*bias);
    out.codes.zero_();
    if (device_kernels) {  // allocated for the kernels to write, which do not run here
      out.aux.zero_();
      out.scale.zero_();
    }
    return {out.y, out.codes, out.aux, out.scale, detail::saved_step_of(step)};
  }
#ifdef INT4TRAIN_TORCH_CUDA
  if (device_kernels) {
    // The dedicated kernels (cuda.h): fused Hadamard + LSQ passes and one FP8 product of the
    // codes, equal to the core bit for bit. The step stays on the device (device_step).
    LinearConfig kcfg = cfg;
    kcfg.device_step = stream_hi.data_ptr<int64_t>();
    const Tensor xc = x.contiguous(), wc = weight.contiguous();
    const std::optional<Tensor> bc = bias.has_value() && bias->defined()
                                         ? std::optional<Tensor>(bias->contiguous())
                                         : std::nullopt;
    LinearForwardArgs args;
    args.x = detail::to_view(xc, "x");
    args.w = detail::to_view(wc, "weight");
    args.bias = detail::to_view_or_null(bc, "bias");
    args.step_x = detail::to_view(sx, "input_step");
    args.step_w = detail::to_view(sw, "weight_step");
    args.y = detail::to_view(out.y, "y");
    args.saved_codes = detail::codes_view(out.codes, d, "saved_codes");
    args.saved_aux = detail::to_view(out.aux, "saved_aux");
    args.saved_scale = detail::to_view(out.scale, "saved_scale");
    // The forward's first kernel copies the step (saved_step_of's copy, without a launch of its
    // own) where the step is on x's device, as the saved step is (on the step's device).
    const bool step_here = step.device() == x.device();
    const Tensor saved_step =
        step_here ? at::empty({}, stream_hi.options()) : detail::saved_step_of(step);
    if (step_here) args.saved_step = detail::to_view(saved_step, "saved_step");
    cuda_bridge::linear_forward(kcfg, args, x.get_device());
    return {out.y, out.codes, out.aux, out.scale, saved_step};
  }
#endif
  const Tensor saved_step = detail::saved_step_of(step);
  const Tensor x32 = x.to(at::kFloat), w32 = weight.to(at::kFloat);
  if (cfg.recipe == Recipe::kFp) {
    Tensor y = at::mm(x32, w32.t());
    if (bias.has_value() && bias->defined()) y = y + bias->to(at::kFloat);
    out.y.copy_(y);
  } else if (cfg.recipe == Recipe::kInt8) {
    const Codes qx = absmax_codes(x32, 127), qw = absmax_codes(w32, 127);
    out.codes.copy_(qx.codes);
    out.scale.copy_(qx.scale);
    out.y.copy_(epilogue(int_product(qx.codes, qw.codes), qx.scale * qw.scale, bias,
                         x.scalar_type()));
  } else {
    const int64_t g = cfg.hadamard_block;
    const Tensor xt = hadamard_fp32(x32, g), wt = hadamard_fp32(w32, g);
    const auto [qx, vx] = lsq_codes(xt, sx);
    const auto [qw, vw] = lsq_codes(wt, sw);
    const Tensor u = philox_uniforms(cfg.seed, stream_low(layer, RandomPurpose::kLsqAux), stream_hi,
                                     n * d, x.options())
                         .reshape({n, d});
    out.codes.copy_(pack_codes(qx));
    out.aux.copy_(pack_bits(lsq_aux_bits(vx, qx, u)));
    const Tensor bad = at::logical_not(at::isfinite(xt)).any() |
                       at::logical_not(at::isfinite(wt)).any();
    const Tensor y = epilogue(int_product(qx, qw), sx * sw, bias, at::kFloat);
    out.y.copy_(at::where(bad, at::full_like(y, NAN), y));
  }
  return {out.y, out.codes, out.aux, out.scale, saved_step};
}

// The kept rows' importance weights 2^e (0 for dropped rows) of one LSS selection over the 2N
// bit-split rows, as float64; also the number kept. The whole selection runs on the host through
// the core (lss.h: fixed-order fp64 sums, the exponents' capacity search and the stratified draw),
// the same rows as the CPU layer and the CUDA kernels.
std::pair<Tensor, Tensor> lss_weights(const Tensor& scores, int64_t n, const LinearConfig& cfg,
                                      RandomPurpose purpose, const Tensor& stream_hi) {
  const Tensor scores_cpu = scores.to(at::kCPU).contiguous();
  const int64_t rows = scores_cpu.numel();
  const double budget = cfg.lss_budget * static_cast<double>(n);
  const int64_t capacity = lss_capacity(budget, rows);
  Tensor probs = at::empty_like(scores_cpu);
  Tensor exps = at::empty({rows}, scores_cpu.options().dtype(at::kChar));
  Tensor slots = at::empty({capacity}, scores_cpu.options().dtype(at::kInt));
  const uint64_t step = static_cast<uint64_t>(stream_hi.item<int64_t>()) & 0xFFFFFFFFull;
  const RandomKey key{cfg.seed,
                      (step << 32) | static_cast<uint64_t>(stream_low(cfg.layer, purpose))};
  int64_t kept = 0;
  call_core([&] {
    lss_probabilities(detail::to_view(scores_cpu, "scores"), budget,
                      detail::to_view(probs, "probs"));
    lss_round_pow2(detail::to_view(probs, "probs"), kLssMaxExponent, capacity,
                   detail::to_view(exps, "exps"));
    kept = lss_select(detail::to_view(exps, "exps"), kLssMaxExponent, key,
                      detail::to_view(slots, "slots"));
  });
  // Weight 2^(k + 4) of a kept hi row (the x16 of the bit split), 2^k of a kept lo row, else 0.
  Tensor w = at::zeros({rows}, scores_cpu.options().dtype(at::kDouble));
  double* wp = w.data_ptr<double>();
  const int8_t* kp = exps.data_ptr<int8_t>();
  for (const int32_t i : c10::ArrayRef<int32_t>(slots.data_ptr<int32_t>(), capacity)) {
    if (i >= 0) wp[i] = std::ldexp(1.0, kp[i] + (i < n ? 4 : 0));
  }
  return {w.to(scores.device()), at::scalar_tensor(kept, scores.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_backward(
    const Tensor& grad_y, const std::optional<Tensor>& x, const Tensor& codes, const Tensor& aux,
    const Tensor& scale, const Tensor& weight, const std::optional<Tensor>& input_step,
    const std::optional<Tensor>& weight_step, c10::string_view recipe_name, int64_t hadamard_block,
    int64_t seed, const Tensor& step, int64_t layer, std::array<bool, 5> mask) {
  constexpr const char* op = "int4train.linear_backward";
  TORCH_CHECK_VALUE(grad_y.dim() == 2, op, ": grad_y must be 2-D (N, out_features), got shape ",
                    grad_y.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == grad_y.size(1), op,
                    ": grad_y has shape ", grad_y.sizes(), " but weight has shape ", weight.sizes());
  LinearConfig cfg = make_config(recipe_name, hadamard_block, seed, layer);
  const int64_t n = grad_y.size(0), c = weight.size(0), d = weight.size(1);
  check_recipe_block(cfg, d);
  check_float(grad_y, "grad_y");
  check_float(weight, "w");
#ifdef INT4TRAIN_TORCH_CUDA
  const bool device_kernels = cuda_bridge::runs_kernels(grad_y) &&
                              (cfg.recipe == Recipe::kHqBs || cfg.recipe == Recipe::kHqLss) &&
                              n > 0 && d > 0 && c > 0;
#else
  const bool device_kernels = false;
#endif
  // The device kernels write the stats (rows kept) themselves.
  detail::LinearGradTensors out = detail::allocate_linear_grads(
      n, d, c, grad_y.scalar_type(), weight.scalar_type(), grad_y.options(), mask, !device_kernels);
  const Tensor stream_hi = stream_hi_of(step, grad_y);
  Tensor sx, sw;
  if (recipe_uses_lsq(cfg.recipe)) {
    sx = detail::fp32_scalar(input_step, "input_step", op).to(grad_y.device());
    sw = detail::fp32_scalar(weight_step, "weight_step", op).to(grad_y.device());
  }
  if (mask[3] && !sx.defined()) out.grad_input_step.zero_();
  if (mask[4] && !sw.defined()) out.grad_weight_step.zero_();
#ifdef INT4TRAIN_TORCH_CUDA
  if (device_kernels) {
    // The dedicated kernels (cuda.h): bit split, LSS selection on the device, exact INT8 / FP8
    // products of the codes, LSQ backward and back-rotation, and the bias gradient in linear.h's
    // order (the CPU's, bit for bit). The step stays on the device (LinearConfig::device_step): no
    // host synchronisation.
    LinearConfig kcfg = cfg;
    kcfg.device_step = stream_hi.data_ptr<int64_t>();
    const Tensor gc = grad_y.contiguous(), wc = weight.contiguous(), ac = aux.contiguous();
    LinearBackwardArgs args;
    args.grad_y = detail::to_view(gc, "grad_y");
    args.w = detail::to_view(wc, "weight");
    args.saved_codes = detail::codes_view(codes, d, "codes");
    args.saved_aux = detail::to_view(ac, "aux");
    args.step_x = detail::to_view(sx, "input_step");
    args.step_w = detail::to_view(sw, "weight_step");
    if (mask[0]) args.grad_x = detail::to_view(out.grad_x, "grad_x");
    if (mask[1]) args.grad_w = detail::to_view(out.grad_w, "grad_weight");
    if (mask[2]) args.grad_bias = detail::to_view(out.grad_bias, "grad_bias");
    if (mask[3]) args.grad_step_x = detail::to_view(out.grad_input_step, "grad_input_step");
    if (mask[4]) args.grad_step_w = detail::to_view(out.grad_weight_step, "grad_weight_step");
    args.rows_kept = detail::to_view(out.stats, "stats");
    cuda_bridge::linear_backward(kcfg, args, grad_y.get_device());
    return {out.grad_x, out.grad_w, out.grad_bias, out.grad_input_step, out.grad_weight_step,
            out.stats};
  }
#endif
  const Tensor g32 = grad_y.to(at::kFloat);
  if (mask[2]) out.grad_bias.copy_(g32.to(at::kDouble).sum(0).to(at::kFloat));
  if (n == 0 || d == 0 || c == 0) {
    if (mask[0]) out.grad_x.zero_();
    if (mask[1]) out.grad_w.zero_();
    if (mask[3]) out.grad_input_step.zero_();
    if (mask[4]) out.grad_weight_step.zero_();
    return {out.grad_x,          out.grad_w,           out.grad_bias,
            out.grad_input_step, out.grad_weight_step, out.stats};
  }
  const bool want_dx = mask[0], want_dw = mask[1];
  const Tensor w32 = weight.to(at::kFloat);
  const auto grad_uniforms = [&](int64_t count) {
    return philox_uniforms(cfg.seed, stream_low(layer, RandomPurpose::kGradRound), stream_hi, count,
                           grad_y.options());
  };

  if (cfg.recipe == Recipe::kFp) {
    if (want_dx) out.grad_x.copy_(at::mm(g32, w32));
    if (want_dw) {
      TORCH_CHECK_VALUE(x.has_value() && x->defined(), op,
                        ": the fp recipe needs x (the forward input)");
      TORCH_CHECK_VALUE(x->dim() == 2 && x->size(0) == n && x->size(1) == d, op,
                        ": x must have shape [", n, ", ", d, "], got ", x->sizes());
      out.grad_w.copy_(at::mm(g32.t(), x->to(at::kFloat)));
    }
    if (mask[3]) out.grad_input_step.zero_();
    if (mask[4]) out.grad_weight_step.zero_();
    return {out.grad_x, out.grad_w, out.grad_bias, out.grad_input_step, out.grad_weight_step,
            out.stats};
  }

  if (cfg.recipe == Recipe::kInt8) {
    const Tensor u = grad_uniforms(n * c).reshape({n, c});
    const Codes qg = stochastic_codes(g32, 127, u);
    const Codes qw = absmax_codes(w32, 127);
    if (want_dx) {
      out.grad_x.copy_(epilogue(int_product(qg.codes, qw.codes.t()), qg.scale * qw.scale,
                                std::nullopt, out.grad_x.scalar_type()));
    }
    if (want_dw) {
      TORCH_CHECK_VALUE(codes.scalar_type() == at::kChar && codes.dim() == 2 &&
                            codes.size(0) == n && codes.size(1) == d,
                        op, ": the int8 recipe's codes must be int8 [", n, ", ", d, "]");
      out.grad_w.copy_(epilogue(int_product(qg.codes.t(), codes.t()),
                                qg.scale * scale.to(grad_y.device(), at::kFloat).reshape({}),
                                std::nullopt, out.grad_w.scalar_type()));
    }
    if (mask[3]) out.grad_input_step.zero_();
    if (mask[4]) out.grad_weight_step.zero_();
    return {out.grad_x, out.grad_w, out.grad_bias, out.grad_input_step, out.grad_weight_step,
            out.stats};
  }

  // LSQ recipes: products in the Hadamard domain from the saved codes and the recomputed W~ codes.
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.size(0) == n &&
                        codes.size(1) == packed_row_bytes(d),
                    op, ": codes must be packed int4 uint8 [", n, ", ", packed_row_bytes(d),
                    "], got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK_VALUE(aux.numel() == compact_aux_bytes(n, d), op, ": aux must hold ",
                    compact_aux_bytes(n, d), " bytes, got ", aux.numel());
  const int64_t g = cfg.hadamard_block;
  const Tensor wt = hadamard_fp32(w32, g);
  const auto [qw, vw] = lsq_codes(wt, sw);
  const Tensor qx = unpack_codes(codes, d);
  const bool need_dx = want_dx || mask[3], need_dw = want_dw || mask[4];
  Tensor dx, dw;  // fp32, Hadamard domain
  if (cfg.recipe == Recipe::kHq) {
    const Codes qg = stochastic_codes(g32, 7, grad_uniforms(n * c).reshape({n, c}));
    if (need_dx) dx = epilogue(int_product(qg.codes, qw.t()), qg.scale * sw, std::nullopt, at::kFloat);
    if (need_dw) dw = epilogue(int_product(qg.codes.t(), qx.t()), qg.scale * sx, std::nullopt, at::kFloat);
  } else if (cfg.recipe == Recipe::kLsqLuq) {
    const Tensor gl = luq_values(g32, grad_uniforms(n * c).reshape({n, c}));
    if (need_dx) dx = at::mm(gl, sw * qw.to(at::kFloat));
    if (need_dw) dw = at::mm(gl.t(), sx * qx.to(at::kFloat));
  } else {
    const bool sample = cfg.recipe == Recipe::kHqLss;
    const bool rows = cfg.grad_scale == GradScaleMode::kRow;
    const BitSplit bs = bitsplit_codes(g32, grad_uniforms(n * c).reshape({n, c}), rows);
    const Tensor hi = bs.hi.to(at::kDouble), lo = bs.lo.to(at::kDouble);
    Tensor hi_norm, lo_norm;
    if (sample) {
      hi_norm = code_row_norms(bs.hi);
      lo_norm = code_row_norms(bs.lo);
      if (rows) {
        hi_norm = hi_norm * bs.row.to(at::kFloat);
        lo_norm = lo_norm * bs.row.to(at::kFloat);
      }
    }
    // Per-row weights of the hi and lo rows (16 and 1 without sampling), then one exact product.
    const auto weights = [&](const Tensor& scores, RandomPurpose purpose, int64_t stat) {
      Tensor w_hi, w_lo;
      if (!sample) {
        w_hi = at::full({n}, 16.0, hi.options());
        w_lo = at::ones({n}, hi.options());
      } else {
        auto [wts, kept] = lss_weights(scores, n, cfg, purpose, stream_hi);
        out.stats[stat].copy_(kept);
        w_hi = wts.narrow(0, 0, n);
        w_lo = wts.narrow(0, n, n);
      }
      if (rows) {
        w_hi = w_hi * bs.row;
        w_lo = w_lo * bs.row;
      }
      return std::make_pair(w_hi, w_lo);
    };
    if (need_dx) {
      Tensor scores;
      if (sample) scores = at::cat({hi_norm * 16.0, lo_norm});
      const auto [w_hi, w_lo] = weights(scores, RandomPurpose::kSampleInput, 0);
      const Tensor acc = int_product(hi * w_hi.unsqueeze(1) + lo * w_lo.unsqueeze(1), qw.t());
      const Tensor s = bs.scale.to(at::kDouble) * sw.to(at::kDouble);
      dx = (acc * s).to(at::kFloat);
    }
    if (need_dw) {
      Tensor scores;
      if (sample) {
        const Tensor xnorm = code_row_norms(qx);
        scores = at::cat({(hi_norm * 16.0) * xnorm, lo_norm * xnorm});
      }
      const auto [w_hi, w_lo] = weights(scores, RandomPurpose::kSampleWeight, 1);
      const Tensor acc = int_product((hi * w_hi.unsqueeze(1) + lo * w_lo.unsqueeze(1)).t(), qx.t());
      const Tensor s = bs.scale.to(at::kDouble) * sx.to(at::kDouble);
      dw = (acc * s).to(at::kFloat);
    }
  }
  if (need_dx) {
    const Tensor bits = unpack_bits(aux, n * d);
    auto [dxt, gsx] = lsq_backward_compact_of(qx, bits, dx);
    if (mask[3]) out.grad_input_step.copy_(gsx);
    if (want_dx) out.grad_x.copy_(hadamard_fp32(dxt, g));
  }
  if (need_dw) {
    auto [dwt, gsw] = lsq_backward_of(vw, dw);
    if (mask[4]) out.grad_weight_step.copy_(gsw);
    if (want_dw) out.grad_w.copy_(hadamard_fp32(dwt, g));
  }
  return {out.grad_x, out.grad_w, out.grad_bias, out.grad_input_step, out.grad_weight_step,
          out.stats};
}

// ---------------------------------------------------------------- component ops

Tensor hadamard_transform(const Tensor& x, int64_t block) {
  const Tensor x2 = detail::as_matrix(x, "x");
  check_float(x2, "in");
  check_block(block, x2.size(1));
  return hadamard_fp32(x2, block).to(x.scalar_type()).reshape(x.sizes());
}

std::tuple<Tensor, Tensor> select_hadamard_block(const Tensor& x, const Tensor& w,
                                                 int64_t max_block) {
  // The first-batch search (once per layer) on the host, through the core.
  const Tensor x2 = detail::as_matrix(x, "x").to(at::kCPU), w2 = detail::as_matrix(w, "w").to(at::kCPU);
  const HadamardChoice choice = call_core([&] {
    return int4train::select_hadamard_block(detail::to_view(x2, "x"), detail::to_view(w2, "w"),
                                            static_cast<int32_t>(max_block));
  });
  const Tensor errors =
      at::tensor(choice.errors, at::TensorOptions().dtype(at::kDouble)).to(x.device());
  return {at::scalar_tensor(static_cast<int64_t>(choice.block), x.options().dtype(at::kLong)),
          errors};
}

Tensor lsq_init_step(const Tensor& x) {
  const Tensor x2 = detail::as_matrix(x, "x");
  check_float(x2, "x");
  const Tensor x32 = x2.to(at::kFloat);
  const int64_t nonfinite = at::logical_not(at::isfinite(x32)).sum().item<int64_t>();
  TORCH_CHECK_VALUE(nonfinite == 0,
                    "x: expected finite values to initialise the LSQ step, found ", nonfinite,
                    " non-finite");
  const Tensor total = x32.to(at::kDouble).abs().sum();
  const Tensor mean = divide(total, static_cast<double>(std::max<int64_t>(x32.numel(), 1)));
  Tensor s = divide(mean * 2.0, std::sqrt(static_cast<double>(kLsqQp))).to(at::kFloat);
  s = at::clamp_min(s, FLT_MIN);
  return at::where(total > 0, s, at::ones_like(s));
}

std::tuple<Tensor, Tensor> lsq_quantize(const Tensor& x, const Tensor& step, bool packed) {
  const Tensor x2 = detail::as_matrix(x, "x");
  check_float(x2, "x");
  const Tensor s = detail::fp32_scalar(step, "step", "int4train.lsq_quantize").to(x.device());
  TORCH_CHECK_VALUE(((s > 0) & at::isfinite(s)).item<bool>(),
                    "step: expected a positive finite step size, got ", s.item<float>());
  const Tensor x32 = x2.to(at::kFloat);
  const Tensor codes = lsq_codes(x32, s).first;
  const Tensor nonfinite = at::logical_not(at::isfinite(x32)).sum();
  std::vector<int64_t> shape = x.sizes().vec();
  if (!packed) return {codes.reshape(shape), nonfinite};
  shape.back() = packed_row_bytes(x2.size(1));
  return {pack_codes(codes).reshape(shape), nonfinite};
}

std::tuple<Tensor, Tensor, Tensor> quantize_bitsplit(const Tensor& g, int64_t seed, int64_t stream,
                                                     bool packed) {
  const Tensor g2 = detail::as_matrix(g, "g");
  check_float(g2, "g");
  const uint64_t st = static_cast<uint64_t>(stream);
  const Tensor hi_word = at::scalar_tensor(static_cast<int64_t>(st >> 32), g.options().dtype(at::kLong));
  const Tensor u = philox_uniforms(static_cast<uint64_t>(seed), static_cast<int64_t>(st & kMask32),
                                   hi_word, g2.numel(), g.options())
                       .reshape(g2.sizes());
  const BitSplit bs = bitsplit_codes(g2.to(at::kFloat), u);
  std::vector<int64_t> shape = g.sizes().vec();
  if (!packed) return {bs.hi.reshape(shape), bs.lo.reshape(shape), bs.scale};
  shape.back() = packed_row_bytes(g2.size(1));
  return {pack_codes(bs.hi).reshape(shape), pack_codes(bs.lo).reshape(shape), bs.scale};
}

Tensor pack_int4(const Tensor& codes) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kChar, "int4train.pack_int4: codes must be int8, got ",
                   codes.scalar_type());
  const Tensor c2 = detail::as_matrix(codes, "codes");
  if (c2.numel() > 0) {
    TORCH_CHECK_VALUE(((c2 >= kInt4Min) & (c2 <= kInt4Max)).all().item<bool>(),
                      "codes: expected values in [-8, 7]");
  }
  std::vector<int64_t> shape = codes.sizes().vec();
  shape.back() = packed_row_bytes(c2.size(1));
  return pack_codes(c2).reshape(shape);
}

Tensor unpack_int4(const Tensor& packed, int64_t cols) {
  TORCH_CHECK_VALUE(cols >= 0, "int4train.unpack_int4: cols must be >= 0, got ", cols);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte,
                   "int4train.unpack_int4: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() >= 1 && packed.size(-1) == packed_row_bytes(cols),
                    "int4train.unpack_int4: packed must have last dimension ",
                    packed_row_bytes(cols), " for cols = ", cols, ", got shape ", packed.sizes());
  const Tensor p2 = detail::as_matrix(packed, "packed");
  std::vector<int64_t> shape = packed.sizes().vec();
  shape.back() = cols;
  return unpack_codes(p2, cols).reshape(shape);
}

Tensor gemm_s32(const Tensor& a, const Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, "int4train.gemm_s32: a and b must be 2-D, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type() &&
                       (a.scalar_type() == at::kChar || a.scalar_type() == at::kByte),
                   "int4train.gemm_s32: a and b must both be int8 codes or both uint8 packed int4, ",
                   "got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "int4train.gemm_s32: a is ", a.sizes(), " and b is ",
                    b.sizes(), ": their reduction dimensions (last) differ");
  if (a.scalar_type() == at::kByte) {
    const int64_t k = 2 * a.size(1);
    TORCH_CHECK_VALUE(k <= kMaxKInt4, "a: K = ", k, " exceeds kMaxKInt4");
    return int_product(unpack_codes(a, k), unpack_codes(b, k)).to(at::kInt);
  }
  TORCH_CHECK_VALUE(a.size(1) <= kMaxKInt8, "a: K = ", a.size(1), " exceeds kMaxKInt8");
  return int_product(a, b).to(at::kInt);
}

Tensor lss_probabilities(const Tensor& scores, double budget) {
  TORCH_CHECK_VALUE(scores.dim() == 1, "int4train.lss_probabilities: scores must be 1-D, got shape ",
                    scores.sizes());
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat,
                   "int4train.lss_probabilities: scores must be float32, got ", scores.scalar_type());
  const Tensor s = scores.to(at::kCPU).contiguous();
  Tensor probs = at::empty_like(s);
  call_core([&] {
    int4train::lss_probabilities(detail::to_view(s, "scores"), budget,
                                 detail::to_view(probs, "probs"));
  });
  return probs.to(scores.device());
}

}  // namespace

// CUDA tensors run the generic implementation (until the dedicated kernels exist).
TORCH_LIBRARY_IMPL(int4train, CUDA, m) {
  m.impl("hadamard_transform", &hadamard_transform);
  m.impl("select_hadamard_block", &select_hadamard_block);
  m.impl("lsq_init_step", &lsq_init_step);
  m.impl("lsq_quantize", &lsq_quantize);
  m.impl("quantize_bitsplit", &quantize_bitsplit);
  m.impl("pack_int4", &pack_int4);
  m.impl("unpack_int4", &unpack_int4);
  m.impl("gemm_s32", &gemm_s32);
  m.impl("lss_probabilities", &lss_probabilities);
  m.impl("linear_forward", &linear_forward);
  m.impl("linear_backward", &linear_backward);
}

// The same functions on any device, for testing them against the core on CPU tensors.
TORCH_LIBRARY_FRAGMENT(int4train, m) {
  m.set_python_module("int4train._fake");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("_generic_hadamard_transform(Tensor x, int block) -> Tensor", tags);
  m.def("_generic_lsq_init_step(Tensor x) -> Tensor", tags);
  m.def(
      "_generic_lsq_quantize(Tensor x, Tensor step, bool packed=False) -> "
      "(Tensor codes, Tensor nonfinite)",
      tags);
  m.def(
      "_generic_quantize_bitsplit(Tensor g, int seed, int stream, bool packed=False) -> "
      "(Tensor hi, Tensor lo, Tensor scale)",
      tags);
  m.def("_generic_pack_int4(Tensor codes) -> Tensor", tags);
  m.def("_generic_unpack_int4(Tensor packed, int cols) -> Tensor", tags);
  m.def("_generic_gemm_s32(Tensor a, Tensor b) -> Tensor", tags);
  m.def(
      "_generic_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? input_step, "
      "Tensor? weight_step, str recipe, int hadamard_block, int seed, Tensor step, int layer) -> "
      "(Tensor y, Tensor codes, Tensor aux, Tensor scale, Tensor saved_step)",
      tags);
  m.def(
      "_generic_linear_backward(Tensor grad_y, Tensor? x, Tensor codes, Tensor aux, "
      "Tensor scale, Tensor weight, Tensor? input_step, Tensor? weight_step, str recipe, "
      "int hadamard_block, int seed, Tensor step, int layer, bool[5] output_mask) -> "
      "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_input_step, "
      "Tensor grad_weight_step, Tensor stats)",
      tags);
}

TORCH_LIBRARY_IMPL(int4train, CompositeExplicitAutograd, m) {
  m.impl("_generic_hadamard_transform", &hadamard_transform);
  m.impl("_generic_lsq_init_step", &lsq_init_step);
  m.impl("_generic_lsq_quantize", &lsq_quantize);
  m.impl("_generic_quantize_bitsplit", &quantize_bitsplit);
  m.impl("_generic_pack_int4", &pack_int4);
  m.impl("_generic_unpack_int4", &unpack_int4);
  m.impl("_generic_gemm_s32", &gemm_s32);
  m.impl("_generic_linear_forward", &linear_forward);
  m.impl("_generic_linear_backward", &linear_backward);
}

}  // namespace int4train::pt::generic
