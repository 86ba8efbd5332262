// int4train PyTorch binding: the differentiable ops. The quantized linear's autograd is a C++
// torch::autograd::Function (so LibTorch users get gradients too) whose forward and backward call the
// linear_forward / linear_backward ops through the dispatcher (so torch.compile traces them through
// their fake kernels). Also the autocast kernels of `linear` and the autograd of hadamard_transform.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "cuda_bridge.h"
#include "int4train/quantize.h"
#include "int4train/torch/ops.h"
#include "ops_internal.h"

namespace int4train::pt {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---------------------------------------------------------------- the steps from their parameters
// _lsq_steps(input_step, weight_step) -> the fp32 0-dim steps the quantizers use,
// lsq_step_of_param of each (quantize.h: |p| floored at the smallest normal float);
// _lsq_step_grads(input_step, weight_step, grad_input_step, grad_weight_step) -> the gradients back
// to the parameters (lsq_step_param_grad, in each parameter's dtype and shape; an empty grad gives
// an empty output). Below autograd (the linear's Function calls them), so a training step pays one
// launch for both steps each way on CUDA instead of a dozen ATen ops and their autograd nodes.
// Elsewhere (and for fp16 / fp64 parameters) the ATen form, which PyTorch's own
// clamp_min(abs(p)) differentiates the same way.

void check_step_param(const Tensor& p, const char* arg) {
  TORCH_CHECK_VALUE(p.numel() == 1, "int4train.linear: ", arg,
                    " (an LSQ step) must hold one element, got shape ", p.sizes());
  TORCH_CHECK_TYPE(p.is_floating_point(), "int4train.linear: ", arg,
                   " (an LSQ step) must be a floating-point tensor, got ", p.scalar_type());
}

bool step_kernels(const Tensor& a, const Tensor& b) {
  const auto ok = [](const Tensor& p) {
    return p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16;
  };
  return cuda_bridge::runs_kernels(a) && a.device() == b.device() && ok(a) && ok(b);
}

std::tuple<Tensor, Tensor> lsq_steps_impl(const Tensor& input_step, const Tensor& weight_step) {
  check_step_param(input_step, "input_step");
  check_step_param(weight_step, "weight_step");
#ifdef INT4TRAIN_TORCH_CUDA
  if (step_kernels(input_step, weight_step)) return cuda_bridge::lsq_steps(input_step, weight_step);
#endif
  const auto of = [](const Tensor& p) {
    return p.to(at::kFloat).reshape({}).abs().clamp_min(kLsqStepFloor);
  };
  return {of(input_step), of(weight_step)};
}

std::tuple<Tensor, Tensor> lsq_step_grads_impl(const Tensor& input_step, const Tensor& weight_step,
                                               const Tensor& grad_input_step,
                                               const Tensor& grad_weight_step) {
  check_step_param(input_step, "input_step");
  check_step_param(weight_step, "weight_step");
  for (const Tensor* g : {&grad_input_step, &grad_weight_step}) {
    TORCH_CHECK_VALUE(
        g->numel() <= 1 && g->scalar_type() == at::kFloat,
        "int4train._lsq_step_grads: the step gradients must be fp32 with one element ",
        "(or none), got ", g->scalar_type(), " ", g->sizes());
  }
#ifdef INT4TRAIN_TORCH_CUDA
  if (step_kernels(input_step, weight_step)) {
    return cuda_bridge::lsq_step_grads(input_step, weight_step, grad_input_step, grad_weight_step);
  }
#endif
  const auto of = [](const Tensor& p, const Tensor& g) {
    if (g.numel() == 0) return at::empty({0}, p.options());
    const Tensor p32 = p.to(at::kFloat).reshape({});
    const Tensor kept =
        at::where(p32.abs() >= kLsqStepFloor, g.reshape({}), at::zeros({}, g.options()));
    return (kept * p32.sgn()).to(p.scalar_type()).reshape(p.sizes());
  };
  return {of(input_step, grad_input_step), of(weight_step, grad_weight_step)};
}

std::tuple<Tensor, Tensor> lsq_steps(const Tensor& input_step, const Tensor& weight_step) {
  static const auto handle =
      detail::op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)>("int4train::_lsq_steps");
  return handle.call(input_step, weight_step);
}

