// int4train CUDA path: the forward's one pass over X (or W): block Hadamard transform + LSQ INT4
// quantization, writing the FP8 GEMM operand, the packed codes and the compact aux bits of
// quantize.h and counting non-finite values on the device; and the plain block Hadamard transform
// (the backward's back-rotation). Both reproduce the CPU core bit for bit.
#include <cfloat>
#include <cmath>
#include <string>

#include "cuda_common.h"
#include "device_common.cuh"
#include "int4train/cuda.h"
#include "int4train/hadamard.h"
#include "int4train/int4.h"
#include "int4train/numeric.h"
#include "int4train/philox.h"
#include "int4train/quantize.h"

namespace int4train {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;  // 8 warps a block

struct LsqParams {
  const void* x;
  int64_t ldx, rows, cols;
  const float* step;
  float hscale;  // float(1 / sqrt(double(block))), as the CPU computes it
  int32_t block;
  PhiloxKeys keys;  // philox_keys(RandomKey::seed), read from constant memory
  uint64_t stream;
  const int64_t* device_step;  // RandomKey::device_step: the stream's step bits, read on the device
  uint8_t* operand;  // may be null
  int64_t ldop, op_cols;
  bool op_s8;                     // operand: INT8 (the codes as int8) instead of FP8 e4m3
  uint8_t* packed;                // may be null
  uint8_t* aux;                   // may be null
  unsigned long long* nonfinite;  // may be null
  // The layer's W pass (hadamard_lsq_quantize_alpha), else null: with the count in nonfinite
  // complete, the grid's last block (ticket) sets the forward product's scale *alpha to NaN where
  // anything was counted.
  unsigned int* ticket;
  float* alpha;
};

__device__ __forceinline__ bool step_is_bad(float s) { return !(s > 0.0f && s <= FLT_MAX); }

// The step's inverse as the CPU computes it (== 1.0f / s correctly rounded), whether the step is
// bad (not positive and finite: every element counted) and whether codes can come from the
// inverse without the NaN checks (a good step with a finite inverse).
struct LsqInverse {
  float inv;
  bool bad_step, inv_ok;
};
__device__ __forceinline__ LsqInverse lsq_inverse(const LsqParams& p) {
  const float s = *p.step;
  const float inv = __frcp_rn(s);
  const bool bad_step = step_is_bad(s);
  return LsqInverse{inv, bad_step, !bad_step && isfinite(inv)};
}

// The compact aux bit of quantize.h / quantize_kernels.h (lsq_aux_bit), q = x~ * (1 / s), c its
// code (lsq_code) and h the element's 16-bit random draw. Boundary codes (-8, 7) store the clip
// flag, the CPU's q < -8 (code -8) or q > 7 (code 7): c.clipped, q outside [-8, 7]. Interior codes
// (-7 .. 6, i.e. |value + 1/2| <= 13/2) store stochastic_round_clamp(r + 1/2, u, 0, 1) with r =
// rint(q) - q = value - q, i.e. floor((r + 1/2) + u) >= 1 with the CPU's two roundings. There value
// - q is exact (Sterbenz, or value 0), so (value - q) + 1/2 rounds as (value + 1/2) - q, whose
// first term is exact and also makes the interior test; the uniform's addition is add_uniform_u16.
// NaN q: value 0, bit 0.
__device__ __forceinline__ uint32_t lsq_aux_bit(float q, const LsqCode& c, uint32_t h) {
  static_assert(kLsqQn == 8 && kLsqQp == 7, "the tests below assume the [-8, 7] code range");
  const float vp = __fadd_rn(c.value, 0.5f);
  const bool interior = fabsf(vp) <= 6.5f;
  const bool up = add_uniform_u16(__fsub_rn(vp, q), h) >= 1.0f;
  return (interior ? up : c.clipped) ? 1u : 0u;
}

// lsq_aux_bit where q is not NaN: a clipped q has a boundary code, so the bit is (interior and
// up) or clipped, which compiles to predicate logic (the comparisons' combining forms) instead of
// two selects an element.
__device__ __forceinline__ bool lsq_aux_bit_clean(float q, const LsqCode& c, uint32_t h) {
  const float vp = __fadd_rn(c.value, 0.5f);
  const bool interior = fabsf(vp) <= 6.5f;
  const bool up = add_uniform_u16(__fsub_rn(vp, q), h) >= 1.0f;
  return (interior && up) || c.clipped;
}

// The packed word of 8 codes from their LsqCode::bits patterns (bits(kRoundMagic) + n, n in
// [-8, 7]) without masking each: pattern - (bits(kRoundMagic) - 8) is n + 8 in [0, 15], so
// kCleanNibblesBias + sum_i (pattern_i << 4 i) is the word of the offset nibbles n_i + 8 (modulo
// 2^32, the patterns' high bits cancel with the bias), and XOR 0x88888888 turns each into n_i's
// two's-complement nibble. One shift-add an element instead of a mask, a shift and a merge.
constexpr uint32_t kCleanNibblesBias =
    0u - (0x4B400000u - 8u) * 0x11111111u;  // bits(kRoundMagic) = 0x4B400000

__device__ __forceinline__ void count_nonfinite(uint32_t bad, unsigned long long* counter) {
  const uint32_t total = warp_sum_u32(bad);
  if (counter != nullptr && (threadIdx.x & 31) == 0 && total > 0) {
    atomicAdd(counter, static_cast<unsigned long long>(total));
  }
}

// count_nonfinite, then for the layer's W pass (p.alpha) the forward's NaN report: once every
// block has counted (the X pass ran before), the last block makes the product's scale NaN if
// anything was counted, so that y is NaN throughout, as the CPU's fill_nan (NaN times any
// accumulator, plus the bias).
__device__ __forceinline__ void count_and_finish(uint32_t bad, const LsqParams& p) {
  count_nonfinite(bad, p.nonfinite);
  if (p.alpha == nullptr || !last_block_of_grid(p.ticket)) return;
  if (threadIdx.x == 0 && __ldcg(p.nonfinite) > 0) *p.alpha = __uint_as_float(0x7FC00000u);
}

// Codes (exact floats), packed nibbles and aux bits of one lane's 8 transformed values; kClean:
// every v[i] is finite and 1/s is finite, so no q is NaN and nothing is counted. kNibbles: the
// nibbles are wanted (packed codes, or an INT8 operand, which is made from them); without them
// packed_word stays 0 and only the FP8 operand can be made (from value).
template <bool kAux, bool kClean, bool kNibbles>
__device__ __forceinline__ void lsq_quantize8(const LsqParams& p, uint64_t stream, uint64_t b,
                                              const float v[8], const LsqInverse& li, uint32_t* bad,
                                              float value[8], uint32_t* packed_word,
                                              uint32_t* bits) {
  // One Philox block: the 16-bit draws of the 8 values (flat indices 8 b .. 8 b + 7).
  Philox4x32 r{};
  if (kAux) r = random_block(p.keys, stream, b);
  // Clean lanes sum the codes' offset patterns into the packed word (clean_nibbles_sum).
  uint32_t sum = kClean ? kCleanNibblesBias : 0u;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (!kClean && (li.bad_step || !isfinite(v[i]))) ++*bad;
    const float q = __fmul_rn(v[i], li.inv);
    const LsqCode c = lsq_code<!kClean>(q, static_cast<float>(-kLsqQn), static_cast<float>(kLsqQp));
    value[i] = c.value;
    if (kClean) {
      if (kNibbles) sum += c.bits << (4 * i);
      if (kAux && lsq_aux_bit_clean(q, c, block_u16(r, i))) *bits |= 1u << i;
    } else {
      if (kNibbles) *packed_word |= c.nibble << (4 * i);
      if (kAux) *bits |= lsq_aux_bit(q, c, block_u16(r, i)) << i;
    }
  }
  if (kClean && kNibbles) *packed_word = sum ^ 0x88888888u;
}

