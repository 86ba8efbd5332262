// int4train core: x86 SIMD micro-kernels of the CPU GEMMs (AVX-512 VNNI, AVX-VNNI, AVX2, AVX-512 F
// and AVX2 FMA), each compiled for its instruction set with a target attribute and called only
// where cpu_features() reports it. Panel layouts and the exactness argument are in gemm_kernels.h.
#include <cstdint>
#include <cstring>

#include "gemm_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define INT4TRAIN_GEMM_X86 1
#if !defined(__clang__) && __GNUC__ >= 11
#define INT4TRAIN_GEMM_AVX_VNNI 1  // cpu_features() reports AVX-VNNI on the same compilers only
#endif
#endif

namespace int4train {
namespace detail {

#if defined(INT4TRAIN_GEMM_X86)
namespace {

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// GCC keeps arrays of vector accumulators in memory (a store and reload per multiply-add), so every
// kernel names its accumulators: c<row><vector>, through the per-row macros below.
#define I4T_ROWS6(X) X(0) X(1) X(2) X(3) X(4) X(5)

// ---------------------------------------------------------------------- integer, AVX-512 VNNI
// 6 x 64: 24 zmm accumulators, 4 B vectors per group and 6 broadcasts of 4 A bytes; each vpdpbusd
// does 64 multiply-adds (u8 x s8, summed in fours without saturation, wrapping int32 accumulate).
constexpr int kVnni512Mr = 6, kVnni512Nr = 64;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void s32_avx512_vnni_6x64(
    const void* ap, const void* bp, int64_t kgroups, int32_t* c, int64_t ldc, const int32_t* init) {
  const uint8_t* a = static_cast<const uint8_t*>(ap);
  const int8_t* b = static_cast<const int8_t*>(bp);
#define I4T_DECL(r) __m512i c##r##0, c##r##1, c##r##2, c##r##3;
  I4T_ROWS6(I4T_DECL)
#undef I4T_DECL
  if (init != nullptr) {
    const __m512i x0 = _mm512_loadu_si512(init), x1 = _mm512_loadu_si512(init + 16);
    const __m512i x2 = _mm512_loadu_si512(init + 32), x3 = _mm512_loadu_si512(init + 48);
#define I4T_INIT(r) c##r##0 = x0, c##r##1 = x1, c##r##2 = x2, c##r##3 = x3;
    I4T_ROWS6(I4T_INIT)
#undef I4T_INIT
  } else {
#define I4T_LOAD(r)                               \
  c##r##0 = _mm512_loadu_si512(c + r * ldc);      \
  c##r##1 = _mm512_loadu_si512(c + r * ldc + 16); \
  c##r##2 = _mm512_loadu_si512(c + r * ldc + 32); \
  c##r##3 = _mm512_loadu_si512(c + r * ldc + 48);
    I4T_ROWS6(I4T_LOAD)
#undef I4T_LOAD
  }
  for (int64_t g = 0; g < kgroups; ++g) {
    const int8_t* bg = b + g * (kVnni512Nr * 4);
    const uint8_t* ag = a + g * (kVnni512Mr * 4);
    const __m512i b0 = _mm512_loadu_si512(bg), b1 = _mm512_loadu_si512(bg + 64);
    const __m512i b2 = _mm512_loadu_si512(bg + 128), b3 = _mm512_loadu_si512(bg + 192);
#define I4T_STEP(r)                                             \
  {                                                             \
    const __m512i av = _mm512_set1_epi32(load_i32(ag + 4 * r)); \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0);             \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1);             \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, av, b2);             \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, av, b3);             \
  }
    I4T_ROWS6(I4T_STEP)
#undef I4T_STEP
  }
