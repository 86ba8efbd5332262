// int4train PyTorch binding: the differentiable ops. The quantized linear's autograd is a C++
// torch::autograd::Function (so LibTorch users get gradients too) whose forward and backward call the
// linear_forward / linear_backward ops through the dispatcher (so torch.compile traces them through
// their fake kernels). Also the autocast kernels of `linear` and the autograd of hadamard_transform.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <string>

#include "int4train/torch/ops.h"
#include "ops_internal.h"

namespace int4train::pt {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Position of each forward argument among the Function's variable inputs (-1: not a variable), so
// that needs_input_grad, which counts variables only, can be asked per argument.
int64_t variable_index(const std::optional<Tensor>& t, int64_t* next) {
  return t.has_value() && t->defined() ? (*next)++ : -1;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  // x: (N, D); weight: (C, D); steps: fp32 scalars or absent; returns y (N, C).
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& input_step,
                        const std::optional<Tensor>& weight_step, const std::string& recipe,
                        int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, codes, aux, scale, saved_step] = linear_forward(x, weight, bias, input_step, weight_step, recipe,
                                                 hadamard_block, seed, step, layer);
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
                            weight_step.value_or(Tensor()), codes, aux, scale, saved_step});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const Tensor& input_step = saved[2];
    const Tensor& weight_step = saved[3];
    auto needs = [&](const char* key) {
      const int64_t index = ctx->saved_data[key].toInt();
      return index >= 0 && ctx->needs_input_grad(static_cast<size_t>(index));
    };
    const std::array<bool, 5> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   needs("bias_index"), needs("input_step_index"),
                                   needs("weight_step_index")};
    variable_list grads(10);
    if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) return grads;
    auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    auto [gx, gw, gb, gsx, gsw, stats] = linear_backward(
        grad_outputs[0], opt(x), saved[4], saved[5], saved[6], weight, opt(input_step),
        opt(weight_step), ctx->saved_data["recipe"].toStringRef(),
        ctx->saved_data["hadamard_block"].toInt(), ctx->saved_data["seed"].toInt(), saved[7],
        ctx->saved_data["layer"].toInt(), mask);
    if (mask[0]) grads[0] = gx;
    if (mask[1]) grads[1] = gw;
    if (mask[2]) grads[2] = gb;
    if (mask[3]) grads[3] = gsx;
    if (mask[4]) grads[4] = gsw;
    return grads;
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

void check_linear_dtypes(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type(),
                   "int4train.linear: x and weight must have the same dtype (as nn.Linear), got ",
                   x.scalar_type(), " and ", weight.scalar_type());
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

void check_linear_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
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
  check_linear_dtypes(x, weight, bias);
}

std::vector<int64_t> output_shape(const Tensor& x, const Tensor& weight) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return shape;
}

// The step the quantizers use: |s| in fp32, floored at the smallest normal float. An optimizer update
// that carries a learned step across zero then mirrors it instead of breaking the layer (the core
// needs s > 0); the gradient flows through |s| (and through the cast: a bf16 step gets a bf16 grad).
std::optional<Tensor> as_fp32_scalar(const std::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->to(at::kFloat).reshape({}).abs().clamp_min(std::numeric_limits<float>::min());
}

Tensor linear_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& input_step,
                       const std::optional<Tensor>& weight_step, c10::string_view recipe,
                       int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer) {
  check_linear_args(x, weight, bias);
  const Tensor x2 = x.reshape({-1, weight.size(1)});
  const Tensor y = LinearFunction::apply(x2, weight, bias, as_fp32_scalar(input_step),
                                         as_fp32_scalar(weight_step), std::string(recipe),
                                         hadamard_block, seed, step, layer);
  return y.reshape(output_shape(x, weight));
}

// Without autograd (inference mode, or a backend below it): the forward alone.
Tensor linear_forward_only(const Tensor& x, const Tensor& weight,
                           const std::optional<Tensor>& bias,
                           const std::optional<Tensor>& input_step,
                           const std::optional<Tensor>& weight_step, c10::string_view recipe,
                           int64_t hadamard_block, int64_t seed, const Tensor& step,
                           int64_t layer) {
  check_linear_args(x, weight, bias);
  const Tensor x2 = x.reshape({-1, weight.size(1)});
  const Tensor y = std::get<0>(linear_forward(x2, weight, bias, as_fp32_scalar(input_step),
                                              as_fp32_scalar(weight_step), std::string(recipe),
                                              hadamard_block, seed, step, layer));
  return y.reshape(output_shape(x, weight));
}

// Autocast: like nn.Linear, the layer takes lower-precision operands under autocast. The core
// computes in bf16 or fp32, so bf16 autocast gives bf16 operands and fp16 autocast gives fp32 (the
// steps stay fp32 either way).
template <c10::DispatchKey kKey, c10::DeviceType kDevice>
Tensor linear_autocast(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                       const std::optional<Tensor>& input_step,
                       const std::optional<Tensor>& weight_step, c10::string_view recipe,
                       int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dtype =
      at::autocast::get_autocast_dtype(kDevice) == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
  return linear(at::autocast::cached_cast(dtype, x, kDevice),
                at::autocast::cached_cast(dtype, weight, kDevice),
                at::autocast::cached_cast(dtype, bias, kDevice), input_step, weight_step,
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
}

TORCH_LIBRARY_IMPL(int4train, Autocast, m) {
  m.impl("linear", &linear_autocast<c10::DispatchKey::Autocast, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(int4train, AutocastCPU, m) {
  m.impl("linear", &linear_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

}  // namespace int4train::pt