// The codes of one lane's 8 transformed values (lsq_quantize8; b: their Philox block). The rare
// lanes with an Inf or NaN (finite_probe8) take the checked path.
template <bool kAux, bool kNibbles = true>
__device__ __forceinline__ void lsq_codes8(const LsqParams& p, uint64_t stream, uint64_t b,
                                           const float v[8], const LsqInverse& li, uint32_t* bad,
                                           float value[8], uint32_t* packed_word, uint32_t* bits) {
  const float z = finite_probe8(v);
  if (li.inv_ok && z == z) {
    lsq_quantize8<kAux, true, kNibbles>(p, stream, b, v, li, bad, value, packed_word, bits);
  } else {
    lsq_quantize8<kAux, false, kNibbles>(p, stream, b, v, li, bad, value, packed_word, bits);
  }
}

// Quantizes and stores one lane's 8 transformed values, flat indices 8 b .. 8 b + 7 (their Philox
// block, aux byte b and packed bytes 4 b .. 4 b + 3); their 8 operand bytes go to p.operand + op_at
// (8-byte aligned) where there is an operand (a test of p.operand, which the compiler keeps out of
// the loops, unlike one of a pointer computed in them).
template <bool kVec, bool kAux, bool kNibbles = true>
__device__ __forceinline__ void lsq_store8(const LsqParams& p, uint64_t stream, uint64_t b,
                                           uint64_t op_at, const float v[8], const LsqInverse& li,
                                           uint32_t* bad) {
  uint32_t packed_word = 0, bits = 0;
  float value[8];
  lsq_codes8<kAux, kNibbles>(p, stream, b, v, li, bad, value, &packed_word, &bits);
  if (kNibbles) {
    if (kVec) {
      if (p.packed != nullptr) *reinterpret_cast<uint32_t*>(p.packed + 4 * b) = packed_word;
    } else if (p.packed != nullptr) {
      uint8_t* dst = p.packed + 4 * b;
#pragma unroll
      for (int i = 0; i < 4; ++i) dst[i] = static_cast<uint8_t>(packed_word >> (8 * i));
    }
  }
  if (p.operand != nullptr) {
    *reinterpret_cast<uint2*>(p.operand + op_at) =
        kNibbles ? operand_bytes8(p.op_s8, packed_word, value) : e4m3x8(value);
  }
  if (kAux) p.aux[b] = static_cast<uint8_t>(bits);
}

