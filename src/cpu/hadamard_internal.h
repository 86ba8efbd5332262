// int4train core (internal): the pieces shared by the scalar reference and the SIMD fast paths of
// the block Hadamard transform: the one scalar block routine (the spec of hadamard.h, also used for
// the tails the vector kernels leave) and the entry points of the per-ISA kernels.
#pragma once

#include <cstdint>

#include "int4train/common.h"
#include "int4train/numeric.h"

namespace int4train {
namespace detail {

inline float hadamard_load(float v) { return v; }
inline float hadamard_load(BFloat16 v) { return bf16_to_float(v); }
inline void hadamard_store(float v, float* p) { *p = v; }
inline void hadamard_store(float v, BFloat16* p) { *p = float_to_bf16(v); }

// One block of g values, exactly in the order of hadamard.h: butterflies for h = 1, 2, ..., g/2,
// then one multiply by `scale`. `in` and `out` may be the same block (it is read whole first).
template <typename In, typename Out>
inline void hadamard_block_scalar(const In* in, Out* out, int32_t g, float scale) {
  float buf[256];
  for (int32_t i = 0; i < g; ++i) buf[i] = hadamard_load(in[i]);
  for (int32_t h = 1; h < g; h *= 2) {
    for (int32_t i = 0; i < g; i += 2 * h) {
      for (int32_t j = i; j < i + h; ++j) {
        const float a = buf[j];
        const float b = buf[j + h];
        buf[j] = a + b;
        buf[j + h] = a - b;
      }
    }
  }
  for (int32_t i = 0; i < g; ++i) hadamard_store(buf[i] * scale, out + i);
}

// Transforms n contiguous values (n a multiple of the block) from `in` to `out` (same element
// offsets; they may alias exactly). The pointers are float* or BFloat16* as the dtypes say.
using HadamardSpanFn = void (*)(const void* in, void* out, int64_t n, float scale);

// The kernel of an ISA for (block, in dtype, out dtype), or nullptr when there is none. Callers
// check the CPU first: cpu_features() for AVX2 and AVX-512, hadamard_cpu_has_avx512_bf16() for the
// kernels that convert to bf16 with VCVTNEPS2BF16 (only bf16 outputs have them).
HadamardSpanFn hadamard_span_avx2(int32_t block, DType in, DType out);
HadamardSpanFn hadamard_span_avx512(int32_t block, DType in, DType out);
HadamardSpanFn hadamard_span_avx512_bf16(int32_t block, DType in, DType out);
bool hadamard_cpu_has_avx512_bf16();  // AVX-512 F/BW/VL/DQ + BF16, and SIMD not turned off

// Runtime block size -> kernel template instance: K<G, In, Out>::run for G = 1, 2, ..., 256.
template <template <int, typename, typename> class K, typename In, typename Out>
HadamardSpanFn pick_hadamard_block(int32_t block) {
  switch (block) {
    case 1:
      return &K<1, In, Out>::run;
    case 2:
      return &K<2, In, Out>::run;
    case 4:
      return &K<4, In, Out>::run;
    case 8:
      return &K<8, In, Out>::run;
    case 16:
      return &K<16, In, Out>::run;
    case 32:
      return &K<32, In, Out>::run;
    case 64:
      return &K<64, In, Out>::run;
    case 128:
      return &K<128, In, Out>::run;
    case 256:
      return &K<256, In, Out>::run;
    default:
      return nullptr;
  }
}

}  // namespace detail
}  // namespace int4train
