// int4train for LibTorch: the C++ entry points of int4train/torch/ops.h, each a typed call of its
// op through the c10 dispatcher (so autograd, autocast and the device kernels apply as from
// Python).
#include "int4train/torch/ops.h"
#include "ops_internal.h"

namespace int4train::pt {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using detail::op;

}  // namespace

Tensor linear(const Tensor& x, const Tensor& weight, const OptTensor& bias,
              const OptTensor& input_step, const OptTensor& weight_step, const std::string& recipe,
              int64_t hadamard_block, int64_t seed, const Tensor& step, int64_t layer) {
  static const auto handle =
      op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                c10::string_view, int64_t, int64_t, const Tensor&, int64_t)>("int4train::linear");
  return handle.call(x, weight, bias, input_step, weight_step, recipe, hadamard_block, seed, step,
                     layer);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_forward(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& input_step,
    const OptTensor& weight_step, const std::string& recipe, int64_t hadamard_block, int64_t seed,
    const Tensor& step, int64_t layer) {
  static const auto handle =
      op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
          c10::string_view, int64_t, int64_t, const Tensor&, int64_t)>("int4train::linear_forward");
  return handle.call(x, weight, bias, input_step, weight_step, recipe, hadamard_block, seed, step,
                     layer);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_backward(
    const Tensor& grad_y, const OptTensor& x, const Tensor& codes, const Tensor& aux,
    const Tensor& scale, const Tensor& weight, const OptTensor& input_step,
    const OptTensor& weight_step, const std::string& recipe, int64_t hadamard_block, int64_t seed,
    const Tensor& step, int64_t layer, std::array<bool, 5> output_mask) {
  static const auto handle =
      op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
          const Tensor&, const OptTensor&, const OptTensor&, c10::string_view, int64_t, int64_t,
          const Tensor&, int64_t, std::array<bool, 5>)>("int4train::linear_backward");
  return handle.call(grad_y, x, codes, aux, scale, weight, input_step, weight_step, recipe,
                     hadamard_block, seed, step, layer, output_mask);
}

Tensor hadamard_transform(const Tensor& x, int64_t block) {
  static const auto handle = op<Tensor(const Tensor&, int64_t)>("int4train::hadamard_transform");
  return handle.call(x, block);
}

std::tuple<Tensor, Tensor> select_hadamard_block(const Tensor& x, const Tensor& w,
                                                 int64_t max_block) {
  static const auto handle = op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>(
      "int4train::select_hadamard_block");
  return handle.call(x, w, max_block);
}

Tensor lsq_init_step(const Tensor& x) {
  static const auto handle = op<Tensor(const Tensor&)>("int4train::lsq_init_step");
  return handle.call(x);
}

Tensor lsq_mse_step(const Tensor& x) {
  static const auto handle = op<Tensor(const Tensor&)>("int4train::lsq_mse_step");
  return handle.call(x);
}

std::tuple<Tensor, Tensor> lsq_quantize(const Tensor& x, const Tensor& step, bool packed) {
  static const auto handle =
      op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, bool)>("int4train::lsq_quantize");
  return handle.call(x, step, packed);
}

std::tuple<Tensor, Tensor, Tensor> quantize_bitsplit(const Tensor& g, int64_t seed, int64_t stream,
                                                     bool packed) {
  static const auto handle =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, int64_t, bool)>(
          "int4train::quantize_bitsplit");
  return handle.call(g, seed, stream, packed);
}

Tensor pack_int4(const Tensor& codes) {
  static const auto handle = op<Tensor(const Tensor&)>("int4train::pack_int4");
  return handle.call(codes);
}

Tensor unpack_int4(const Tensor& packed, int64_t cols) {
  static const auto handle = op<Tensor(const Tensor&, int64_t)>("int4train::unpack_int4");
  return handle.call(packed, cols);
}

Tensor gemm_s32(const Tensor& a, const Tensor& b) {
  static const auto handle = op<Tensor(const Tensor&, const Tensor&)>("int4train::gemm_s32");
  return handle.call(a, b);
}

Tensor lss_probabilities(const Tensor& scores, double budget) {
  static const auto handle =
      op<Tensor(const Tensor&, double)>("int4train::lss_probabilities");
  return handle.call(scores, budget);
}

}  // namespace int4train::pt