// Rows whose length is a multiple of 8 (every block size): a warp per 256 columns of a row, a
// persistent grid, kForwardChunkDepth chunks' loads in flight per warp (device_common.cuh).
template <typename In, int G, bool kVec, bool kAux>
__global__ void __launch_bounds__(kThreads, 3) hadamard_lsq_kernel(const LsqParams p) {
  const int lane = threadIdx.x & 31;
  const LsqInverse li = lsq_inverse(p);
  const uint64_t stream = kAux ? stream_with_step(p.stream, p.device_step) : 0;
  uint32_t bad = 0;
  for_each_warp_chunk<In, kVec, kForwardChunkDepth>(
      static_cast<const In*>(p.x), p.ldx, p.rows, p.cols,
      [&](int64_t row, int64_t col0, float v[8]) {
        hadamard_warp8<G>(v, lane, p.hscale);
        if (col0 < p.cols) {
          // The lane's 8 elements, flat index 8 b .. 8 b + 7 (col0 and cols are multiples of 8),
          // in unsigned arithmetic. Operand rows are 16-byte aligned with a stride of a multiple
          // of 16: 8 bytes at col0 are aligned.
          const uint64_t b = static_cast<uint64_t>(row * p.cols + col0) >> 3;
          lsq_store8<kVec, kAux>(p, stream, b, static_cast<uint64_t>(row * p.ldop + col0), v, li,
                                 &bad);
        } else if (p.operand != nullptr && col0 < p.op_cols) {
          *reinterpret_cast<uint2*>(p.operand + row * p.ldop + col0) = make_uint2(0u, 0u);
        }
      });
  count_and_finish(bad, p);
}

// Whether G's transform scale 1 / sqrt(G) is a power of two (G a power of 4): then x~ * (1 / s)
// = (v / sqrt(G)) / s can take one product v * (inv / sqrt(G)) (lsq_flat_chunks' kFold).
template <int G>
constexpr bool kScaleIsPow2 = G == 1 || G == 4 || G == 16 || G == 64 || G == 256;

// hadamard_lsq_flat_kernel's loop. kFold: v stays unscaled and li.inv is inv / sqrt(G) (exact),
// so q = v * (inv / sqrt(G)) in one product. That is the CPU's fl(fl(v / sqrt(G)) * inv) wherever
// v / sqrt(G) is exact, i.e. not below FLT_MIN; below it, with inv <= 2^98 (the kernel's guard),
// both are at most 2^-28 in magnitude, where the code is 0, the rounding residual's sum 1/2 - q
// rounds to 1/2 and nothing else depends on q: the same codes, operand and aux bits.
template <typename In, int G, bool kAux, bool kNibbles, bool kFold>
__device__ __forceinline__ void lsq_flat_chunks(const LsqParams& p, const LsqInverse& li,
                                                const HadamardLane<G>& had, uint64_t stream,
                                                uint32_t* bad) {
  using Src = MatrixSrc<In, true>;
  const Src src{static_cast<const In*>(p.x), p.cols};
  const uint64_t numel = static_cast<uint64_t>(p.rows) * static_cast<uint64_t>(p.cols);
  for_each_flat_chunk<kAux ? 1 : 0, kAux>(src, numel, [&](uint64_t e, const typename Src::Buf& b) {
    float v[8];
    b.to_float(v);
    if (kFold) {
      had.unscaled(v);
    } else {
      had(v, p.hscale);
    }
    lsq_store8<true, kAux, kNibbles>(p, stream, e >> 3, e, v, li, bad);
  });
}

// hadamard_lsq_kernel where nothing has a gap (lsq_flat: rows a multiple of 256 long, x and the
// operand contiguous), the common case, on for_each_flat_chunk. kNibbles: packed codes or an INT8
// operand are asked for (else the nibbles are not computed). The same bits as hadamard_lsq_kernel.
// The next chunk's load in flight (depth 1) made the X pass 5% faster on an H200 (69 against 72-73
// us at 8192 x 4096, ncu), and the W pass without aux bits 3-4% slower (75 against 72 us at 16384 x
// 4096), so the passes without aux bits load each chunk where it is used (docs/cuda.md, stop 32;
// the FP8-only W pass is hadamard_lsq_flat16_kernel since stop 36). Where 1 / sqrt(G)
// is a power of two and the step's inverse lies in [2^-100, 2^98] (any sensible step), the loop
// folds the transform's scale into the inverse (lsq_flat_chunks' kFold): one product an element.
// The X pass is held to 64 registers (4 blocks an SM, as before the fold and the pinned values,
// which took ptxas to 64-72 unbounded).
template <typename In, int G, bool kAux, bool kNibbles>
__global__ void __launch_bounds__(kThreads, kAux ? 4 : 3)
    hadamard_lsq_flat_kernel(const LsqParams p) {
  const LsqInverse li = lsq_inverse(p);
  const uint64_t stream = kAux ? stream_with_step(p.stream, p.device_step) : 0;
  uint32_t bad = 0;
  // The X pass (kAux) keeps the signs and the loop's stride in registers (it has registers to
  // spare at 4 blocks an SM); the passes without aux bits would lose occupancy.
  HadamardLane<G> had(static_cast<int>(threadIdx.x & 31));
  if (kAux) had.pin();
  if constexpr (kScaleIsPow2<G>) {
    if (li.inv_ok && li.inv >= 0x1p-100f && li.inv <= 0x1p98f) {
      LsqInverse folded = li;
      folded.inv = __fmul_rn(li.inv, p.hscale);  // exact: a power of two, no underflow
      lsq_flat_chunks<In, G, kAux, kNibbles, true>(p, folded, had, stream, &bad);
      count_and_finish(bad, p);
      return;
    }
  }
  lsq_flat_chunks<In, G, kAux, kNibbles, false>(p, li, had, stream, &bad);
  count_and_finish(bad, p);
}