#define I4T_STORE(r)                              \
  _mm512_storeu_si512(c + r * ldc, c##r##0);      \
  _mm512_storeu_si512(c + r * ldc + 16, c##r##1); \
  _mm512_storeu_si512(c + r * ldc + 32, c##r##2); \
  _mm512_storeu_si512(c + r * ldc + 48, c##r##3);
  I4T_ROWS6(I4T_STORE)
#undef I4T_STORE
}

// 256-bit accumulators: 6 rows x 2 vectors (12 of the 16 ymm registers).
#define I4T_Y_LOADU(p) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
#define I4T_Y_STOREU(p, v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v)
#define I4T_Y_PROLOGUE                                                \
  I4T_ROWS6(I4T_Y_DECL)                                               \
  if (init != nullptr) {                                              \
    const __m256i x0 = I4T_Y_LOADU(init), x1 = I4T_Y_LOADU(init + 8); \
    I4T_ROWS6(I4T_Y_INIT)                                             \
  } else {                                                            \
    I4T_ROWS6(I4T_Y_LOAD)                                             \
  }
#define I4T_Y_DECL(r) __m256i c##r##0, c##r##1;
#define I4T_Y_INIT(r) c##r##0 = x0, c##r##1 = x1;
#define I4T_Y_LOAD(r) c##r##0 = I4T_Y_LOADU(c + r * ldc), c##r##1 = I4T_Y_LOADU(c + r * ldc + 8);
#define I4T_Y_STORE(r) I4T_Y_STOREU(c + r * ldc, c##r##0), I4T_Y_STOREU(c + r * ldc + 8, c##r##1);

// ------------------------------------------------------------------------- integer, AVX-VNNI (VEX)
// 6 x 16 with 16 ymm registers: 12 accumulators, 2 B vectors, 1 broadcast.
#if defined(INT4TRAIN_GEMM_AVX_VNNI)
constexpr int kVnni256Mr = 6, kVnni256Nr = 16;

__attribute__((target("avx2,avxvnni"))) void s32_avx_vnni_6x16(const void* ap, const void* bp,
                                                               int64_t kgroups, int32_t* c,
                                                               int64_t ldc, const int32_t* init) {
  const uint8_t* a = static_cast<const uint8_t*>(ap);
  const int8_t* b = static_cast<const int8_t*>(bp);
  I4T_Y_PROLOGUE
  for (int64_t g = 0; g < kgroups; ++g) {
    const int8_t* bg = b + g * (kVnni256Nr * 4);
    const uint8_t* ag = a + g * (kVnni256Mr * 4);
    const __m256i b0 = I4T_Y_LOADU(bg), b1 = I4T_Y_LOADU(bg + 32);
#define I4T_STEP(r)                                             \
  {                                                             \
    const __m256i av = _mm256_set1_epi32(load_i32(ag + 4 * r)); \
    c##r##0 = _mm256_dpbusd_avx_epi32(c##r##0, av, b0);         \
    c##r##1 = _mm256_dpbusd_avx_epi32(c##r##1, av, b1);         \
  }
    I4T_ROWS6(I4T_STEP)
#undef I4T_STEP
  }
  I4T_ROWS6(I4T_Y_STORE)
}
#endif

// --------------------------------------------------------------------------- integer, AVX2 (int16)
// 6 x 16 on int16 pairs: vpmaddwd multiplies int16 pairs and adds them into int32 without
// saturation for int8-range operands (|2 * 128 * 128| < 2^31), so this path needs no offset.
constexpr int kAvx2Mr = 6, kAvx2Nr = 16;

__attribute__((target("avx2,fma"))) void s32_avx2_6x16(const void* ap, const void* bp,
                                                       int64_t kgroups, int32_t* c, int64_t ldc,
                                                       const int32_t* init) {
  const int16_t* a = static_cast<const int16_t*>(ap);
  const int16_t* b = static_cast<const int16_t*>(bp);
  I4T_Y_PROLOGUE
  for (int64_t g = 0; g < kgroups; ++g) {
    const int16_t* bg = b + g * (kAvx2Nr * 2);
    const int16_t* ag = a + g * (kAvx2Mr * 2);
    const __m256i b0 = I4T_Y_LOADU(bg), b1 = I4T_Y_LOADU(bg + 16);
#define I4T_STEP(r)                                                 \
  {                                                                 \
    const __m256i av = _mm256_set1_epi32(load_i32(ag + 2 * r));     \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(av, b0)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(av, b1)); \
  }
    I4T_ROWS6(I4T_STEP)
#undef I4T_STEP
  }
  I4T_ROWS6(I4T_Y_STORE)
}

// ------------------------------------------------------------------------------- fp32, AVX-512 F
// 6 x 64: 24 zmm accumulators; one fused multiply-add per element and k, k ascending.
constexpr int kF512Mr = 6, kF512Nr = 64;

__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void f32_avx512_6x64(
    const float* a, const float* b, int64_t k, float* c, int64_t ldc, bool init_zero) {
#define I4T_DECL(r) __m512 c##r##0, c##r##1, c##r##2, c##r##3;
  I4T_ROWS6(I4T_DECL)
#undef I4T_DECL
  if (init_zero) {
#define I4T_INIT(r) c##r##0 = c##r##1 = c##r##2 = c##r##3 = _mm512_setzero_ps();
    I4T_ROWS6(I4T_INIT)
#undef I4T_INIT
  } else {
#define I4T_LOAD(r)                            \
  c##r##0 = _mm512_loadu_ps(c + r * ldc);      \
  c##r##1 = _mm512_loadu_ps(c + r * ldc + 16); \
  c##r##2 = _mm512_loadu_ps(c + r * ldc + 32); \
  c##r##3 = _mm512_loadu_ps(c + r * ldc + 48);
    I4T_ROWS6(I4T_LOAD)
#undef I4T_LOAD
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * kF512Nr;
    const float* app = a + p * kF512Mr;
    const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
    const __m512 b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);
#define I4T_STEP(r)                             \
  {                                             \
    const __m512 av = _mm512_set1_ps(app[r]);   \
    c##r##0 = _mm512_fmadd_ps(av, b0, c##r##0); \
    c##r##1 = _mm512_fmadd_ps(av, b1, c##r##1); \
    c##r##2 = _mm512_fmadd_ps(av, b2, c##r##2); \
    c##r##3 = _mm512_fmadd_ps(av, b3, c##r##3); \
  }
    I4T_ROWS6(I4T_STEP)
#undef I4T_STEP
  }
#define I4T_STORE(r)                           \
  _mm512_storeu_ps(c + r * ldc, c##r##0);      \
  _mm512_storeu_ps(c + r * ldc + 16, c##r##1); \
  _mm512_storeu_ps(c + r * ldc + 32, c##r##2); \
  _mm512_storeu_ps(c + r * ldc + 48, c##r##3);
  I4T_ROWS6(I4T_STORE)
#undef I4T_STORE
}

// --------------------------------------------------------------------------------- fp32, AVX2 FMA
constexpr int kF256Mr = 6, kF256Nr = 16;

__attribute__((target("avx2,fma"))) void f32_avx2_6x16(const float* a, const float* b, int64_t k,
                                                       float* c, int64_t ldc, bool init_zero) {
#define I4T_DECL(r) __m256 c##r##0, c##r##1;
  I4T_ROWS6(I4T_DECL)
#undef I4T_DECL
  if (init_zero) {
#define I4T_INIT(r) c##r##0 = c##r##1 = _mm256_setzero_ps();
    I4T_ROWS6(I4T_INIT)
#undef I4T_INIT
  } else {
#define I4T_LOAD(r) \
  c##r##0 = _mm256_loadu_ps(c + r * ldc), c##r##1 = _mm256_loadu_ps(c + r * ldc + 8);
    I4T_ROWS6(I4T_LOAD)
#undef I4T_LOAD
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* bp = b + p * kF256Nr;
    const float* app = a + p * kF256Mr;
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
#define I4T_STEP(r)                                 \
  {                                                 \
    const __m256 av = _mm256_broadcast_ss(app + r); \
    c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);     \
    c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);     \
  }
    I4T_ROWS6(I4T_STEP)
#undef I4T_STEP
  }
#define I4T_STORE(r) \
  _mm256_storeu_ps(c + r * ldc, c##r##0), _mm256_storeu_ps(c + r * ldc + 8, c##r##1);
  I4T_ROWS6(I4T_STORE)
#undef I4T_STORE
}

#undef I4T_Y_LOADU
#undef I4T_Y_STOREU
#undef I4T_Y_PROLOGUE
#undef I4T_Y_DECL
#undef I4T_Y_INIT
#undef I4T_Y_LOAD
#undef I4T_Y_STORE
#undef I4T_ROWS6

}  // namespace

// Sign-extends each nibble with (n ^ 8) - 8 and interleaves low/high nibbles; unpacklo/hi work
// within 128-bit lanes, so the two halves are put back in order with permute2x128.
__attribute__((target("avx2"))) int64_t expand_int4_avx2(const uint8_t* src, int64_t bytes,
                                                         int8_t* out) {
  const __m256i mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  int64_t j = 0;
  for (; j + 32 <= bytes; j += 32) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
    const __m256i lo = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(x, mask), eight), eight);
    const __m256i hi = _mm256_sub_epi8(
        _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), mask), eight), eight);
    const __m256i i0 = _mm256_unpacklo_epi8(lo, hi), i1 = _mm256_unpackhi_epi8(lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j),
                        _mm256_permute2x128_si256(i0, i1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * j + 32),
                        _mm256_permute2x128_si256(i0, i1, 0x31));
  }
  return j;
}