std::tuple<Tensor, Tensor> lsq_step_grads(const Tensor& input_step, const Tensor& weight_step,
                                          const Tensor& grad_input_step,
                                          const Tensor& grad_weight_step) {
  static const auto handle = detail::op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&)>("int4train::_lsq_step_grads");
  return handle.call(input_step, weight_step, grad_input_step, grad_weight_step);
}

// ---------------------------------------------------------------- the linear layer's autograd

// Position of each forward argument among the Function's variable inputs (-1: not a variable), so
// that needs_input_grad, which counts variables only, can be asked per argument.
int64_t variable_index(const std::optional<Tensor>& t, int64_t* next) {
  return t.has_value() && t->defined() ? (*next)++ : -1;
}

// The weight as the layer computes with it: cast to `dtype` when given (autocast), else as it is.
Tensor weight_as(const Tensor& weight, std::optional<at::ScalarType> dtype) {
  return dtype.has_value() ? weight.to(*dtype) : weight;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  // x: (N, D); weight: (C, D); steps: the step parameters (any float one-element tensors) or
  // absent; returns y (N, C). The LSQ recipes quantize with _lsq_steps of the two parameters.
  // weight_dtype (autocast): the layer computes with weight.to(weight_dtype), a cast made here and
  // again in the backward, so that the cast copy is not kept between them (the weight itself is).
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& input_step,
                        const std::optional<Tensor>& weight_step, const std::string& recipe,
                        int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer,
                        std::optional<at::ScalarType> weight_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto [sx, sw] = effective_steps(recipe, input_step, weight_step);
    auto [y, codes, aux, scale, saved_step] =
        linear_forward(x, weight_as(weight, weight_dtype), bias, sx, sw, recipe, hadamard_block,
                       seed, step, layer);
    ctx->saved_data["weight_dtype"] =
        weight_dtype.has_value() ? static_cast<int64_t>(*weight_dtype) : int64_t{-1};
    int64_t next = 2;  // x and weight are variables 0 and 1
    ctx->saved_data["bias_index"] = variable_index(bias, &next);
    ctx->saved_data["input_step_index"] = variable_index(input_step, &next);
    ctx->saved_data["weight_step_index"] = variable_index(weight_step, &next);
    ctx->saved_data["recipe"] = recipe;
    ctx->saved_data["hadamard_block"] = hadamard_block;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["layer"] = layer;
    // Only the fp recipe keeps x; the others keep its INT4 codes (+ aux bits) or int8 codes.
    const bool keep_x = detail::recipe_from(recipe) == Recipe::kFp;
    // saved_step is the op's copy of `step`, not `step` itself: the module increments its counter in
    // place after the forward (and under torch.compile an output of the op is the one value the
    // partitioner can neither move into the backward nor recompute from the mutated counter).
    ctx->save_for_backward({keep_x ? x : Tensor(), weight, input_step.value_or(Tensor()),
                            weight_step.value_or(Tensor()), codes, aux, scale, saved_step,
                            sx.value_or(Tensor()), sw.value_or(Tensor())});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const int64_t weight_dtype = ctx->saved_data["weight_dtype"].toInt();
    const Tensor weight = weight_as(
        saved[1],
        weight_dtype < 0 ? std::nullopt : std::optional(static_cast<at::ScalarType>(weight_dtype)));
    const Tensor& input_step = saved[2];
    const Tensor& weight_step = saved[3];
    auto needs = [&](const char* key) {
      const int64_t index = ctx->saved_data[key].toInt();
      return index >= 0 && ctx->needs_input_grad(static_cast<size_t>(index));
    };
    const std::array<bool, 5> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   needs("bias_index"), needs("input_step_index"),
                                   needs("weight_step_index")};
    variable_list grads(11);  // one per forward argument
    if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return grads;
    auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    auto [gx, gw, gb, gsx, gsw, stats] = linear_backward(
        grad_outputs[0], opt(x), saved[4], saved[5], saved[6], weight, opt(saved[8]), opt(saved[9]),
        ctx->saved_data["recipe"].toStringRef(), ctx->saved_data["hadamard_block"].toInt(),
        ctx->saved_data["seed"].toInt(), saved[7], ctx->saved_data["layer"].toInt(), mask);
    if (mask[0]) grads[0] = gx;
    // In the weight's own dtype, as autocast's cast would have passed it back.
    if (mask[1]) grads[1] = weight_dtype < 0 ? gw : gw.to(saved[1].scalar_type());
    if (mask[2]) grads[2] = gb;
    if (mask[3] || mask[4]) {
      if (saved[8].defined()) {
        // Through _lsq_steps: both parameters' gradients in one call.
        std::tie(gsx, gsw) = lsq_step_grads(input_step, weight_step, gsx, gsw);
      } else {
        // Steps the recipe does not use: zero gradients in the parameters' dtypes.
        gsx = mask[3] ? at::zeros_like(input_step) : gsx;
        gsw = mask[4] ? at::zeros_like(weight_step) : gsw;
      }
      if (mask[3]) grads[3] = gsx;
      if (mask[4]) grads[4] = gsw;
    }
    return grads;
  }

  // The steps linear_forward takes: an LSQ recipe's from _lsq_steps of both parameters (one of
  // them absent: passed on as absent, for linear_forward's error); other recipes use none.
  static std::pair<std::optional<Tensor>, std::optional<Tensor>> effective_steps(
      const std::string& recipe, const std::optional<Tensor>& input_step,
      const std::optional<Tensor>& weight_step) {
    const bool both = input_step.has_value() && input_step->defined() && weight_step.has_value() &&
                      weight_step->defined();
    if (!recipe_uses_lsq(detail::recipe_from(recipe)) || !both) return {std::nullopt, std::nullopt};
    auto [sx, sw] = lsq_steps(*input_step, *weight_step);
    return {sx, sw};
  }
};