// hadamard_lsq_flat_kernel's FP8-only form (no aux bits, no nibbles: the forward's W pass) on
// for_each_flat_chunk16: 16 values a lane, so one cross-lane stage of the transform fewer (4
// in-lane stages of 16 values, 4 of shuffles, against 3 and 5 at 8 a lane) and half the loop's
// bookkeeping an element: 5% fewer instructions a chunk in the SASS. The same bits (the transform's
// stages in the same order, then lsq_store8 on each half of the lane's values). The X pass keeps 8
// values a lane: at 16 its loop compiled to as many SASS instructions an element (1,169 a 16-value
// chunk against 2 x 580: the 16 shuffles and 16 multiply-adds saved, 16 more in-lane additions and
// 18 more integer multiply-adds) and to 80 registers (3 blocks an SM, against 4).
template <typename In, int G, bool kFold>
__device__ __forceinline__ void lsq_flat16_chunks(const LsqParams& p, const LsqInverse& li,
                                                  const HadamardLane<G, 16>& had, uint32_t* bad) {
  using Src = MatrixSrc<In, true>;
  const Src src{static_cast<const In*>(p.x), p.cols};
  const uint64_t numel = static_cast<uint64_t>(p.rows) * static_cast<uint64_t>(p.cols);
  for_each_flat_chunk16(
      src, numel,
      [&](uint64_t e, bool live, const typename Src::Buf& lo, const typename Src::Buf& hi) {
        float v[16];
        lo.to_float(v);
        hi.to_float(v + 8);
        if (kFold) {
          had.unscaled(v);
        } else {
          had(v, p.hscale);
        }
        if (live) {
          lsq_store8<true, false, false>(p, 0, e >> 3, e, v, li, bad);
          lsq_store8<true, false, false>(p, 0, (e >> 3) + 1, e + 8, v + 8, li, bad);
        }
      });
}

// At most 40 registers (6 blocks an SM, as the 8-a-lane kernel); fp32 input, whose 16 loaded
// values take twice the registers of bf16's, at 4 blocks (64 registers: 40 spilled 16 bytes).
template <typename In, int G>
__global__ void __launch_bounds__(kThreads, sizeof(In) == 4 ? 4 : 6)
    hadamard_lsq_flat16_kernel(const LsqParams p) {
  const LsqInverse li = lsq_inverse(p);
  uint32_t bad = 0;
  const HadamardLane<G, 16> had(static_cast<int>(threadIdx.x & 31));
  // The fold as in hadamard_lsq_flat_kernel (the same guard).
  if constexpr (kScaleIsPow2<G>) {
    if (li.inv_ok && li.inv >= 0x1p-100f && li.inv <= 0x1p98f) {
      LsqInverse folded = li;
      folded.inv = __fmul_rn(li.inv, p.hscale);  // exact: a power of two, no underflow
      lsq_flat16_chunks<In, G, true>(p, folded, had, &bad);
      count_and_finish(bad, p);
      return;
    }
  }
  lsq_flat16_chunks<In, G, false>(p, li, had, &bad);
  count_and_finish(bad, p);
}

// The codes as a transposed operand (hadamard_lsq_codes_t_cuda; p.operand is that operand, cols x
// padded rows): tile_to_transposed's tiles, each lane's 8 values transformed and quantized as
// hadamard_lsq_kernel does (no aux bits, nothing counted). Rows a multiple of 8 long.
template <typename In, int G, bool kVec>
__global__ void __launch_bounds__(kThreads, 3) hadamard_lsq_t_kernel(const LsqParams p) {
  static_assert(kThreads == kWarpCols, "tile_to_transposed: a thread per tile column");
  const int lane = threadIdx.x & 31;
  const LsqInverse li = lsq_inverse(p);
  tile_to_transposed<In, kVec>(static_cast<const In*>(p.x), p.ldx, p.rows, p.cols, p.operand,
                               p.ldop, p.op_cols, [&](int64_t, int64_t col0, float v[8]) {
                                 hadamard_warp8<G>(v, lane, p.hscale);
                                 if (col0 >= p.cols) return make_uint2(0u, 0u);
                                 uint32_t bad = 0, packed_word = 0, bits = 0;
                                 float value[8];
                                 lsq_codes8<false>(p, 0, 0, v, li, &bad, value, &packed_word,
                                                   &bits);
                                 return operand_bytes8(p.op_s8, packed_word, value);
                               });
}

