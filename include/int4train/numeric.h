// int4train core: scalar numerics shared by the CPU and GPU code paths: bf16 conversion and the one
// rounding rule of the project.
//
// Rounding rule (everywhere: CPU reference, fast CPU, CUDA): deterministic quantizers round half to
// even (IEEE roundTiesToEven, rintf / __float2int_rn); stochastic rounding is floor(v + u) with u
// uniform in [0, 1) from philox.h, both computed in fp32. A quantizer's real-to-grid value is
// v = x * inv_scale with inv_scale = 1.0f / scale computed once in fp32 (a single rounded multiply, so
// the CPU and the GPU agree bit for bit).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "int4train/macros.h"

namespace int4train {

struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(BFloat16) == 2, "BFloat16 must be two bytes");

INT4TRAIN_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

INT4TRAIN_HD float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

INT4TRAIN_HD float bf16_to_float(BFloat16 h) { return float_from_bits(static_cast<uint32_t>(h.bits) << 16); }

// Round to nearest even; NaN stays NaN (quiet), infinities stay infinite.
INT4TRAIN_HD BFloat16 float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0u) {
    return BFloat16{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  }
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

// Round half to even then clamp to [lo, hi]; NaN maps to 0 (it never reaches an integer conversion).
INT4TRAIN_HD int round_clamp(float v, int lo, int hi) {
  if (!(v == v)) return 0;
  const float r = rintf(v);
  if (r < static_cast<float>(lo)) return lo;
  if (r > static_cast<float>(hi)) return hi;
  return static_cast<int>(r);
}

// Stochastic rounding floor(v + u) then clamp; NaN maps to 0.
INT4TRAIN_HD int stochastic_round_clamp(float v, float u, int lo, int hi) {
  if (!(v == v)) return 0;
  const float r = floorf(v + u);
  if (r < static_cast<float>(lo)) return lo;
  if (r > static_cast<float>(hi)) return hi;
  return static_cast<int>(r);
}

}  // namespace int4train
