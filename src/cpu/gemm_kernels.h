// int4train core (internal): the packed-panel micro-kernels behind gemm_s32 and gemm_f32, and entry
// points that pick one instruction set explicitly, so that tests check every path on one machine.
//
// Panel layouts (written by the packing code of gemm.cpp, read by the kernels):
//  - integer, byte layout (VNNI and scalar kernels): K is zero-padded to a multiple of 4, in groups
//    of 4. An A micro-panel holds MR rows as [group][row][4] bytes, each (code + 128) as uint8 (the
//    code's bits XOR 0x80); a B micro-panel holds NR rows as [group][row][4] int8 codes. The kernel
//    sums (a + 128) * b with wrapping int32 arithmetic; the caller starts every tile at
//    -128 * sum_k b[n, k], so the final value is the exact product (all arithmetic is modulo 2^32
//    and the true result fits in int32).
//  - integer, int16 layout (AVX2 without VNNI): K padded to a multiple of 2, groups of 2, int16
//    codes for A and B; no offset (vpmaddwd is exact for products of int8 values).
//  - fp32: groups of 1, [k][row] floats. Every kernel computes c = fma(a[k], b[k], c) for k
//    ascending, so all fp32 kernels give the same bits and the K order never depends on tiling or
//    threads.
#pragma once

#include <cstdint>
#include <vector>

#include "int4train/common.h"

namespace int4train {
namespace detail {

enum class GemmIsa : int32_t { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512 = 3 };
const char* gemm_isa_name(GemmIsa isa);

// Instruction sets whose gemm_s32 / gemm_f32 kernels can run on this CPU (kScalar always; the SIMD
// ones only where cpu_features() reports them, so INT4TRAIN_SIMD=0 leaves only kScalar).
std::vector<GemmIsa> gemm_s32_isas();
std::vector<GemmIsa> gemm_f32_isas();
// The one gemm_s32 / gemm_f32 use.
GemmIsa gemm_s32_best_isa();
GemmIsa gemm_f32_best_isa();

// gemm_s32 / gemm_f32 with a chosen kernel; parallel = false runs every output tile on the calling
// thread (the tiling is the same either way). An ISA that cannot run here is an Error.
void gemm_s32_with(GemmIsa isa, bool parallel, const TensorView& a, const TensorView& b,
                   TensorView c);
void gemm_f32_with(GemmIsa isa, bool parallel, const TensorView& a, const TensorView& b,
                   float alpha, bool accumulate, TensorView out);

// ---- micro-kernels: one MR x NR tile of C (row stride ldc) over kgroups groups of K. init: NR
// start values for every row (the first K block), or nullptr to continue from the values in c.
using S32KernelFn = void (*)(const void* a, const void* b, int64_t kgroups, int32_t* c, int64_t ldc,
                             const int32_t* init);
using F32KernelFn = void (*)(const float* a, const float* b, int64_t k, float* c, int64_t ldc,
                             bool init_zero);

struct S32Kernel {
  S32KernelFn fn;
  int mr, nr;
  bool int16_layout;  // false: byte layout, groups of 4; true: int16 layout, groups of 2
};
struct F32Kernel {
  F32KernelFn fn;
  int mr, nr;
};

// x86 kernels (gemm_x86.cpp), compiled for their instruction sets with target attributes; call only
// where cpu_features() reports them. On other architectures these return kernels with fn ==
// nullptr. Unpacks `bytes` bytes of a packed INT4 row into 2 * bytes int8 codes (low nibble first)
// with AVX2; returns how many leading bytes it handled (a multiple of 32; the caller finishes the
// rest).
int64_t expand_int4_avx2(const uint8_t* src, int64_t bytes, int8_t* out);

S32Kernel s32_kernel_avx512_vnni();
S32Kernel s32_kernel_avx_vnni();
S32Kernel s32_kernel_avx2();
F32Kernel f32_kernel_avx512();
F32Kernel f32_kernel_avx2();

}  // namespace detail
}  // namespace int4train