// Rows whose length is not a multiple of 8 (so block <= 4): one thread per pair of columns (one
// packed byte, two operand bytes), each value recomputed from its small block.
template <typename In>
__global__ void __launch_bounds__(kThreads) lsq_small_codes_kernel(const LsqParams p) {
  const int64_t pairs = (p.op_cols > p.cols ? p.op_cols : p.cols + 1) / 2;
  const LsqInverse li = lsq_inverse(p);
  uint32_t bad = 0;
  const int64_t total = p.rows * pairs;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // The loop bound is rounded up to whole warps so that the warp reduction sees every lane.
  const int64_t span = (total + 31) / 32 * 32;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       t - threadIdx.x % 32 < span; t += stride) {
    if (t >= total) continue;
    const int64_t row = t / pairs, j = t - row * pairs;
    const In* xr = static_cast<const In*>(p.x) + row * p.ldx;
    int codes[2] = {0, 0};
    for (int k = 0; k < 2; ++k) {
      const int64_t c = 2 * j + k;
      if (c >= p.cols) continue;
      const float xt = hadamard_small_at(xr, c, p.block, p.hscale);
      if (li.bad_step || !isfinite(xt)) ++bad;
      codes[k] = round_clamp(__fmul_rn(xt, li.inv), -kLsqQn, kLsqQp);
    }
    if (p.packed != nullptr && 2 * j < p.cols) {
      p.packed[row * ((p.cols + 1) / 2) + j] = pack_int4_pair(codes[0], codes[1]);
    }
    if (p.operand != nullptr) {
      for (int k = 0; k < 2; ++k) {
        const int64_t c = 2 * j + k;
        if (c < p.op_cols) {
          p.operand[row * p.ldop + c] = p.op_s8
                                            ? static_cast<uint8_t>(static_cast<int8_t>(codes[k]))
                                            : static_cast<uint8_t>(e4m3_of_code(codes[k]));
        }
      }
    }
  }
  // Threads of a warp that left the loop early do not exist here: the loop runs whole warps.
  count_and_finish(bad, p);
}

// The aux bits where rows are not a multiple of 8 long: one thread per aux byte (8 flat indices).
template <typename In>
__global__ void __launch_bounds__(kThreads) lsq_small_aux_kernel(const LsqParams p) {
  const int64_t numel = p.rows * p.cols;
  const int64_t nbytes = (numel + 7) / 8;
  const float inv = __frcp_rn(*p.step);
  const uint64_t stream = stream_with_step(p.stream, p.device_step);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t bits = 0;
    const Philox4x32 r = random_block(p.keys, stream, static_cast<uint64_t>(b));  // elements 8 b ..
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t e = 8 * b + k;
      if (e >= numel) break;
      const int64_t row = e / p.cols, c = e - row * p.cols;
      const In* xr = static_cast<const In*>(p.x) + row * p.ldx;
      const float q = __fmul_rn(hadamard_small_at(xr, c, p.block, p.hscale), inv);
      const LsqCode code = lsq_code(q, static_cast<float>(-kLsqQn), static_cast<float>(kLsqQp));
      bits |= lsq_aux_bit(q, code, block_u16(r, k)) << k;
    }
    p.aux[b] = static_cast<uint8_t>(bits);
  }
}

// ---- plain transform
struct TransformParams {
  const void* in;
  int64_t ldi;
  void* out;
  int64_t ldo, rows, cols;
  float hscale;
  int32_t block;
};

template <typename In, typename Out, int G, bool kVec>
__global__ void __launch_bounds__(kThreads) hadamard_kernel(const TransformParams p) {
  const int lane = threadIdx.x & 31;
  for_each_warp_chunk<In, kVec, kForwardChunkDepth>(
      static_cast<const In*>(p.in), p.ldi, p.rows, p.cols,
      [&](int64_t row, int64_t col0, float v[8]) {
        hadamard_warp8<G>(v, lane, p.hscale);
        if (col0 < p.cols) store8<kVec>(static_cast<Out*>(p.out) + row * p.ldo + col0, v);
      });
}

// Row lengths not a multiple of 8 (block <= 4): a thread per block, read whole before it is written
// (so in place is safe).
template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) hadamard_small_kernel(const TransformParams p) {
  const int64_t per_row = p.cols / p.block;
  const int64_t total = p.rows * per_row;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = t / per_row, c0 = (t - row * per_row) * p.block;
    const In* src = static_cast<const In*>(p.in) + row * p.ldi;
    float v[4];
    for (int i = 0; i < p.block; ++i) v[i] = hadamard_small_at(src, c0 + i, p.block, p.hscale);
    Out* dst = static_cast<Out*>(p.out) + row * p.ldo + c0;
    for (int i = 0; i < p.block; ++i) {
      if constexpr (sizeof(Out) == 4) {
        dst[i] = v[i];
      } else {
        dst[i] = float_to_bf16(v[i]);
      }
    }
  }
}

// ---- the steps from their parameters (quantize.h): thread i < 2 handles pair i; with grads, the
// chain rule back to the parameters instead.
struct StepPairs {
  const void* param[2];
  bool bf16[2];
  const float* grad[2];  // null: forward (out = fp32 step)
  void* out[2];          // null: pair skipped
};

__global__ void lsq_steps_kernel(const StepPairs sp) {
  const int i = threadIdx.x;
  if (i >= 2 || sp.out[i] == nullptr) return;
  const float p = sp.bf16[i] ? bf16_to_float(*static_cast<const BFloat16*>(sp.param[i]))
                             : *static_cast<const float*>(sp.param[i]);
  if (sp.grad[i] == nullptr) {
    *static_cast<float*>(sp.out[i]) = lsq_step_of_param(p);
    return;
  }
  const float g = lsq_step_param_grad(p, *sp.grad[i]);
  if (sp.bf16[i]) {
    *static_cast<BFloat16*>(sp.out[i]) = float_to_bf16(g);
  } else {
    *static_cast<float*>(sp.out[i]) = g;
  }
}

