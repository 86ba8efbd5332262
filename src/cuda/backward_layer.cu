// int4train CUDA path: the element-wise passes of the layer's backward that sit between the
// products: the full-information LSQ backward (the weight's), the exact recombination of the
// bit-split partial products (16 hi + lo, scaled in fp64 exactly as src/cpu/linear.cpp), and the
// reduction pass over the output gradient (its absmax and the bias gradient's column sums in the
// CPU's order).
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_common.h"
#include "device_common.cuh"
#include "int4train/cuda.h"
#include "int4train/linear.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"
#include "kernels.h"

namespace int4train {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;  // fixed by the shape only: deterministic partial sums
// The most blocks of dw_epilogue_kernel's tile grid (a step-gradient partial each: 128 MiB).
constexpr int64_t kMaxTileBlocks = int64_t{1} << 24;

// quantize_kernels.cpp's lsq_backward_tile rules: v = x * (1/s); mask -8 <= v <= 7; r = rint(v) - v
// inside, -8 below, 7 above.
__global__ void __launch_bounds__(kThreads)
    lsq_backward_kernel(const float* __restrict__ x, int64_t ldx, const float* __restrict__ step,
                        const float* __restrict__ g, int64_t ldg, void* __restrict__ gx,
                        bool gx_bf16, int64_t ldo, int64_t rows, int64_t cols,
                        double* __restrict__ partial) {
  const float inv = __frcp_rn(*step);
  const float lo = static_cast<float>(-kLsqQn), hi = static_cast<float>(kLsqQp);
  const int64_t numel = rows * cols;
  double acc = 0.0;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, c = e - r * cols;
    const float v = __fmul_rn(x[r * ldx + c], inv);
    float res = __fsub_rn(rintf(v), v);
    if (v < lo) res = lo;
    if (v > hi) res = hi;
    const float gk = g[r * ldg + c];
    if (gx != nullptr) {
      const float out = (v >= lo && v <= hi) ? gk : 0.0f;
      if (gx_bf16) {
        static_cast<BFloat16*>(gx)[r * ldo + c] = float_to_bf16(out);
      } else {
        static_cast<float*>(gx)[r * ldo + c] = out;
      }
    }
    acc += static_cast<double>(gk) * static_cast<double>(res);
  }
  if (partial == nullptr) return;
  block_sum_to<kThreads>(acc, partial + blockIdx.x);
}

// 2^e as a double (e in [-1022, 1023]).
__device__ __forceinline__ double pow2(int e) {
  return __longlong_as_double(static_cast<long long>(1023 + e) << 52);
}

// The exact recombination of one element's hi and lo partials of hq_lss's compacted input
// gradient, with the LSS exponents of its rows (exps: 2N, hi rows first; -1 = dropped) and its
// token's row exponent k (grad_scale=row, else 0): the kept rows' 2^(4 + k_hi - k) hi + 2^(k_lo -
// k) lo. Equal to the CPU's int64 sum converted to fp64 and scaled by 2^-row_shift (4 with row
// scales, else 0; both exact; a zero is +0.0 as the CPU's, since the sum starts from +0.0).
__device__ __forceinline__ double recombine(double h, double l, const int8_t* exps, int64_t rows,
                                            int64_t row, int k) {
  const int eh = exps[row], el = exps[rows + row];
  double a = 0.0;
  if (eh >= 0) a = __fma_rn(pow2(4 + eh - k), h, a);
  if (el >= 0) a = __fma_rn(pow2(el - k), l, a);
  return a;
}

// A row's weight of the s32 form: 2^(scale_exp - row_exps[row]) (1.0 without row scales).
__device__ __forceinline__ double row_weight(const int8_t* row_exps, int scale_exp, int64_t row) {
  return pow2(scale_exp - (row_exps != nullptr ? row_exps[row] : 0));
}

// The exact fp64 sum of an s32 element's K-chunks (stride chunk_stride) from the first chunk's
// value `first` (offset: the element's index in a chunk), 16 of it plus the lo product's chunks
// where lo is given, times w (a power of two): SplitPartials' s32 form.
__device__ __forceinline__ double sum_chunks(double first, const int32_t* __restrict__ prod,
                                             const int32_t* __restrict__ lo, int chunks,
                                             int64_t chunk_stride, int64_t offset, double w) {
  double a = first;
  for (int k = 1; k < chunks; ++k) {
    a = __dadd_rn(a, static_cast<double>(prod[k * chunk_stride + offset]));
  }
  if (lo != nullptr) {
    a = __dmul_rn(16.0, a);
    for (int k = 0; k < chunks; ++k) {
      a = __dadd_rn(a, static_cast<double>(lo[k * chunk_stride + offset]));
    }
  }
  return __dmul_rn(a, w);
}

// out = float(double(*s1) * double(*s2) * sum), SplitPartials' two forms (P: int32 for s32, fp32
// for slots): sum_chunks of the s32 product, or recombine of row r's hi and lo rows slots[r],
// slots[rows + r] (-1: a dropped row, 0). The CPU's int64 sum and its rounding.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    combine_bitsplit_kernel(const P* __restrict__ prod, int64_t ld, int chunks,
                            int64_t chunk_stride, const int32_t* __restrict__ lo,
                            const int32_t* __restrict__ slots, const int8_t* __restrict__ exps,
                            const int8_t* __restrict__ row_exps, int scale_exp,
                            const float* __restrict__ s1, const float* __restrict__ s2,
                            float* __restrict__ out, int64_t ldo, int64_t rows, int64_t cols) {
  const double scale = __dmul_rn(static_cast<double>(*s1), static_cast<double>(*s2));
  const int64_t total = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / cols, c = e - r * cols;
    double a = 0.0;
    if (slots != nullptr) {
      const int64_t hr = slots[r], lr = slots[rows + r];
      a = recombine(hr >= 0 ? static_cast<double>(prod[hr * ld + c]) : 0.0,
                    lr >= 0 ? static_cast<double>(prod[lr * ld + c]) : 0.0, exps, rows, r,
                    row_exps != nullptr ? row_exps[r] : 0);
    } else if constexpr (std::is_same_v<P, int32_t>) {  // the s32 form (fp32 comes with slots)
      a = sum_chunks(static_cast<double>(prod[r * ld + c]), prod, lo, chunks, chunk_stride,
                     r * ld + c, row_weight(row_exps, scale_exp, r));
    }
    out[r * ldo + c] = __double2float_rn(__dmul_rn(scale, a));
  }
}

