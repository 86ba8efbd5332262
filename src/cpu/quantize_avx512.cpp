// int4train core: AVX-512 (F/BW/VL) versions of the quantizer element kernels: Philox4x32-10 on 16
// blocks at once, rounding and stochastic rounding 16 elements at once. Each must equal its scalar
// twin in quantize_kernels.cpp bit for bit; only called where cpu_features() reports AVX-512.
#include <immintrin.h>

#include <cstdint>

#include "int4train/philox.h"
#include "int4train/quantize.h"
#include "quantize_kernels.h"

#if defined(__x86_64__)

// One rounding per operation, exactly as written: no fused multiply-add (CPU and GPU must agree).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

// GCC 12's AVX-512 headers build _mm512_undefined_*() from a self-initialised variable and then
// warn about it wherever such an intrinsic is inlined (GCC PR 105593, fixed in 12.3 / 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Everything between push and pop is compiled for AVX-512; only functions with internal linkage and
// the table getter live here, so no inline function of a header gets an AVX-512 copy.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#endif

namespace int4train {
namespace detail {
namespace {

// ---------------------------------------------------------------- Philox4x32-10, 16 blocks a call

inline void mulhilo16(__m512i a, __m512i m, __m512i* lo, __m512i* hi) {
  const __m512i even = _mm512_mul_epu32(a, m);  // lanes 0, 2, ...: 64-bit products
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ...
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Words of blocks block0 .. block0 + 15 in element order (out[4 b + w] = word w of block block0 +
// b).
inline void philox_batch(uint64_t seed, uint64_t stream, uint64_t block0, uint32_t* out) {
  const uint32_t b_lo = static_cast<uint32_t>(block0), b_hi = static_cast<uint32_t>(block0 >> 32);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(b_lo)), iota);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, _mm512_set1_epi32(static_cast<int>(b_lo)));
  const __m512i hi0 = _mm512_set1_epi32(static_cast<int>(b_hi));
  __m512i c1 = _mm512_mask_add_epi32(hi0, carry, hi0, _mm512_set1_epi32(1));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream)));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32)));
  const PhiloxKeys keys = philox_keys(seed);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < kPhiloxRounds; ++round) {
    __m512i lo0, hi0r, lo1, hi1r;
    mulhilo16(c0, m0, &lo0, &hi0r);
    mulhilo16(c2, m1, &lo1, &hi1r);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1r, c1),
                                        _mm512_set1_epi32(static_cast<int>(keys.k0[round])));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0r, c3),
                                        _mm512_set1_epi32(static_cast<int>(keys.k1[round])));
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  // Transpose 4 x 16 (word-major) to element order: first 4 x 4 within 128-bit lanes, then the
  // lanes.
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i v1 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i v3 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm512_storeu_si512(out, _mm512_shuffle_i32x4(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(v2, v3, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(v2, v3, _MM_SHUFFLE(3, 1, 3, 1)));
}

// random_uniform's 16-bit draws (uniforms_scalar): the words of the blocks, then each 16-bit half
// widened in memory order (a word's low half first), converted and scaled by 2^-16, exactly.
const float* uniforms_avx512(uint64_t seed, uint64_t stream, uint64_t e0, int64_t n,
                             float* scratch) {
  const uint64_t first = e0 >> 3;
  const int64_t offset = static_cast<int64_t>(e0 & 7u);
  const int64_t blocks = (offset + n + 7) / 8;
  // At most (7 + kQuantTile + 1 + 7) / 8 blocks, rounded up to whole batches of 16, 4 words each.
  constexpr int64_t kMaxWords = 4 * 16 * (((7 + kQuantTile + 1 + 7) / 8 + 15) / 16);
  static_assert(kMaxWords <= kUniformScratch / 2 && 8 * (kMaxWords / 4) <= kUniformScratch,
                "the word and uniform scratch of a tile");
  alignas(64) uint32_t words[kMaxWords];
  for (int64_t b = 0; b < blocks; b += 16) {
    philox_batch(seed, stream, first + static_cast<uint64_t>(b), words + 4 * b);
  }
  const __m512 scale = _mm512_set1_ps(0x1.0p-16f);
  for (int64_t k = 0; k < 8 * blocks; k += 16) {
    const __m256i halves = _mm256_load_si256(reinterpret_cast<const __m256i*>(words + k / 2));
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(halves)), scale);
    _mm512_storeu_ps(scratch + k, f);
  }
  return scratch + offset;
}