void launch_lsq_steps(const StepPairs& sp, void* stream) {
  lsq_steps_kernel<<<1, 32, 0, as_stream(stream)>>>(sp);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

// ---- host side
void check_block(int32_t block, int64_t cols) {
  if (!is_valid_hadamard_block(block)) {
    throw_error(ErrorKind::kValue, "block: expected a power of two in [1, " +
                                       std::to_string(kMaxHadamardBlock) + "], got " +
                                       std::to_string(block));
  }
  if (cols % block != 0) {
    throw_error(ErrorKind::kValue, "block: expected a divisor of the row length D = " +
                                       std::to_string(cols) + ", got " + std::to_string(block));
  }
}

// The pass's common part: x, block and step checked; the params' input, transform and step fields.
LsqParams lsq_params(const TensorView& x, int32_t block, const TensorView& step) {
  check_dtype(x, "x", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(x, "x");
  check_block(block, x.shape[1]);
  check_row_length(x, "x");
  check_device_scalar(step, "step", DType::kFloat32);
  LsqParams p{};
  p.x = x.data;
  p.ldx = row_stride(x);
  p.rows = x.shape[0];
  p.cols = x.shape[1];
  p.step = step.ptr<const float>();
  p.hscale = hadamard_scale(block);
  p.block = block;
  return p;
}

// Whether hadamard_lsq_flat_kernel applies: whole chunks (rows a multiple of 256 long), x rows
// back to back, and the operand (if any) likewise with no padding columns; kVec's alignment.
bool lsq_flat(const LsqParams& p, bool vec) {
  return vec && p.cols % kWarpCols == 0 && (p.rows == 1 || p.ldx == p.cols) &&
         (p.operand == nullptr || (p.op_cols == p.cols && (p.rows == 1 || p.ldop == p.cols)));
}

template <typename In, int G, bool kVec>
void launch_lsq_g(const LsqParams& p, cudaStream_t stream) {
  // A warp's chunks: 256 columns of a row, or 512 elements (warp_chunks = 2: 16 values a lane).
  const int64_t warps = p.rows * ((p.cols + kWarpCols - 1) / kWarpCols);
  auto launch = [&](auto kernel, int64_t warp_chunks = 1) {
    const int64_t needed =
        (warps + warp_chunks * (kThreads / 32) - 1) / (warp_chunks * (kThreads / 32));
    kernel<<<persistent_blocks(kernel, kThreads, needed), kThreads, 0, stream>>>(p);
  };
  if (lsq_flat(p, kVec)) {
    // The X pass (aux bits, packed codes), the FP8-only W pass (16 values a lane), and the rest.
    const bool nibbles = p.packed != nullptr || (p.operand != nullptr && p.op_s8);
    if (p.aux != nullptr) {
      launch(hadamard_lsq_flat_kernel<In, G, true, true>);
    } else if (nibbles) {
      launch(hadamard_lsq_flat_kernel<In, G, false, true>);
    } else {
      launch(hadamard_lsq_flat16_kernel<In, G>, 2);
    }
  } else {
    p.aux != nullptr ? launch(hadamard_lsq_kernel<In, G, kVec, true>)
                     : launch(hadamard_lsq_kernel<In, G, kVec, false>);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

template <typename In, bool kVec>
void launch_lsq(const LsqParams& p, cudaStream_t stream) {
  dispatch_block(p.block, [&](auto g) { launch_lsq_g<In, decltype(g)::value, kVec>(p, stream); });
}

template <typename In, typename Out, int G, bool kVec>
void launch_transform_g(const TransformParams& p, cudaStream_t stream) {
  const int64_t warps = p.rows * ((p.cols + kWarpCols - 1) / kWarpCols);
  const int grid = persistent_blocks(hadamard_kernel<In, Out, G, kVec>, kThreads,
                                     (warps + kThreads / 32 - 1) / (kThreads / 32));
  hadamard_kernel<In, Out, G, kVec><<<grid, kThreads, 0, stream>>>(p);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

template <typename In, typename Out, bool kVec>
void launch_transform(const TransformParams& p, cudaStream_t stream) {
  dispatch_block(p.block,
                 [&](auto g) { launch_transform_g<In, Out, decltype(g)::value, kVec>(p, stream); });
}

template <typename In, typename Out>
void dispatch_transform(const TransformParams& p, bool vec, cudaStream_t stream) {
  if (p.cols % kLaneElems != 0) {
    const int64_t total = p.rows * (p.cols / p.block);
    hadamard_small_kernel<In, Out><<<grid_blocks(total, kThreads), kThreads, 0, stream>>>(p);
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  } else if (vec) {
    launch_transform<In, Out, true>(p, stream);
  } else {
    launch_transform<In, Out, false>(p, stream);
  }
}

void hadamard_lsq_quantize(const TensorView& x, int32_t block, const TensorView& step,
                           const RandomKey& rng, TensorView operand, TensorView packed,
                           TensorView aux, TensorView nonfinite, unsigned int* ticket, float* alpha,
                           void* stream) {
  LsqParams p = lsq_params(x, block, step);
  p.ticket = ticket;
  p.alpha = alpha;
  const int64_t rows = p.rows, cols = p.cols;
  p.keys = philox_keys(rng.seed);
  p.stream = rng.stream;
  p.device_step = rng.device_step;
  if (operand.data != nullptr) {
    check_codes_operand(operand, "operand", rows, cols, {DType::kFloat8E4M3, DType::kInt8});
    p.operand = operand.ptr<uint8_t>();
    p.op_s8 = operand.dtype == DType::kInt8;
    p.ldop = row_stride(operand);
    p.op_cols = operand.shape[1];
  }
  if (packed.data != nullptr) {
    check_dtype(packed, "packed", {DType::kInt4Packed});
    check_device_matrix(packed, "packed");
    check_shape(packed, "packed", rows, cols);
    p.packed = packed.ptr<uint8_t>();
  }
  if (aux.data != nullptr) {
    check_dtype(aux, "aux", {DType::kUInt8});
    check_vector(aux, "aux", compact_aux_bytes(rows, cols));
    p.aux = aux.ptr<uint8_t>();
  }
  if (nonfinite.data != nullptr) {
    check_device_scalar(nonfinite, "nonfinite", DType::kInt64);
    p.nonfinite = nonfinite.ptr<unsigned long long>();
  }
  if (rows == 0 || cols == 0) return;
  const cudaStream_t s = as_stream(stream);
  const bool bf16 = x.dtype == DType::kBFloat16;
  if (cols % kLaneElems == 0) {
    const size_t vec_bytes = bf16 ? 16 : 32;
    const bool vec = aligned(x.data, vec_bytes) && (rows == 1 || (p.ldx % kLaneElems) == 0) &&
                     (p.packed == nullptr || aligned(p.packed, 4)) &&
                     (p.operand == nullptr || aligned(p.operand, 8));
    if (bf16) {
      vec ? launch_lsq<BFloat16, true>(p, s) : launch_lsq<BFloat16, false>(p, s);
    } else {
      vec ? launch_lsq<float, true>(p, s) : launch_lsq<float, false>(p, s);
    }
    return;
  }
  const int64_t pairs = (fp8_padded_cols(cols) > cols ? fp8_padded_cols(cols) : cols + 1) / 2;
  const int grid = grid_blocks(rows * pairs, kThreads);
  if (bf16) {
    lsq_small_codes_kernel<BFloat16><<<grid, kThreads, 0, s>>>(p);
  } else {
    lsq_small_codes_kernel<float><<<grid, kThreads, 0, s>>>(p);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  if (p.aux != nullptr) {
    const int agrid = grid_blocks((rows * cols + 7) / 8, kThreads);
    if (bf16) {
      lsq_small_aux_kernel<BFloat16><<<agrid, kThreads, 0, s>>>(p);
    } else {
      lsq_small_aux_kernel<float><<<agrid, kThreads, 0, s>>>(p);
    }
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
}
}  // namespace

void hadamard_lsq_quantize_alpha(const TensorView& w, int32_t block, const TensorView& step,
                                 TensorView operand, TensorView nonfinite, unsigned int* ticket,
                                 float* alpha, void* stream) {
  if (nonfinite.data == nullptr || ticket == nullptr || alpha == nullptr) {
    throw_error(ErrorKind::kRuntime,
                "hadamard_lsq_quantize_alpha: expected the count, a ticket and the scale");
  }
  hadamard_lsq_quantize(w, block, step, RandomKey{}, operand, TensorView{}, TensorView{}, nonfinite,
                        ticket, alpha, stream);
}
}  // namespace cuda_detail

void hadamard_lsq_quantize_cuda(const TensorView& x, int32_t block, const TensorView& step,
                                const RandomKey& rng, TensorView operand, TensorView packed,
                                TensorView aux, TensorView nonfinite, void* stream) {
  cuda_detail::hadamard_lsq_quantize(x, block, step, rng, operand, packed, aux, nonfinite, nullptr,
                                     nullptr, stream);
}

void hadamard_lsq_codes_t_cuda(const TensorView& x, int32_t block, const TensorView& step,
                               TensorView operand_t, const CudaAllocator& alloc, void* stream) {
  using namespace cuda_detail;
  LsqParams p = lsq_params(x, block, step);
  const int64_t rows = p.rows, cols = p.cols;
  check_codes_operand(operand_t, "operand_t", cols, rows, {DType::kFloat8E4M3, DType::kInt8});
  const bool s8 = operand_t.dtype == DType::kInt8;
  if (rows == 0 || cols == 0) return;  // no operand columns, or no operand rows
  if (cols % kLaneElems != 0 || !tiles_fit(rows)) {
    // The packed codes, then their transpose.
    DeviceBuffer buf(alloc, static_cast<size_t>(rows * packed_row_bytes(cols)), stream);
    const TensorView packed = make_matrix(buf.get(), DType::kInt4Packed, rows, cols);
    hadamard_lsq_quantize_cuda(x, block, step, RandomKey{}, TensorView{}, packed, TensorView{},
                               TensorView{}, stream);
    s8 ? codes_to_s8_cuda(packed, TensorView{}, true, operand_t, TensorView{}, stream)
       : codes_to_fp8_cuda(packed, true, operand_t, stream);
    return;
  }
  p.operand = operand_t.ptr<uint8_t>();
  p.op_s8 = s8;
  p.ldop = row_stride(operand_t);
  p.op_cols = operand_t.shape[1];
  const bool bf16 = x.dtype == DType::kBFloat16;
  const bool vec = aligned(x.data, bf16 ? 16 : 32) && (rows == 1 || p.ldx % kLaneElems == 0);
  const dim3 grid = tile_grid(rows, cols);
  const cudaStream_t s = as_stream(stream);
  dispatch_block(block, [&](auto g) {
    constexpr int G = decltype(g)::value;
    if (bf16) {
      vec ? hadamard_lsq_t_kernel<BFloat16, G, true><<<grid, kThreads, 0, s>>>(p)
          : hadamard_lsq_t_kernel<BFloat16, G, false><<<grid, kThreads, 0, s>>>(p);
    } else {
      vec ? hadamard_lsq_t_kernel<float, G, true><<<grid, kThreads, 0, s>>>(p)
          : hadamard_lsq_t_kernel<float, G, false><<<grid, kThreads, 0, s>>>(p);
    }
  });
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

namespace cuda_detail {
namespace {
// Pair i of a launch_lsq_steps call, checked: param (fp32 or bf16 device scalar) -> out, its step
// (fp32; grad == nullptr) or, from grad (an fp32 step gradient), its gradient in param's dtype.
void add_step_pair(StepPairs* sp, int i, const TensorView& param, const char* param_name,
                   const TensorView* grad, const char* grad_name, const TensorView& out,
                   const char* out_name) {
  check_dtype(param, param_name, {DType::kFloat32, DType::kBFloat16});
  check_device_scalar(param, param_name, param.dtype);
  if (grad != nullptr) check_device_scalar(*grad, grad_name, DType::kFloat32);
  check_device_scalar(out, out_name, grad != nullptr ? param.dtype : DType::kFloat32);
  sp->param[i] = param.data;
  sp->bf16[i] = param.dtype == DType::kBFloat16;
  sp->grad[i] = grad != nullptr ? grad->ptr<const float>() : nullptr;
  sp->out[i] = out.data;
}
}  // namespace
}  // namespace cuda_detail

void lsq_steps_cuda(const TensorView& input_param, const TensorView& weight_param,
                    TensorView input_step, TensorView weight_step, void* stream) {
  using namespace cuda_detail;
  StepPairs sp{};
  if (input_param.data != nullptr) {
    add_step_pair(&sp, 0, input_param, "input_param", nullptr, nullptr, input_step, "input_step");
  }
  if (weight_param.data != nullptr) {
    add_step_pair(&sp, 1, weight_param, "weight_param", nullptr, nullptr, weight_step,
                  "weight_step");
  }
  if (sp.out[0] != nullptr || sp.out[1] != nullptr) launch_lsq_steps(sp, stream);
}

void lsq_step_grads_cuda(const TensorView& input_param, const TensorView& weight_param,
                         const TensorView& grad_input_step, const TensorView& grad_weight_step,
                         TensorView grad_input_param, TensorView grad_weight_param, void* stream) {
  using namespace cuda_detail;
  StepPairs sp{};
  if (grad_input_step.data != nullptr) {
    add_step_pair(&sp, 0, input_param, "input_param", &grad_input_step, "grad_input_step",
                  grad_input_param, "grad_input_param");
  }
  if (grad_weight_step.data != nullptr) {
    add_step_pair(&sp, 1, weight_param, "weight_param", &grad_weight_step, "grad_weight_step",
                  grad_weight_param, "grad_weight_param");
  }
  if (sp.out[0] != nullptr || sp.out[1] != nullptr) launch_lsq_steps(sp, stream);
}

void hadamard_transform_cuda(const TensorView& in, TensorView out, int32_t block, void* stream) {
  using namespace cuda_detail;
  check_dtype(in, "in", {DType::kFloat32, DType::kBFloat16});
  check_dtype(out, "out", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(in, "in");
  check_device_matrix(out, "out");
  check_shape(out, "out", in.shape[0], in.shape[1]);
  check_block(block, in.shape[1]);
  check_row_length(in, "in");
  if (in.numel() == 0) return;
  const bool same_view =
      in.data == out.data && in.dtype == out.dtype && row_stride(in) == row_stride(out);
  if (!same_view) {
    const int64_t ei = static_cast<int64_t>(dtype_size(in.dtype));
    const int64_t eo = static_cast<int64_t>(dtype_size(out.dtype));
    const char* a0 = static_cast<const char*>(in.data);
    const char* a1 = a0 + ((in.shape[0] - 1) * row_stride(in) + in.shape[1]) * ei;
    const char* b0 = static_cast<const char*>(out.data);
    const char* b1 = b0 + ((out.shape[0] - 1) * row_stride(out) + out.shape[1]) * eo;
    if (a0 < b1 && b0 < a1) {
      throw_error(ErrorKind::kValue,
                  "out: overlaps in; in place needs the same data pointer, dtype and strides");
    }
  }
  TransformParams p{in.data,     row_stride(in),        out.data, row_stride(out), in.shape[0],
                    in.shape[1], hadamard_scale(block), block};
  const bool in_bf16 = in.dtype == DType::kBFloat16, out_bf16 = out.dtype == DType::kBFloat16;
  const bool vec = aligned(in.data, in_bf16 ? 16 : 32) && aligned(out.data, out_bf16 ? 16 : 32) &&
                   (p.rows == 1 || (p.ldi % kLaneElems == 0 && p.ldo % kLaneElems == 0));
  const cudaStream_t s = as_stream(stream);
  if (in_bf16) {
    out_bf16 ? dispatch_transform<BFloat16, BFloat16>(p, vec, s)
             : dispatch_transform<BFloat16, float>(p, vec, s);
  } else {
    out_bf16 ? dispatch_transform<float, BFloat16>(p, vec, s)
             : dispatch_transform<float, float>(p, vec, s);
  }
}

}  // namespace int4train
