// int4train core: the AVX-512 kernels of the block Hadamard transform for bf16 outputs on CPUs with
// AVX512-BF16, whose VCVTNEPS2BF16 rounds in one instruction what otherwise takes eight.
#include <cstdint>

#include "cpu_features.h"
#include "hadamard_internal.h"

#if defined(__x86_64__) || defined(__i386__)
// See hadamard_avx512.cpp (GCC PR 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#define INT4TRAIN_HADAMARD_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#define INT4TRAIN_HADAMARD_NATIVE_BF16 1

namespace int4train {
namespace detail {
namespace {
#include "hadamard_avx512_kernels.inc"
}  // namespace

bool hadamard_cpu_has_avx512_bf16() {
  static const bool has = [] {
    if (!cpu_features().avx512) return false;  // also false when INT4TRAIN_SIMD=0
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
}

HadamardSpanFn hadamard_span_avx512_bf16(int32_t block, DType in, DType out) {
  if (out != DType::kBFloat16) return nullptr;
  if (in == DType::kFloat32) return pick_hadamard_block<Avx512Kernel, float, BFloat16>(block);
  if (in == DType::kBFloat16) return pick_hadamard_block<Avx512Kernel, BFloat16, BFloat16>(block);
  return nullptr;
}

}  // namespace detail
}  // namespace int4train

#else  // not x86

namespace int4train {
namespace detail {
bool hadamard_cpu_has_avx512_bf16() { return false; }
HadamardSpanFn hadamard_span_avx512_bf16(int32_t, DType, DType) { return nullptr; }
}  // namespace detail
}  // namespace int4train

#endif