// One read of g for the backward's two reductions over it: max |g| (launch_absmax's bits, into
// amax with atomicMax) and grad_bias in linear.h's order, partial[b, j] = the sum of column j over
// row block b (rows in order, fp64, from 0.0). Each sum is a dependent chain in one thread, so what
// bounds the pass is how many loads are in flight: one warp per (row block, kPairCols-column tile)
// item, two columns a lane (one 4-byte load of a bf16 row), kSumBatch rows' loads issued before
// their in-order sums, and small blocks of a grid with one warp per item, so that every SM holds
// items. With one row block the sums go to out directly; otherwise bias_total_kernel adds the
// partials of each column in block order.
constexpr int kColSumThreads = 64;
constexpr int64_t kPairCols = 64;
constexpr int kSumBatch = 32;
// bias_total_column's batch: 32 partials' loads before their additions (ptxas keeps about 12 in
// flight at 32 registers; a batch of 8 left 64 or 128 dependent loads a column in 8 or 16 rounds).
constexpr int kTotalBatch = 32;
static_assert(kBiasGradBlockRows % kSumBatch == 0, "whole blocks run in batches");
static_assert(kSumBatch <= 32, "row_max: lane k keeps row k of a batch");

__device__ __forceinline__ void store_bias(void* out, bool out_bf16, int64_t j, double acc) {
  const float v = static_cast<float>(acc);
  if (out_bf16) {
    static_cast<BFloat16*>(out)[j] = float_to_bf16(v);
  } else {
    static_cast<float*>(out)[j] = v;
  }
}

// The lane's two values of one row: kPair, one aligned load (cols even); else element by element,
// a column past the end reading 0.0.
template <typename In, bool kPair>
__device__ __forceinline__ void load_pair(const In* p, bool c1, float* v0, float* v1) {
  if constexpr (kPair && sizeof(In) == 2) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(p);
    *v0 = __uint_as_float(w << 16);
    *v1 = __uint_as_float(w & 0xFFFF0000u);
  } else if constexpr (kPair) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    *v0 = f.x;
    *v1 = f.y;
  } else {
    *v0 = load_elem(p);
    *v1 = c1 ? load_elem(p + 1) : 0.0f;
  }
}

template <typename In, bool kPair, bool kRowMax>
__global__ void __launch_bounds__(kColSumThreads)
    absmax_column_sums_kernel(const In* __restrict__ g, int64_t ld, int64_t rows, int64_t cols,
                              uint32_t* __restrict__ amax, double* __restrict__ partial,
                              void* __restrict__ out, bool out_bf16,
                              uint32_t* __restrict__ row_max) {
  const int lane = threadIdx.x & 31;
  const int64_t tiles = (cols + kPairCols - 1) / kPairCols;
  // No rows: one empty block, so that the sums are written (0.0).
  const int64_t blocks = rows > 0 ? (rows + kBiasGradBlockRows - 1) / kBiasGradBlockRows : 1;
  const int64_t item = (static_cast<int64_t>(blockIdx.x) * kColSumThreads + threadIdx.x) / 32;
  uint32_t m = 0;
  if (item < tiles * blocks) {  // warp-uniform
    const int64_t b = item / tiles, j = (item - b * tiles) * kPairCols + 2 * lane;
    const int64_t i0 = b * kBiasGradBlockRows;
    const int64_t i1 = i0 + kBiasGradBlockRows < rows ? i0 + kBiasGradBlockRows : rows;
    const bool c0 = j < cols, c1 = j + 1 < cols;
    // kRowMax: every lane runs the row loop (a lane past the last column reads nothing and holds
    // 0.0), so that each row's maximum over the warp's columns is one warp reduction; lane k keeps
    // row k's of a batch and adds it to row_max with one atomicMax.
    if (c0 || kRowMax) {
      double acc0 = 0.0, acc1 = 0.0;
      const In* p = g + i0 * ld + (c0 ? j : 0);
      int64_t i = i0;
      for (; i + kSumBatch <= i1; i += kSumBatch, p += kSumBatch * ld) {
        float v0[kSumBatch], v1[kSumBatch];
#pragma unroll
        for (int k = 0; k < kSumBatch; ++k) {
          if (!kRowMax || c0) {
            load_pair<In, kPair>(p + k * ld, c1, &v0[k], &v1[k]);
          } else {
            v0[k] = v1[k] = 0.0f;
          }
        }
        uint32_t mine = 0;
#pragma unroll
        for (int k = 0; k < kSumBatch; ++k) {
          acc0 += static_cast<double>(v0[k]);
          acc1 += static_cast<double>(v1[k]);
          const uint32_t a = max(abs_bits(v0[k]), abs_bits(v1[k]));  // a missing column reads 0.0
          m = max(m, a);
          if (kRowMax) {
            const uint32_t r = __reduce_max_sync(kFullMask, a);
            if (lane == k) mine = r;
          }
        }
        if (kRowMax && mine > 0) atomicMax(row_max + i + lane, mine);
      }
      for (; i < i1; ++i, p += ld) {
        float v0 = 0.0f, v1 = 0.0f;
        if (!kRowMax || c0) load_pair<In, kPair>(p, c1, &v0, &v1);
        acc0 += static_cast<double>(v0);
        acc1 += static_cast<double>(v1);
        const uint32_t a = max(abs_bits(v0), abs_bits(v1));
        m = max(m, a);
        if (kRowMax) {
          const uint32_t r = __reduce_max_sync(kFullMask, a);
          if (lane == 0 && r > 0) atomicMax(row_max + i, r);
        }
      }
      // One block: the block sum is the total (0.0 + acc == acc, also for -0.0: the block sum of
      // a column of -0.0 starts from 0.0, so it is 0.0 too).
      if (c0) {
        if (partial != nullptr) {
          partial[b * cols + j] = acc0;
          if (c1) partial[b * cols + j + 1] = acc1;
        } else {
          store_bias(out, out_bf16, j, acc0);
          if (c1) store_bias(out, out_bf16, j + 1, acc1);
        }
      }
    }
  }
  m = __reduce_max_sync(kFullMask, m);
  if (amax != nullptr && lane == 0 && m > 0) atomicMax(amax, m);
}

// out[j] = the row blocks' partial sums of column j added in block order (fp64, from 0.0), a
// batch of partials' loads in flight at a time (bias_total_kernel, finish_sums_kernel).
__device__ __forceinline__ void bias_total_column(const double* __restrict__ partial,
                                                  int64_t blocks, int64_t cols, int64_t j,
                                                  void* __restrict__ out, bool out_bf16) {
  double acc = 0.0;
  int64_t b = 0;
  for (; b + kTotalBatch <= blocks; b += kTotalBatch) {
    double v[kTotalBatch];
#pragma unroll
    for (int k = 0; k < kTotalBatch; ++k) v[k] = partial[(b + k) * cols + j];
#pragma unroll
    for (int k = 0; k < kTotalBatch; ++k) acc += v[k];
  }
  for (; b < blocks; ++b) acc += partial[b * cols + j];
  store_bias(out, out_bf16, j, acc);
}

