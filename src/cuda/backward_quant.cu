// int4train CUDA path: the backward's quantizers and LSQ gradient on the device: absmax, unbiased
// bit splitting (a reduction pass then one quantize pass, the scale never leaving the device), the
// compact-state LSQ backward, and the conversion of saved INT4 codes into FP8 GEMM operands
// (optionally transposed, for the products whose reduction dimension is the token dimension).
#include <cuda_fp8.h>

#include <cfloat>
#include <cmath>
#include <string>

#include "cuda_common.h"
#include "device_common.cuh"
#include "int4train/cuda.h"
#include "int4train/int4.h"
#include "int4train/lss.h"
#include "int4train/numeric.h"
#include "int4train/philox.h"
#include "int4train/quantize.h"
#include "kernels.h"

namespace int4train {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0, "absmax_kernel's uniform rows: a warp's t values are 32-aligned");

// ------------------------------------------------------------------------------ absmax

// The largest of `v` (|g| bits) over the lanes of this loop iteration that hold row r, into
// row_max[r] with one atomicMax per row and warp. uniform: every such lane holds the same row (the
// vectorised loop over rows whose 8-element groups come in whole warps).
__device__ __forceinline__ void row_max_update(uint32_t* row_max, int64_t r, uint32_t v,
                                               bool uniform) {
  const unsigned active = __activemask();
  const unsigned same =
      uniform ? active : __match_any_sync(active, static_cast<unsigned long long>(r));
  const uint32_t m = __reduce_max_sync(same, v);
  if ((threadIdx.x & 31) == static_cast<unsigned>(__ffs(same) - 1) && m > 0) {
    atomicMax(row_max + r, m);
  }
}

// max |g| as fp32 bits into *out (NaN > Inf > finite); with kRowMax also each row's into
// row_max[row] (zeroed by the caller), for grad_scale=row's exponents, in the same read of g.
template <typename In, bool kVec8, bool kRowMax>
__global__ void __launch_bounds__(kThreads)
    absmax_kernel(const In* __restrict__ g, int64_t ld, int64_t rows, int64_t cols,
                  uint32_t* __restrict__ out, uint32_t* __restrict__ row_max) {
  uint32_t m = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (kVec8) {
    const int64_t groups = cols / 8, total = rows * groups;
    const bool uniform = groups % 32 == 0;  // a warp's 32 groups (t = 32 w .. 32 w + 31): one row
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
         t += stride) {
      const int64_t r = t / groups, c = (t - r * groups) * 8;
      float v[8];
      load8<true>(g + r * ld + c, v);
      uint32_t lm = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) lm = max(lm, abs_bits(v[i]));
      m = max(m, lm);
      if (kRowMax) row_max_update(row_max, r, lm, uniform);
    }
  } else {
    const int64_t total = rows * cols;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
         t += stride) {
      const int64_t r = t / cols, c = t - r * cols;
      const uint32_t a = abs_bits(load_elem(g + r * ld + c));
      m = max(m, a);
      if (kRowMax) row_max_update(row_max, r, a, false);
    }
  }
  m = __reduce_max_sync(kFullMask, m);
  __shared__ uint32_t warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    uint32_t b = threadIdx.x < kThreads / 32 ? warp_max[threadIdx.x] : 0u;
    b = __reduce_max_sync(kFullMask, b);
    if (threadIdx.x == 0 && b > 0) atomicMax(out, b);
  }
}

// absmax_kernel over g; *out (and row_max) must be zero on entry: the kernel only raises them, and
// the caller zeroes them (with whatever else it zeroes in the same memset).
void launch_absmax(const TensorView& g, uint32_t* out, cudaStream_t stream,
                   uint32_t* row_max = nullptr) {
  const int64_t rows = g.shape[0], cols = g.shape[1];
  if (rows * cols == 0) return;
  const int64_t ld = row_stride(g);
  const bool bf16 = g.dtype == DType::kBFloat16;
  const bool vec = cols % 8 == 0 && (rows == 1 || ld % 8 == 0) && aligned(g.data, bf16 ? 16 : 32);
  // A few blocks per SM are enough to saturate memory; the cap keeps the atomics few.
  const int grid = grid_blocks(rows * cols / (vec ? 8 : 1), kThreads, 2048);
  dispatch_input_flags(bf16, vec, row_max != nullptr, [&](auto in, auto kvec, auto krow) {
    using In = decltype(in);
    absmax_kernel<In, decltype(kvec)::value, decltype(krow)::value>
        <<<grid, kThreads, 0, stream>>>(g.ptr<const In>(), ld, rows, cols, out, row_max);
  });
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------ bit split
struct BitsplitParams {
  const void* g;
  int64_t ldg, rows, cols;
  const uint32_t* amax_bits;
  PhiloxKeys keys;  // philox_keys(RandomKey::seed), read from constant memory
  uint64_t stream;
  const int64_t* device_step;  // RandomKey::device_step
  uint8_t* operand;  // FP8 2 rows x padded cols, hi rows then lo rows; or (q8) INT8 rows of q
  int64_t ldop, op_cols;
  uint8_t* operand_t;  // (q8) INT8 cols x padded rows: q^T; may be null
  int64_t ldt, opt_cols;
  bool q8;      // operand: INT8 rows x padded cols of q = 16 hi + lo (one row per row of g)
  bool s8;      // operand: the hi and lo rows as INT8 (the INT8 engine) instead of FP8
  uint8_t* hi;  // packed, may be null
  uint8_t* lo;
  int32_t* row_sumsq;  // 2 rows, zeroed before; may be null
  float* scale;
  const float* row_inv;  // grad_scale=row: each row's 119 / max|g| * 2^k_row; null: one inverse
};

// The inverse scale of `row`: the tensor's, or its row's (grad_scale=row).
__device__ __forceinline__ float row_inverse(const BitsplitParams& p, int64_t row, float inv) {
  return p.row_inv != nullptr ? p.row_inv[row] : inv;
}

// grad_scale=row (quantize_bitsplit_rows of quantize.h): each row's exponent k, the largest k <=
// kGradRowMaxExponent with max|g_row| 2^k <= max|g| (every k 0 unless max|g| is finite and not
// zero), and its inverse scale (119 / max|g|) 2^k; the rows' maxima (|g| bits) come from the
// reduction pass (launch_absmax / launch_absmax_column_sums with row_max), a thread per row.
__global__ void __launch_bounds__(kThreads)
    bitsplit_row_scales_kernel(const uint32_t* __restrict__ row_max, int64_t rows,
                               const uint32_t* __restrict__ amax_bits, int8_t* __restrict__ row_exp,
                               float* __restrict__ row_inv) {
  const float amax = __uint_as_float(*amax_bits);
  const float inv = amax == 0.0f ? 0.0f : __fdiv_rn(static_cast<float>(kBitSplitLevels), amax);
  const bool scaled = amax > 0.0f && amax <= FLT_MAX;  // finite and not zero (NaN: neither)
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int k = 0;
    if (scaled) {
      const float rmax = __uint_as_float(row_max[row]);
      while (k < kGradRowMaxExponent && ldexpf(rmax, k + 1) <= amax) ++k;
    }
    row_exp[row] = static_cast<int8_t>(k);
    row_inv[row] = ldexpf(inv, k);
  }
}

// out[i] = max_exp - k[i]: the weight gradient's fold of the row scales into the token side.
__global__ void __launch_bounds__(kThreads)
    fold_exponents_kernel(const int8_t* __restrict__ k, int64_t n, int max_exp,
                          int8_t* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int8_t>(max_exp - k[i]);
  }
}

// The pass's inverse scale 119 / max|g| (0 for an all-zero g), and whether every g * inverse scale
// of the pass is finite, so that split_q_magic may skip its NaN test: max|g| finite (no Inf or NaN
// in g) and the inverse scale finite even times a row's 2^k (grad_scale=row; a subnormal max|g|
// makes 119 / max|g| overflow, and 0 * Inf is NaN). Block 0's thread 0 also writes the scale.
struct BitsplitInverse {
  float inv;
  bool finite;
};
__device__ __forceinline__ BitsplitInverse bitsplit_scales(const BitsplitParams& p) {
  const float amax = __uint_as_float(*p.amax_bits);
  const float levels = static_cast<float>(kBitSplitLevels);
  const bool zero = amax == 0.0f;
  const float inv = zero ? 0.0f : __fdiv_rn(levels, amax);
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    *p.scale = zero ? 0.0f : __fdiv_rn(amax, levels);
  }
  return BitsplitInverse{
      inv, amax <= FLT_MAX && inv <= FLT_MAX / static_cast<float>(1 << kGradRowMaxExponent)};
}

