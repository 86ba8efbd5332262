// int4train for LibTorch: Int4Linear, a torch::nn::Linear replacement whose three matrix products
// run on 4-bit integers (or any recipe of int4train/linear.h). Same parameters and state_dict names
// as the Python int4train.Int4Linear, so checkpoints move between the two.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>

#include "int4train/linear.h"

namespace int4train::pt {

struct Int4LinearOptions {
  Int4LinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  // "fp", "int8", "lsq_luq", "hq", "hq_bs" or "hq_lss" (int4train/linear.h).
  // A recipe name or spec (int4train/linear.h, parse_recipe_spec), e.g. "hq_lss:lss_budget=1.5" or
  // "hq_lss:grad_scale=row".
  TORCH_ARG(std::string, recipe) = "hq_lss";
  // Random streams: keyed by (seed, training step, layer id).
  TORCH_ARG(int64_t, seed) = 0;
  TORCH_ARG(int64_t, layer) = 0;
  // Largest Hadamard block the first-batch search may pick (a power of two <= 256).
  TORCH_ARG(int64_t, max_hadamard_block) = 256;
  // How the first batch sets the LSQ steps: "mse" (lsq_mse_step) or "mean_abs" (lsq_init_step), as
  // the Python Recipe.step_init.
  TORCH_ARG(std::string, step_init) = "mse";
  // The small-shape rule (int4train/linear.h): a forward on a CUDA device whose tokens x in x out
  // is below this many multiply-adds runs as the plain product in x's dtype (at::linear) instead.
  // Unset (the default): the measured rule, int4train::dense_fallback_macs(recipe); 0: never
  // (every call quantized, as an accuracy study wants); any other value >= 0: the threshold.
  TORCH_ARG(std::optional<double>, dense_below_macs) = std::nullopt;
};

// State (the names are the state_dict keys):
//   weight (out, in), bias (out): parameters, as torch::nn::Linear;
//   input_step, weight_step: fp32 parameters of shape (1,), the LSQ step sizes (LSQ recipes only;
//   checkpoints with 0-dim steps load);
//   hadamard_block (int64 0-dim), initialized (bool 0-dim), step (int64 0-dim): buffers.
// The first forward on a non-empty batch initialises the steps (lsq_mse_step, or lsq_init_step with
// step_init "mean_abs", of the transformed x and w) and picks the Hadamard block (hq recipes;
// lsq_luq uses 1), unless `initialized` is already set (a loaded checkpoint is never
// re-initialised). Each forward in training mode increments `step`. forward takes x (...,
// in_features) in float32 or bfloat16 (any float dtype under autocast).
class Int4LinearImpl : public torch::nn::Cloneable<Int4LinearImpl> {
 public:
  Int4LinearImpl(int64_t in_features, int64_t out_features)
      : Int4LinearImpl(Int4LinearOptions(in_features, out_features)) {}
  explicit Int4LinearImpl(const Int4LinearOptions& options);

  void reset() override;
  // Same initialisation as torch::nn::Linear.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  at::Tensor forward(const at::Tensor& x);

  bool is_initialized() const;
  int64_t block_size() const;  // the Hadamard block in use (1 until initialised)
  // The small-shape rule's threshold in use: options.dense_below_macs, or when it is unset
  // int4train::dense_fallback_macs of the recipe (0: every call quantized).
  double dense_below_macs() const;

  Int4LinearOptions options;
  at::Tensor weight, bias, input_step, weight_step;
  at::Tensor hadamard_block, initialized, step;

 private:
  void initialize(const at::Tensor& x);
  // Host copies of `initialized` and `hadamard_block`, which every forward branches on. They are
  // read from the device again only when either buffer is another tensor or has been written (its
  // storage or version counter changed: initialisation, torch::load, .to(), an in-place write), so
  // a forward on a CUDA device does not synchronise with the host.
  struct HostState {
    const void* init_data = nullptr;
    const void* block_data = nullptr;
    int64_t init_version = -1, block_version = -1;
    bool initialized = false;
    int64_t block = 1;
  };
  const HostState& host_state() const;
  mutable HostState host_;
};
TORCH_MODULE(Int4Linear);

// An Int4Linear that shares the weight and bias of `linear` (same shapes, device and dtype).
Int4Linear int4_linear_from(const torch::nn::Linear& linear, const std::string& recipe = "hq_lss",
                            int64_t seed = 0, int64_t layer = 0);
// The same with every option (recipe, seed, layer, max_hadamard_block, step_init); in_features,
// out_features and bias must be the linear's (a c10::ValueError naming the option otherwise).
Int4Linear int4_linear_from(const torch::nn::Linear& linear, const Int4LinearOptions& options);

}  // namespace int4train::pt