__global__ void __launch_bounds__(kThreads)
    bias_total_kernel(const double* __restrict__ partial, int64_t blocks, int64_t cols,
                      void* __restrict__ out, bool out_bf16) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < cols) bias_total_column(partial, blocks, cols, j, out, out_bf16);
}

// DeferredSums::finish's one launch: blocks 0 .. steps - 1 each sum one step gradient's partials
// (sum_partials_kernel's body), the rest a column of the bias gradient each thread
// (bias_total_kernel's).
struct FinishSums {
  const double* step_partial[DeferredSums::kMaxSteps];
  int step_count[DeferredSums::kMaxSteps];
  double step_gamma[DeferredSums::kMaxSteps];
  float* step_out[DeferredSums::kMaxSteps];
  int steps;
  const double* bias_partial;  // null: no bias totals
  int64_t bias_blocks, bias_cols;
  void* bias_out;
  bool bias_bf16;
};
static_assert(kThreads == kSumThreads, "finish_sums_kernel runs sum_partials_kernel's body");

__global__ void __launch_bounds__(kThreads) finish_sums_kernel(const FinishSums f) {
  static_assert(DeferredSums::kMaxSteps == 2, "the selects below pick one of two step sums");
  const int b = static_cast<int>(blockIdx.x);
  if (b < f.steps) {  // block-uniform: the block sum's barriers see every thread
    // Selects rather than f.step_*[b], which made ptxas copy the arrays to local memory.
    const bool first = b == 0;
    block_sum_partials<kSumThreads>(
        first ? f.step_partial[0] : f.step_partial[1], first ? f.step_count[0] : f.step_count[1],
        first ? f.step_gamma[0] : f.step_gamma[1], first ? f.step_out[0] : f.step_out[1]);
    return;
  }
  const int64_t j = static_cast<int64_t>(b - f.steps) * kThreads + threadIdx.x;
  if (j < f.bias_cols) {
    bias_total_column(f.bias_partial, f.bias_blocks, f.bias_cols, j, f.bias_out, f.bias_bf16);
  }
}

// ---- the fused epilogues of the bit-split backward (hq_bs, hq_lss): one pass from the product
// (int32 holding 16 hi + lo, or hq_lss's compacted fp32 rows of hi and lo read through the slots)
// to the gradient in the input domain. Per element exactly the separate kernels' arithmetic: v =
// float(s1 * s2 * (16 hi + lo)) in fp64 (16 hi + lo is exact in fp64); the LSQ backward's mask and
// r; the Hadamard back-rotation of the masked row chunk (the warp's 256 columns hold whole blocks);
// the step gradient's terms v * r summed in fp64 per thread, per block, then by sum_partials_kernel
// (a fixed order for a given grid, so deterministic; within an fp32 rounding of the CPU's order).
struct EpilogueParams {
  const void* prod;  // SplitPartials::prod: int32 holding 16 hi + lo, or the compacted fp32 product
  int64_t ld;
  int chunks;  // K-chunks of the int32 product, chunk_stride apart, summed exactly
  int64_t chunk_stride;
  const int32_t* slots;  // dX of hq_lss: the rows' slots in the compacted product (SplitPartials)
  bool slots_s32;        // ... an int32 product (the INT8 engine) instead of fp32
  const int8_t* exps;    // dX of hq_lss: the rows' LSS exponents (recombine)
  const int8_t* row_exps;  // grad_scale=row: SplitPartials::row_exps, scale_exp and lo
  int scale_exp;
  const int32_t* lo;
  const float* s1;
  const float* s2;
  const uint8_t* packed;  // dX: the saved codes (rows x cols, packed) ...
  const uint8_t* aux;     // ... and their compact aux bits
  const void* w;          // dW: the weight (rows x cols), fp32 or bf16, row stride ldw ...
  int64_t ldw;
  const float* step;  // ... and its step
  float hscale;
  void* out;  // fp32 or bf16 (out_bf16), row stride ldo; may be null (only the step gradient)
  bool out_bf16, out_vec;
  int64_t ldo, rows, cols;
  double* partial;   // one per block
  uint8_t* codes_t;  // dW (kCodes): W's codes as a transposed operand ...
  int64_t ldt, t_cols;
  bool codes_s8;  // ... INT8 (else FP8 e4m3)
};

// out = float(scale * sum_chunks) for one lane's 8 elements of an int32 product that holds the
// recombined sum 16 hi + lo (hq_bs; hq_lss's weight gradient, the importance weights folded into
// its operands, or its hi and lo products with row scales); h: the first chunk's values. kUsual:
// the caller knows it is the usual case (usual_partials), so no code for the others is emitted.
__host__ __device__ __forceinline__ bool usual_partials(const EpilogueParams& p) {
  return p.chunks == 1 && p.lo == nullptr && p.row_exps == nullptr && p.scale_exp == 0;
}
// The usual case's 8 values (no per-element loop, so the 8 chains interleave).
__device__ __forceinline__ void scale8(double scale, const double h[8], float v[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __double2float_rn(__dmul_rn(scale, h[i]));
}
template <bool kUsual = false>
__device__ __forceinline__ void combine8(const EpilogueParams& p, double scale, int64_t row,
                                         int64_t col0, const double h[8], float v[8]) {
  if (kUsual || usual_partials(p)) {
    scale8(scale, h, v);
    return;
  }
  const double w = row_weight(p.row_exps, p.scale_exp, row);
  const int32_t* prod = static_cast<const int32_t*>(p.prod);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const double a =
        sum_chunks(h[i], prod, p.lo, p.chunks, p.chunk_stride, row * p.ld + col0 + i, w);
    v[i] = __double2float_rn(__dmul_rn(scale, a));
  }
}

// The source of the dX epilogue for a compacted product (p.slots): row's hi and lo partials are
// rows slots[row] and slots[rows + row] of one fp32 product (s32: int32, the INT8 engine's, whose
// values are exact in fp32 too: cuda.h), absent (zero, flag off) where dropped; loaded ahead by
// for_each_warp_chunk_from like a plain row.
struct SlotSrc {
  struct Buf {
    float h[8], l[8];
    bool has_h, has_l;
  };
  const float* __restrict__ prod;
  const int32_t* __restrict__ slots;
  int64_t ld, rows;
  bool s32;
  __device__ __forceinline__ void load_row(int32_t slot, int32_t col, float v[8]) const {
    if (slot < 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.0f;
      return;
    }
    load8<true>(prod + slot * ld + col, v);
    if (s32) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = __int2float_rn(__float_as_int(v[i]));
    }
  }
  __device__ __forceinline__ void load(Buf& b, int64_t row, int32_t col) const {
    const int32_t hs = slots[row], ls = slots[rows + row];
    b.has_h = hs >= 0;
    b.has_l = ls >= 0;
    load_row(hs, col, b.h);
    load_row(ls, col, b.l);
  }
  __device__ __forceinline__ void zero(Buf& b) const {
    b.has_h = b.has_l = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) b.h[i] = b.l[i] = 0.0f;
  }
};