// q = stochastic_round_clamp(g * inv, u, -L, L) of numeric.h, u = uniform_from_u16(h) of philox.h,
// without conversion instructions: the
// floor of the rounded sum g * inv + u, clamped (clamping first is the same for integer bounds; NaN
// gives 0), as the bit pattern of kRoundMagic + q, i.e. bits(kRoundMagic) + q (device_common.cuh).
// bits(kRoundMagic) ends in a zero byte, so the pattern's low byte is q's (two's complement).
// kFinite: y is known not to be NaN (bitsplit_scales' finite), so the test is left out (fminf and
// fmaxf would map a NaN to a bound, not to 0).
template <bool kFinite>
__device__ __forceinline__ uint32_t split_q_magic(float g, float inv, uint32_t h) {
  constexpr float kL = static_cast<float>(kBitSplitLevels);
  const float y = add_uniform_u16(__fmul_rn(g, inv), h);  // + uniform_from_u16(h), rounded once
  const float c = kFinite || y == y ? fminf(fmaxf(y, -kL), kL) : 0.0f;
  return __float_as_uint(__fadd_rd(c, kRoundMagic));
}
static_assert(kRoundMagic == 0x1.8p23f,
              "split_q_magic's low byte needs bits(kRoundMagic) = 0x4B400000");

// The bit split of one value as exact floats and integers: q of split_q_magic, then hi =
// floor((q + 8) / 16) = ((q + 136) >> 4) - 8 (a non-negative shifted numerator), lo = q - 16 hi.
struct SplitValue {
  int hi, lo;
  float hi_f, lo_f;
  __device__ __forceinline__ int q() const { return 16 * hi + lo; }
};
template <bool kFinite>
__device__ __forceinline__ SplitValue split_value(float g, float inv, uint32_t draw) {
  const int q =
      static_cast<int>(split_q_magic<kFinite>(g, inv, draw)) - __float_as_int(kRoundMagic);
  const int h = ((q + 8 + 128) >> 4) - 8;
  const int l = q - 16 * h;
  return SplitValue{h, l, int_as_exact_float(h), int_as_exact_float(l)};
}

// The low bytes of a, b, c, d in one word (a's lowest).
__device__ __forceinline__ uint32_t low_bytes4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040u), __byte_perm(c, d, 0x0040u), 0x5410u);
}

// One lane's 8 bytes of operand row `row` (q's, or the stacked hi / lo rows) at column col0.
__device__ __forceinline__ void store_operand8(const BitsplitParams& p, int64_t row, int64_t col0,
                                               uint2 bytes) {
  *reinterpret_cast<uint2*>(p.operand + row * p.ldop + col0) = bytes;
}

// hq_bs's pass: one lane's 8 values (columns col0 .. col0+7 of `row`) as 8 bytes of the INT8 row
// of q = 16 hi + lo, taken from split_q_magic's bit patterns; nothing is split.
// b: the 8 values' Philox block (their flat indices 8 b .. 8 b + 7).
template <bool kFinite>
__device__ __forceinline__ uint2 q8_bytes_at(const BitsplitParams& p, uint64_t stream, uint64_t b,
                                             const float v[8], float inv) {
  const Philox4x32 r = random_block(p.keys, stream, b);
  uint32_t m[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) m[i] = split_q_magic<kFinite>(v[i], inv, block_u16(r, i));
  return make_uint2(low_bytes4(m[0], m[1], m[2], m[3]), low_bytes4(m[4], m[5], m[6], m[7]));
}
template <bool kFinite>
__device__ __forceinline__ uint2 q8_bytes(const BitsplitParams& p, uint64_t stream, int64_t row,
                                          int64_t col0, const float v[8], float inv) {
  return q8_bytes_at<kFinite>(p, stream, static_cast<uint64_t>(row * p.cols + col0) >> 3, v, inv);
}

// One lane's 8 values split (Philox block b): the packed hi and lo nibbles, their values as exact
// floats, and the sums of their squares added to *sq_hi, *sq_lo.
struct Split8 {
  uint32_t ph = 0, pl = 0;
  float hf[8], lf[8];
};
template <bool kFinite>
__device__ __forceinline__ Split8 split8(const BitsplitParams& p, uint64_t stream, uint64_t b,
                                         const float v[8], float inv, int32_t* sq_hi,
                                         int32_t* sq_lo) {
  const Philox4x32 r = random_block(p.keys, stream, b);
  Split8 s;
  // The nibbles by shift-adds: sum_i c_i 16^i + 0x88888888 (mod 2^32) is the word of the offset
  // nibbles c_i + 8 in [0, 15], and XOR 0x88888888 turns each into c_i's two's complement.
  uint32_t sh = 0x88888888u, sl = 0x88888888u;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const SplitValue sv = split_value<kFinite>(v[i], inv, block_u16(r, i));
    *sq_hi += sv.hi * sv.hi;
    *sq_lo += sv.lo * sv.lo;
    sh += static_cast<uint32_t>(sv.hi) << (4 * i);
    sl += static_cast<uint32_t>(sv.lo) << (4 * i);
    s.hf[i] = sv.hi_f;
    s.lf[i] = sv.lo_f;
  }
  s.ph = sh ^ 0x88888888u;
  s.pl = sl ^ 0x88888888u;
  return s;
}

// One lane's 8 values split: packed hi/lo codes, the FP8 (or INT8, p.s8) hi and lo operand rows,
// the rows' sums of squared codes.
template <bool kVec, bool kFinite>
__device__ __forceinline__ void bitsplit_store8(const BitsplitParams& p, uint64_t stream,
                                                int64_t row, int64_t col0, const float v[8],
                                                float inv, int32_t* sq_hi, int32_t* sq_lo) {
  const Split8 sp = split8<kFinite>(p, stream, static_cast<uint64_t>(row * p.cols + col0) >> 3, v,
                                    inv, sq_hi, sq_lo);
  const uint32_t ph = sp.ph, pl = sp.pl;
  const float* hf = sp.hf;
  const float* lf = sp.lf;
  const int64_t pb = row * (p.cols / 2) + col0 / 2;
  if (p.hi != nullptr) {
    if (kVec) {
      *reinterpret_cast<uint32_t*>(p.hi + pb) = ph;
      *reinterpret_cast<uint32_t*>(p.lo + pb) = pl;
    } else {
      for (int i = 0; i < 4; ++i) {
        p.hi[pb + i] = static_cast<uint8_t>(ph >> (8 * i));
        p.lo[pb + i] = static_cast<uint8_t>(pl >> (8 * i));
      }
    }
  }
  if (p.operand == nullptr) return;
  store_operand8(p, row, col0, operand_bytes8(p.s8, ph, hf));  // hi and lo: codes in [-8, 7]
  store_operand8(p, p.rows + row, col0, operand_bytes8(p.s8, pl, lf));
}

// hq_lss's row sums of squared codes: a warp's partial sums of row `row`'s hi and lo codes, added
// by its first lane (where not zero). row_of() gives the row (called after the warp's sums).
template <typename RowOf>
__device__ __forceinline__ void add_row_sumsq(const BitsplitParams& p, int lane, int32_t sq_hi,
                                              int32_t sq_lo, RowOf&& row_of) {
  sq_hi = warp_sum_s32(sq_hi);
  sq_lo = warp_sum_s32(sq_lo);
  const auto row = row_of();
  if (lane == 0 && sq_hi != 0) atomicAdd(p.row_sumsq + row, sq_hi);
  if (lane == 0 && sq_lo != 0) atomicAdd(p.row_sumsq + p.rows + row, sq_lo);
}

