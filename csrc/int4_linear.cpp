// int4train for LibTorch: the Int4Linear module (int4train/torch/int4_linear.h). Holds the layer's
// parameters and state and calls the differentiable int4train::linear op.
#include "int4train/torch/int4_linear.h"

#include <ATen/autocast_mode.h>
#include <torch/nn/init.h>
#include <torch/torch.h>

#include <cmath>

#include "int4train/linear.h"
#include "int4train/torch/ops.h"
#include "ops_internal.h"

namespace int4train::pt {

Int4LinearImpl::Int4LinearImpl(const Int4LinearOptions& options_) : options(options_) {
  reset();
}

void Int4LinearImpl::reset() {
  const Recipe recipe = detail::recipe_from(options.recipe());
  TORCH_CHECK_VALUE(options.in_features() >= 0 && options.out_features() >= 0,
                    "Int4Linear: in_features and out_features must be >= 0, got ",
                    options.in_features(), " and ", options.out_features());
  TORCH_CHECK_VALUE(options.step_init() == "mean_abs" || options.step_init() == "mse",
                    "Int4Linear: step_init must be \"mean_abs\" or \"mse\", got \"",
                    options.step_init(), "\"");
  TORCH_CHECK_VALUE(!options.dense_below_macs() || *options.dense_below_macs() >= 0.0,
                    "Int4Linear: dense_below_macs must be >= 0 (0: never fall back; unset: the "
                    "recipe's measured rule), got ",
                    options.dense_below_macs().value_or(0.0));
  TORCH_CHECK_VALUE(recipe_uses_lsq(recipe) || options.step_init() == "mse",
                    "Int4Linear: step_init applies to the LSQ recipes, got \"", options.step_init(),
                    "\" for recipe ", options.recipe());
  weight = register_parameter("weight",
                              torch::empty({options.out_features(), options.in_features()}));
  if (options.bias()) {
    bias = register_parameter("bias", torch::empty(options.out_features()));
  } else {
    bias = register_parameter("bias", {}, /*requires_grad=*/false);
  }
  if (recipe_uses_lsq(recipe)) {
    // Shape (1,), as the Python module's (FSDP takes no 0-dim parameter); 0-dim steps of older
    // checkpoints load too (torch::load takes the saved shape; the ops take any one-element step).
    input_step = register_parameter("input_step", torch::ones({1}));
    weight_step = register_parameter("weight_step", torch::ones({1}));
  }
  hadamard_block = register_buffer("hadamard_block", torch::ones({}, torch::kLong));
  initialized = register_buffer("initialized", torch::zeros({}, torch::kBool));
  step = register_buffer("step", torch::zeros({}, torch::kLong));
  reset_parameters();
}

void Int4LinearImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const int64_t fan_in = options.in_features();
    const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

double Int4LinearImpl::dense_below_macs() const {
  return options.dense_below_macs().value_or(
      dense_fallback_macs(detail::recipe_from(options.recipe())));
}

void Int4LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "int4train::pt::Int4Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha
         << options.bias() << ", recipe=" << options.recipe() << ", layer=" << options.layer();
  stream << ", dense_below_macs=" << dense_below_macs();
  stream << ")";
}

const Int4LinearImpl::HostState& Int4LinearImpl::host_state() const {
  if (host_.init_data != initialized.data_ptr() || host_.init_version != initialized._version() ||
      host_.block_data != hadamard_block.data_ptr() ||
      host_.block_version != hadamard_block._version()) {
    host_.initialized = initialized.item<bool>();
    host_.block = hadamard_block.item<int64_t>();
    host_.init_data = initialized.data_ptr();
    host_.init_version = initialized._version();
    host_.block_data = hadamard_block.data_ptr();
    host_.block_version = hadamard_block._version();
  }
  return host_;
}

bool Int4LinearImpl::is_initialized() const { return host_state().initialized; }

int64_t Int4LinearImpl::block_size() const { return host_state().block; }