// The source of the dX epilogue for an INT8 product (hq_bs: q = 16 hi + lo in one operand row):
// the int32 partials of row `row`, 8 per lane, 32-byte aligned (the first K-chunk; combine8 adds
// the others).
struct S32Src {
  struct Buf {
    int4 a, b;
    // The 8 values in fp64 (exact).
    __device__ __forceinline__ void exact(double v[8]) const {
      const int w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = static_cast<double>(w[i]);
    }
  };
  const int32_t* __restrict__ prod;
  int64_t ld;
  __device__ __forceinline__ void load(Buf& b, int64_t row, int32_t col) const {
    load_flat(b, static_cast<uint64_t>(row * ld + col));
  }
  __device__ __forceinline__ void load_flat(Buf& b, uint64_t e) const {
    const int4* q = reinterpret_cast<const int4*>(prod + e);
    b.a = q[0];
    b.b = q[1];
  }
  __device__ __forceinline__ void zero(Buf& b) const { b.a = b.b = make_int4(0, 0, 0, 0); }
};

// The dX epilogue's third input: a chunk's saved codes (8 nibbles) and aux bits (a byte).
struct CodesSrc {
  struct Buf {
    uint32_t codes, bits;
  };
  const uint8_t* __restrict__ packed;
  const uint8_t* __restrict__ aux;
  int64_t cols;
  __device__ __forceinline__ void load(Buf& b, int64_t row, int32_t col) const {
    load_flat(b, static_cast<uint64_t>(row * cols + col));
  }
  // e: the flat index of the chunk's first element (col and cols are multiples of 8): packed bytes
  // e / 2 .., aux byte e / 8.
  __device__ __forceinline__ void load_flat(Buf& b, uint64_t e) const {
    b.codes = *reinterpret_cast<const uint32_t*>(packed + (e >> 1));
    b.bits = aux[e >> 3];
  }
  __device__ __forceinline__ void zero(Buf& b) const { b.codes = b.bits = 0; }
};

// Two sources of the same chunk loaded together, so that the second's loads are in flight with the
// first's instead of being waited for where they are used: the dX epilogue's partials with the
// saved codes (hq_lss's compacted epilogue 20% faster on an H200; hq_bs's unchanged), the dW
// epilogue's weight values with the int32 partials (the product has the weight's shape).
template <typename A, typename B>
struct PairSrc {
  struct Buf {
    typename A::Buf first;
    typename B::Buf second;
  };
  A a;
  B b;
  __device__ __forceinline__ void load(Buf& buf, int64_t row, int32_t col) const {
    a.load(buf.first, row, col);
    b.load(buf.second, row, col);
  }
  __device__ __forceinline__ void load_flat(Buf& buf, uint64_t e) const {
    a.load_flat(buf.first, e);
    b.load_flat(buf.second, e);
  }
  __device__ __forceinline__ void zero(Buf& buf) const {
    a.zero(buf.first);
    b.zero(buf.second);
  }
};

// recombine's sum over the kept rows of a SlotSrc chunk (exponents of the row from p.exps and
// p.row_exps).
__device__ __forceinline__ void combine8_slots(const EpilogueParams& p, double scale, int64_t row,
                                               const SlotSrc::Buf& b, float v[8]) {
  const int eh = p.exps[row], el = p.exps[p.rows + row];
  const int k = p.row_exps != nullptr ? p.row_exps[row] : 0;  // grad_scale=row
  const double wh = b.has_h ? pow2(4 + eh - k) : 0.0, wl = b.has_l ? pow2(el - k) : 0.0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    double a = 0.0;
    if (b.has_h) a = __fma_rn(wh, static_cast<double>(b.h[i]), a);
    if (b.has_l) a = __fma_rn(wl, static_cast<double>(b.l[i]), a);
    v[i] = __double2float_rn(__dmul_rn(scale, a));
  }
}

__device__ __forceinline__ void store_out8(const EpilogueParams& p, int64_t row, int64_t col0,
                                           const float v[8]) {
  if (p.out == nullptr) return;
  if (p.out_bf16) {
    BFloat16* dst = static_cast<BFloat16*>(p.out) + row * p.ldo + col0;
    p.out_vec ? store8<true>(dst, v) : store8<false>(dst, v);
  } else {
    float* dst = static_cast<float*>(p.out) + row * p.ldo + col0;
    p.out_vec ? store8<true>(dst, v) : store8<false>(dst, v);
  }
}

// The input's LSQ backward of one lane's 8 recombined values v from their saved codes (8 nibbles)
// and aux bits: acc += v r, v masked.
__device__ __forceinline__ void dx_lsq8(uint32_t codes, uint32_t bits, float v[8], double& acc) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int code = static_cast<int>(((codes >> (4 * i)) & 0xFu) ^ 0x8u) - 8;
    const MaskR m = lsq_compact_decode(code, (bits >> i) & 1u);
    acc += static_cast<double>(v[i]) * static_cast<double>(m.r);
    v[i] = m.inside ? v[i] : 0.0f;
  }
}