// Rows a multiple of 8 long: a warp per 256 columns, 8 per lane, a persistent grid with
// kChunkDepth chunks' loads in flight per warp (device_common.cuh). kQ8: hq_bs's pass (q8_bytes,
// the rows of q alone), which fits 64 registers, so 4 blocks per SM (2.5% faster than 3 at
// 8192 x 16384 on an H200); else bitsplit_store8.
template <typename In, bool kVec, bool kQ8>
__global__ void __launch_bounds__(kThreads, kQ8 ? 4 : 3) bitsplit_kernel(const BitsplitParams p) {
  const int lane = threadIdx.x & 31;
  const BitsplitInverse scales = bitsplit_scales(p);
  const float inv = scales.inv;
  const bool finite = scales.finite;
  const uint64_t stream = stream_with_step(p.stream, p.device_step);
  for_each_warp_chunk<In, kVec, kChunkDepth>(
      static_cast<const In*>(p.g), p.ldg, p.rows, p.cols,
      [&](int64_t row, int64_t col0, float v[8]) {
        int32_t sq_hi = 0, sq_lo = 0;
        if (col0 < p.cols) {
          const float ri = row_inverse(p, row, inv);
          if constexpr (kQ8) {
            store_operand8(p, row, col0,
                           finite ? q8_bytes<true>(p, stream, row, col0, v, ri)
                                  : q8_bytes<false>(p, stream, row, col0, v, ri));
          } else if (finite) {
            bitsplit_store8<kVec, true>(p, stream, row, col0, v, ri, &sq_hi, &sq_lo);
          } else {
            bitsplit_store8<kVec, false>(p, stream, row, col0, v, ri, &sq_hi, &sq_lo);
          }
        } else if (p.operand != nullptr && col0 < p.op_cols) {
          store_operand8(p, row, col0, make_uint2(0u, 0u));
          if (!kQ8) store_operand8(p, p.rows + row, col0, make_uint2(0u, 0u));
        }
        if (!kQ8 && p.row_sumsq != nullptr) {
          add_row_sumsq(p, lane, sq_hi, sq_lo, [&] { return row; });
        }
      });
}

// bitsplit_kernel where nothing has a gap (bitsplit_flat: one inverse scale, rows a multiple of
// 256 long, g, the packed codes and the operand contiguous), on for_each_flat_chunk: the chunk's
// flat index e gives its Philox block (e / 8), packed bytes (e / 2), operand bytes (e; the lo rows
// at numel + e) and, for the row sums, its row (e / 256 / chunks a row, in 32 bits).
template <typename In, bool kQ8>
__global__ void __launch_bounds__(kThreads, kQ8 ? 4 : 3)
    bitsplit_flat_kernel(const BitsplitParams p) {
  const int lane = threadIdx.x & 31;
  const BitsplitInverse scales = bitsplit_scales(p);
  const float inv = scales.inv;
  const bool finite = scales.finite;
  const uint64_t stream = stream_with_step(p.stream, p.device_step);
  using Src = MatrixSrc<In, true>;
  const Src src{static_cast<const In*>(p.g), p.cols};
  const uint64_t numel = static_cast<uint64_t>(p.rows) * static_cast<uint64_t>(p.cols);
  const uint32_t row_chunks = static_cast<uint32_t>(p.cols / kWarpCols);
  for_each_flat_chunk<kChunkDepth>(src, numel, [&](uint64_t e, const typename Src::Buf& b) {
    float v[8];
    b.to_float(v);
    if constexpr (kQ8) {
      *reinterpret_cast<uint2*>(p.operand + e) =
          finite ? q8_bytes_at<true>(p, stream, e >> 3, v, inv)
                 : q8_bytes_at<false>(p, stream, e >> 3, v, inv);
    } else {
      int32_t sq_hi = 0, sq_lo = 0;
      const Split8 sp = finite ? split8<true>(p, stream, e >> 3, v, inv, &sq_hi, &sq_lo)
                               : split8<false>(p, stream, e >> 3, v, inv, &sq_hi, &sq_lo);
      if (p.hi != nullptr) {
        *reinterpret_cast<uint32_t*>(p.hi + (e >> 1)) = sp.ph;
        *reinterpret_cast<uint32_t*>(p.lo + (e >> 1)) = sp.pl;
      }
      if (p.operand != nullptr) {  // hi and lo: codes in [-8, 7]
        *reinterpret_cast<uint2*>(p.operand + e) = operand_bytes8(p.s8, sp.ph, sp.hf);
        *reinterpret_cast<uint2*>(p.operand + numel + e) = operand_bytes8(p.s8, sp.pl, sp.lf);
      }
      if (p.row_sumsq != nullptr) {
        add_row_sumsq(p, lane, sq_hi, sq_lo, [&] {
          return static_cast<uint32_t>(e / kWarpCols) / row_chunks;  // < 2^32 chunks (launcher)
        });
      }
    }
  });
}

// hq_bs's pass with q^T (p.operand_t, the weight gradient's operand, whose reduction runs over
// tokens): tile_to_transposed's tiles, each lane's bytes of q also stored row-major (p.operand, may
// be null) as they are computed. Rows a multiple of 8 long.
template <typename In, bool kVec>
__global__ void __launch_bounds__(kThreads, 4) bitsplit_q8_t_kernel(const BitsplitParams p) {
  static_assert(kThreads == kWarpCols, "tile_to_transposed: a thread per tile column");
  const BitsplitInverse scales = bitsplit_scales(p);
  const float inv = scales.inv;
  const bool finite = scales.finite;
  const uint64_t stream = stream_with_step(p.stream, p.device_step);
  tile_to_transposed<In, kVec>(static_cast<const In*>(p.g), p.ldg, p.rows, p.cols, p.operand_t,
                               p.ldt, p.opt_cols, [&](int64_t row, int64_t col0, const float v[8]) {
                                 uint2 b = make_uint2(0u, 0u);
                                 if (col0 < p.cols) {
                                   const float ri = row_inverse(p, row, inv);
                                   b = finite ? q8_bytes<true>(p, stream, row, col0, v, ri)
                                              : q8_bytes<false>(p, stream, row, col0, v, ri);
                                 }
                                 if (p.operand != nullptr && col0 < p.op_cols) {
                                   store_operand8(p, row, col0, b);
                                 }
                                 return b;
                               });
}

// Any row length: a thread per pair of columns.
template <typename In>
__global__ void __launch_bounds__(kThreads) bitsplit_small_kernel(const BitsplitParams p) {
  const float inv = bitsplit_scales(p).inv;  // the small path keeps the NaN test
  const uint64_t stream = stream_with_step(p.stream, p.device_step);
  const int64_t pairs = (p.op_cols > p.cols ? p.op_cols : p.cols + 1) / 2;
  const int64_t total = p.rows * pairs;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = t / pairs, j = t - row * pairs;
    const In* gr = static_cast<const In*>(p.g) + row * p.ldg;
    SplitValue sc[2] = {{0, 0, 0.0f, 0.0f}, {0, 0, 0.0f, 0.0f}};
    int32_t sq_hi = 0, sq_lo = 0;
    for (int k = 0; k < 2; ++k) {
      const int64_t c = 2 * j + k;
      if (c >= p.cols) continue;
      const uint32_t h = random_u16(p.keys, stream, static_cast<uint64_t>(row * p.cols + c));
      sc[k] = split_value<false>(load_elem(gr + c), row_inverse(p, row, inv), h);
      sq_hi += sc[k].hi * sc[k].hi;
      sq_lo += sc[k].lo * sc[k].lo;
    }
    if (p.hi != nullptr && 2 * j < p.cols) {
      const int64_t pb = row * ((p.cols + 1) / 2) + j;
      p.hi[pb] = pack_int4_pair(sc[0].hi, sc[1].hi);
      p.lo[pb] = pack_int4_pair(sc[0].lo, sc[1].lo);
    }
    if (p.operand != nullptr) {
      for (int k = 0; k < 2; ++k) {
        const int64_t c = 2 * j + k;
        if (c >= p.op_cols) continue;
        if (p.q8) {
          p.operand[row * p.ldop + c] = static_cast<uint8_t>(static_cast<int8_t>(sc[k].q()));
        } else if (p.s8) {
          p.operand[row * p.ldop + c] = static_cast<uint8_t>(static_cast<int8_t>(sc[k].hi));
          p.operand[(p.rows + row) * p.ldop + c] =
              static_cast<uint8_t>(static_cast<int8_t>(sc[k].lo));
        } else {
          p.operand[row * p.ldop + c] = static_cast<uint8_t>(e4m3_of_code(sc[k].hi));
          p.operand[(p.rows + row) * p.ldop + c] = static_cast<uint8_t>(e4m3_of_code(sc[k].lo));
        }
      }
    }
    if (p.row_sumsq != nullptr) {
      if (sq_hi != 0) atomicAdd(p.row_sumsq + row, sq_hi);
      if (sq_lo != 0) atomicAdd(p.row_sumsq + p.rows + row, sq_lo);
    }
  }
}

