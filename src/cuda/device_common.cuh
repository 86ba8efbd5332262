// int4train CUDA path (internal, device side): the pieces every kernel shares: loads of 8
// consecutive fp32/bf16 values, the in-warp Hadamard butterflies in hadamard.h's exact order, the
// e4m3 encoding of INT4 codes, and warp reductions.
#pragma once

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "int4train/numeric.h"
#include "int4train/quantize.h"

namespace int4train {
namespace cuda_detail {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
// A warp covers 256 consecutive columns of a row, 8 per lane: the largest Hadamard block
// (kMaxHadamardBlock) lives in one warp's registers and its cross-lane stages are shuffles.
constexpr int kLaneElems = 8;
constexpr int kWarpCols = 32 * kLaneElems;

__device__ __forceinline__ float load_elem(const float* p) { return *p; }
__device__ __forceinline__ float load_elem(const BFloat16* p) { return bf16_to_float(*p); }
// |v| as bits: NaN > Inf > finite, as the CPU's absmax_bits.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

// v[0..7] = p[0..7]; kVec: p is 32-byte (fp32) / 16-byte (bf16) aligned.
template <bool kVec>
__device__ __forceinline__ void load8(const float* __restrict__ p, float v[8]) {
  if (kVec) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = p[i];
  }
}

template <bool kVec>
__device__ __forceinline__ void load8(const BFloat16* __restrict__ p, float v[8]) {
  if (kVec) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = bf16_to_float(p[i]);
  }
}

template <bool kVec>
__device__ __forceinline__ void store8(float* __restrict__ p, const float v[8]) {
  if (kVec) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = v[i];
  }
}

// float_to_bf16's bits of two floats, lo in the low half, in software: every float, NaN included.
__device__ __forceinline__ uint32_t bf16x2_bits_exact(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bf16(lo).bits) |
         (static_cast<uint32_t>(float_to_bf16(hi).bits) << 16);
}

// float_to_bf16's bits of two floats, lo in the low half: the hardware's round to nearest even
// (cvt.rn.bf16x2.f32, one instruction for the pair), which gives float_to_bf16's bits for every
// float but NaN (its NaN is canonical; float_to_bf16 keeps the sign and payload). A GPU test
// compares the two over all 2^32 floats through store8.
__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t w;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
#else
  return bf16x2_bits_exact(lo, hi);
#endif
}

// A lane's finiteness probe: the sum of v * 0 over its 8 values, NaN iff some v is Inf or NaN
// (Inf * 0 and NaN * 0 are NaN), in 8 fused multiply-adds; `z == z` then says all are finite. The
// kernels' fast paths take such lanes, the rare others a checked path.
__device__ __forceinline__ float finite_probe8(const float v[8]) {
  float z = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) z = __fmaf_rn(v[i], 0.0f, z);
  return z;
}

// p[0..7] = float_to_bf16(v[0..7]); kVec: p is 16-byte aligned. Lanes whose 8 values are all
// finite (finite_probe8) take the hardware conversion, the rare others float_to_bf16.
template <bool kVec>
__device__ __forceinline__ void store8(BFloat16* __restrict__ p, const float v[8]) {
  const float z = finite_probe8(v);
  uint32_t w[4];
  if (z == z) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bf16x2_bits(v[2 * i], v[2 * i + 1]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bf16x2_bits_exact(v[2 * i], v[2 * i + 1]);
  }
  if (kVec) {
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = BFloat16{static_cast<uint16_t>(w[i / 2] >> (16 * (i % 2)))};
  }
}

// A lane's 8 input values as loaded, kept until they are used: the prefetch stage of
// for_each_warp_chunk. bf16 rows stay packed (4 registers instead of 8).
template <typename In, bool kVec>
struct Lane8 {
  float v[8];
  __device__ __forceinline__ void load(const In* __restrict__ p) { load8<kVec>(p, v); }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.0f;
  }
  __device__ __forceinline__ void to_float(float out[8]) const {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = v[i];
  }
};