// dX: the input's LSQ backward from the saved codes and aux bits (lsq_backward_compact_cuda).
// kSlots: the partials of a compacted FP8 product, read through the slots (SlotSrc); else one int32
// product (any K-chunks) that holds the recombined sum (S32Src).
// The compacted variant keeps two rows' partials per chunk in flight: 2 blocks per SM (128
// registers) instead of 3, so that they stay in registers.
template <int G, bool kSlots>
__global__ void __launch_bounds__(kThreads, kSlots ? 2 : 3)
    dx_epilogue_kernel(const EpilogueParams p) {
  const int lane = threadIdx.x & 31;
  const double scale = __dmul_rn(static_cast<double>(*p.s1), static_cast<double>(*p.s2));
  double acc = 0.0;
  // The LSQ backward and back-rotation of one chunk's recombined values v.
  auto finish = [&](int64_t row, int64_t col0, float v[8], uint32_t codes, uint32_t bits) {
    if (col0 < p.cols) dx_lsq8(codes, bits, v, acc);
    hadamard_warp8<G>(v, lane, p.hscale);
    if (col0 < p.cols) store_out8(p, row, col0, v);
  };
  const CodesSrc codes{p.packed, p.aux, p.cols};
  if constexpr (kSlots) {
    using Src = PairSrc<SlotSrc, CodesSrc>;
    const Src src{SlotSrc{static_cast<const float*>(p.prod), p.slots, p.ld, p.rows, p.slots_s32},
                  codes};
    for_each_warp_chunk_from<kChunkDepth>(
        src, p.rows, p.cols, [&](int64_t row, int64_t col0, const Src::Buf& b) {
          float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
          if (col0 < p.cols) combine8_slots(p, scale, row, b.first, v);
          finish(row, col0, v, b.second.codes, b.second.bits);
        });
  } else {
    using Src = PairSrc<S32Src, CodesSrc>;
    const Src src{S32Src{static_cast<const int32_t*>(p.prod), p.ld}, codes};
    for_each_warp_chunk_from<kChunkDepth>(
        src, p.rows, p.cols, [&](int64_t row, int64_t col0, const Src::Buf& b) {
          float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
          if (col0 < p.cols) {
            double h[8];
            b.first.exact(h);
            combine8(p, scale, row, col0, h, v);
          }
          finish(row, col0, v, b.second.codes, b.second.bits);
        });
  }
  block_sum_to<kThreads>(acc, p.partial + blockIdx.x);
}

// dx_epilogue_kernel<G, false> where nothing has a gap (dx_flat: one K-chunk, no lo product or
// row scales, rows a multiple of 256 long, the product, the codes and the output contiguous and
// aligned), the common case, on for_each_flat_chunk: the same bits, without a row or column.
template <int G>
__global__ void __launch_bounds__(kThreads, 3) dx_epilogue_flat_kernel(const EpilogueParams p) {
  const int lane = threadIdx.x & 31;
  const double scale = __dmul_rn(static_cast<double>(*p.s1), static_cast<double>(*p.s2));
  double acc = 0.0;
  using Src = PairSrc<S32Src, CodesSrc>;
  const Src src{S32Src{static_cast<const int32_t*>(p.prod), p.ld},
                CodesSrc{p.packed, p.aux, p.cols}};
  const uint64_t numel = static_cast<uint64_t>(p.rows) * static_cast<uint64_t>(p.cols);
  for_each_flat_chunk<kChunkDepth>(src, numel, [&](uint64_t e, const Src::Buf& b) {
    double h[8];
    b.first.exact(h);
    float v[8];
    scale8(scale, h, v);
    dx_lsq8(b.second.codes, b.second.bits, v, acc);
    hadamard_warp8<G>(v, lane, p.hscale);
    if (p.out == nullptr) return;
    if (p.out_bf16) {
      store8<true>(static_cast<BFloat16*>(p.out) + e, v);
    } else {
      store8<true>(static_cast<float*>(p.out) + e, v);
    }
  });
  block_sum_to<kThreads>(acc, p.partial + blockIdx.x);
}

// One chunk of the dW epilogue (row `row` of W and of the product, the lane's columns col0 ..
// col0 + 7): W~ = the chunk's weights transformed, v = the recombined product, the weight's LSQ
// backward (lsq_backward_cuda's rules: x = W~ / s; mask -8 <= x <= 7; r = rint(x) - x inside, -8 /
// 7 out; acc += v r), the back-rotation of the masked v and its store. kCodes: it also returns W's
// codes of the chunk as operand bytes (p.codes_s8), hadamard_lsq_codes_t_cuda's: lsq_code of the
// same x, whose value is rint(x) inside [-8, 7] and so also gives r.
template <int G, bool kCodes, bool kUsual, typename Buf>
__device__ __forceinline__ uint2 dw_chunk(const EpilogueParams& p, int lane, double scale,
                                          float inv, int64_t row, int64_t col0, const Buf& b,
                                          double& acc) {
  const float qlo = static_cast<float>(-kLsqQn), qhi = static_cast<float>(kLsqQp);
  float wt[8];
  b.first.to_float(wt);
  hadamard_warp8<G>(wt, lane, p.hscale);
  float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  uint2 bytes = make_uint2(0u, 0u);
  if (col0 < p.cols) {
    double h[8];
    b.second.exact(h);
    combine8<kUsual>(p, scale, row, col0, h, v);
    uint32_t code_bits[8];
    float value[8], x[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __fmul_rn(wt[i], inv);
    const float z = finite_probe8(x);
    if (z == z) {
      // Every x finite: x is inside [-8, 7] iff clamping leaves it unchanged, and a clipped x's
      // residual (the bound) is its code's value, so one comparison and two selects an element.
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float clamped = fminf(fmaxf(x[i], qlo), qhi);
        const bool inside = clamped == x[i];
        const float t = __fadd_rn(clamped, kRoundMagic);  // rint(clamped), as lsq_code
        const float rounded = __fsub_rn(t, kRoundMagic);
        if constexpr (kCodes) {
          value[i] = rounded;
          code_bits[i] = __float_as_uint(t);
        }
        const float res = inside ? __fsub_rn(rounded, x[i]) : rounded;
        acc += static_cast<double>(v[i]) * static_cast<double>(res);
        v[i] = inside ? v[i] : 0.0f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float rounded;
        if constexpr (kCodes) {
          // NaN x: value 0, so r is NaN as with rintf; x outside [-8, 7]: r is replaced below.
          const LsqCode c = lsq_code(x[i], qlo, qhi);
          value[i] = c.value;
          code_bits[i] = c.bits;
          rounded = c.value;
        } else {
          rounded = rintf(x[i]);
        }
        float res = __fsub_rn(rounded, x[i]);
        if (x[i] < qlo) res = qlo;
        if (x[i] > qhi) res = qhi;
        acc += static_cast<double>(v[i]) * static_cast<double>(res);
        v[i] = (x[i] >= qlo && x[i] <= qhi) ? v[i] : 0.0f;
      }
    }
    if constexpr (kCodes) {
      bytes = p.codes_s8 ? s8x8_of_code_bits(code_bits) : e4m3x8(value);
    }
  }
  hadamard_warp8<G>(v, lane, p.hscale);
  if (col0 < p.cols) store_out8(p, row, col0, v);
  return bytes;
}

