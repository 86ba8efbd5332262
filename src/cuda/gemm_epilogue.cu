// int4train CUDA path: the passes around a cuBLASLt product that its own epilogue cannot do in the
// CPU core's order: scale and bias applied to a raw fp32 or int32 accumulator, and the exact fp32
// -> int32 conversion of the integer-result mode.
#include <cuda_bf16.h>

#include <type_traits>

#include "cuda_common.h"
#include "int4train/numeric.h"
#include "kernels.h"

namespace int4train {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load_bias(const void* bias, bool bf16, int64_t j) {
  if (bias == nullptr) return 0.0f;
  if (bf16) return bf16_to_float(static_cast<const BFloat16*>(bias)[j]);
  return static_cast<const float*>(bias)[j];
}

// The accumulator as a float: an fp32 accumulator as it is, an int32 one rounded to nearest (the
// CPU's float(acc) of gemm.h's Epilogue; exact below 2^24).
__device__ __forceinline__ float acc_value(float a) { return a; }
__device__ __forceinline__ float acc_value(int32_t a) { return __int2float_rn(a); }

__device__ __forceinline__ float scale_bias_one(float s, float a, const void* bias, bool bias_bf16,
                                                int64_t j) {
  const float v = __fmul_rn(s, a);
  return bias != nullptr ? __fadd_rn(v, load_bias(bias, bias_bf16, j)) : v;
}

// kVec4: each thread takes 4 consecutive columns (n, both row strides a multiple of 4, the rows 16-
// and 8-byte aligned), else one element; grid-stride. The pass is memory-bound; it runs where the
// fused cuBLASLt epilogue does not apply (and after every INT8-engine product).
template <typename Acc, bool kVec4>
__global__ void scale_bias_kernel(const Acc* __restrict__ acc, int64_t ld_acc,
                                  const float* __restrict__ scale_a,
                                  const float* __restrict__ scale_b, const void* __restrict__ bias,
                                  bool bias_bf16, void* __restrict__ out, bool out_bf16,
                                  int64_t ld_out, int64_t m, int64_t n) {
  const float sa = scale_a != nullptr ? *scale_a : 1.0f;
  const float sb = scale_b != nullptr ? *scale_b : 1.0f;
  const float s = __fmul_rn(sa, sb);
  constexpr int kW = kVec4 ? 4 : 1;
  const int64_t per_row = n / kW, total = m * per_row;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / per_row, j = (e - i * per_row) * kW;
    float v[kW];
    if (acc == nullptr) {
#pragma unroll
      for (int t = 0; t < kW; ++t) v[t] = 0.0f;
    } else if constexpr (kVec4) {
      const Acc* src = acc + i * ld_acc + j;
      if constexpr (std::is_same<Acc, float>::value) {
        const float4 q = *reinterpret_cast<const float4*>(src);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
      } else {
        const int4 q = *reinterpret_cast<const int4*>(src);
        v[0] = acc_value(q.x), v[1] = acc_value(q.y), v[2] = acc_value(q.z), v[3] = acc_value(q.w);
      }
    } else {
      v[0] = acc_value(acc[i * ld_acc + j]);
    }
#pragma unroll
    for (int t = 0; t < kW; ++t) v[t] = scale_bias_one(s, v[t], bias, bias_bf16, j + t);
    if (out_bf16) {
      BFloat16* dst = static_cast<BFloat16*>(out) + i * ld_out + j;
      if constexpr (kVec4) {
        const uint32_t lo = float_to_bf16(v[0]).bits | (uint32_t{float_to_bf16(v[1]).bits} << 16);
        const uint32_t hi = float_to_bf16(v[2]).bits | (uint32_t{float_to_bf16(v[3]).bits} << 16);
        *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
      } else {
        dst[0] = float_to_bf16(v[0]);
      }
    } else {
      float* dst = static_cast<float*>(out) + i * ld_out + j;
      if constexpr (kVec4) {
        *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
        dst[0] = v[0];
      }
    }
  }
}

