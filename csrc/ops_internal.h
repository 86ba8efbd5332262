// int4train PyTorch binding: helpers shared by the CPU kernels (ops.cpp), the device-generic ATen
// implementation (generic.cpp) and the autograd Function (autograd.cpp): argument checks and the
// allocation of the linear layer's outputs, so that every implementation returns the same shapes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdint>
#include <optional>

#include "int4train/common.h"
#include "int4train/linear.h"

namespace int4train::pt::detail {

// The typed handle of a registered op, for calls through the dispatcher (so autograd, autocast and
// the device kernels apply); look it up once (a static) per call site.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The low 32 bits of an integer scalar tensor holding the training step (read on the host).
uint32_t step_value(const at::Tensor& step);
// parse_recipe_spec (linear.h: a recipe name, or "hq_lss:lss_budget=X"), with a core Error mapped
// to ValueError: the config's recipe and lss_budget set, the rest default.
LinearConfig config_from(c10::string_view spec);
Recipe recipe_from(c10::string_view spec);
// (..., cols) -> contiguous (rows, cols).
at::Tensor as_matrix(const at::Tensor& x, const char* arg);
// x (..., D) against weight (C, D) and bias (C): a ValueError naming both shapes otherwise.
void check_linear_shapes(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const char* op);
// A required fp32 one-element tensor (an LSQ step), returned as a contiguous 0-dim tensor.
at::Tensor fp32_scalar(const std::optional<at::Tensor>& t, const char* arg, const char* op);

// linear_forward's outputs: y (N, C), the saved codes (uint8 (N, ceil(D/2)) packed INT4 for LSQ
// recipes, int8 (N, D) for int8, (0, 0) for fp), aux (uint8 vector) and scale (fp32 0-dim); aux
// and scale zeroed, unless the caller's kernels write them (zero_unwritten false: every aux byte
// and the scale).
struct LinearTensors {
  at::Tensor y, codes, aux, scale;
};
LinearTensors allocate_linear_outputs(Recipe recipe, int64_t n, int64_t d, int64_t c,
                                      at::ScalarType y_dtype, const at::TensorOptions& device,
                                      bool zero_unwritten = true);
// linear_forward's last output: a copy of the step its random streams used (int64 0-dim, on the
// step's device), which the backward takes as its step.
at::Tensor saved_step_of(const at::Tensor& step);
// The core view of saved codes: uint8 is packed INT4 of d columns, int8 is plain codes.
TensorView codes_view(const at::Tensor& codes, int64_t d, const char* arg);

// linear_backward's outputs; an output whose mask bit is false is an empty (0,) tensor.
// grad_x and grad_bias take grad_y's dtype, grad_weight the weight's, the step gradients fp32;
// stats int64 (2,), zeroed unless the caller's kernel writes it (zero_stats false).
struct LinearGradTensors {
  at::Tensor grad_x, grad_w, grad_bias, grad_input_step, grad_weight_step, stats;
};
LinearGradTensors allocate_linear_grads(int64_t n, int64_t d, int64_t c, at::ScalarType grad_dtype,
                                        at::ScalarType weight_dtype,
                                        const at::TensorOptions& device, std::array<bool, 5> mask,
                                        bool zero_stats = true);

}  // namespace int4train::pt::detail