// dW: the weight's LSQ backward from W~ = the Hadamard transform of W, computed here from W
// (dw_chunk). The weight's values and the product's int32 partials both loaded ahead (PairSrc).
// Without codes: a persistent grid over chunks (for_each_warp_chunk_from), 2 blocks per SM so
// that the loads stay in registers (5% faster on an H200 than 3 blocks that load the partials
// where they are used). kCodes: also W's codes as the input gradient's transposed operand
// (p.codes_t), so that the backward reads W once for both (this epilogue runs before that product),
// on tile_to_transposed_from's grid of tiles of kDwTileRows = 16 rows x 256 columns, 2 rows a warp,
// at 80 registers and 3 blocks an SM, the usual form at 64 and 4 (kDwCodesUsualBlocks). Measured
// on an H200 (ncu, docs/cuda.md): against the plain epilogue + the W pass
// (hadamard_lsq_codes_t_cuda) it replaces, 52.6 + 29.1 -> 74.7 us at 4096 x 4096 with 32-row tiles
// (119 registers, 2 blocks an SM), then 64.4 us with 16-row tiles (245 -> 233 us at 16384 x 4096),
// then 52 us (202 us) at 4 blocks an SM. Two other forms were slower: the tiles on a persistent
// grid with the next rows' loads in flight across tiles (73.5 us, but 255 against 246 at 16384 x
// 4096; 11% more instructions), and no shared tile, each lane storing its 4 rows' bytes as 4-byte
// words of the transposed rows (114 us: L2 takes a request per word). kUsual: the product's usual
// form (usual_partials), without the code for the others (a kernel of a fifth the size).
constexpr int kDwTileRows = 16;
// Blocks an SM of the usual form with codes: 4 (64 registers, no spill on sm_90; 8% faster than 3
// on an H200, docs/cuda.md, stop 33); 3 before sm_90, where 64 registers spilled 8 bytes.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kDwCodesUsualBlocks = 3;
#else
constexpr int kDwCodesUsualBlocks = 4;
#endif
template <typename In, int G, bool kCodes, bool kUsual>
__global__ void __launch_bounds__(kThreads, kCodes ? (kUsual ? kDwCodesUsualBlocks : 3) : 2)
    dw_epilogue_kernel(const EpilogueParams p) {
  static_assert(!kCodes || kThreads == kWarpCols, "tile_to_transposed_from: a thread per column");
  const int lane = threadIdx.x & 31;
  const double scale = __dmul_rn(static_cast<double>(*p.s1), static_cast<double>(*p.s2));
  const float inv = __frcp_rn(*p.step);
  double acc = 0.0;
  using Src = PairSrc<MatrixSrc<In, true>, S32Src>;
  const Src src{MatrixSrc<In, true>{static_cast<const In*>(p.w), p.ldw},
                S32Src{static_cast<const int32_t*>(p.prod), p.ld}};
  if constexpr (kCodes) {
    tile_to_transposed_from<kDwTileRows>(
        src, p.rows, p.cols, p.codes_t, p.ldt, p.t_cols,
        [&](int64_t row, int64_t col0, const typename Src::Buf& b) {
          return dw_chunk<G, true, kUsual>(p, lane, scale, inv, row, col0, b, acc);
        });
  } else {
    for_each_warp_chunk_from<kChunkDepth>(
        src, p.rows, p.cols, [&](int64_t row, int64_t col0, const typename Src::Buf& b) {
          dw_chunk<G, false, kUsual>(p, lane, scale, inv, row, col0, b, acc);
        });
  }
  block_sum_to<kThreads>(acc,
                         p.partial + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x));
}

// An epilogue on `grid` (one step-gradient partial per block), then the step gradient from them:
// a launch here, or with defer, in its finish().
template <typename Kernel>
void launch_epilogue_on(Kernel kernel, dim3 grid, EpilogueParams p, float* grad_step, double gamma,
                        const CudaAllocator& alloc, cudaStream_t stream, DeferredSums* defer) {
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y;
  const bool deferred = defer != nullptr && grad_step != nullptr;
  DeviceBuffer partial(alloc, deferred ? 0 : sizeof(double) * static_cast<size_t>(blocks), stream);
  p.partial = deferred ? defer->step_partials(blocks, gamma, grad_step) : partial.as<double>();
  kernel<<<grid, kThreads, 0, stream>>>(p);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  if (grad_step != nullptr && !deferred) {
    sum_partials_kernel<<<1, kSumThreads, 0, stream>>>(p.partial, static_cast<int>(blocks), gamma,
                                                       grad_step);
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
}

// An epilogue on a persistent grid (for_each_warp_chunk_from's).
template <typename Kernel>
void launch_epilogue(Kernel kernel, EpilogueParams p, float* grad_step, double gamma,
                     const CudaAllocator& alloc, cudaStream_t stream, DeferredSums* defer) {
  const int64_t warps = p.rows * ((p.cols + kWarpCols - 1) / kWarpCols);
  const int grid =
      persistent_blocks(kernel, kThreads, (warps + kThreads / 32 - 1) / (kThreads / 32));
  launch_epilogue_on(kernel, dim3(static_cast<unsigned>(grid)), p, grad_step, gamma, alloc, stream,
                     defer);
}

// SplitPartials in one of its two forms: s32 without slots or exps, or the slots form (fp32 or
// int32, one chunk, no lo product or scale_exp) with exps (dX only: `slots_ok`); anything else is
// a bug in the caller.
void check_split_partials(const SplitPartials& pp, const int8_t* exps, const char* who,
                          bool slots_ok = true) {
  const bool s32_form = pp.s32 && pp.slots == nullptr && exps == nullptr;
  const bool slots_form = slots_ok && pp.slots != nullptr && pp.chunks == 1 && exps != nullptr &&
                          pp.lo == nullptr && pp.scale_exp == 0;
  if (!s32_form && !slots_form) {
    throw_error(ErrorKind::kRuntime,
                std::string(who) + ": expected an int32 product holding 16 hi + lo" +
                    (slots_ok ? ", or a compacted product with slots and exponents" : ""));
  }
}

}  // namespace