void Int4LinearImpl::initialize(const at::Tensor& x) {
  torch::NoGradGuard no_grad;
  const Recipe recipe = detail::recipe_from(options.recipe());
  at::Tensor x2 = x.detach().reshape({-1, options.in_features()});
  if (x2.size(0) == 0) return;  // nothing to learn from: wait for a non-empty batch
  if (recipe_uses_lsq(recipe)) {
    // Statistics of the operands the layer will quantize (the weight's dtype; autocast may lower
    // both later, which changes them by far less than a 4-bit step).
    if (x2.scalar_type() != weight.scalar_type()) x2 = x2.to(weight.scalar_type());
    int64_t block = 1;
    if (recipe_uses_hadamard(recipe)) {
      block = std::get<0>(select_hadamard_block(x2, weight, options.max_hadamard_block()))
                  .item<int64_t>();
    }
    const auto init = options.step_init() == "mse" ? &lsq_mse_step : &lsq_init_step;
    input_step.copy_(init(hadamard_transform(x2, block)));
    weight_step.copy_(init(hadamard_transform(weight, block)));
    hadamard_block.fill_(block);
  }
  initialized.fill_(true);
}

at::Tensor Int4LinearImpl::forward(const at::Tensor& x) {
  const auto dtype = x.scalar_type();
  const bool autocast = at::autocast::is_autocast_enabled(x.device().type());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 ||
                       (autocast && at::isFloatingType(dtype) && dtype != at::kDouble),
                   "Int4Linear: supports float32 and bfloat16 inputs (any float under autocast), ",
                   "got ", dtype);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == options.in_features(), "Int4Linear: input has ",
                    "shape ", x.sizes(), ", expected last dimension in_features = ",
                    options.in_features());
  if (!is_initialized()) initialize(x);
  auto opt = [](const at::Tensor& t) {
    return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
  };
  const int64_t tokens = options.in_features() > 0 ? x.numel() / options.in_features() : 0;
  if (x.is_cuda() && below_dense_threshold(tokens, options.in_features(), options.out_features(),
                                           dense_below_macs())) {
    return at::linear(x, weight, opt(bias));  // the small-shape rule: `step` does not advance
  }
  at::Tensor y = linear(x, weight, opt(bias), opt(input_step), opt(weight_step), options.recipe(),
                        block_size(), options.seed(), step, options.layer());
  if (is_training()) {
    torch::NoGradGuard no_grad;
    step.add_(1);
  }
  return y;
}

Int4Linear int4_linear_from(const torch::nn::Linear& linear, const std::string& recipe,
                            int64_t seed, int64_t layer) {
  const auto& lo = linear->options;
  return int4_linear_from(linear, Int4LinearOptions(lo.in_features(), lo.out_features())
                                      .bias(lo.bias())
                                      .recipe(recipe)
                                      .seed(seed)
                                      .layer(layer));
}

Int4Linear int4_linear_from(const torch::nn::Linear& linear, const Int4LinearOptions& options) {
  const auto& lo = linear->options;
  TORCH_CHECK_VALUE(options.in_features() == lo.in_features() &&
                        options.out_features() == lo.out_features(),
                    "int4_linear_from: options.in_features/out_features must be the linear's (",
                    lo.in_features(), ", ", lo.out_features(), "), got (", options.in_features(),
                    ", ", options.out_features(), ")");
  TORCH_CHECK_VALUE(options.bias() == lo.bias(), "int4_linear_from: options.bias must be the linear's (",
                    lo.bias() ? "true" : "false", ")");
  Int4Linear out(options);
  // The new parameters share the storage of the old ones; the other state follows their device.
  torch::NoGradGuard no_grad;
  out->weight.set_data(linear->weight);
  if (lo.bias()) out->bias.set_data(linear->bias);
  for (auto& t : out->buffers()) t.set_data(t.to(linear->weight.device()));
  if (out->input_step.defined()) {
    out->input_step.set_data(out->input_step.to(linear->weight.device()));
    out->weight_step.set_data(out->weight_step.to(linear->weight.device()));
  }
  return out;
}

}  // namespace int4train::pt