template <>
struct Lane8<BFloat16, true> {
  uint4 q;
  __device__ __forceinline__ void load(const BFloat16* __restrict__ p) {
    q = *reinterpret_cast<const uint4*>(p);
  }
  __device__ __forceinline__ void zero() { q = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ void to_float(float out[8]) const {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

// How many chunks a warp has in flight in for_each_warp_chunk: the loads of the next kDepth - 1
// chunks are issued before the current one is computed (docs/cuda.md, "Grid", has what depth 1, 2
// and 4 measured: the quantizers are bound by instructions, so the depth matters little).
// kChunkDepth: the backward's passes (bit split, epilogues); kForwardChunkDepth: the forward's
// Hadamard + LSQ pass and the plain block Hadamard transform, 4-8% faster with one chunk in flight.
#ifndef INT4TRAIN_CUDA_CHUNK_DEPTH
#define INT4TRAIN_CUDA_CHUNK_DEPTH 2
#endif
#ifndef INT4TRAIN_CUDA_FORWARD_CHUNK_DEPTH
#define INT4TRAIN_CUDA_FORWARD_CHUNK_DEPTH 1
#endif
constexpr int kChunkDepth = INT4TRAIN_CUDA_CHUNK_DEPTH;
constexpr int kForwardChunkDepth = INT4TRAIN_CUDA_FORWARD_CHUNK_DEPTH;

// Visits the chunks (a row's 256 consecutive columns, 8 per lane) of a rows x cols matrix, the
// warps of the grid taking them in turn (warp w: chunks w, w + W, w + 2W, ... in row-major chunk
// order, W the number of warps), with kDepth chunks' loads in flight per warp. The loads come from
// `src`: a policy with a buffer type Src::Buf, src.load(buf, row, col0) and src.zero(buf).
// body(row, col0, buf) runs on every lane of the warp for each chunk, col0 = the lane's first
// column (col0 >= cols: past the row end, buf zero); warp-uniform, so it may use shuffles.
template <int kDepth, typename Src, typename Body>
__device__ __forceinline__ void for_each_warp_chunk_from(const Src& src, int64_t rows, int64_t cols,
                                                         Body&& body) {
  // Column indices fit in 32 bits (the launchers check cols <= kMaxRowLength, cuda_common.h).
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int32_t ncols = static_cast<int32_t>(cols);
  const int32_t chunks = static_cast<int32_t>((cols + kWarpCols - 1) / kWarpCols);
  if (chunks == 0 || rows <= 0) return;  // nothing to visit (uniform across the grid)
  // The next chunk to load, as (row, chunk of the row), advanced by nwarps chunks at a time without
  // a division per chunk.
  int64_t frow = warp / chunks;
  int32_t fchunk = static_cast<int32_t>(warp - frow * chunks);
  const int64_t step_rows = nwarps / chunks;
  const int32_t step_chunks = static_cast<int32_t>(nwarps - step_rows * chunks);
  typename Src::Buf buf[kDepth];
  int64_t brow[kDepth];
  int32_t bcol[kDepth];
  auto fetch = [&](int k) {
    brow[k] = frow;
    bcol[k] = fchunk * kWarpCols + kLaneElems * lane;
    if (frow < rows && bcol[k] < ncols) {
      src.load(buf[k], frow, bcol[k]);
    } else {
      src.zero(buf[k]);
    }
    fchunk += step_chunks;
    frow += step_rows;
    if (fchunk >= chunks) {
      fchunk -= chunks;
      ++frow;
    }
  };
#pragma unroll
  for (int k = 0; k < kDepth; ++k) fetch(k);
  while (true) {
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      // A warp's chunks come in increasing order: past the last row, all later ones are too.
      if (brow[k] >= rows) return;
      const typename Src::Buf cur = buf[k];
      const int64_t row = brow[k];
      const int64_t col0 = bcol[k];
      fetch(k);
      body(row, col0, cur);
    }
  }
}

// for_each_warp_chunk_from where nothing has a gap: every matrix involved has rows a multiple of
// 256 long stored back to back, so together they are one flat array whose chunk k is elements
// 256 k .. 256 k + 255, and a lane's flat index is all the addressing there is: no row, no column,
// no bound per chunk (ncu on an H200, docs/cuda.md stop 32: the X pass 53.9 -> 51.7 M warp
// instructions at 8192 x 4096, the dX epilogue 59.3 -> 48.6 M and 92 -> 68 us).
// Warp w of W takes chunks w, w + W, ... with kDepth chunks' loads in flight; src.load_flat(buf,
// e) loads the lane's 8 values from flat index e; body(e, buf) runs on every lane of the warp
// (numel is a multiple of 256, so a warp's lanes leave together and the body may use shuffles).
// kDepth 0: each chunk loaded where it is used (nothing in flight across chunks). kPinStride: the
// stride is kept in a register (an empty asm), where the compiler would otherwise recompute it
// from the grid size in every iteration (5 instructions a chunk, docs/cuda.md, stop 35), for
// kernels with registers to spare.
template <int kDepth, bool kPinStride = false, typename Src, typename Body>
__device__ __forceinline__ void for_each_flat_chunk(const Src& src, uint64_t numel, Body&& body) {
  const uint64_t lane = threadIdx.x & 31;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  uint64_t stride = (static_cast<uint64_t>(gridDim.x) * blockDim.x >> 5) * kWarpCols;
  if constexpr (kPinStride) asm volatile("" : "+l"(stride));
  uint64_t next = warp * kWarpCols + kLaneElems * lane;  // the next chunk to load
  if constexpr (kDepth == 0) {
    for (; next < numel; next += stride) {
      typename Src::Buf b;
      src.load_flat(b, next);
      body(next, b);
    }
  } else {
    typename Src::Buf buf[kDepth];
    uint64_t be[kDepth];
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      be[k] = next;
      if (next < numel) src.load_flat(buf[k], next);
      next += stride;
    }
    while (true) {
#pragma unroll
      for (int k = 0; k < kDepth; ++k) {
        if (be[k] >= numel) return;  // a warp's chunks come in increasing order
        const typename Src::Buf cur = buf[k];
        const uint64_t e = be[k];
        be[k] = next;
        if (next < numel) src.load_flat(buf[k], next);
        next += stride;
        body(e, cur);
      }
    }
  }
}

// for_each_flat_chunk with 16 values a lane: warp w of W takes the 512-element chunks w, w + W,
// ...; body(e, live, lo, hi) runs on every lane of the warp with the lane's flat index e (a
// multiple of 16) and its values e .. e + 7 in lo, e + 8 .. e + 15 in hi. numel is a multiple of
// 256, so a chunk's half-warps are each wholly inside (live) or wholly past the end (not live:
// zeros, nothing to store); the body's shuffles stay within a half-warp. Each chunk is loaded where
// it is used (for_each_flat_chunk's kDepth 0).
template <typename Src, typename Body>
__device__ __forceinline__ void for_each_flat_chunk16(const Src& src, uint64_t numel, Body&& body) {
  constexpr uint64_t kChunk = 2 * kWarpCols;
  const uint64_t lane = threadIdx.x & 31;
  const uint64_t warp = (static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint64_t stride = (static_cast<uint64_t>(gridDim.x) * blockDim.x >> 5) * kChunk;
  for (uint64_t e = warp * kChunk + 2 * kLaneElems * lane; e - 2 * kLaneElems * lane < numel;
       e += stride) {
    typename Src::Buf lo, hi;
    const bool live = e < numel;
    if (live) {
      src.load_flat(lo, e);
      src.load_flat(hi, e + kLaneElems);
    } else {
      src.zero(lo);
      src.zero(hi);
    }
    body(e, live, lo, hi);
  }
}

// The plain source: rows of a matrix x (row stride ldx), 8 values per lane as Lane8.
template <typename In, bool kVec>
struct MatrixSrc {
  using Buf = Lane8<In, kVec>;
  const In* __restrict__ x;
  int64_t ldx;
  __device__ __forceinline__ void load(Buf& b, int64_t row, int32_t col) const {
    b.load(x + row * ldx + col);
  }
  __device__ __forceinline__ void load_flat(Buf& b, uint64_t e) const { b.load(x + e); }
  __device__ __forceinline__ void zero(Buf& b) const { b.zero(); }
};

// for_each_warp_chunk_from over the rows of x, body(row, col0, v) with the lane's 8 values as
// floats (all zero past the row end).
template <typename In, bool kVec, int kDepth, typename Body>
__device__ __forceinline__ void for_each_warp_chunk(const In* __restrict__ x, int64_t ldx,
                                                    int64_t rows, int64_t cols, Body&& body) {
  for_each_warp_chunk_from<kDepth>(MatrixSrc<In, kVec>{x, ldx}, rows, cols,
                                   [&](int64_t row, int64_t col0, const Lane8<In, kVec>& b) {
                                     float v[8];
                                     b.to_float(v);
                                     body(row, col0, v);
                                   });
}

// The second half of tile_to_transposed_from, after the barrier that completes the shared tile of
// kRows rows x 256 columns (rows r0.., columns c0..): column c0 + j of the tile (if < cols) becomes
// kRows bytes of row c0 + j of out_t at column r0, in 16-byte stores. L2 takes a request per
// 32-byte sector a store touches, so a warp's store should fill whole sectors: with 32-row tiles
// two neighbouring threads write the two halves of a column's 32 bytes (a warp: 16 columns' whole
// sectors, two passes over the 256 columns), not one thread both halves in two stores (a warp: 32
// half sectors a store, twice the requests; the bit split's q^T pass took 1.5 times as long that
// way, docs/cuda.md, stop 31). t_cols, a multiple of 16, ends the last row tile's second half.
template <int kRows>
__device__ __forceinline__ void store_tile_transposed(const uint8_t (*tile)[kWarpCols], int64_t c0,
                                                      int64_t r0, int64_t cols,
                                                      uint8_t* __restrict__ out_t, int64_t ldt,
                                                      int64_t t_cols) {
  static_assert(kRows == 16 || kRows == 32, "one 16-byte store per column and thread");
  constexpr int kHalves = kRows / 16;  // threads per column
#pragma unroll
  for (int pass = 0; pass < kHalves; ++pass) {
    const int j = pass * (kWarpCols / kHalves) + static_cast<int>(threadIdx.x) / kHalves;
    const int h = static_cast<int>(threadIdx.x) % kHalves;  // rows 16 h .. 16 h + 15
    const int64_t c = c0 + j;
    if (c >= cols || r0 + 16 * h >= t_cols) continue;
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int r = 16 * h + 4 * k;
      w[k] = static_cast<uint32_t>(tile[r][j]) | (static_cast<uint32_t>(tile[r + 1][j]) << 8) |
             (static_cast<uint32_t>(tile[r + 2][j]) << 16) |
             (static_cast<uint32_t>(tile[r + 3][j]) << 24);
    }
    *reinterpret_cast<uint4*>(out_t + c * ldt + r0 + 16 * h) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// A GEMM operand written transposed by the pass that computes it (the backward products whose
// reduction runs over the rows of what the pass reads): a block per tile of kRows rows x 256
// columns (blockIdx.y: the row tile, blockIdx.x: the column tile; blockDim.x == 256, one thread
// per tile column), each warp kRows / 8 consecutive rows with all their loads issued before the
// first is computed (kRows 32, or 16: half the rows in flight, fewer registers, and 16-byte runs
// of the transposed rows, half a sector; measured in docs/cuda.md, stops 28 and 31: it paid in
// the weight gradient's epilogue, not in the bit split, where q^T is a larger share of the bytes).
// The loads come from `src` (for_each_warp_chunk_from's policy: Src::Buf, src.load(buf, row,
// col0), src.zero(buf)). body(row, col0, buf) runs on every lane of the warp for each of its
// rows < rows (warp-uniform, so it may use shuffles; buf zero past the row end) and returns the
// lane's 8 operand bytes (zero past the row end; it may store other outputs too). Through a
// shared tile, column c of the tile's rows becomes kRows bytes of row c of out_t (row stride
// ldt, t_cols = fp8_padded_cols(rows) columns: rows .. t_cols - 1 are zero, inside the last row
// tile; store_tile_transposed); 16-byte aligned rows. Every thread of the block returns from it
// (a barrier inside).
constexpr int kTileRows = 32;
template <int kRows = kTileRows, typename Src, typename Body>
__device__ __forceinline__ void tile_to_transposed_from(const Src& src, int64_t rows, int64_t cols,
                                                        uint8_t* __restrict__ out_t, int64_t ldt,
                                                        int64_t t_cols, Body&& body) {
  constexpr int kRowsPerWarp = kRows / (kWarpCols / 32);
  __shared__ __align__(16) uint8_t tile[kRows][kWarpCols];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int32_t col0 = static_cast<int32_t>(blockIdx.x) * kWarpCols + kLaneElems * lane;
  typename Src::Buf buf[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = r0 + warp * kRowsPerWarp + i;
    if (row < rows && col0 < cols) {
      src.load(buf[i], row, col0);
    } else {
      src.zero(buf[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = r0 + warp * kRowsPerWarp + i;
    uint2 bytes = make_uint2(0u, 0u);
    if (row < rows) bytes = body(row, static_cast<int64_t>(col0), buf[i]);
    *reinterpret_cast<uint2*>(&tile[warp * kRowsPerWarp + i][kLaneElems * lane]) = bytes;
  }
  __syncthreads();
  store_tile_transposed<kRows>(tile, static_cast<int64_t>(blockIdx.x) * kWarpCols, r0, cols, out_t,
                               ldt, t_cols);
}

// tile_to_transposed_from over the rows of x (row stride ldx), body(row, col0, v) with the lane's 8
// values as floats.
template <typename In, bool kVec, typename Body>
__device__ __forceinline__ void tile_to_transposed(const In* __restrict__ x, int64_t ldx,
                                                   int64_t rows, int64_t cols,
                                                   uint8_t* __restrict__ out_t, int64_t ldt,
                                                   int64_t t_cols, Body&& body) {
  tile_to_transposed_from(MatrixSrc<In, kVec>{x, ldx}, rows, cols, out_t, ldt, t_cols,
                          [&](int64_t row, int64_t col0, const Lane8<In, kVec>& b) {
                            float v[8];
                            b.to_float(v);
                            return body(row, col0, v);
                          });
}

// tile_to_transposed_from's grid for a rows x cols input, kRows rows a tile: column tiles x row
// tiles. It exists for 0 < rows <= 65535 row tiles (gridDim.y's limit: 2,097,120 rows at 32 a
// tile, 1,048,560 at 16); callers fall back beyond.
template <int kRows = kTileRows>
constexpr int64_t transposed_row_tiles(int64_t rows) {
  return (rows + kRows - 1) / kRows;
}
template <int kRows = kTileRows>
constexpr bool tiles_fit(int64_t rows) {
  return rows > 0 && transposed_row_tiles<kRows>(rows) <= 65535;
}
template <int kRows = kTileRows>
inline dim3 tile_grid(int64_t rows, int64_t cols) {
  return dim3(static_cast<unsigned>((cols + kWarpCols - 1) / kWarpCols),
              static_cast<unsigned>(transposed_row_tiles<kRows>(rows)));
}

// The block Hadamard transform of hadamard.h on the 8 values of each lane of a warp that covers 256
// consecutive columns (lane l holds columns 8l .. 8l+7 of the warp's chunk). Butterflies for
// h = 1, 2, 4 are in-lane, h = 8 .. G/2 pair lane l with lane l ^ (h / 8); each computes exactly
// (a, b) <- (a + b, a - b) with a the lower index, then one multiply by `scale`. Every lane of the
// warp must call it (the shuffles use the full mask); lanes past the row end hold zeros, and since
// G divides the row length they never pair with a lane inside it.
// A lane's part of hadamard_warp8: the signs of its cross-lane stages (h = 8 .. G/2: the upper
// lane of a pair computes a - b = fma(-1, b, a), the lower b + a = fma(1, b, a) (= a + b): one
// rounding each, the same value as the subtraction or addition, and no select). pin(): a
// grid-stride kernel that builds it before its loop passes the signs through an empty asm, so
// that the compiler keeps them in registers rather than recomputing them from the lane index in
// every iteration (as it did: 9-10 instructions a chunk, docs/cuda.md, stop 35).
// kLaneVals = 16: 16 values a lane, a half-warp covering 256 consecutive elements (lane l holds
// 16 (l mod 16) .. 16 (l mod 16) + 15 of its half's chunk): butterflies for h = 1 .. 8 in-lane,
// h = 16 .. G/2 pairing lane l with lane l ^ (h / 16), the stages in the same order (so the same
// roundings, the CPU's bits), one cross-lane stage fewer and half the shuffles and fused
// multiply-adds of those stages an element.
template <int G, int kLaneVals = 8>
struct HadamardLane {
  static_assert(kLaneVals == 8 || kLaneVals == 16, "8 or 16 values a lane");
  // Cross-lane stages: log2(G / kLaneVals); one (unused) where there are none.
  static constexpr int kStages = G >= 32 * kLaneVals   ? 5
                                 : G >= 16 * kLaneVals ? 4
                                 : G >= 8 * kLaneVals  ? 3
                                 : G >= 4 * kLaneVals  ? 2
                                                       : 1;
  float sign[kStages];  // stage k pairs lane l with lane l ^ 2^k (h = kLaneVals * 2^k)
  __device__ __forceinline__ explicit HadamardLane(int lane) {
#pragma unroll
    for (int k = 0; k < kStages; ++k) sign[k] = (lane & (1 << k)) != 0 ? -1.0f : 1.0f;
  }
  __device__ __forceinline__ HadamardLane& pin() {
#pragma unroll
    for (int k = 0; k < kStages; ++k) asm volatile("" : "+f"(sign[k]));
    return *this;
  }
  // The transform without its final scale (hadamard_warp8 multiplies by it).
  __device__ __forceinline__ void unscaled(float v[kLaneVals]) const {
#pragma unroll
    for (int h = 1; h < kLaneVals && h < G; h *= 2) {
#pragma unroll
      for (int i = 0; i < kLaneVals; ++i) {
        if ((i & h) == 0) {
          const float a = v[i], b = v[i + h];
          v[i] = __fadd_rn(a, b);
          v[i + h] = __fsub_rn(a, b);
        }
      }
    }
#pragma unroll
    for (int h = kLaneVals, k = 0; h < G; h *= 2, ++k) {
#pragma unroll
      for (int i = 0; i < kLaneVals; ++i) {
        const float p = __shfl_xor_sync(kFullMask, v[i], h / kLaneVals);
        v[i] = __fmaf_rn(sign[k], v[i], p);
      }
    }
  }
  __device__ __forceinline__ void operator()(float v[kLaneVals], float scale) const {
    unscaled(v);
#pragma unroll
    for (int i = 0; i < kLaneVals; ++i) v[i] = __fmul_rn(v[i], scale);
  }
};

template <int G>
__device__ __forceinline__ void hadamard_warp8(float v[8], int lane, float scale) {
  const HadamardLane<G> had{lane};
  had(v, scale);
}

// The transformed value of column c of a row for a small block (g <= 4, the only blocks a row
// length that is not a multiple of 8 admits): reloads c's block and runs the same order.
template <typename In>
__device__ __forceinline__ float hadamard_small_at(const In* __restrict__ row, int64_t c, int g,
                                                   float scale) {
  float buf[4];
  const int64_t b0 = c - c % g;
  for (int i = 0; i < g; ++i) buf[i] = load_elem(row + b0 + i);
  for (int h = 1; h < g; h *= 2) {
    for (int i = 0; i < g; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = buf[j], b = buf[j + h];
        buf[j] = __fadd_rn(a, b);
        buf[j + h] = __fsub_rn(a, b);
      }
    }
  }
  return __fmul_rn(buf[c - b0], scale);
}

// e4m3 bit pattern of an INT4 code c in [-8, 7] (all exact): bytes of the two tables are indexed
// by the nibble c & 15 (0..7 -> 0..7, 8..15 -> -8..-1).
__host__ __device__ __forceinline__ uint32_t e4m3_of_code(int c) {
  constexpr uint64_t kPos = 0x4E4C4A4844403800ull;  // 0, 1, 2, 3, 4, 5, 6, 7
  constexpr uint64_t kNeg = 0xB8C0C4C8CACCCED0ull;  // -8, -7, -6, -5, -4, -3, -2, -1
  const int idx = c & 15;
  const uint64_t t = idx < 8 ? kPos : kNeg;
  return static_cast<uint32_t>(t >> (8 * (idx & 7))) & 0xFFu;
}

// The e4m3 bytes of two integer-valued floats in [-8, 7] (every one exact in e4m3), a in the low
// byte: one hardware conversion on sm_89+ instead of two table lookups.
__device__ __forceinline__ uint32_t e4m3x2(float a, float b) {
  return static_cast<uint32_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// The INT8 operand bytes of eight INT4 codes given as 4-bit two's-complement nibbles (code i in
// bits 4i .. 4i+3 of w), sign-extended, code 0 in the low byte of .x: the INT8 engine's form of
// what e4m3x2 gives the FP8 one.
__device__ __forceinline__ uint2 s8x8_of_nibbles(uint32_t w) {
  uint32_t b[2] = {0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t byte = ((((w >> (4 * i)) & 0xFu) ^ 0x8u) - 0x8u) & 0xFFu;
    b[i / 4] |= byte << (8 * (i % 4));
  }
  return make_uint2(b[0], b[1]);
}

// The FP8 operand bytes of eight integer-valued floats in [-8, 7] (e4m3x2 four times).
__device__ __forceinline__ uint2 e4m3x8(const float value[8]) {
  return make_uint2(e4m3x2(value[0], value[1]) | (e4m3x2(value[2], value[3]) << 16),
                    e4m3x2(value[4], value[5]) | (e4m3x2(value[6], value[7]) << 16));
}

// The 8 operand bytes of eight INT4 codes, given both as nibbles (code i in bits 4i .. 4i+3 of
// packed_word) and as exact floats: INT8 (s8) or FP8 e4m3.
__device__ __forceinline__ uint2 operand_bytes8(bool s8, uint32_t packed_word,
                                                const float value[8]) {
  return s8 ? s8x8_of_nibbles(packed_word) : e4m3x8(value);
}

// Integer-valued floats and their integers without a conversion instruction: for |n| < 2^22,
// kRoundMagic + n is exact and its bit pattern is bits(kRoundMagic) + n; adding kRoundMagic to a
// float in that range rounds it to an integer in the addition's rounding mode.
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
__device__ __forceinline__ float int_as_exact_float(int n) {
  return __fsub_rn(__int_as_float(__float_as_int(kRoundMagic) + n), kRoundMagic);
}

// round_clamp(q, -kLsqQn, kLsqQp) of numeric.h, as the exact float `value` (never -0), the 4-bit
// two's-complement nibble and `bits`, whose low byte is the code as an int8 (int_as_exact_float's
// pattern). Clamping before rounding is the same for integer bounds; NaN gives 0. clipped: q lies
// outside [lo, hi] (also set for a NaN q, whose code is 0).
struct LsqCode {
  float value;
  uint32_t nibble;
  bool clipped;
  uint32_t bits;
};
// kMayBeNan = false: the caller knows q is not NaN (saves the select).
template <bool kMayBeNan = true>
__device__ __forceinline__ LsqCode lsq_code(float q, float lo, float hi) {
  const float clamped = fminf(fmaxf(q, lo), hi);
  const float c = !kMayBeNan || q == q ? clamped : 0.0f;
  const float t = __fadd_rn(c, kRoundMagic);  // round to nearest even, as rintf
  return LsqCode{__fsub_rn(t, kRoundMagic), __float_as_uint(t) & 0xFu, clamped != q,
                 __float_as_uint(t)};
}

// The INT8 operand bytes of 8 codes from their LsqCode::bits (code 0 in the low byte of .x): the
// low bytes, gathered by byte permutes (3 for 4 codes).
__device__ __forceinline__ uint2 s8x8_of_code_bits(const uint32_t bits[8]) {
  uint32_t w[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t lo = __byte_perm(bits[4 * h], bits[4 * h + 1], 0x0040);      // b0 of each
    const uint32_t hi = __byte_perm(bits[4 * h + 2], bits[4 * h + 3], 0x0040);  // likewise
    w[h] = __byte_perm(lo, hi, 0x5410);
  }
  return make_uint2(w[0], w[1]);
}

// __fadd_rn(x, uniform_from_u16(h)) of philox.h in one instruction after the conversion: the
// uniform h * 2^-16 is exact, so the fused multiply-add rounds the same exact sum once.
__device__ __forceinline__ float add_uniform_u16(float x, uint32_t h) {
  return __fmaf_rn(static_cast<float>(h), 0x1.0p-16f, x);
}

// The LSQ backward of one element from its compact state (quantize_kernels.cpp's
// lsq_backward_compact_tile rules): whether the gradient passes (the STE mask) and the estimate r
// of d x^ / d s / s used for the step's gradient, from the code c and its aux bit b. r (exact in
// fp64, so r times an fp32 gradient is exact too) is built from its high word by selects: the early
// returns of the plain form compiled to a branch per element (BSSY, BRA, BSYNC) and to about twice
// the instructions (docs/cuda.md, "Where a step's time goes").
struct MaskR {
  bool inside;
  double r;
};
__device__ __forceinline__ MaskR lsq_compact_decode(int c, bool b) {
  static_assert(kLsqQn == 8 && kLsqQp == 7, "the high words below are those of -8 and 7");
  const bool lo = c == -kLsqQn, hi = c == kLsqQp;
  // The high words of 1/2, -1/2 (interior codes), -8, -1/4 (code -8), 7, 1/4 (code 7); the low
  // words are 0.
  uint32_t rh = b ? 0x3FE00000u : 0xBFE00000u;
  rh = lo ? (b ? 0xC0200000u : 0xBFD00000u) : rh;
  rh = hi ? (b ? 0x401C0000u : 0x3FD00000u) : rh;
  return MaskR{!(b && (lo || hi)), __hiloint2double(static_cast<int>(rh), 0)};
}

__device__ __forceinline__ uint32_t warp_sum_u32(uint32_t v) {
  return __reduce_add_sync(kFullMask, v);
}

__device__ __forceinline__ int32_t warp_sum_s32(int32_t v) {
  return __reduce_add_sync(kFullMask, v);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// *out = the sum of acc over the block's threads (kThreads of them, a multiple of 32), in fp64 in a
// fixed order: warps by shuffles, then the warps' sums in warp order. Every thread of the block
// must call it.
template <int kThreads>
__device__ __forceinline__ void block_sum_to(double acc, double* out) {
  acc = warp_sum_f64(acc);
  __shared__ double warp_acc[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_acc[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_acc[w];
    *out = s;
  }
}

// *out = float(gamma * sum of partial[0 .. n-1]) in fp64, by one block of kSumThreads threads in a
// fixed order (thread t sums t, t + kSumThreads, ... in order, then a fixed tree): deterministic
// run to run. Launch <<<1, kSumThreads>>>.
constexpr int kSumThreads = 256;
// The body (every thread of a block of kT calls it), which the backward's finish_sums_kernel
// shares.
template <int kT = kSumThreads>
__device__ __forceinline__ void block_sum_partials(const double* __restrict__ partial, int n,
                                                   double gamma, float* __restrict__ out) {
  __shared__ double sh[kT];
  double s = 0.0;
  // 8 loads in flight, then their additions in order (a grid of 16,384 blocks leaves 64 partials a
  // thread, whose loads one at a time were the sum's time).
  constexpr int kBatch = 8;
  int i = threadIdx.x;
  for (; i + (kBatch - 1) * kT < n; i += kBatch * kT) {
    double v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) v[k] = partial[i + k * kT];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) s += v[k];
  }
  for (; i < n; i += kT) s += partial[i];
  sh[threadIdx.x] = s;
  __syncthreads();
#pragma unroll
  for (int h = kT / 2; h > 0; h /= 2) {
    if (static_cast<int>(threadIdx.x) < h) sh[threadIdx.x] += sh[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = static_cast<float>(gamma * sh[0]);
}
template <int kT = kSumThreads>
__global__ void __launch_bounds__(kT) sum_partials_kernel(const double* __restrict__ partial, int n,
                                                          double gamma, float* __restrict__ out) {
  block_sum_partials<kT>(partial, n, gamma, out);
}

// True in the one block of the grid that gets here last, for work on what every block wrote
// before (a count, as the layer's W pass does), in place of a launch after the kernel. *ticket
// counts the blocks that got here: 0 on entry, so the caller zeroes it; it is left at the grid's
// size. Every thread of every block must call it once, after its block's writes: thread 0 makes
// them visible to the GPU before it takes a ticket (the CUDA programming guide's __threadfence()
// reduction).
__device__ __forceinline__ bool last_block_of_grid(unsigned int* ticket) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
    last = atomicAdd(ticket, 1u) == blocks - 1;
    if (last) __threadfence();
  }
  __syncthreads();
  return last;
}

}  // namespace cuda_detail
}  // namespace int4train