void launch_combine_bitsplit(const SplitPartials& pp, const int8_t* exps, const float* s1,
                             const float* s2, float* out, int64_t ldo, int64_t rows, int64_t cols,
                             cudaStream_t stream) {
  check_split_partials(pp, exps, "launch_combine_bitsplit");
  if (rows * cols == 0) return;
  const int grid = grid_blocks(rows * cols, kThreads, int64_t{1} << 16);
  auto launch = [&](auto* prod) {
    combine_bitsplit_kernel<<<grid, kThreads, 0, stream>>>(
        prod, pp.ld, pp.chunks, pp.chunk_stride, pp.lo, pp.slots, exps, pp.row_exps, pp.scale_exp,
        s1, s2, out, ldo, rows, cols);
  };
  pp.s32 ? launch(static_cast<const int32_t*>(pp.prod))
         : launch(static_cast<const float*>(pp.prod));
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void launch_absmax_column_sums(const TensorView& g, uint32_t* amax, TensorView column_sums,
                               const CudaAllocator& alloc, cudaStream_t stream, uint32_t* row_max,
                               DeferredSums* defer) {
  const int64_t rows = g.shape[0], cols = g.shape[1];
  if (cols == 0) return;
  const int64_t blocks = rows > 0 ? (rows + kBiasGradBlockRows - 1) / kBiasGradBlockRows : 1;
  const bool ob = column_sums.dtype == DType::kBFloat16, bf16 = g.dtype == DType::kBFloat16;
  const bool deferred = blocks > 1 && defer != nullptr;
  DeviceBuffer partial(alloc, blocks > 1 && !deferred ? sizeof(double) * blocks * cols : 0, stream);
  double* part = blocks == 1 ? nullptr
                 : deferred  ? defer->bias_partials(blocks, cols, column_sums.data, ob)
                             : partial.as<double>();
  const int64_t ld = row_stride(g);
  const bool pair = cols % 2 == 0 && (rows <= 1 || ld % 2 == 0) && aligned(g.data, bf16 ? 4 : 8);
  const int64_t warps = blocks * ((cols + kPairCols - 1) / kPairCols);
  const int64_t grid = (warps + kColSumThreads / 32 - 1) / (kColSumThreads / 32);
  if (grid > INT32_MAX) throw_error(ErrorKind::kValue, "g: too many rows x columns");
  dispatch_input_flags(bf16, pair, row_max != nullptr, [&](auto in, auto kpair, auto krow) {
    using In = decltype(in);
    absmax_column_sums_kernel<In, decltype(kpair)::value, decltype(krow)::value>
        <<<static_cast<unsigned>(grid), kColSumThreads, 0, stream>>>(
            g.ptr<const In>(), ld, rows, cols, amax, part, column_sums.data, ob, row_max);
  });
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  if (part != nullptr && !deferred) {
    bias_total_kernel<<<grid_blocks(cols, kThreads, int64_t{1} << 20), kThreads, 0, stream>>>(
        part, blocks, cols, column_sums.data, ob);
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
}

namespace {
bool vec_ok(const void* p, bool bf16, int64_t ld, int64_t rows) {
  return aligned(p, bf16 ? 16 : 32) && (rows == 1 || ld % 8 == 0);
}

// The parameters both epilogues share: the partial products, their scales, the shape, the Hadamard
// scale of `block` and the optional output.
EpilogueParams epilogue_params(const SplitPartials& pp, const float* s1, const float* s2,
                               int64_t rows, int64_t cols, int32_t block, const TensorView& out) {
  EpilogueParams p{};
  p.prod = pp.prod;
  p.ld = pp.ld;
  p.chunks = pp.chunks;
  p.chunk_stride = pp.chunk_stride;
  p.row_exps = pp.row_exps;
  p.scale_exp = pp.scale_exp;
  p.lo = pp.lo;
  p.s1 = s1;
  p.s2 = s2;
  p.rows = rows;
  p.cols = cols;
  p.hscale = hadamard_scale(block);
  if (out.data != nullptr) {
    p.out = out.data;
    p.out_bf16 = out.dtype == DType::kBFloat16;
    p.ldo = row_stride(out);
    p.out_vec = vec_ok(out.data, p.out_bf16, p.ldo, rows);
  }
  return p;
}

// An empty gradient: nothing to launch; the step gradient (a sum over no elements) is 0, as the
// separate passes give.
bool epilogue_empty(const EpilogueParams& p, float* grad_step, cudaStream_t stream) {
  if (p.rows > 0 && p.cols > 0) return false;
  if (grad_step != nullptr) {
    INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(grad_step, 0, sizeof(float), stream));
  }
  return true;
}
}  // namespace

void launch_dx_epilogue(const SplitPartials& pp, const int8_t* exps, const float* s1,
                        const float* s2, const TensorView& packed, const TensorView& aux,
                        int32_t block, TensorView grad_x, TensorView grad_step,
                        const CudaAllocator& alloc, cudaStream_t stream, DeferredSums* defer) {
  check_split_partials(pp, exps, "launch_dx_epilogue");
  EpilogueParams p = epilogue_params(pp, s1, s2, packed.shape[0], packed.shape[1], block, grad_x);
  p.slots = pp.slots;
  p.slots_s32 = pp.s32;
  p.exps = exps;
  p.packed = packed.ptr<const uint8_t>();
  p.aux = aux.ptr<const uint8_t>();
  float* gs = grad_step.data != nullptr ? grad_step.ptr<float>() : nullptr;
  if (epilogue_empty(p, gs, stream)) return;
  const double gamma = lsq_step_gamma(p.rows * p.cols);
  // dx_epilogue_flat_kernel's conditions: combine8's usual case, and nothing with a gap (the
  // product's rows 32-byte aligned, the codes' 4-byte aligned, as the row-wise kernel needs too).
  const bool flat = p.slots == nullptr && usual_partials(p) && p.cols % kWarpCols == 0 &&
                    (p.rows == 1 || p.ld == p.cols) &&
                    (p.out == nullptr || (p.out_vec && (p.rows == 1 || p.ldo == p.cols)));
  dispatch_block(block, [&](auto g) {
    constexpr int G = decltype(g)::value;
    if (p.slots != nullptr) {
      launch_epilogue(dx_epilogue_kernel<G, true>, p, gs, gamma, alloc, stream, defer);
    } else if (flat) {
      launch_epilogue(dx_epilogue_flat_kernel<G>, p, gs, gamma, alloc, stream, defer);
    } else {
      launch_epilogue(dx_epilogue_kernel<G, false>, p, gs, gamma, alloc, stream, defer);
    }
  });
}

bool launch_dw_epilogue(const SplitPartials& pp, const float* s1, const float* s2,
                        const TensorView& w, const TensorView& step_w, int32_t block,
                        TensorView grad_w, TensorView grad_step, TensorView codes_t,
                        const CudaAllocator& alloc, cudaStream_t stream, DeferredSums* defer) {
  check_split_partials(pp, nullptr, "launch_dw_epilogue", false);
  EpilogueParams p = epilogue_params(pp, s1, s2, w.shape[0], w.shape[1], block, grad_w);
  p.w = w.data;
  p.ldw = row_stride(w);
  p.step = step_w.ptr<const float>();
  const bool want_codes = codes_t.data != nullptr;
  if (want_codes) {
    check_codes_operand(codes_t, "codes_t", p.cols, p.rows, {DType::kInt8, DType::kFloat8E4M3});
  }
  float* gs = grad_step.data != nullptr ? grad_step.ptr<float>() : nullptr;
  if (epilogue_empty(p, gs, stream)) return want_codes;  // no codes to write either
  // The tiles' grid: at most 65535 row tiles (gridDim.y), and a partial per block.
  const dim3 tiles = tile_grid<kDwTileRows>(p.rows, p.cols);
  const bool with_codes = want_codes && tiles_fit<kDwTileRows>(p.rows) &&
                          static_cast<int64_t>(tiles.x) * tiles.y <= kMaxTileBlocks;
  if (with_codes) {
    p.codes_t = codes_t.ptr<uint8_t>();
    p.ldt = row_stride(codes_t);
    p.t_cols = codes_t.shape[1];
    p.codes_s8 = codes_t.dtype == DType::kInt8;
  }
  const bool bf16 = w.dtype == DType::kBFloat16;
  const double gamma = lsq_step_gamma(p.rows * p.cols);
  const bool usual = usual_partials(p);
  dispatch_block(block, [&](auto g) {
    constexpr int G = decltype(g)::value;
    auto launch = [&](auto usual_tag) {
      constexpr bool kUsual = decltype(usual_tag)::value;
      if (with_codes) {
        bf16 ? launch_epilogue_on(dw_epilogue_kernel<BFloat16, G, true, kUsual>, tiles, p, gs,
                                  gamma, alloc, stream, defer)
             : launch_epilogue_on(dw_epilogue_kernel<float, G, true, kUsual>, tiles, p, gs, gamma,
                                  alloc, stream, defer);
      } else {
        bf16 ? launch_epilogue(dw_epilogue_kernel<BFloat16, G, false, kUsual>, p, gs, gamma, alloc,
                               stream, defer)
             : launch_epilogue(dw_epilogue_kernel<float, G, false, kUsual>, p, gs, gamma, alloc,
                               stream, defer);
      }
    };
    usual ? launch(std::true_type{}) : launch(std::false_type{});
  });
  return with_codes;
}

struct DeferredSums::Impl {
  CudaAllocator alloc;
  void* stream;
  std::vector<std::unique_ptr<DeviceBuffer>> buffers;
  FinishSums f{};
  double* keep(size_t bytes) {
    buffers.push_back(std::make_unique<DeviceBuffer>(alloc, bytes, stream));
    return buffers.back()->as<double>();
  }
};

DeferredSums::DeferredSums(const CudaAllocator& alloc, void* stream)
    : impl_(new Impl{alloc, stream, {}, {}}) {}

DeferredSums::~DeferredSums() = default;

double* DeferredSums::step_partials(int64_t count, double gamma, float* out) {
  FinishSums& f = impl_->f;
  if (f.steps == kMaxSteps) {
    throw_error(ErrorKind::kRuntime, "DeferredSums: more than two step gradients");
  }
  if (count > INT32_MAX) throw_error(ErrorKind::kRuntime, "DeferredSums: too many partials");
  double* buf = impl_->keep(sizeof(double) * static_cast<size_t>(count));
  f.step_partial[f.steps] = buf;
  f.step_count[f.steps] = static_cast<int>(count);
  f.step_gamma[f.steps] = gamma;
  f.step_out[f.steps] = out;
  ++f.steps;
  return buf;
}

double* DeferredSums::bias_partials(int64_t blocks, int64_t cols, void* out, bool out_bf16) {
  FinishSums& f = impl_->f;
  if (f.bias_partial != nullptr) {
    throw_error(ErrorKind::kRuntime, "DeferredSums: a second bias gradient");
  }
  double* buf = impl_->keep(sizeof(double) * static_cast<size_t>(blocks * cols));
  f.bias_partial = buf;
  f.bias_blocks = blocks;
  f.bias_cols = cols;
  f.bias_out = out;
  f.bias_bf16 = out_bf16;
  return buf;
}

void DeferredSums::finish() {
  const FinishSums& f = impl_->f;
  const int64_t bias_blocks =
      f.bias_partial != nullptr ? (f.bias_cols + kThreads - 1) / kThreads : 0;
  const int64_t grid = f.steps + bias_blocks;
  if (grid == 0) return;
  if (grid > INT32_MAX) throw_error(ErrorKind::kRuntime, "DeferredSums: too many columns");
  finish_sums_kernel<<<static_cast<unsigned>(grid), kThreads, 0, as_stream(impl_->stream)>>>(f);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  impl_->f = FinishSums{};  // launched once
}

}  // namespace cuda_detail