// ---------------------------------------------------------------- elementwise

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                    : static_cast<__mmask16>((1u << static_cast<unsigned>(left)) - 1u);
}

uint32_t absmax_bits_f32_avx512(const float* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i m = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 16) {
    const __m512i v = _mm512_maskz_loadu_epi32(tail_mask(n - k), x + k);
    m = _mm512_max_epu32(m, _mm512_and_si512(v, abs_mask));
  }
  return static_cast<uint32_t>(_mm512_reduce_max_epu32(m));
}

uint32_t absmax_bits_bf16_avx512(const uint16_t* x, int64_t n) {
  const __m512i abs_mask = _mm512_set1_epi16(0x7FFF);
  __m512i m = _mm512_setzero_si512();
  for (int64_t k = 0; k < n; k += 32) {
    const int64_t left = n - k;
    const __mmask32 mask = left >= 32 ? 0xFFFFFFFFu : ((1u << static_cast<unsigned>(left)) - 1u);
    const __m512i v = _mm512_maskz_loadu_epi16(mask, x + k);
    m = _mm512_max_epu16(m, _mm512_and_si512(v, abs_mask));
  }
  // Widen the 32 lanes to 2 x 16 and reduce.
  const __m512i a = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(m));
  const __m512i b = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(m, 1));
  return static_cast<uint32_t>(_mm512_reduce_max_epu32(_mm512_max_epu32(a, b))) << 16;
}

void bf16_to_f32_avx512(const uint16_t* in, int64_t n, float* out) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m256i h = _mm256_maskz_loadu_epi16(m, in + k);
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    _mm512_mask_storeu_ps(out + k, m, _mm512_castsi512_ps(w));
  }
}

void f32_to_bf16_avx512(const float* in, int64_t n, uint16_t* out) {
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000), man_mask = _mm512_set1_epi32(0x007FFFFF);
  const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i quiet = _mm512_set1_epi32(0x0040);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512i u = _mm512_maskz_loadu_epi32(m, in + k);
    const __mmask16 nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, exp_mask), exp_mask) &
                          _mm512_test_epi32_mask(u, man_mask);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, lsb)), 16);
    const __m512i nan_bits = _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet);
    const __m512i r = _mm512_mask_blend_epi32(nan, rounded, nan_bits);
    _mm512_mask_cvtepi32_storeu_epi16(out + k, m, r);
  }
}

// round_clamp: rint, NaN -> 0, clamp, all in fp32.
inline __m512 round_clamp16(__m512 v, __m512 lo, __m512 hi) {
  __m512 r = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), r);
  return _mm512_min_ps(_mm512_max_ps(r, lo), hi);
}

// stochastic_round_clamp: floor(v + u), NaN -> 0, clamp.
inline __m512 stochastic_clamp16(__m512 v, __m512 u, __m512 lo, __m512 hi) {
  __m512 r = _mm512_roundscale_ps(_mm512_add_ps(v, u), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), r);
  return _mm512_min_ps(_mm512_max_ps(r, lo), hi);
}

inline __mmask16 nonfinite16(__m512 x) {
  const __m512i e = _mm512_set1_epi32(0x7F800000);
  return _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), e), e);
}

int64_t round_codes_avx512(const float* x, int64_t n, float inv, int lo, int hi, int8_t* out) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(lo)),
               vhi = _mm512_set1_ps(static_cast<float>(hi));
  int64_t bad = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    const __m512 r = round_clamp16(_mm512_mul_ps(xv, vinv), vlo, vhi);
    _mm512_mask_cvtepi32_storeu_epi8(out + k, m, _mm512_cvtps_epi32(r));
    bad += __builtin_popcount(static_cast<unsigned>(nonfinite16(xv) & m));
  }
  return bad;
}

void stochastic_codes_avx512(const float* x, const float* u, int64_t n, float inv, int lo, int hi,
                             int8_t* out) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(lo)),
               vhi = _mm512_set1_ps(static_cast<float>(hi));
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv);
    const __m512 r = stochastic_clamp16(v, _mm512_maskz_loadu_ps(m, u + k), vlo, vhi);
    _mm512_mask_cvtepi32_storeu_epi8(out + k, m, _mm512_cvtps_epi32(r));
  }
}

