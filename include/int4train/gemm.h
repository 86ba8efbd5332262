// int4train core: integer matrix products with exact int32 accumulation, and the fp32 product used by
// the full-precision recipe and the LUQ baseline.
//
// Dimension vocabulary (used everywhere in this project): C = A * B^T, A is M x K, B is N x K, C is
// M x N; both operands are row-major with the reduction dimension K contiguous. (The linear layer maps
// onto it in linear.h.)
#pragma once

#include <cstdint>

#include "int4train/common.h"

namespace int4train {

// Exactness bounds: |a * b| <= 64 for INT4 codes and <= 128 * 128 for int8, so the int32 sum is exact
// for K <= kMaxKInt4 (INT4) and K <= kMaxKInt8 (int8); a larger K is an Error naming `a`.
constexpr int64_t kMaxKInt4 = (int64_t{1} << 31) / 64 - 1;
constexpr int64_t kMaxKInt8 = (int64_t{1} << 31) / (128 * 128) - 1;

// c[m, n] = sum_k a[m, k] * b[n, k], exactly, in int32. a, b: int8 (any values) or kInt4Packed (both of
// the same dtype); c: int32 M x N (row stride may exceed N). Any M, N, K >= 0 (K = 0 writes zeros).
void gemm_s32(const TensorView& a, const TensorView& b, TensorView c);
// The plain scalar reference; the fast path equals it bit for bit.
void gemm_s32_ref(const TensorView& a, const TensorView& b, TensorView c);

// Epilogue of a scaled integer product: out[m, n] = alpha * row_scale[m] * acc[m, n] + bias[n]
// (+ out[m, n] when accumulate). alpha is a host scalar; row_scale (fp32 M) and bias (fp32 or bf16 N)
// are optional (data == nullptr). The product is formed in fp32 from the exact int32 accumulator, in
// this order: v = (alpha * row_scale[m]) * float(acc); v = v + bias[n]; v = v + out[m, n].
struct Epilogue {
  float alpha = 1.0f;
  TensorView row_scale;
  TensorView bias;
  bool accumulate = false;  // fp32 out only
};

// out = epilogue(gemm_s32(a, b)); out: fp32 or bf16 M x N.
void gemm_scaled(const TensorView& a, const TensorView& b, const Epilogue& epilogue, TensorView out);

// out = alpha * a * b^T (+ out when accumulate), fp32 operands and output, fp32 accumulation
// (blocked and multithreaded; the summation order over K is fixed, so the result is the same for any
// thread count).
void gemm_f32(const TensorView& a, const TensorView& b, float alpha, bool accumulate, TensorView out);

// out = in^T for fp32, int8 or int32 matrices (out: cols x rows, same dtype).
void transpose(const TensorView& in, TensorView out);

}  // namespace int4train