void lsq_backward_cuda(const TensorView& x, const TensorView& step, const TensorView& grad_xhat,
                       TensorView grad_x, TensorView grad_step, const CudaAllocator& alloc,
                       void* stream) {
  using namespace cuda_detail;
  check_dtype(x, "x", {DType::kFloat32});
  check_device_matrix(x, "x");
  check_device_scalar(step, "step", DType::kFloat32);
  const int64_t rows = x.shape[0], cols = x.shape[1];
  check_dtype(grad_xhat, "grad_xhat", {DType::kFloat32});
  check_device_matrix(grad_xhat, "grad_xhat");
  check_shape(grad_xhat, "grad_xhat", rows, cols);
  const bool want_gx = grad_x.data != nullptr, want_gs = grad_step.data != nullptr;
  if (want_gx) {
    check_dtype(grad_x, "grad_x", {DType::kFloat32, DType::kBFloat16});
    check_device_matrix(grad_x, "grad_x");
    check_shape(grad_x, "grad_x", rows, cols);
    const bool same = grad_x.dtype == DType::kFloat32 && grad_x.data == grad_xhat.data &&
                      row_stride(grad_x) == row_stride(grad_xhat);
    if (!same && grad_x.data == grad_xhat.data) {
      throw_error(ErrorKind::kValue,
                  "grad_x: expected either grad_xhat itself (fp32, in place) or memory that does "
                  "not overlap it");
    }
  }
  if (want_gs) check_device_scalar(grad_step, "grad_step", DType::kFloat32);
  if (!want_gx && !want_gs) return;
  const cudaStream_t s = as_stream(stream);
  const int64_t numel = rows * cols;
  const int grid = grid_blocks(numel, kThreads, kMaxBlocks);
  DeviceBuffer partial(alloc, want_gs ? sizeof(double) * grid : 0, stream);
  if (numel > 0) {
    lsq_backward_kernel<<<grid, kThreads, 0, s>>>(
        x.ptr<const float>(), row_stride(x), step.ptr<const float>(), grad_xhat.ptr<const float>(),
        row_stride(grad_xhat), want_gx ? grad_x.data : nullptr, grad_x.dtype == DType::kBFloat16,
        want_gx ? row_stride(grad_x) : 0, rows, cols, want_gs ? partial.as<double>() : nullptr);
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
  if (want_gs) {
    const double gamma = lsq_step_gamma(numel);
    sum_partials_kernel<<<1, kSumThreads, 0, s>>>(partial.as<const double>(),
                                                   numel > 0 ? grid : 0, gamma,
                                                   grad_step.ptr<float>());
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace int4train