class HadamardFunction : public torch::autograd::Function<HadamardFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, int64_t block) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["block"] = block;
    return hadamard_transform(x, block);
  }
  // B_g is symmetric and orthonormal: the gradient is the same transform of the output gradient.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return {hadamard_transform(grad_outputs[0], ctx->saved_data["block"].toInt()), Tensor()};
  }
};

// weight_dtype: the dtype the layer computes the weight in (its own, or autocast's).
void check_linear_dtypes(const Tensor& x, at::ScalarType weight_dtype,
                         const std::optional<Tensor>& bias) {
  TORCH_CHECK_TYPE(x.scalar_type() == weight_dtype,
                   "int4train.linear: x and weight must have the same dtype (as nn.Linear), got ",
                   x.scalar_type(), " and ", weight_dtype);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                   "int4train.linear: supports float32 and bfloat16 (under autocast, any float ",
                   "input), got ", x.scalar_type(),
                   "; cast the model to float32 or bfloat16, or run it under torch.autocast");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(),
                     "int4train.linear: bias must have the dtype of x, got ", bias->scalar_type(),
                     " and ", x.scalar_type());
  }
}

void check_linear_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       std::optional<at::ScalarType> weight_dtype = std::nullopt) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "int4train.linear: weight must be 2-D, got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), "int4train.linear: x has shape ",
                    x.sizes(), " but weight has shape ", weight.sizes(),
                    ": the last dimension of x must be in_features = ", weight.size(1));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "int4train.linear: bias must have shape [", weight.size(0), "], got ",
                      bias->sizes());
  }
  check_linear_dtypes(x, weight_dtype.value_or(weight.scalar_type()), bias);
}

std::vector<int64_t> output_shape(const Tensor& x, const Tensor& weight) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return shape;
}

