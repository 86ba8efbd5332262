// int4train CUDA path: the element-wise passes of the layer's backward that sit between the FP8
// products: the full-information LSQ backward (the weight's), the exact recombination of the
// bit-split partial products (16 hi + lo, scaled in fp64 exactly as src/cpu/linear.cpp), and the
// bias gradient (per-column sums in the CPU's order).
#include <cmath>
#include <string>

#include "cuda_common.h"
#include "device_common.cuh"
#include "int4train/cuda.h"
#include "int4train/linear.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"
#include "kernels.h"

namespace int4train {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;  // fixed by the shape only: deterministic partial sums

int grid_blocks(int64_t items, int64_t per_block, int64_t cap) {
  int64_t b = (items + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<int>(b);
}

// quantize_kernels.cpp's lsq_backward_tile rules: v = x * (1/s); mask -8 <= v <= 7; r = rint(v) - v
// inside, -8 below, 7 above.
__global__ void __launch_bounds__(kThreads)
    lsq_backward_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ step,
                        const float* __restrict__ g, int64_t ldg, void* __restrict__ gx,
                        bool gx_bf16, int64_t ldo, int64_t rows, int64_t cols,
                        double* __restrict__ partial) {
  const float inv = __frcp_rn(*step);
  const float lo = static_cast<float>(-kLsqQn), hi = static_cast<float>(kLsqQp);
  const int64_t numel = rows * cols;
  double acc = 0.0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, c = e - r * cols;
    const float v = __fmul_rn(x[r * ldx + c], inv);
    float res = __fsub_rn(rintf(v), v);
    if (v < lo) res = lo;
    if (v > hi) res = hi;
    const float gk = g[r * ldg + c];
    if (gx != nullptr) {
      const float out = (v >= lo && v <= hi) ? gk : 0.0f;
      if (gx_bf16) {
        static_cast<BFloat16*>(gx)[r * ldo + c] = float_to_bf16(out);
      } else {
        static_cast<float*>(gx)[r * ldo + c] = out;
      }
    }
    acc += static_cast<double>(gk) * static_cast<double>(res);
  }
  if (partial == nullptr) return;
  acc = warp_sum_f64(acc);
  __shared__ double warp_acc[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_acc[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_acc[w];
    partial[blockIdx.x] = s;
  }
}

// out = float(double(*s1) * double(*s2) * (16 * hi + lo)), hi and lo fp32 accumulators holding
// integers (exact below 2^24), summed exactly in int64 (the CPU's order and rounding).
__global__ void __launch_bounds__(kThreads)
    combine_bitsplit_kernel(const float* __restrict__ hi, const float* __restrict__ lo, int64_t ld,
                            const float* __restrict__ s1, const float* __restrict__ s2,
                            float* __restrict__ out, int64_t ldo, int64_t rows, int64_t cols) {
  const double scale = __dmul_rn(static_cast<double>(*s1), static_cast<double>(*s2));
  const int64_t total = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, c = e - r * cols;
    const int64_t acc = (static_cast<int64_t>(__float2ll_rn(hi[r * ld + c])) << 4) +
                        static_cast<int64_t>(__float2ll_rn(lo[r * ld + c]));
    out[r * ldo + c] = __double2float_rn(__dmul_rn(scale, static_cast<double>(acc)));
  }
}

// grad_bias in linear.h's order: partial[b, j] = sum of column j over row block b (rows in order,
// fp64), one thread per (block, column); then, when there is more than one block, out[j] = the
// partials of column j added in block order. With one block the first kernel writes out directly.
template <typename In>
__global__ void __launch_bounds__(kThreads)
    bias_block_sums_kernel(const In* __restrict__ g, int64_t ld, int64_t rows, int64_t cols,
                           double* __restrict__ partial, void* __restrict__ out, bool out_bf16) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const int64_t blocks = (rows + kBiasGradBlockRows - 1) / kBiasGradBlockRows;
  for (int64_t b = blockIdx.y; b < (blocks > 0 ? blocks : 1); b += gridDim.y) {
    const int64_t i0 = b * kBiasGradBlockRows;
    const int64_t i1 = i0 + kBiasGradBlockRows < rows ? i0 + kBiasGradBlockRows : rows;
    double acc = 0.0;
#pragma unroll 8
    for (int64_t i = i0; i < i1; ++i) acc += static_cast<double>(load_elem(g + i * ld + j));
    if (partial != nullptr) {
      partial[b * cols + j] = acc;
      continue;
    }
    // One block: the block sum is the total (0.0 + acc == acc, also for -0.0: 0.0 + -0.0 = 0.0
    // and the block sum of a column of -0.0 starts from 0.0, so it is 0.0 too).
    const float v = static_cast<float>(acc);
    if (out_bf16) {
      static_cast<BFloat16*>(out)[j] = float_to_bf16(v);
    } else {
      static_cast<float*>(out)[j] = v;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    bias_total_kernel(const double* __restrict__ partial, int64_t blocks, int64_t cols,
                      void* __restrict__ out, bool out_bf16) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  double acc = 0.0;
  for (int64_t b = 0; b < blocks; ++b) acc += partial[b * cols + j];
  const float v = static_cast<float>(acc);
  if (out_bf16) {
    static_cast<BFloat16*>(out)[j] = float_to_bf16(v);
  } else {
    static_cast<float*>(out)[j] = v;
  }
}

}  // namespace