S32Kernel s32_kernel_avx512_vnni() { return {s32_avx512_vnni_6x64, kVnni512Mr, kVnni512Nr, false}; }
#if defined(INT4TRAIN_GEMM_AVX_VNNI)
S32Kernel s32_kernel_avx_vnni() { return {s32_avx_vnni_6x16, kVnni256Mr, kVnni256Nr, false}; }
#else
S32Kernel s32_kernel_avx_vnni() { return {nullptr, 1, 1, false}; }
#endif
S32Kernel s32_kernel_avx2() { return {s32_avx2_6x16, kAvx2Mr, kAvx2Nr, true}; }
F32Kernel f32_kernel_avx512() { return {f32_avx512_6x64, kF512Mr, kF512Nr}; }
F32Kernel f32_kernel_avx2() { return {f32_avx2_6x16, kF256Mr, kF256Nr}; }

#else  // not x86 with GCC-style intrinsics: only the scalar kernels of gemm.cpp exist

int64_t expand_int4_avx2(const uint8_t*, int64_t, int8_t*) { return 0; }
S32Kernel s32_kernel_avx512_vnni() { return {nullptr, 1, 1, false}; }
S32Kernel s32_kernel_avx_vnni() { return {nullptr, 1, 1, false}; }
S32Kernel s32_kernel_avx2() { return {nullptr, 1, 1, true}; }
F32Kernel f32_kernel_avx512() { return {nullptr, 1, 1}; }
F32Kernel f32_kernel_avx2() { return {nullptr, 1, 1}; }

#endif

}  // namespace detail
}  // namespace int4train
