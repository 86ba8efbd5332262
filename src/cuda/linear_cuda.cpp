// int4train CUDA path: the quantized linear layer's forward on the device, composed from the fused
// quantizer and the FP8 product exactly as src/cpu/linear.cpp composes the CPU components, so that
// the two agree bit for bit. No host synchronisation: the non-finite report stays on the device.
#include <cuda_runtime.h>

#include <string>

#include "cuda_common.h"
#include "int4train/cuda.h"
#include "int4train/hadamard.h"
#include "int4train/linear.h"
#include "int4train/quantize.h"
#include "kernels.h"

namespace int4train {

void linear_forward_cuda(const LinearConfig& cfg, const LinearForwardArgs& a,
                         const CudaAllocator& alloc, void* stream) {
  using namespace cuda_detail;
  if (!recipe_uses_lsq(cfg.recipe)) {
    throw_error(ErrorKind::kNotImplemented,
                std::string("recipe: linear_forward_cuda implements the LSQ recipes (lsq_luq, hq, "
                            "hq_bs, hq_lss), got ") +
                    recipe_name(cfg.recipe));
  }
  check_dtype(a.x, "x", {DType::kFloat32, DType::kBFloat16});
  check_dtype(a.w, "w", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(a.x, "x");
  check_device_matrix(a.w, "w");
  const int64_t n = a.x.shape[0], d = a.x.shape[1], c = a.w.shape[0];
  if (a.w.shape[1] != d) {
    throw_error(ErrorKind::kValue, "w: expected " + std::to_string(d) +
                                       " columns (in_features of x), got " +
                                       std::to_string(a.w.shape[1]));
  }
  const int32_t g = cfg.hadamard_block;
  if (recipe_uses_hadamard(cfg.recipe)) {
    if (!is_valid_hadamard_block(g) || (d > 0 && d % g != 0)) {
      throw_error(ErrorKind::kValue, "hadamard_block: expected a power of two <= " +
                                         std::to_string(kMaxHadamardBlock) +
                                         " dividing in_features = " + std::to_string(d) +
                                         ", got " + std::to_string(g));
    }
  } else if (g != 1) {
    throw_error(ErrorKind::kValue, std::string("hadamard_block: recipe ") +
                                       recipe_name(cfg.recipe) +
                                       " uses no Hadamard transform, expected 1, got " +
                                       std::to_string(g));
  }
  check_dtype(a.y, "y", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(a.y, "y");
  check_shape(a.y, "y", n, c);
  check_device_scalar(a.step_x, "step_x", DType::kFloat32);
  check_device_scalar(a.step_w, "step_w", DType::kFloat32);
  check_dtype(a.saved_codes, "saved_codes", {DType::kInt4Packed});
  check_shape(a.saved_codes, "saved_codes", n, d);
  check_dtype(a.saved_aux, "saved_aux", {DType::kUInt8});
  check_vector(a.saved_aux, "saved_aux", compact_aux_bytes(n, d));

  const cudaStream_t s = as_stream(stream);
  const int64_t dp = fp8_padded_cols(d);
  // One 256-byte-aligned temporary: the counter, then the two operands (16-byte aligned rows).
  const size_t x_bytes = static_cast<size_t>(n * dp), w_bytes = static_cast<size_t>(c * dp);
  const size_t x_off = 256, w_off = x_off + (x_bytes + 255) / 256 * 256;
  DeviceBuffer tmp(alloc, w_off + w_bytes, stream);
  char* base = tmp.as<char>();
  auto* counter = reinterpret_cast<unsigned long long*>(base);
  INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof *counter, s));
  const TensorView cnt = make_scalar(counter, DType::kInt64);
  const TensorView opx = make_matrix(base + x_off, DType::kFloat8E4M3, n, dp);
  const TensorView opw = make_matrix(base + w_off, DType::kFloat8E4M3, c, dp);
  const RandomKey aux_key{cfg.seed, make_stream(cfg.step, cfg.layer, RandomPurpose::kLsqAux)};
  hadamard_lsq_quantize_cuda(a.x, g, a.step_x, aux_key, opx, a.saved_codes, a.saved_aux, cnt,
                             stream);
  hadamard_lsq_quantize_cuda(a.w, g, a.step_w, RandomKey{}, opw, TensorView{}, TensorView{}, cnt,
                             stream);
  gemm_fp8_cuda(opx, opw, a.step_x, a.step_w, a.bias, a.y, alloc, stream);
  launch_fill_nan_if(counter, a.y.data, a.y.dtype == DType::kBFloat16, row_stride(a.y), n, c, s);
}

}  // namespace int4train
