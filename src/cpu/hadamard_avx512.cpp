// int4train core: the AVX-512 (F/BW/VL) kernels of the block Hadamard transform, from
// hadamard_avx512_kernels.inc, with bf16 outputs rounded in integer arithmetic.
#include <cstdint>

#include "hadamard_internal.h"

#if defined(__x86_64__) || defined(__i386__)
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the unused merge source, which trips a
// false -Wmaybe-uninitialized inside the intrinsic headers (GCC PR 105593, fixed in GCC 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#define INT4TRAIN_HADAMARD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define INT4TRAIN_HADAMARD_NATIVE_BF16 0

namespace int4train {
namespace detail {
namespace {
#include "hadamard_avx512_kernels.inc"
}  // namespace

HadamardSpanFn hadamard_span_avx512(int32_t block, DType in, DType out) {
  const bool in_f32 = in == DType::kFloat32, out_f32 = out == DType::kFloat32;
  const bool in_bf16 = in == DType::kBFloat16, out_bf16 = out == DType::kBFloat16;
  if (in_f32 && out_f32) return pick_hadamard_block<Avx512Kernel, float, float>(block);
  if (in_f32 && out_bf16) return pick_hadamard_block<Avx512Kernel, float, BFloat16>(block);
  if (in_bf16 && out_f32) return pick_hadamard_block<Avx512Kernel, BFloat16, float>(block);
  if (in_bf16 && out_bf16) return pick_hadamard_block<Avx512Kernel, BFloat16, BFloat16>(block);
  return nullptr;
}

}  // namespace detail
}  // namespace int4train

#else  // not x86

namespace int4train {
namespace detail {
HadamardSpanFn hadamard_span_avx512(int32_t, DType, DType) { return nullptr; }
}  // namespace detail
}  // namespace int4train

#endif
