// int4train CUDA path (internal, device side): the pieces every kernel shares: loads of 8
// consecutive fp32/bf16 values, the in-warp Hadamard butterflies in hadamard.h's exact order, the
// e4m3 encoding of INT4 codes, and warp reductions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "int4train/numeric.h"

namespace int4train {
namespace cuda_detail {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
// A warp covers 256 consecutive columns of a row, 8 per lane: the largest Hadamard block
// (kMaxHadamardBlock) lives in one warp's registers and its cross-lane stages are shuffles.
constexpr int kLaneElems = 8;
constexpr int kWarpCols = 32 * kLaneElems;

__device__ __forceinline__ float load_elem(const float* p) { return *p; }
__device__ __forceinline__ float load_elem(const BFloat16* p) { return bf16_to_float(*p); }

// v[0..7] = p[0..7]; kVec: p is 32-byte (fp32) / 16-byte (bf16) aligned.
template <bool kVec>
__device__ __forceinline__ void load8(const float* __restrict__ p, float v[8]) {
  if (kVec) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = p[i];
  }
}

template <bool kVec>
__device__ __forceinline__ void load8(const BFloat16* __restrict__ p, float v[8]) {
  if (kVec) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = bf16_to_float(p[i]);
  }
}

template <bool kVec>
__device__ __forceinline__ void store8(float* __restrict__ p, const float v[8]) {
  if (kVec) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = v[i];
  }
}

template <bool kVec>
__device__ __forceinline__ void store8(BFloat16* __restrict__ p, const float v[8]) {
  if (kVec) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<uint32_t>(float_to_bf16(v[2 * i]).bits) |
             (static_cast<uint32_t>(float_to_bf16(v[2 * i + 1]).bits) << 16);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = float_to_bf16(v[i]);
  }
}

// The block Hadamard transform of hadamard.h on the 8 values of each lane of a warp that covers 256
// consecutive columns (lane l holds columns 8l .. 8l+7 of the warp's chunk). Butterflies for
// h = 1, 2, 4 are in-lane, h = 8 .. G/2 pair lane l with lane l ^ (h / 8); each computes exactly
// (a, b) <- (a + b, a - b) with a the lower index, then one multiply by `scale`. Every lane of the
// warp must call it (the shuffles use the full mask); lanes past the row end hold zeros, and since
// G divides the row length they never pair with a lane inside it.
template <int G>
__device__ __forceinline__ void hadamard_warp8(float v[8], int lane, float scale) {
#pragma unroll
  for (int h = 1; h < 8 && h < G; h *= 2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = __fadd_rn(a, b);
        v[i + h] = __fsub_rn(a, b);
      }
    }
  }
#pragma unroll
  for (int h = 8; h < G; h *= 2) {
    const int m = h / 8;
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float p = __shfl_xor_sync(kFullMask, v[i], m);
      v[i] = upper ? __fsub_rn(p, v[i]) : __fadd_rn(v[i], p);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(v[i], scale);
}

// The transformed value of column c of a row for a small block (g <= 4, the only blocks a row
// length that is not a multiple of 8 admits): reloads c's block and runs the same order.
template <typename In>
__device__ __forceinline__ float hadamard_small_at(const In* __restrict__ row, int64_t c, int g,
                                                   float scale) {
  float buf[4];
  const int64_t b0 = c - c % g;
  for (int i = 0; i < g; ++i) buf[i] = load_elem(row + b0 + i);
  for (int h = 1; h < g; h *= 2) {
    for (int i = 0; i < g; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = buf[j], b = buf[j + h];
        buf[j] = __fadd_rn(a, b);
        buf[j + h] = __fsub_rn(a, b);
      }
    }
  }
  return __fmul_rn(buf[c - b0], scale);
}

// e4m3 bit pattern of an INT4 code c in [-8, 7] (all exact): bytes of the two tables are indexed
// by the nibble c & 15 (0..7 -> 0..7, 8..15 -> -8..-1).
__host__ __device__ __forceinline__ uint32_t e4m3_of_code(int c) {
  constexpr uint64_t kPos = 0x4E4C4A4844403800ull;  // 0, 1, 2, 3, 4, 5, 6, 7
  constexpr uint64_t kNeg = 0xB8C0C4C8CACCCED0ull;  // -8, -7, -6, -5, -4, -3, -2, -1
  const int idx = c & 15;
  const uint64_t t = idx < 8 ? kPos : kNeg;
  return static_cast<uint32_t>(t >> (8 * (idx & 7))) & 0xFFu;
}

__device__ __forceinline__ uint32_t warp_sum_u32(uint32_t v) {
  return __reduce_add_sync(kFullMask, v);
}

__device__ __forceinline__ int32_t warp_sum_s32(int32_t v) {
  return __reduce_add_sync(kFullMask, v);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

}  // namespace cuda_detail
}  // namespace int4train