// ------------------------------------------------------------------------------ LSQ backward
// Fixed grid (a function of the shape only) so that the per-block partial sums, combined in block
// order by the finalize kernel, give the same grad_step on every run.
constexpr int kLsqBwdMaxBlocks = 1024;

struct LsqBwdParams {
  const uint8_t* packed;
  const uint8_t* aux;
  const float* gxhat;
  int64_t ldg;
  void* gx;  // may be null
  bool gx_bf16;
  int64_t ldx, rows, cols;
  double* partial;  // one per block, may be null
};

template <bool kVec8>
__global__ void __launch_bounds__(kThreads) lsq_backward_compact_kernel(const LsqBwdParams p) {
  const int64_t numel = p.rows * p.cols;
  const int64_t prb = (p.cols + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double acc = 0.0;
  if (kVec8) {
    // cols % 8 == 0, all rows contiguous and aligned: 8 elements (4 code bytes, 1 aux byte) a step.
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < numel / 8;
         t += stride) {
      const int64_t e0 = 8 * t;
      const uint32_t codes = *reinterpret_cast<const uint32_t*>(p.packed + e0 / 2);
      const uint32_t bits = p.aux[t];
      float g[8], out[8];
      load8<true>(p.gxhat + e0, g);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int code = static_cast<int>(((codes >> (4 * i)) & 0xF) ^ 0x8) - 8;
        const MaskR m = lsq_compact_decode(code, (bits >> i) & 1u);
        out[i] = m.inside ? g[i] : 0.0f;
        acc += static_cast<double>(g[i]) * static_cast<double>(m.r);
      }
      if (p.gx != nullptr) {
        if (p.gx_bf16) {
          store8<true>(static_cast<BFloat16*>(p.gx) + e0, out);
        } else {
          store8<true>(static_cast<float*>(p.gx) + e0, out);
        }
      }
    }
  } else {
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel;
         e += stride) {
      const int64_t r = e / p.cols, c = e - r * p.cols;
      const uint8_t byte = p.packed[r * prb + c / 2];
      const int code = (c & 1) ? unpack_int4_hi(byte) : unpack_int4_lo(byte);
      const bool bit = (p.aux[e >> 3] >> (e & 7)) & 1u;
      const MaskR m = lsq_compact_decode(code, bit);
      const float g = p.gxhat[r * p.ldg + c];
      if (p.gx != nullptr) {
        const float out = m.inside ? g : 0.0f;
        if (p.gx_bf16) {
          static_cast<BFloat16*>(p.gx)[r * p.ldx + c] = float_to_bf16(out);
        } else {
          static_cast<float*>(p.gx)[r * p.ldx + c] = out;
        }
      }
      acc += static_cast<double>(g) * static_cast<double>(m.r);
    }
  }
  if (p.partial == nullptr) return;
  block_sum_to<kThreads>(acc, p.partial + blockIdx.x);
}

// ------------------------------------------------------------------------------ codes -> operands
struct ToOperandParams {
  const uint8_t* codes;  // packed or int8
  bool packed;
  int64_t ldc, rows, cols;  // rows: operand positions (code rows, or row_map's length)
  uint8_t* out;
  int64_t ldo, out_cols;
  bool s8;                      // INT8 operand; else FP8 e4m3
  const int8_t* row_exp;        // INT8 only, optional: code row r scaled by 2^row_exp[r] (-1: zero)
  unsigned long long* invalid;  // optional: counts rows with an exponent out of range
  const int32_t* row_map;       // optional: position r takes code row row_map[r] mod src_rows,
  int64_t src_rows, map_range;  // scaled by 2^row_exp[row_map[r]]; -1 a zero row
};

// The INT8 byte of code * 2^e: e = -1 gives 0, e in [0, kLssMaxExponent] the exact value (|code *
// 2^e| <= 128, the product -8 * 16 = -128 included); anything else 0 (counted by the caller).
__device__ __forceinline__ bool exponent_ok(int e) { return e >= -1 && e <= kLssMaxExponent; }
__device__ __forceinline__ uint8_t s8_scaled(int code, int e) {
  return e >= 0 && exponent_ok(e) ? static_cast<uint8_t>(static_cast<int8_t>(code * (1 << e)))
                                  : uint8_t{0};
}

// Where operand position r comes from: its code row (-1: a zero row) and exponent. An out-of-range
// map value or exponent gives a zero row, counted once per position (where `first`).
struct Source {
  int64_t row;
  int e;
};
__device__ __forceinline__ Source source_of(const ToOperandParams& p, int64_t r, bool first) {
  int64_t v = r;
  if (p.row_map != nullptr) {
    v = p.row_map[r];
    if (v < 0 || v >= p.map_range) {
      if (v >= 0 || v < -1) {
        if (first && p.invalid != nullptr) atomicAdd(p.invalid, 1ull);
      }
      return Source{-1, -1};
    }
  }
  const int e = p.row_exp != nullptr ? p.row_exp[v] : 0;
  if (!exponent_ok(e)) {
    if (first && p.invalid != nullptr) atomicAdd(p.invalid, 1ull);
    return Source{-1, -1};
  }
  return Source{v < p.src_rows ? v : v % p.src_rows, e};
}

__device__ __forceinline__ int load_code(const ToOperandParams& p, int64_t r, int64_t c) {
  if (p.packed) {
    const uint8_t byte = p.codes[r * ((p.cols + 1) / 2) + c / 2];
    return (c & 1) ? unpack_int4_hi(byte) : unpack_int4_lo(byte);
  }
  return static_cast<int>(reinterpret_cast<const int8_t*>(p.codes)[r * p.ldc + c]);
}

// The operand byte of position r, column c (< cols).
__device__ __forceinline__ uint8_t operand_of(const ToOperandParams& p, int64_t r, int64_t c) {
  const Source src = source_of(p, r, c == 0);
  if (src.row < 0) return uint8_t{0};
  const int code = load_code(p, src.row, c);
  if (p.s8) return s8_scaled(code, src.e);
  if (p.packed) return static_cast<uint8_t>(e4m3_of_code(code));
  return static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(static_cast<float>(code), __NV_SATFINITE, __NV_E4M3));
}

// out[r, c] = code[r, c] (c < cols), 0 in the padding.
__global__ void __launch_bounds__(kThreads) codes_to_operand_kernel(const ToOperandParams p) {
  const int64_t total = p.rows * p.out_cols;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / p.out_cols, c = t - r * p.out_cols;
    p.out[r * p.ldo + c] = c < p.cols ? operand_of(p, r, c) : uint8_t{0};
  }
}

// out (cols x padded rows) = codes^T through a 64 x 64 shared tile: reads along code rows, writes
// along output rows, both coalesced.
constexpr int kTile = 64;
__global__ void __launch_bounds__(kThreads) codes_to_operand_t_kernel(const ToOperandParams p) {
  __shared__ uint8_t tile[kTile][kTile + 4];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;  // code rows = output columns
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;  // code columns = output rows
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
    const int rr = i / kTile, cc = i % kTile;
    const int64_t r = r0 + rr, c = c0 + cc;
    tile[rr][cc] = (r < p.rows && c < p.cols) ? operand_of(p, r, c) : uint8_t{0};
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTile * kTile; i += blockDim.x) {
    const int oc = i % kTile, orow = i / kTile;
    const int64_t out_r = c0 + orow, out_c = r0 + oc;
    if (out_r < p.cols && out_c < p.out_cols) p.out[out_r * p.ldo + out_c] = tile[oc][orow];
  }
}