void launch_combine_bitsplit(const float* hi, const float* lo, int64_t ld, const float* s1,
                             const float* s2, float* out, int64_t ldo, int64_t rows, int64_t cols,
                             cudaStream_t stream) {
  if (rows * cols == 0) return;
  combine_bitsplit_kernel<<<grid_blocks(rows * cols, kThreads, int64_t{1} << 16), kThreads, 0,
                            stream>>>(hi, lo, ld, s1, s2, out, ldo, rows, cols);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void launch_bias_grad(const TensorView& g, TensorView out, const CudaAllocator& alloc,
                      cudaStream_t stream) {
  const int64_t rows = g.shape[0], cols = g.shape[1];
  if (cols == 0) return;
  const int64_t blocks = rows > 0 ? (rows + kBiasGradBlockRows - 1) / kBiasGradBlockRows : 1;
  DeviceBuffer partial(alloc, blocks > 1 ? sizeof(double) * blocks * cols : 0, stream);
  double* part = blocks > 1 ? partial.as<double>() : nullptr;
  // grid.y is at most 65535: a thread then takes row blocks y, y + 65535, ... of its column.
  const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>(blocks < 65535 ? blocks : 65535));
  const bool ob = out.dtype == DType::kBFloat16;
  if (g.dtype == DType::kBFloat16) {
    bias_block_sums_kernel<BFloat16><<<grid, kThreads, 0, stream>>>(
        g.ptr<const BFloat16>(), row_stride(g), rows, cols, part, out.data, ob);
  } else {
    bias_block_sums_kernel<float><<<grid, kThreads, 0, stream>>>(
        g.ptr<const float>(), row_stride(g), rows, cols, part, out.data, ob);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  if (part != nullptr) {
    bias_total_kernel<<<grid_blocks(cols, kThreads, int64_t{1} << 20), kThreads, 0, stream>>>(
        part, blocks, cols, out.data, ob);
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace cuda_detail

void lsq_backward_cuda(const TensorView& x, const TensorView& step, const TensorView& grad_xhat,
                       TensorView grad_x, TensorView grad_step, const CudaAllocator& alloc,
                       void* stream) {
  using namespace cuda_detail;
  check_dtype(x, "x", {DType::kFloat32});
  check_device_matrix(x, "x");
  check_device_scalar(step, "step", DType::kFloat32);
  const int64_t rows = x.shape[0], cols = x.shape[1];
  check_dtype(grad_xhat, "grad_xhat", {DType::kFloat32});
  check_device_matrix(grad_xhat, "grad_xhat");
  check_shape(grad_xhat, "grad_xhat", rows, cols);
  const bool want_gx = grad_x.data != nullptr, want_gs = grad_step.data != nullptr;
  if (want_gx) {
    check_dtype(grad_x, "grad_x", {DType::kFloat32, DType::kBFloat16});
    check_device_matrix(grad_x, "grad_x");
    check_shape(grad_x, "grad_x", rows, cols);
    const bool same = grad_x.dtype == DType::kFloat32 && grad_x.data == grad_xhat.data &&
                      row_stride(grad_x) == row_stride(grad_xhat);
    if (!same && grad_x.data == grad_xhat.data) {
      throw_error(ErrorKind::kValue,
                  "grad_x: expected either grad_xhat itself (fp32, in place) or memory that does "
                  "not overlap it");
    }
  }
  if (want_gs) check_device_scalar(grad_step, "grad_step", DType::kFloat32);
  if (!want_gx && !want_gs) return;
  const cudaStream_t s = as_stream(stream);
  const int64_t numel = rows * cols;
  const int grid = grid_blocks(numel, kThreads, kMaxBlocks);
  DeviceBuffer partial(alloc, want_gs ? sizeof(double) * grid : 0, stream);
  if (numel > 0) {
    lsq_backward_kernel<<<grid, kThreads, 0, s>>>(
        x.ptr<const float>(), row_stride(x), step.ptr<const float>(), grad_xhat.ptr<const float>(),
        row_stride(grad_xhat), want_gx ? grad_x.data : nullptr, grad_x.dtype == DType::kBFloat16,
        want_gx ? row_stride(grad_x) : 0, rows, cols, want_gs ? partial.as<double>() : nullptr);
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
  if (want_gs) {
    const double gamma = numel > 0 ? 1.0 / std::sqrt(static_cast<double>(numel) * kLsqQp) : 0.0;
    sum_partials_kernel<<<1, kSumThreads, 0, s>>>(partial.as<const double>(),
                                                   numel > 0 ? grid : 0, gamma,
                                                   grad_step.ptr<float>());
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace int4train