void bitsplit_codes_avx512(const float* x, const float* u, int64_t n, float inv, int8_t* hi,
                           int8_t* lo) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(-kBitSplitLevels));
  const __m512 vhi = _mm512_set1_ps(static_cast<float>(kBitSplitLevels));
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv);
    const __m512i q =
        _mm512_cvtps_epi32(stochastic_clamp16(v, _mm512_maskz_loadu_ps(m, u + k), vlo, vhi));
    const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, eight), 4);  // floor((q + 8) / 16)
    const __m512i l = _mm512_sub_epi32(q, _mm512_slli_epi32(h, 4));
    _mm512_mask_cvtepi32_storeu_epi8(hi + k, m, h);
    _mm512_mask_cvtepi32_storeu_epi8(lo + k, m, l);
  }
}

int64_t lsq_compact_codes_avx512(const float* x, const float* u, int64_t n, float inv,
                                 int8_t* codes, uint8_t* bits) {
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(-kLsqQn));
  const __m512 vhi = _mm512_set1_ps(static_cast<float>(kLsqQp));
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  int64_t bad = 0;
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    const __m512 v = _mm512_mul_ps(xv, vinv);
    const __m512 c = round_clamp16(v, vlo, vhi);
    // Interior: floor((rint(v) - v + 1/2) + u) clamped to [0, 1], NaN -> 0.
    const __m512 r =
        _mm512_sub_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), v);
    const __m512 b =
        stochastic_clamp16(_mm512_add_ps(r, half), _mm512_maskz_loadu_ps(m, u + k), zero, one);
    __mmask16 bit = _mm512_cmp_ps_mask(b, one, _CMP_EQ_OQ);
    // Boundary codes: the clip flag.
    const __mmask16 at_lo = _mm512_cmp_ps_mask(c, vlo, _CMP_EQ_OQ);
    const __mmask16 at_hi = _mm512_cmp_ps_mask(c, vhi, _CMP_EQ_OQ);
    const __mmask16 clip = (at_lo & _mm512_cmp_ps_mask(v, vlo, _CMP_LT_OQ)) |
                           (at_hi & _mm512_cmp_ps_mask(v, vhi, _CMP_GT_OQ));
    bit = static_cast<__mmask16>((bit & ~(at_lo | at_hi)) | clip);
    _mm512_mask_cvtepi32_storeu_epi8(codes + k, m, _mm512_cvtps_epi32(c));
    _mm512_mask_cvtepi32_storeu_epi8(bits + k, m,
                                     _mm512_maskz_mov_epi32(bit, _mm512_set1_epi32(1)));
    bad += __builtin_popcount(static_cast<unsigned>(nonfinite16(xv) & m));
  }
  return bad;
}

// Adds g * r (fp64, exact products) of 16 elements into lanes 0-7 (acc_lo) and 8-15 (acc_hi).
inline void accumulate16(__m512 g, __m512 r, __m512d* acc_lo, __m512d* acc_hi) {
  const __m512d g_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(g));
  const __m512d r_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(r));
  const __m512d g_hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(g), 1)));
  const __m512d r_hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r), 1)));
  *acc_lo = _mm512_add_pd(*acc_lo, _mm512_mul_pd(g_lo, r_lo));
  *acc_hi = _mm512_add_pd(*acc_hi, _mm512_mul_pd(g_hi, r_hi));
}

inline double sum_lanes16(__m512d acc_lo, __m512d acc_hi) {
  alignas(64) double acc[kSumLanes];
  _mm512_store_pd(acc, acc_lo);
  _mm512_store_pd(acc + 8, acc_hi);
  double s = 0.0;
  for (int l = 0; l < kSumLanes; ++l) s += acc[l];
  return s;
}

double lsq_backward_tile_avx512(const float* x, const float* g, int64_t n, float inv, float* gx) {
  static_assert(kSumLanes == 16, "one AVX-512 register of fp32 per accumulation step");
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 vlo = _mm512_set1_ps(static_cast<float>(-kLsqQn));
  const __m512 vhi = _mm512_set1_ps(static_cast<float>(kLsqQp));
  __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + k), vinv);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + k);
    const __mmask16 below = _mm512_cmp_ps_mask(v, vlo, _CMP_LT_OQ);
    const __mmask16 above = _mm512_cmp_ps_mask(v, vhi, _CMP_GT_OQ);
    const __mmask16 inside =
        _mm512_cmp_ps_mask(v, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, vhi, _CMP_LE_OQ);
    __m512 r =
        _mm512_sub_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), v);
    r = _mm512_mask_mov_ps(r, below, vlo);
    r = _mm512_mask_mov_ps(r, above, vhi);
    if (gx != nullptr) _mm512_mask_storeu_ps(gx + k, m, _mm512_maskz_mov_ps(inside, gv));
    accumulate16(gv, r, &acc_lo, &acc_hi);
  }
  return sum_lanes16(acc_lo, acc_hi);
}