// The transposed INT8 operand of packed codes with no row map or exponents and rows a multiple of
// 64 codes long (hq_bs's X^T for the weight gradient's product): a block per tile of 128 positions
// (code rows) x 64 code columns. Each thread loads 4 bytes (8 codes) of 4 consecutive positions,
// sign-extends the nibbles to bytes, transposes the 4 x 8 bytes with byte permutes into 8 words
// (a column's 4 positions each) and stores them into a shared tile of 64 output rows x 128 bytes
// whose 16-byte chunks are XOR-swizzled by the column's group of 8, so that neither the 4-byte
// stores nor the 16-byte loads conflict; each thread then writes two 16-byte chunks, a warp 4
// output rows' 128 contiguous bytes (4 whole sectors each).
constexpr int kT8Pos = 128, kT8Cols = 64;

// The 4-bit two's-complement values in the low nibbles of v's bytes (high nibbles zero), as int8
// bytes: (n ^ 8) - 8 a byte, with 0x78 added and bit 7 flipped so that no byte borrows.
__device__ __forceinline__ uint32_t sext_nibbles4(uint32_t v) {
  return ((v ^ 0x08080808u) + 0x78787878u) ^ 0x80808080u;
}

__global__ void __launch_bounds__(kThreads) packed_to_s8_t_kernel(const ToOperandParams p) {
  __shared__ __align__(16) uint32_t tile[kT8Cols][kT8Pos / 4];  // [column][word of 4 positions]
  const int t = static_cast<int>(threadIdx.x);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kT8Pos;   // positions
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kT8Cols;  // code columns
  const int cb = t & 7;  // codes 8 cb .. 8 cb + 7 of the tile's columns
  const int g = t >> 3;  // positions 4 g .. 4 g + 3 of the tile
  const int64_t row_bytes = p.cols / 2;
  uint32_t lo[4], hi[4];  // position i's codes 0-3 and 4-7 as int8 bytes
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + 4 * g + i;
    const uint32_t x =
        r < p.rows ? *reinterpret_cast<const uint32_t*>(p.codes + r * row_bytes + c0 / 2 + 4 * cb)
                   : 0u;  // past the last position: the operand's zero padding
    const uint32_t even = sext_nibbles4(x & 0x0F0F0F0Fu);        // codes 0, 2, 4, 6
    const uint32_t odd = sext_nibbles4((x >> 4) & 0x0F0F0F0Fu);  // codes 1, 3, 5, 7
    lo[i] = __byte_perm(even, odd, 0x5140u);
    hi[i] = __byte_perm(even, odd, 0x7362u);
  }
  // 4 x 4 byte transposes: word j = column j's bytes of positions 0..3.
  uint32_t col[8];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t* w = h == 0 ? lo : hi;
    const uint32_t ab0 = __byte_perm(w[0], w[1], 0x5140u), ab1 = __byte_perm(w[0], w[1], 0x7362u);
    const uint32_t cd0 = __byte_perm(w[2], w[3], 0x5140u), cd1 = __byte_perm(w[2], w[3], 0x7362u);
    col[4 * h + 0] = __byte_perm(ab0, cd0, 0x5410u);
    col[4 * h + 1] = __byte_perm(ab0, cd0, 0x7632u);
    col[4 * h + 2] = __byte_perm(ab1, cd1, 0x5410u);
    col[4 * h + 3] = __byte_perm(ab1, cd1, 0x7632u);
  }
  // Word g of column c sits in 16-byte chunk (g / 4) ^ (c / 8) of the column's row.
#pragma unroll
  for (int j = 0; j < 8; ++j) tile[8 * cb + j][(((g >> 2) ^ cb) << 2) | (g & 3)] = col[j];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int idx = t + k * kThreads;
    const int oc = idx >> 3, q = idx & 7;  // output row c0 + oc, its chunk q (16 positions)
    const int64_t out_c = r0 + 16 * q;
    if (out_c >= p.out_cols) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(&tile[oc][(q ^ (oc >> 3)) << 2]);
    *reinterpret_cast<uint4*>(p.out + (c0 + oc) * p.ldo + out_c) = v;
  }
}

// The transposed operand of codes whose rows are 16-code multiples (cols % 16 == 0; packed: each
// row's bytes 8-byte aligned; int8 (kPacked false): 16-byte aligned, ldc % 16 == 0): a 64 x 64 tile
// per block, each thread reading 16 codes (8 packed bytes or 16 int8) of a row and writing 16
// operand bytes (one uint4) of an output row, through a shared tile (pitch 68: 4-byte rows, 2-way
// bank conflicts at most). blockIdx.x: tiles of code rows (= output columns, padding included),
// blockIdx.y: tiles of code columns (= output rows).
template <bool kPacked>
__global__ void __launch_bounds__(kThreads) codes_to_operand_t16_kernel(const ToOperandParams p) {
  constexpr int kPitch = kTile + 4;
  __shared__ __align__(16) uint8_t tile[kTile * kPitch];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;  // positions
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTile;  // code columns
  const int t = threadIdx.x;
  {
    const int rr = t >> 2, q = t & 3;
    const int64_t r = r0 + rr, c = c0 + 16 * q;
    // codes 0 past the end: the operand's zero padding
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    int e = 0;
    if (r < p.rows && c < p.cols) {
      const Source src = source_of(p, r, c == 0);
      if (src.row >= 0) {
        if (kPacked) {
          const uint2 h = *reinterpret_cast<const uint2*>(p.codes + src.row * (p.cols / 2) + c / 2);
          w.x = h.x;
          w.y = h.y;
        } else {
          w = *reinterpret_cast<const uint4*>(p.codes + src.row * p.ldc + c);
        }
      }
      e = src.e;
    }
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      int code;
      if (kPacked) {
        code = unpack_int4_lo(static_cast<uint8_t>(words[k >> 3] >> (4 * (k & 7))));
      } else {
        code = static_cast<int8_t>(static_cast<uint8_t>(words[k >> 2] >> (8 * (k & 3))));
      }
      uint8_t byte;
      if (p.s8) {
        byte = s8_scaled(code, e);
      } else if (kPacked) {
        byte = static_cast<uint8_t>(e4m3_of_code(code));
      } else {
        byte = static_cast<uint8_t>(
            __nv_cvt_float_to_fp8(static_cast<float>(code), __NV_SATFINITE, __NV_E4M3));
      }
      tile[(16 * q + k) * kPitch + rr] = byte;
    }
  }
  __syncthreads();
  const int oc = t >> 2, sgm = t & 3;
  const int64_t out_r = c0 + oc, out_c = r0 + 16 * sgm;
  if (out_r < p.cols && out_c < p.out_cols) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(tile + oc * kPitch + 16 * sgm);
    *reinterpret_cast<uint4*>(p.out + out_r * p.ldo + out_c) =
        make_uint4(src[0], src[1], src[2], src[3]);
  }
}

// out row j = in row map[j] (-1 or out of range: zeros), 16 bytes per thread (widths and strides
// of GEMM operands are multiples of 16).
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const uint8_t* __restrict__ in, int64_t ldi, int64_t in_rows,
                       const int32_t* __restrict__ map, uint8_t* __restrict__ out, int64_t ldo,
                       int64_t rows, int64_t width, unsigned long long* invalid) {
  const int64_t vecs = width / 16, total = rows * vecs;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = t / vecs, q = t - j * vecs;
    const int64_t v = map[j];
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (v >= 0 && v < in_rows) {
      w = *reinterpret_cast<const uint4*>(in + v * ldi + 16 * q);
    } else if (v != -1 && q == 0 && invalid != nullptr) {
      atomicAdd(invalid, 1ull);
    }
    *reinterpret_cast<uint4*>(out + j * ldo + 16 * q) = w;
  }
}

}  // namespace
}  // namespace cuda_detail

namespace cuda_detail {
void launch_fold_exponents(const int8_t* k, int64_t n, int max_exp, int8_t* out,
                           cudaStream_t stream) {
  if (n <= 0) return;
  fold_exponents_kernel<<<grid_blocks(n, kThreads, int64_t{1} << 12), kThreads, 0, stream>>>(
      k, n, max_exp, out);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}
}  // namespace cuda_detail

void absmax_bits_cuda(const TensorView& g, TensorView amax_bits, void* stream) {
  using namespace cuda_detail;
  check_dtype(g, "g", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(g, "g");
  check_dtype(amax_bits, "amax_bits", {DType::kInt32});
  check_scalar(amax_bits, "amax_bits");
  check_not_null(amax_bits, "amax_bits");
  INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(amax_bits.data, 0, sizeof(uint32_t), as_stream(stream)));
  launch_absmax(g, amax_bits.ptr<uint32_t>(), as_stream(stream));
}