Tensor linear_function(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& input_step,
                       const std::optional<Tensor>& weight_step, c10::string_view recipe,
                       int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer,
                       std::optional<at::ScalarType> weight_dtype) {
  check_linear_args(x, weight, bias, weight_dtype);
  const bool flat = x.dim() == 2;  // (N, D) already: no reshapes (two view ops a call)
  const Tensor x2 = flat ? x : x.reshape({-1, weight.size(1)});
  const Tensor y =
      LinearFunction::apply(x2, weight, bias, input_step, weight_step, std::string(recipe),
                            hadamard_block, seed, step, layer, weight_dtype);
  return flat ? y : y.reshape(output_shape(x, weight));
}

Tensor linear_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& input_step,
                       const std::optional<Tensor>& weight_step, c10::string_view recipe,
                       int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer) {
  return linear_function(x, weight, bias, input_step, weight_step, recipe, hadamard_block, seed,
                         step, layer, std::nullopt);
}

// Without autograd (inference mode, or a backend below it): the forward alone.
Tensor linear_forward_only(const Tensor& x, const Tensor& weight,
                           const std::optional<Tensor>& bias,
                           const std::optional<Tensor>& input_step,
                           const std::optional<Tensor>& weight_step, c10::string_view recipe,
                           int64_t hadamard_block, int64_t seed, const Tensor& step,
                           int64_t layer) {
  check_linear_args(x, weight, bias);
  const bool flat = x.dim() == 2;
  const Tensor x2 = flat ? x : x.reshape({-1, weight.size(1)});
  const auto [sx, sw] =
      LinearFunction::effective_steps(std::string(recipe), input_step, weight_step);
  const Tensor y = std::get<0>(linear_forward(x2, weight, bias, sx, sw, std::string(recipe),
                                              hadamard_block, seed, step, layer));
  return flat ? y : y.reshape(output_shape(x, weight));
}

// Autocast: like nn.Linear, the layer takes lower-precision operands under autocast. The core
// computes in bf16 or fp32, so bf16 autocast gives bf16 operands and fp16 autocast gives fp32 (the
// steps stay fp32 either way). Unlike nn.Linear, a training forward does not keep autocast's cast
// copy of the weight for the backward (2 bytes per weight element: more than the layer's saved
// codes, 0.625 byte per input element, wherever C > 0.31 N): the layer's Function casts the weight
// itself, in the forward and again in the backward, and keeps the weight (a parameter, there
// anyway). The same values, so the same outputs and gradients.
template <c10::DispatchKey kKey, c10::DeviceType kDevice>
Tensor linear_autocast(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& input_step,
                       const std::optional<Tensor>& weight_step, c10::string_view recipe,
                       int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dtype =
      at::autocast::get_autocast_dtype(kDevice) == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  // The weights autocast would cast: eligible, and of another dtype.
  const bool cast_weight =
      at::autocast::is_eligible(weight, kDevice) && weight.scalar_type() != dtype;
  const Tensor xc = at::autocast::cached_cast(dtype, x, kDevice);
  const std::optional<Tensor> bc = at::autocast::cached_cast(dtype, bias, kDevice);
  if (cast_weight && at::GradMode::is_enabled() && !c10::InferenceMode::is_enabled()) {
    return linear_function(xc, weight, bc, input_step, weight_step, recipe, hadamard_block, seed,
                           step, layer, dtype);
  }
  return linear(xc, at::autocast::cached_cast(dtype, weight, kDevice), bc, input_step, weight_step,
                std::string(recipe), hadamard_block, seed, step, layer);
}

Tensor hadamard_transform_autograd(const Tensor& x, int64_t block) {
  return HadamardFunction::apply(x, block);
}

}  // namespace

TORCH_LIBRARY_IMPL(int4train, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("hadamard_transform", &hadamard_transform_autograd);
}

TORCH_LIBRARY_IMPL(int4train, CompositeExplicitAutograd, m) {
  m.impl("linear", &linear_forward_only);
  m.impl("_lsq_steps", &lsq_steps_impl);
  m.impl("_lsq_step_grads", &lsq_step_grads_impl);
}

TORCH_LIBRARY_IMPL(int4train, Autocast, m) {
  m.impl("linear", &linear_autocast<c10::DispatchKey::Autocast, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(int4train, AutocastCPU, m) {
  m.impl("linear", &linear_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

}  // namespace int4train::pt
