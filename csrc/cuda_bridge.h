// int4train PyTorch binding: the bridge from CUDA tensors to the core's CUDA kernels
// (include/int4train/cuda.h), on PyTorch's current stream with its caching allocator. Built where
// both the core has CUDA (nvcc at build time) and torch has CUDA (libc10_cuda); kAvailable says so.
// The device-generic implementation (generic.cpp) calls these for CUDA tensors where a kernel
// exists, and keeps its ATen form elsewhere.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "int4train/linear.h"

namespace int4train::pt::cuda_bridge {

#ifdef INT4TRAIN_TORCH_CUDA
constexpr bool kAvailable = true;
// True for a CUDA tensor on a device the kernels run on (compute capability 8.0 or newer,
// cuda.h's kMinCapabilityKernels); the ATen forms of generic.cpp serve older devices.
bool runs_kernels(const at::Tensor& t);
#else
constexpr bool kAvailable = false;  // nothing below is defined: callers guard with the macro
inline bool runs_kernels(const at::Tensor&) { return false; }
#endif

// Philox words random_u32(seed, (uint32(step) << 32) | stream_lo, i), i < n, as int64 in
// [0, 2^32) on step's device; step: int64 0-dim device tensor.
at::Tensor philox_words(uint64_t seed, uint32_t stream_lo, const at::Tensor& step, int64_t n);

// x (rows, d) fp32 or bf16 CUDA -> x B_g in fp32, bit-identical to hadamard.h's order.
at::Tensor hadamard_fp32(const at::Tensor& x, int64_t g);

// lsq_steps_cuda / lsq_step_grads_cuda (cuda.h) on one-element fp32 or bf16 CUDA tensors of one
// device: the two fp32 0-dim steps; the two parameter gradients (empty where the grad is empty).
std::tuple<at::Tensor, at::Tensor> lsq_steps(const at::Tensor& input_param,
                                             const at::Tensor& weight_param);
std::tuple<at::Tensor, at::Tensor> lsq_step_grads(const at::Tensor& input_param,
                                                  const at::Tensor& weight_param,
                                                  const at::Tensor& grad_input_step,
                                                  const at::Tensor& grad_weight_step);

// linear_forward_cuda / linear_backward_cuda on the device of the views (device index given).
void linear_forward(const LinearConfig& config, const LinearForwardArgs& args, int device);
void linear_backward(const LinearConfig& config, const LinearBackwardArgs& args, int device);

}  // namespace int4train::pt::cuda_bridge