namespace cuda_detail {
namespace {
// The bit split's common part: g and scale checked, the params' input, random and scale fields.
BitsplitParams bitsplit_params(const TensorView& g, const RandomKey& rng, const TensorView& scale) {
  check_dtype(g, "g", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(g, "g");
  check_row_length(g, "g");
  check_device_scalar(scale, "scale", DType::kFloat32);
  BitsplitParams p{};
  p.g = g.data;
  p.ldg = row_stride(g);
  p.rows = g.shape[0];
  p.cols = g.shape[1];
  p.keys = philox_keys(rng.seed);
  p.stream = rng.stream;
  p.device_step = rng.device_step;
  p.scale = scale.ptr<float>();
  return p;
}

// grad_scale=row: each row's exponent into row_exp and its inverse scale into row_inv (a device
// buffer of rows floats) from the rows' maxima of the reduction pass; p.row_inv then points at it.
void launch_row_scales(BitsplitParams& p, const uint32_t* row_max, const TensorView& row_exp,
                       DeviceBuffer& row_inv, cudaStream_t s) {
  if (p.rows == 0) return;
  bitsplit_row_scales_kernel<<<grid_blocks(p.rows, kThreads, int64_t{1} << 16), kThreads, 0, s>>>(
      row_max, p.rows, p.amax_bits, row_exp.ptr<int8_t>(), row_inv.as<float>());
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  p.row_inv = row_inv.as<float>();
}

// The reduction pass's temporaries (alive until the quantize pass that reads them is enqueued):
// max |g| (bits) in maxima's first word and, with grad_scale=row, the rows' maxima in the words
// after it (one buffer, zeroed by one memset), and the rows' inverse scales.
struct ReduceBuffers {
  DeviceBuffer maxima, row_inv;
  ReduceBuffers(const CudaAllocator& alloc, int64_t rows, bool by_row, void* stream)
      : maxima(alloc, sizeof(uint32_t) * static_cast<size_t>(1 + (by_row ? rows : 0)), stream),
        row_inv(alloc, by_row ? static_cast<size_t>(rows) * 4 : 0, stream) {}
  uint32_t* amax() { return maxima.as<uint32_t>(); }
  uint32_t* row_max() { return maxima.as<uint32_t>() + 1; }
};

// The reduction pass (after every check): max |g| into b.amax() (p.amax_bits), with g's column sums
// when column_sums is given; with row_exp (grad_scale=row) each row's max |g| from the same read,
// then each row's exponent and inverse scale (p.row_inv).
void bitsplit_reduce(BitsplitParams& p, const TensorView& g, TensorView column_sums,
                     const TensorView& row_exp, ReduceBuffers& b, const CudaAllocator& alloc,
                     cudaStream_t s, DeferredSums* defer) {
  const bool by_row = row_exp.data != nullptr;
  uint32_t* row_max = by_row && p.rows > 0 ? b.row_max() : nullptr;
  INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(b.maxima.get(), 0, b.maxima.bytes(), s));
  if (column_sums.data != nullptr) {
    launch_absmax_column_sums(g, b.amax(), column_sums, alloc, s, row_max, defer);
  } else {
    launch_absmax(g, b.amax(), s, row_max);
  }
  p.amax_bits = b.amax();
  if (by_row) launch_row_scales(p, row_max, row_exp, b.row_inv, s);
}

void check_column_sums(const TensorView& column_sums, int64_t cols) {
  if (column_sums.data == nullptr) return;
  check_dtype(column_sums, "column_sums", {DType::kFloat32, DType::kBFloat16});
  check_vector(column_sums, "column_sums", cols);
}

// The quantize pass of rows a multiple of 8 long: warps over 256-column chunks (device_common.cuh).
template <bool kQ8>
void launch_bitsplit_chunks(const BitsplitParams& p, bool vec, bool bf16, cudaStream_t s) {
  const int64_t warps = p.rows * ((p.cols + kWarpCols - 1) / kWarpCols);
  const int64_t needed = (warps + kThreads / 32 - 1) / (kThreads / 32);
  auto launch = [&](auto kernel) {
    kernel<<<persistent_blocks(kernel, kThreads, needed), kThreads, 0, s>>>(p);
  };
  // bitsplit_flat_kernel's conditions: one inverse scale, whole chunks, g and the operand rows back
  // to back (the operand's 2 rows x cols, or q's rows), chunk indices in 32 bits for the row sums.
  const bool flat =
      vec && p.row_inv == nullptr && p.cols % kWarpCols == 0 && (p.rows == 1 || p.ldg == p.cols) &&
      (p.operand == nullptr || (p.op_cols == p.cols && p.ldop == p.cols)) &&
      (!kQ8 || p.operand != nullptr) && p.rows * (p.cols / kWarpCols) <= int64_t{0xFFFFFFFF};
  if (flat) {
    bf16 ? launch(bitsplit_flat_kernel<BFloat16, kQ8>) : launch(bitsplit_flat_kernel<float, kQ8>);
    return;
  }
  if (bf16) {
    vec ? launch(bitsplit_kernel<BFloat16, true, kQ8>)
        : launch(bitsplit_kernel<BFloat16, false, kQ8>);
  } else {
    vec ? launch(bitsplit_kernel<float, true, kQ8>) : launch(bitsplit_kernel<float, false, kQ8>);
  }
}

void launch_bitsplit_small(const BitsplitParams& p, bool bf16, cudaStream_t s) {
  const int64_t pairs = (p.op_cols > p.cols ? p.op_cols : p.cols + 1) / 2;
  const int grid = grid_blocks(p.rows * pairs, kThreads);
  if (bf16) {
    bitsplit_small_kernel<BFloat16><<<grid, kThreads, 0, s>>>(p);
  } else {
    bitsplit_small_kernel<float><<<grid, kThreads, 0, s>>>(p);
  }
}

void check_row_exp(const TensorView& row_exp, int64_t rows) {
  if (row_exp.data == nullptr) return;
  check_dtype(row_exp, "row_exp", {DType::kInt8});
  check_vector(row_exp, "row_exp", rows);
}

bool bitsplit_vec(const BitsplitParams& p, bool bf16) {
  return aligned(p.g, bf16 ? 16 : 32) && (p.rows == 1 || p.ldg % 8 == 0) &&
         (p.hi == nullptr || (aligned(p.hi, 4) && aligned(p.lo, 4)));
}
}  // namespace
}  // namespace cuda_detail