__global__ void f32_to_s32_kernel(const float* __restrict__ acc, int64_t ld_acc,
                                  int32_t* __restrict__ c, int64_t ld_c, int64_t m, int64_t n) {
  const int64_t total = m * n;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / n, j = e - i * n;
    c[i * ld_c + j] = acc != nullptr ? __float2int_rn(acc[i * ld_acc + j]) : 0;
  }
}

__global__ void forward_prologue_kernel(unsigned long long* __restrict__ counter,
                                        unsigned int* __restrict__ ticket,
                                        const float* __restrict__ step_x,
                                        const float* __restrict__ step_w, float* __restrict__ alpha,
                                        const int64_t* __restrict__ device_step, int64_t host_step,
                                        int64_t* __restrict__ saved_step,
                                        float* __restrict__ saved_scale) {
  *counter = 0;
  *ticket = 0;
  *alpha = __fmul_rn(*step_x, *step_w);
  if (saved_step != nullptr) *saved_step = device_step != nullptr ? *device_step : host_step;
  if (saved_scale != nullptr) *saved_scale = 0.0f;
}

__global__ void scale_product_kernel(const float* __restrict__ a, const float* __restrict__ b,
                                     float* __restrict__ out) {
  *out = __fmul_rn(a != nullptr ? *a : 1.0f, b != nullptr ? *b : 1.0f);
}

int grid_for(int64_t total) { return grid_blocks(total, kThreads, 65536); }

}  // namespace

namespace {
template <typename Acc>
void scale_bias(const Acc* acc, int64_t ld_acc, const float* scale_a, const float* scale_b,
                const void* bias, bool bias_bf16, void* out, bool out_bf16, int64_t ld_out,
                int64_t m, int64_t n, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  const bool vec4 = n % 4 == 0 && (m == 1 || (ld_acc % 4 == 0 && ld_out % 4 == 0)) &&
                    (acc == nullptr || aligned(acc, 16)) && aligned(out, out_bf16 ? 8 : 16);
  if (vec4) {
    scale_bias_kernel<Acc, true><<<grid_for(m * n / 4), kThreads, 0, stream>>>(
        acc, ld_acc, scale_a, scale_b, bias, bias_bf16, out, out_bf16, ld_out, m, n);
  } else {
    scale_bias_kernel<Acc, false><<<grid_for(m * n), kThreads, 0, stream>>>(
        acc, ld_acc, scale_a, scale_b, bias, bias_bf16, out, out_bf16, ld_out, m, n);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}
}  // namespace

void launch_scale_bias(const float* acc, int64_t ld_acc, const float* scale_a, const float* scale_b,
                       const void* bias, bool bias_bf16, void* out, bool out_bf16, int64_t ld_out,
                       int64_t m, int64_t n, cudaStream_t stream) {
  scale_bias(acc, ld_acc, scale_a, scale_b, bias, bias_bf16, out, out_bf16, ld_out, m, n, stream);
}

void launch_scale_bias(const int32_t* acc, int64_t ld_acc, const float* scale_a,
                       const float* scale_b, const void* bias, bool bias_bf16, void* out,
                       bool out_bf16, int64_t ld_out, int64_t m, int64_t n, cudaStream_t stream) {
  scale_bias(acc, ld_acc, scale_a, scale_b, bias, bias_bf16, out, out_bf16, ld_out, m, n, stream);
}

void launch_scale_product(const float* scale_a, const float* scale_b, float* out,
                          cudaStream_t stream) {
  scale_product_kernel<<<1, 1, 0, stream>>>(scale_a, scale_b, out);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void launch_f32_to_s32(const float* acc, int64_t ld_acc, int32_t* c, int64_t ld_c, int64_t m,
                       int64_t n, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  f32_to_s32_kernel<<<grid_for(m * n), kThreads, 0, stream>>>(acc, ld_acc, c, ld_c, m, n);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void launch_forward_prologue(unsigned long long* counter, unsigned int* ticket, const float* step_x,
                             const float* step_w, float* alpha, const int64_t* device_step,
                             int64_t host_step, int64_t* saved_step, float* saved_scale,
                             cudaStream_t stream) {
  forward_prologue_kernel<<<1, 1, 0, stream>>>(counter, ticket, step_x, step_w, alpha, device_step,
                                               host_step, saved_step, saved_scale);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace int4train