double lsq_backward_compact_tile_avx512(const int8_t* codes, const uint8_t* bits, const float* g,
                                        int64_t n, float* gx) {
  const __m512i clo = _mm512_set1_epi32(-kLsqQn), chi = _mm512_set1_epi32(kLsqQp);
  const __m512 half = _mm512_set1_ps(0.5f), mhalf = _mm512_set1_ps(-0.5f);
  const __m512 quarter = _mm512_set1_ps(0.25f), mquarter = _mm512_set1_ps(-0.25f);
  const __m512 flo = _mm512_set1_ps(static_cast<float>(-kLsqQn));
  const __m512 fhi = _mm512_set1_ps(static_cast<float>(kLsqQp));
  __m512d acc_lo = _mm512_setzero_pd(), acc_hi = _mm512_setzero_pd();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 m = tail_mask(n - k);
    const __m512i c = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, codes + k));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, bits + k));
    const __mmask16 bit = _mm512_test_epi32_mask(b, b);
    const __mmask16 at_lo = _mm512_cmpeq_epi32_mask(c, clo);
    const __mmask16 at_hi = _mm512_cmpeq_epi32_mask(c, chi);
    // Interior: bit - 1/2; boundary: the clip value or the midpoint -+1/4.
    __m512 r = _mm512_mask_mov_ps(mhalf, bit, half);
    r = _mm512_mask_mov_ps(r, at_lo, _mm512_mask_mov_ps(mquarter, bit, flo));
    r = _mm512_mask_mov_ps(r, at_hi, _mm512_mask_mov_ps(quarter, bit, fhi));
    const __mmask16 inside = static_cast<__mmask16>(~((at_lo | at_hi) & bit));
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + k);
    if (gx != nullptr) _mm512_mask_storeu_ps(gx + k, m, _mm512_maskz_mov_ps(inside, gv));
    accumulate16(gv, _mm512_maskz_mov_ps(m, r), &acc_lo, &acc_hi);
  }
  return sum_lanes16(acc_lo, acc_hi);
}

void pack_codes_avx512(const int8_t* codes, int64_t n, uint8_t* out) {
  const int64_t pairs = n / 2;
  const __m512i nib = _mm512_set1_epi16(0x0F0F), low = _mm512_set1_epi16(0x00FF);
  for (int64_t j = 0; j < pairs; j += 32) {
    const int64_t left = pairs - j;
    const __mmask32 m = left >= 32 ? 0xFFFFFFFFu : ((1u << static_cast<unsigned>(left)) - 1u);
    // 16-bit lane j holds codes 2j (low byte) and 2j + 1 (high byte).
    const __m512i w = _mm512_and_si512(_mm512_maskz_loadu_epi16(m, codes + 2 * j), nib);
    const __m512i p = _mm512_and_si512(_mm512_or_si512(w, _mm512_srli_epi16(w, 4)), low);
    _mm512_mask_cvtepi16_storeu_epi8(out + j, m, p);
  }
  if (n & 1) out[pairs] = static_cast<uint8_t>(codes[n - 1] & 0xF);
}

}  // namespace

const QuantKernels& quant_kernels_avx512() {
  static const QuantKernels k = {
      "avx512",
      uniforms_avx512,
      absmax_bits_f32_avx512,
      absmax_bits_bf16_avx512,
      bf16_to_f32_avx512,
      f32_to_bf16_avx512,
      round_codes_avx512,
      stochastic_codes_avx512,
      bitsplit_codes_avx512,
      lsq_compact_codes_avx512,
      lsq_backward_tile_avx512,
      lsq_backward_compact_tile_avx512,
      pack_codes_avx512,
      quant_kernels_scalar().unpack_codes,
  };
  return k;
}

}  // namespace detail
}  // namespace int4train

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // __x86_64__