void cuda_detail::quantize_bitsplit(const TensorView& g, const RandomKey& rng, TensorView operand,
                                    TensorView hi, TensorView lo, TensorView row_sumsq,
                                    TensorView scale, TensorView column_sums,
                                    const CudaAllocator& alloc, void* stream, TensorView row_exp,
                                    DeferredSums* defer) {
  BitsplitParams p = bitsplit_params(g, rng, scale);
  const int64_t rows = p.rows, cols = p.cols;
  if (operand.data != nullptr) {
    check_dtype(operand, "operand", {DType::kFloat8E4M3, DType::kInt8});
    check_gemm_operand(operand, "operand", operand.dtype);
    if (operand.shape[0] != 2 * rows) {
      throw_error(
          ErrorKind::kValue,
          "operand: expected the 2N = " + std::to_string(2 * rows) +
              " stacked hi and lo rows, got " + std::to_string(operand.shape[0]) +
              (operand.dtype == DType::kInt8
                   ? " (one INT8 row of q = 16 hi + lo per token: quantize_bitsplit_q8_cuda)"
                   : ""));
    }
    check_shape(operand, "operand", 2 * rows, fp8_padded_cols(cols));
    p.s8 = operand.dtype == DType::kInt8;
    p.operand = operand.ptr<uint8_t>();
    p.ldop = row_stride(operand);
    p.op_cols = operand.shape[1];
  }
  if ((hi.data == nullptr) != (lo.data == nullptr)) {
    throw_error(ErrorKind::kValue, "hi: hi and lo must be given together");
  }
  if (hi.data != nullptr) {
    for (const TensorView* t : {&hi, &lo}) {
      const char* name = t == &hi ? "hi" : "lo";
      check_dtype(*t, name, {DType::kInt4Packed});
      check_device_matrix(*t, name);
      check_shape(*t, name, rows, cols);
    }
    p.hi = hi.ptr<uint8_t>();
    p.lo = lo.ptr<uint8_t>();
  }
  if (row_sumsq.data != nullptr) {
    check_dtype(row_sumsq, "row_sumsq", {DType::kInt32});
    check_vector(row_sumsq, "row_sumsq", 2 * rows);
    p.row_sumsq = row_sumsq.ptr<int32_t>();
  }
  check_column_sums(column_sums, cols);
  check_row_exp(row_exp, rows);
  const cudaStream_t s = as_stream(stream);
  if (p.row_sumsq != nullptr) {
    INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(p.row_sumsq, 0, sizeof(int32_t) * 2 * rows, s));
  }
  ReduceBuffers reduce(alloc, rows, row_exp.data != nullptr, stream);
  bitsplit_reduce(p, g, column_sums, row_exp, reduce, alloc, s, defer);
  const bool bf16 = g.dtype == DType::kBFloat16;
  if (cols % kLaneElems == 0 && cols > 0) {
    launch_bitsplit_chunks<false>(p, bitsplit_vec(p, bf16), bf16, s);
  } else {
    launch_bitsplit_small(p, bf16, s);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void quantize_bitsplit_cuda(const TensorView& g, const RandomKey& rng, TensorView operand,
                            TensorView hi, TensorView lo, TensorView row_sumsq, TensorView scale,
                            TensorView column_sums, const CudaAllocator& alloc, void* stream,
                            TensorView row_exp) {
  cuda_detail::quantize_bitsplit(g, rng, operand, hi, lo, row_sumsq, scale, column_sums, alloc,
                                 stream, row_exp, nullptr);
}

void cuda_detail::quantize_bitsplit_q8(const TensorView& g, const RandomKey& rng,
                                       TensorView operand, TensorView operand_t, TensorView scale,
                                       TensorView column_sums, const CudaAllocator& alloc,
                                       void* stream, TensorView row_exp, DeferredSums* defer) {
  BitsplitParams p = bitsplit_params(g, rng, scale);
  const int64_t rows = p.rows, cols = p.cols;
  p.q8 = true;
  check_row_exp(row_exp, rows);
  if (operand.data != nullptr) {
    check_codes_operand(operand, "operand", rows, cols, {DType::kInt8});
    p.operand = operand.ptr<uint8_t>();
    p.ldop = row_stride(operand);
    p.op_cols = operand.shape[1];
  }
  if (operand_t.data != nullptr) {
    check_codes_operand(operand_t, "operand_t", cols, rows, {DType::kInt8});
    p.operand_t = operand_t.ptr<uint8_t>();
    p.ldt = row_stride(operand_t);
    p.opt_cols = operand_t.shape[1];
  }
  if (p.operand == nullptr && p.operand_t == nullptr && rows * cols > 0) {
    throw_error(ErrorKind::kValue,
                "operand: expected operand, operand_t or both (the scale and column sums alone: "
                "quantize_bitsplit_cuda without an operand)");
  }
  check_column_sums(column_sums, cols);
  const cudaStream_t s = as_stream(stream);
  ReduceBuffers reduce(alloc, rows, row_exp.data != nullptr, stream);
  bitsplit_reduce(p, g, column_sums, row_exp, reduce, alloc, s, defer);
  const bool bf16 = g.dtype == DType::kBFloat16;
  const bool chunks = cols % kLaneElems == 0 && cols > 0;
  if (p.operand_t != nullptr && chunks && tiles_fit(rows)) {
    const dim3 grid = tile_grid(rows, cols);
    const bool vec = bitsplit_vec(p, bf16);
    if (bf16) {
      vec ? bitsplit_q8_t_kernel<BFloat16, true><<<grid, kThreads, 0, s>>>(p)
          : bitsplit_q8_t_kernel<BFloat16, false><<<grid, kThreads, 0, s>>>(p);
    } else {
      vec ? bitsplit_q8_t_kernel<float, true><<<grid, kThreads, 0, s>>>(p)
          : bitsplit_q8_t_kernel<float, false><<<grid, kThreads, 0, s>>>(p);
    }
    INT4TRAIN_CUDA_LAUNCH_CHECK();
    return;
  }
  // The rows of q (into a temporary where only q^T is asked for; the kernels write the scale even
  // for no rows), then q^T from them.
  DeviceBuffer tmp(
      alloc, static_cast<size_t>(p.operand == nullptr ? rows * fp8_padded_cols(cols) : 0), stream);
  TensorView q = operand;
  if (p.operand == nullptr) {
    q = make_matrix(tmp.get(), DType::kInt8, rows, fp8_padded_cols(cols));
    p.operand = tmp.as<uint8_t>();
    p.ldop = p.op_cols = q.shape[1];
  }
  if (chunks) {
    launch_bitsplit_chunks<true>(p, bitsplit_vec(p, bf16), bf16, s);
  } else {
    launch_bitsplit_small(p, bf16, s);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  if (p.operand_t != nullptr) {
    TensorView real = q;  // the real columns
    real.shape[1] = cols;
    codes_to_s8_cuda(real, TensorView{}, true, operand_t, TensorView{}, stream);
  }
}

void quantize_bitsplit_q8_cuda(const TensorView& g, const RandomKey& rng, TensorView operand,
                               TensorView operand_t, TensorView scale, TensorView column_sums,
                               const CudaAllocator& alloc, void* stream, TensorView row_exp) {
  cuda_detail::quantize_bitsplit_q8(g, rng, operand, operand_t, scale, column_sums, alloc, stream,
                                    row_exp, nullptr);
}

void lsq_backward_compact_cuda(const TensorView& packed_codes, const TensorView& aux,
                               const TensorView& grad_xhat, TensorView grad_x, TensorView grad_step,
                               const CudaAllocator& alloc, void* stream) {
  using namespace cuda_detail;
  check_dtype(packed_codes, "packed_codes", {DType::kInt4Packed});
  check_device_matrix(packed_codes, "packed_codes");
  const int64_t rows = packed_codes.shape[0], cols = packed_codes.shape[1];
  check_dtype(aux, "aux", {DType::kUInt8});
  check_vector(aux, "aux", compact_aux_bytes(rows, cols));
  check_dtype(grad_xhat, "grad_xhat", {DType::kFloat32});
  check_device_matrix(grad_xhat, "grad_xhat");
  check_shape(grad_xhat, "grad_xhat", rows, cols);
  const bool want_gx = grad_x.data != nullptr, want_gs = grad_step.data != nullptr;
  if (want_gx) {
    check_dtype(grad_x, "grad_x", {DType::kFloat32, DType::kBFloat16});
    check_device_matrix(grad_x, "grad_x");
    check_shape(grad_x, "grad_x", rows, cols);
    const bool same = grad_x.dtype == DType::kFloat32 && grad_x.data == grad_xhat.data &&
                      (rows <= 1 || grad_x.strides[0] == grad_xhat.strides[0]);
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
  const int grid = grid_blocks(cols % 8 == 0 ? numel / 8 : numel, kThreads, kLsqBwdMaxBlocks);
  DeviceBuffer partial(alloc, want_gs ? sizeof(double) * grid : 0, stream);
  if (numel > 0) {
    LsqBwdParams p{packed_codes.ptr<const uint8_t>(),
                   aux.ptr<const uint8_t>(),
                   grad_xhat.ptr<const float>(),
                   row_stride(grad_xhat),
                   want_gx ? grad_x.data : nullptr,
                   grad_x.dtype == DType::kBFloat16,
                   want_gx ? row_stride(grad_x) : 0,
                   rows,
                   cols,
                   want_gs ? partial.as<double>() : nullptr};
    const bool vec = cols % 8 == 0 &&
                     (rows == 1 || (p.ldg == cols && (!want_gx || p.ldx == cols))) &&
                     aligned(p.gxhat, 32) && aligned(p.packed, 4) &&
                     (!want_gx || aligned(p.gx, p.gx_bf16 ? 16 : 32));
    if (vec) {
      lsq_backward_compact_kernel<true><<<grid, kThreads, 0, s>>>(p);
    } else {
      lsq_backward_compact_kernel<false><<<grid, kThreads, 0, s>>>(p);
    }
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

namespace cuda_detail {
namespace {
// Where an operand's rows come from: every code row in order, or a map (row_map positions, code row
// = map value mod codes.rows, exponent row_exp[map value]).
struct RowMap {
  bool mapped = false;
  const int32_t* map = nullptr;
  int64_t len = 0, range = 0;
};
void to_operand(const TensorView& codes, bool s8, const int8_t* row_exp, bool transpose,
                TensorView operand, unsigned long long* invalid, void* stream,
                const RowMap& rm = RowMap{});
}  // namespace
}  // namespace cuda_detail

void codes_to_fp8_cuda(const TensorView& codes, bool transpose, TensorView operand, void* stream) {
  check_dtype(codes, "codes", {DType::kInt4Packed, DType::kInt8});
  cuda_detail::check_gemm_operand(operand, "operand", DType::kFloat8E4M3);
  cuda_detail::to_operand(codes, false, nullptr, transpose, operand, nullptr, stream);
}

void codes_to_s8_cuda(const TensorView& codes, const TensorView& row_exponents, bool transpose,
                      TensorView operand, TensorView invalid, void* stream) {
  check_dtype(codes, "codes", {DType::kInt4Packed, DType::kInt8});
  cuda_detail::check_gemm_operand(operand, "operand", DType::kInt8);
  const bool weighted = row_exponents.data != nullptr || row_exponents.ndim > 0;
  if (weighted && codes.dtype == DType::kInt8) {
    throw_error(ErrorKind::kValue,
                "row_exponents: int8 codes are copied as they are, expected no exponents (an empty "
                "view)");
  }
  if (weighted) {
    check_dtype(row_exponents, "row_exponents", {DType::kInt8});
    if (row_exponents.ndim != 1 || !row_exponents.is_contiguous() ||
        (codes.ndim == 2 && row_exponents.numel() != codes.shape[0])) {
      throw_error(ErrorKind::kValue,
                  "row_exponents: expected a contiguous int8 device vector of one exponent per "
                  "code row");
    }
    if (row_exponents.numel() > 0) check_not_null(row_exponents, "row_exponents");
  }
  if (invalid.data != nullptr) cuda_detail::check_device_scalar(invalid, "invalid", DType::kInt64);
  cuda_detail::to_operand(
      codes, true,
      weighted && row_exponents.numel() > 0 ? row_exponents.ptr<const int8_t>() : nullptr,
      transpose, operand, static_cast<unsigned long long*>(invalid.data), stream);
}

namespace {
int64_t check_row_map(const TensorView& row_map) {
  check_dtype(row_map, "row_map", {DType::kInt32});
  if (row_map.ndim != 1 || !row_map.is_contiguous()) {
    throw_error(ErrorKind::kValue, "row_map: expected a contiguous int32 device vector");
  }
  if (row_map.numel() > 0) check_not_null(row_map, "row_map");
  return row_map.numel();
}
}  // namespace

void gather_codes_to_s8_cuda(const TensorView& codes, const TensorView& row_map,
                             const TensorView& map_exponents, TensorView operand,
                             TensorView invalid, void* stream) {
  check_dtype(codes, "codes", {DType::kInt4Packed});
  cuda_detail::check_device_matrix(codes, "codes");
  cuda_detail::check_gemm_operand(operand, "operand", DType::kInt8);
  const int64_t m = check_row_map(row_map);
  check_dtype(map_exponents, "map_exponents", {DType::kInt8});
  if (map_exponents.ndim != 1 || !map_exponents.is_contiguous()) {
    throw_error(ErrorKind::kValue, "map_exponents: expected a contiguous int8 device vector");
  }
  if (map_exponents.numel() > 0) check_not_null(map_exponents, "map_exponents");
  if (codes.shape[0] == 0 && map_exponents.numel() > 0) {
    throw_error(ErrorKind::kValue, "codes: expected code rows for the map's values, got none");
  }
  if (invalid.data != nullptr) cuda_detail::check_device_scalar(invalid, "invalid", DType::kInt64);
  cuda_detail::to_operand(codes, true,
                          map_exponents.numel() > 0 ? map_exponents.ptr<const int8_t>() : nullptr,
                          true, operand, static_cast<unsigned long long*>(invalid.data), stream,
                          cuda_detail::RowMap{true, m > 0 ? row_map.ptr<const int32_t>() : nullptr,
                                              m, map_exponents.numel()});
}

void gather_operand_rows_cuda(const TensorView& operand, const TensorView& row_map, TensorView out,
                              TensorView invalid, void* stream) {
  using namespace cuda_detail;
  check_dtype(operand, "operand", {DType::kFloat8E4M3, DType::kInt8});
  check_gemm_operand(operand, "operand", operand.dtype);
  check_gemm_operand(out, "out", operand.dtype);
  const int64_t m = check_row_map(row_map);
  check_shape(out, "out", m, operand.shape[1]);
  if (invalid.data != nullptr) check_device_scalar(invalid, "invalid", DType::kInt64);
  const int64_t width = operand.shape[1];
  if (m == 0 || width == 0) return;
  gather_rows_kernel<<<grid_blocks(m * (width / 16), kThreads), kThreads, 0, as_stream(stream)>>>(
      operand.ptr<const uint8_t>(), row_stride(operand), operand.shape[0],
      row_map.ptr<const int32_t>(), out.ptr<uint8_t>(), row_stride(out), m, width,
      static_cast<unsigned long long*>(invalid.data));
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

namespace cuda_detail {
namespace {
void to_operand(const TensorView& codes, bool s8, const int8_t* row_exp, bool transpose,
                TensorView operand, unsigned long long* invalid, void* stream, const RowMap& rm) {
  check_device_matrix(codes, "codes");
  const int64_t src_rows = codes.shape[0], cols = codes.shape[1];
  const int64_t rows = rm.mapped ? rm.len : src_rows;  // operand positions
  const int64_t out_rows = transpose ? cols : rows, out_k = transpose ? rows : cols;
  check_shape(operand, "operand", out_rows, fp8_padded_cols(out_k));
  ToOperandParams p{codes.ptr<const uint8_t>(),
                    codes.dtype == DType::kInt4Packed,
                    codes.dtype == DType::kInt8 ? row_stride(codes) : 0,
                    rows,
                    cols,
                    operand.ptr<uint8_t>(),
                    row_stride(operand),
                    operand.shape[1],
                    s8,
                    row_exp,
                    invalid,
                    rm.map,
                    src_rows,
                    rm.range};
  if (out_rows == 0 || operand.shape[1] == 0) return;
  const cudaStream_t s = as_stream(stream);
  if (!transpose) {
    codes_to_operand_kernel<<<grid_blocks(rows * p.out_cols, kThreads), kThreads, 0, s>>>(p);
  } else if (p.packed && s8 && row_exp == nullptr && !rm.mapped && cols % kT8Cols == 0 &&
             cols / kT8Cols <= 65535 && aligned(p.codes, 4) && aligned(p.out, 16) &&
             p.ldo % 16 == 0) {
    const dim3 grid(static_cast<unsigned>((p.out_cols + kT8Pos - 1) / kT8Pos),
                    static_cast<unsigned>(cols / kT8Cols));
    packed_to_s8_t_kernel<<<grid, kThreads, 0, s>>>(p);
  } else if (cols % 16 == 0 && (cols + kTile - 1) / kTile <= 65535 &&
             (p.packed ? aligned(p.codes, 8)
                       : aligned(p.codes, 16) && (rows <= 1 || p.ldc % 16 == 0))) {
    const dim3 grid(static_cast<unsigned>((p.out_cols + kTile - 1) / kTile),
                    static_cast<unsigned>((cols + kTile - 1) / kTile));
    p.packed ? codes_to_operand_t16_kernel<true><<<grid, kThreads, 0, s>>>(p)
             : codes_to_operand_t16_kernel<false><<<grid, kThreads, 0, s>>>(p);
  } else {
    const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile),
                    static_cast<unsigned>((p.out_cols + kTile - 1) / kTile));
    codes_to_operand_t_kernel<<<grid, kThreads, 0, s>>>(p);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda_detail

}  // namespace int4train
