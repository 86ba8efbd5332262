// int4train PyTorch binding: CUDA tensors to the core's CUDA kernels (cuda_bridge.h).
#include "cuda_bridge.h"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "convert.h"
#include "int4train/cuda.h"

namespace int4train::pt::cuda_bridge {
namespace {

// Temporaries of the kernels come from PyTorch's caching allocator, on the stream they run on.
void* allocate(void*, size_t bytes, void* stream) {
  return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(
      bytes, static_cast<cudaStream_t>(stream));
}
void deallocate(void*, void* ptr, size_t, void*) {
  c10::cuda::CUDACachingAllocator::raw_delete(ptr);
}
CudaAllocator torch_allocator() { return CudaAllocator{nullptr, &allocate, &deallocate}; }

void* current_stream(int device) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
}

}  // namespace

at::Tensor philox_words(uint64_t seed, uint32_t stream_lo, const at::Tensor& step, int64_t n) {
  const c10::cuda::CUDAGuard guard(step.device());
  const at::Tensor hi = step.to(at::kLong).reshape({}).contiguous();
  at::Tensor words = at::empty({n}, step.options().dtype(at::kLong));
  detail::call_core([&] {
    philox_words_cuda(seed, stream_lo, detail::to_view(hi, "step"), detail::to_view(words, "words"),
                      current_stream(step.get_device()));
  });
  return words;
}

at::Tensor hadamard_fp32(const at::Tensor& x, int64_t g) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor in = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kFloat));
  if (in.numel() == 0) return out;
  detail::call_core([&] {
    hadamard_transform_cuda(detail::to_view(in, "x"), detail::to_view(out, "out"),
                            static_cast<int32_t>(g), current_stream(x.get_device()));
  });
  return out;
}

namespace {

// A one-element tensor (the caller checked numel 1) as a 0-dim core view of its storage.
TensorView scalar_view(const at::Tensor& t, const char* arg) {
  return detail::to_view(t.dim() == 0 ? t : t.reshape({}), arg);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lsq_steps(const at::Tensor& input_param,
                                             const at::Tensor& weight_param) {
  const c10::cuda::CUDAGuard guard(input_param.device());
  // Two allocations: an op's outputs may not alias each other (torch.compile assumes fresh,
  // 16-byte aligned outputs).
  at::Tensor sx = at::empty({}, input_param.options().dtype(at::kFloat));
  at::Tensor sw = at::empty({}, input_param.options().dtype(at::kFloat));
  detail::call_core([&] {
    lsq_steps_cuda(scalar_view(input_param, "input_step"), scalar_view(weight_param, "weight_step"),
                   detail::to_view(sx, "input_step"), detail::to_view(sw, "weight_step"),
                   current_stream(input_param.get_device()));
  });
  return {sx, sw};
}

std::tuple<at::Tensor, at::Tensor> lsq_step_grads(const at::Tensor& input_param,
                                                  const at::Tensor& weight_param,
                                                  const at::Tensor& grad_input_step,
                                                  const at::Tensor& grad_weight_step) {
  const c10::cuda::CUDAGuard guard(input_param.device());
  // Fresh outputs (an op's output may not alias its inputs).
  const auto out_of = [](const at::Tensor& p, const at::Tensor& g) {
    return g.numel() == 0 ? at::empty({0}, p.options()) : at::empty(p.sizes(), p.options());
  };
  at::Tensor gx = out_of(input_param, grad_input_step), gw = out_of(weight_param, grad_weight_step);
  const auto grad_view = [](const at::Tensor& g, const char* arg) {
    return g.numel() == 0 ? TensorView{} : scalar_view(g, arg);
  };
  detail::call_core([&] {
    lsq_step_grads_cuda(
        scalar_view(input_param, "input_step"), scalar_view(weight_param, "weight_step"),
        grad_view(grad_input_step, "grad_input_step"),
        grad_view(grad_weight_step, "grad_weight_step"), grad_view(gx, "grad_input_param"),
        grad_view(gw, "grad_weight_param"), current_stream(input_param.get_device()));
  });
  return {gx, gw};
}

bool runs_kernels(const at::Tensor& t) {
  return t.is_cuda() && cuda_compute_capability(t.get_device()) >= kMinCapabilityKernels;
}

void linear_forward(const LinearConfig& config, const LinearForwardArgs& args, int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  detail::call_core(
      [&] { linear_forward_cuda(config, args, torch_allocator(), current_stream(device)); });
}

void linear_backward(const LinearConfig& config, const LinearBackwardArgs& args, int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  detail::call_core(
      [&] { linear_backward_cuda(config, args, torch_allocator(), current_stream(device)); });
}

}  // namespace int4train::pt::cuda_bridge
