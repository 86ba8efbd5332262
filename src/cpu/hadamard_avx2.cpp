// int4train core: the AVX2 kernels of the block Hadamard transform (8 floats a register), for CPUs
// without AVX-512. Butterflies with h < 8 are lane shuffles inside a register, larger h pair whole
// registers; every stage is the same fp32 add/sub as the scalar reference, so results agree bit for
// bit.
#include <cstdint>

#include "hadamard_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define INT4TRAIN_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace int4train {
namespace detail {
namespace {

INT4TRAIN_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
INT4TRAIN_TARGET_AVX2 inline __m256 load8(const BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
INT4TRAIN_TARGET_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// The bf16 rounding of numeric.h (nearest even; a NaN keeps its top bits and becomes quiet) in
// integer ops, exact for subnormals too (VCVTNEPS2BF16 would flush them to zero).
INT4TRAIN_TARGET_AVX2 inline void store8(BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i top = _mm256_srli_epi32(u, 16);
  const __m256i bias =
      _mm256_add_epi32(_mm256_and_si256(top, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
  // Values are in [0, 0xFFFF], so the unsigned-saturating pack is exact; qwords 0 and 2 hold them.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// One butterfly stage with pair distance H inside each register: the partner s[i] = x[i ^ H];
// positions with bit H clear get s + x * 1 = a + b, the others s + x * (-1) = a - b. The product by
// +-1 is exact, so the fused multiply-add rounds once, exactly like the reference's add and
// subtract (signed zeros included), in two instructions instead of add, subtract and blend.
template <int H>
INT4TRAIN_TARGET_AVX2 inline __m256 stage8(__m256 x) {
  __m256 s, signs;
  if constexpr (H == 1) {
    s = _mm256_permute_ps(x, 0xB1);
    signs = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  } else if constexpr (H == 2) {
    s = _mm256_permute_ps(x, 0x4E);
    signs = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  } else {
    static_assert(H == 4, "in-register stages are h = 1, 2, 4");
    s = _mm256_permute2f128_ps(x, x, 0x01);
    signs = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  }
  return _mm256_fmadd_ps(x, signs, s);
}

// The stages h = 1 .. min(G, 8) / 2, in order.
template <int G>
INT4TRAIN_TARGET_AVX2 inline __m256 stages8(__m256 x) {
  if constexpr (G > 1) x = stage8<1>(x);
  if constexpr (G > 2) x = stage8<2>(x);
  if constexpr (G > 4) x = stage8<4>(x);
  return x;
}

// Butterflies between whole registers: stages h = 8 * step for step = 1 .. kRegs / 2, in order.
template <int kRegs>
INT4TRAIN_TARGET_AVX2 inline void cross_stages(__m256* v) {
#pragma GCC unroll 8
  for (int step = 1; step < kRegs; step *= 2) {
#pragma GCC unroll 8
    for (int i = 0; i < kRegs; ++i) {
      if (i & step) continue;
      const __m256 a = v[i], b = v[i + step];
      v[i] = _mm256_add_ps(a, b);
      v[i + step] = _mm256_sub_ps(a, b);
    }
  }
}

// Blocks of up to 64 values live in at most 8 of the 16 ymm registers. Larger blocks (128, 256)
// would need 16 or 32 and spill, so they go in two phases through an L1-resident buffer: each 64-value
// sub-block takes the stages h = 1 .. 32 in registers, then every column j (8 values wide) of the
// G/64 sub-blocks takes the stages h = 64 .. G/2. A value's stages run in the same order with the
// same operands either way, so the result is the reference's bit for bit. (Measured on a 2-core AVX2
// EPYC, 4096 x 4096, block 256: 32 live registers ran bf16 at 0.48x memcpy; see bench/results/.)
template <int G, typename In, typename Out>
INT4TRAIN_TARGET_AVX2 void span_avx2(const void* in_v, void* out_v, int64_t n, float scale) {
  const In* in = static_cast<const In*>(in_v);
  Out* out = static_cast<Out*>(out_v);
  const __m256 vs = _mm256_set1_ps(scale);
  if constexpr (G > 64) {
    constexpr int kSub = G / 64;
    alignas(32) float buf[G];
    for (int64_t off = 0; off < n; off += G) {
#pragma GCC unroll 4
      for (int b = 0; b < kSub; ++b) {
        __m256 v[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) v[i] = stages8<8>(load8(in + off + 64 * b + 8 * i));
        cross_stages<8>(v);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) _mm256_store_ps(buf + 64 * b + 8 * i, v[i]);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 64; j += 8) {
        __m256 v[kSub];
#pragma GCC unroll 4
        for (int b = 0; b < kSub; ++b) v[b] = _mm256_load_ps(buf + 64 * b + j);
        cross_stages<kSub>(v);
#pragma GCC unroll 4
        for (int b = 0; b < kSub; ++b) store8(out + off + 64 * b + j, _mm256_mul_ps(v[b], vs));
      }
    }
  } else if constexpr (G >= 8) {
    constexpr int kRegs = G / 8;
    for (int64_t off = 0; off < n; off += G) {
      __m256 v[kRegs];
#pragma GCC unroll 8
      for (int i = 0; i < kRegs; ++i) v[i] = stages8<8>(load8(in + off + 8 * i));
      cross_stages<kRegs>(v);
#pragma GCC unroll 8
      for (int i = 0; i < kRegs; ++i) store8(out + off + 8 * i, _mm256_mul_ps(v[i], vs));
    }
  } else {
    int64_t off = 0;
    for (; off + 8 <= n; off += 8)
      store8(out + off, _mm256_mul_ps(stages8<G>(load8(in + off)), vs));
    for (; off < n; off += G) hadamard_block_scalar(in + off, out + off, G, scale);
  }
}

template <int G, typename In, typename Out>
struct Avx2Kernel {
  INT4TRAIN_TARGET_AVX2 static void run(const void* in, void* out, int64_t n, float scale) {
    span_avx2<G, In, Out>(in, out, n, scale);
  }
};

}  // namespace

HadamardSpanFn hadamard_span_avx2(int32_t block, DType in, DType out) {
  const bool in_f32 = in == DType::kFloat32, out_f32 = out == DType::kFloat32;
  const bool in_bf16 = in == DType::kBFloat16, out_bf16 = out == DType::kBFloat16;
  if (in_f32 && out_f32) return pick_hadamard_block<Avx2Kernel, float, float>(block);
  if (in_f32 && out_bf16) return pick_hadamard_block<Avx2Kernel, float, BFloat16>(block);
  if (in_bf16 && out_f32) return pick_hadamard_block<Avx2Kernel, BFloat16, float>(block);
  if (in_bf16 && out_bf16) return pick_hadamard_block<Avx2Kernel, BFloat16, BFloat16>(block);
  return nullptr;
}

}  // namespace detail
}  // namespace int4train

#else  // not x86

namespace int4train {
namespace detail {
HadamardSpanFn hadamard_span_avx2(int32_t, DType, DType) { return nullptr; }
}  // namespace detail
}  // namespace int4train

#endif
