// int4train core: packing, unpacking and transposing the signed INT4 format of int4.h on the CPU.
// They run on the hot path (forward codes saved for backward, GEMM operands), so the loops are
// vectorised (AVX2 where the CPU has it, plain loops elsewhere) and threaded.
#include "int4train/int4.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define INT4TRAIN_X86 1
#endif

#include "cpu_features.h"
#include "parallel.h"

namespace int4train {
namespace {

// Work is split into (row, column segment) units so that a single long row still uses every thread.
// A segment holds an even number of codes, so it starts on a byte boundary of the packed row.
constexpr int64_t kSegmentCodes = int64_t{1} << 15;
constexpr int64_t kCodesPerChunk = int64_t{1} << 16;  // enough work to amortise a thread hand-off

template <typename Fn>
void for_each_segment(int64_t rows, int64_t cols, const Fn& fn) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t segs = (cols + kSegmentCodes - 1) / kSegmentCodes;
  const int64_t seg_len = std::min(cols, kSegmentCodes);
  const int64_t grain = std::max<int64_t>(1, kCodesPerChunk / seg_len);
  detail::parallel_for(rows * segs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / segs;
      const int64_t c0 = (u % segs) * kSegmentCodes;
      fn(r, c0, std::min(cols, c0 + kSegmentCodes));
    }
  });
}

int64_t row_stride(const TensorView& t) { return t.shape[0] > 1 ? t.strides[0] : t.shape[1]; }

// ---------------------------------------------------------------- pack
// Packs codes [0, n) of one row (n may be odd: the last high nibble is the zero padding). Returns a
// nonzero value iff some code is outside [-8, 7]: (c + 8) must fit in the low nibble.
uint32_t pack_span_scalar(const int8_t* src, uint8_t* dst, int64_t n) {
  uint32_t bad = 0;
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t lo = static_cast<uint8_t>(src[2 * j]);
    const uint8_t hi = static_cast<uint8_t>(src[2 * j + 1]);
    bad |= static_cast<uint8_t>(lo + 8u) | static_cast<uint8_t>(hi + 8u);
    dst[j] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
  }
  if (n & 1) {
    const uint8_t lo = static_cast<uint8_t>(src[n - 1]);
    bad |= static_cast<uint8_t>(lo + 8u);
    dst[pairs] = static_cast<uint8_t>(lo & 0xF);
  }
  return bad & 0xF0u;
}

#ifdef INT4TRAIN_X86
__attribute__((target("avx2"))) uint32_t pack_span_avx2(const int8_t* src, uint8_t* dst,
                                                        int64_t n) {
  const __m256i eight = _mm256_set1_epi8(8);
  const __m256i lo_mask = _mm256_set1_epi16(0x000F);
  const __m256i hi_mask = _mm256_set1_epi16(0x00F0);
  __m256i bad = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j + 32));
    bad =
        _mm256_or_si256(bad, _mm256_or_si256(_mm256_add_epi8(a, eight), _mm256_add_epi8(b, eight)));
    // Each 16-bit lane holds (even code, odd code), little-endian: byte = lo | hi << 4.
    const __m256i pa = _mm256_or_si256(_mm256_and_si256(a, lo_mask),
                                       _mm256_and_si256(_mm256_srli_epi16(a, 4), hi_mask));
    const __m256i pb = _mm256_or_si256(_mm256_and_si256(b, lo_mask),
                                       _mm256_and_si256(_mm256_srli_epi16(b, 4), hi_mask));
    // packus interleaves 128-bit lanes (a0 b0 a1 b1); the permute restores a0 a1 b0 b1.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pa, pb), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j / 2), packed);
  }
  const uint32_t bad_bits = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(
      _mm256_and_si256(bad, _mm256_set1_epi8(static_cast<char>(0xF0))), _mm256_setzero_si256())));
  const uint32_t tail = pack_span_scalar(src + j, dst + j / 2, n - j);
  return (bad_bits != 0xFFFFFFFFu ? 1u : 0u) | tail;
}
#endif

// ---------------------------------------------------------------- unpack
void unpack_span_scalar(const uint8_t* src, int8_t* dst, int64_t n) {
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t b = src[j];
    dst[2 * j] = static_cast<int8_t>(unpack_int4_lo(b));
    dst[2 * j + 1] = static_cast<int8_t>(unpack_int4_hi(b));
  }
  if (n & 1) dst[n - 1] = static_cast<int8_t>(unpack_int4_lo(src[pairs]));
}

#ifdef INT4TRAIN_X86
__attribute__((target("avx2"))) void unpack_span_avx2(const uint8_t* src, int8_t* dst, int64_t n) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i eight = _mm256_set1_epi8(8);
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j / 2));
    // Sign-extend each nibble: (n ^ 8) - 8.
    const __m256i lo = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(b, low4), eight), eight);
    const __m256i hi = _mm256_sub_epi8(
        _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4), eight), eight);
    const __m256i u0 = _mm256_unpacklo_epi8(lo, hi);  // codes 0-15 | 32-47
    const __m256i u1 = _mm256_unpackhi_epi8(lo, hi);  // codes 16-31 | 48-63
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j + 32),
                        _mm256_permute2x128_si256(u0, u1, 0x31));
  }
  unpack_span_scalar(src + j / 2, dst + j, n - j);
}
#endif

// ---------------------------------------------------------------- transpose
// An 8x8 byte transpose of eight little-endian words: byte b of a[t] moves to byte t of a[b].
inline void transpose8x8_bytes(uint64_t a[8]) {
  for (int t = 0; t < 4; ++t) {
    const uint64_t x = a[t], y = a[t + 4];
    a[t] = (x & 0x00000000FFFFFFFFull) | (y << 32);
    a[t + 4] = (x >> 32) | (y & 0xFFFFFFFF00000000ull);
  }
  for (int t : {0, 1, 4, 5}) {
    const uint64_t m = 0x0000FFFF0000FFFFull;
    const uint64_t x = a[t], y = a[t + 2];
    a[t] = (x & m) | ((y & m) << 16);
    a[t + 2] = ((x >> 16) & m) | (y & ~m);
  }
  for (int t = 0; t < 8; t += 2) {
    const uint64_t m = 0x00FF00FF00FF00FFull;
    const uint64_t x = a[t], y = a[t + 1];
    a[t] = (x & m) | ((y & m) << 8);
    a[t + 1] = ((x >> 8) & m) | (y & ~m);
  }
}

// One 16 x 16 code tile. `in` points at input byte b0 of row r0 (16 rows, 8 bytes each: codes
// 2 b0 .. 2 b0 + 15), `out` at output byte r0 / 2 of row 2 b0 (16 rows, 8 bytes each). Input rows
// 2t and 2t+1 hold the low and high nibble of output byte t: even output rows take both low
// nibbles, odd output rows both high nibbles.
inline void transpose_tile16(const uint8_t* in, int64_t in_row_bytes, uint8_t* out,
                             int64_t out_row_bytes) {
  constexpr uint64_t kLow = 0x0F0F0F0F0F0F0F0Full;
  uint64_t even[8], odd[8];
  for (int t = 0; t < 8; ++t) {
    uint64_t x, y;
    std::memcpy(&x, in + (2 * t) * in_row_bytes, 8);
    std::memcpy(&y, in + (2 * t + 1) * in_row_bytes, 8);
    even[t] = (x & kLow) | ((y & kLow) << 4);
    odd[t] = ((x >> 4) & kLow) | (y & ~kLow);
  }
  transpose8x8_bytes(even);
  transpose8x8_bytes(odd);
  for (int b = 0; b < 8; ++b) {
    std::memcpy(out + (2 * b) * out_row_bytes, &even[b], 8);
    std::memcpy(out + (2 * b + 1) * out_row_bytes, &odd[b], 8);
  }
}

#ifdef INT4TRAIN_X86
// Stores the four qwords of q as 8-byte pieces of output rows 2 b + parity for b = base, base + 1
// (lane 0) and base + 16, base + 17 (lane 1). `out` points at the tile's output row 0.
__attribute__((target("avx2"))) inline void emit_qwords_avx2(__m256i q, int base, int parity,
                                                             uint8_t* out, int64_t out_row_bytes) {
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  uint8_t* row = out + (2 * base + parity) * out_row_bytes;
  const int64_t next = 2 * out_row_bytes;  // b -> b + 1
  _mm_storel_epi64(reinterpret_cast<__m128i*>(row), lo);
  _mm_storeh_pd(reinterpret_cast<double*>(row + next), _mm_castsi128_pd(lo));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(row + 16 * next), hi);
  _mm_storeh_pd(reinterpret_cast<double*>(row + 17 * next), _mm_castsi128_pd(hi));
}

// Byte b of the registers v[0..7] (32 bytes each) becomes the 8-byte piece of output row
// 2 b + parity. Three rounds of unpacks (bytes, words, dwords) gather the eight bytes of each b
// into one qword; qword k of lane L then holds b = base + k + 16 L.
__attribute__((target("avx2"))) inline void store_transposed_avx2(const __m256i v[8], int parity,
                                                                  uint8_t* out,
                                                                  int64_t out_row_bytes) {
  __m256i lo8[4], hi8[4];  // byte pairs (t = 2p, 2p + 1): b = k (lo8) and b = 8 + k (hi8)
  for (int p = 0; p < 4; ++p) {
    lo8[p] = _mm256_unpacklo_epi8(v[2 * p], v[2 * p + 1]);
    hi8[p] = _mm256_unpackhi_epi8(v[2 * p], v[2 * p + 1]);
  }
  for (int half = 0; half < 2; ++half) {
    const __m256i* w = half == 0 ? lo8 : hi8;
    const int f = 8 * half;
    // Dwords of t = 0..3 (a0, c0) and t = 4..7 (a1, c1): b = f + k (a) and b = f + 4 + k (c).
    const __m256i a0 = _mm256_unpacklo_epi16(w[0], w[1]), a1 = _mm256_unpacklo_epi16(w[2], w[3]);
    const __m256i c0 = _mm256_unpackhi_epi16(w[0], w[1]), c1 = _mm256_unpackhi_epi16(w[2], w[3]);
    emit_qwords_avx2(_mm256_unpacklo_epi32(a0, a1), f, parity, out, out_row_bytes);
    emit_qwords_avx2(_mm256_unpackhi_epi32(a0, a1), f + 2, parity, out, out_row_bytes);
    emit_qwords_avx2(_mm256_unpacklo_epi32(c0, c1), f + 4, parity, out, out_row_bytes);
    emit_qwords_avx2(_mm256_unpackhi_epi32(c0, c1), f + 6, parity, out, out_row_bytes);
  }
}

// A 16 x 64 code tile, as transpose_tile16 but 32 input bytes (64 output rows) at a time.
__attribute__((target("avx2"))) void transpose_tile64_avx2(const uint8_t* in, int64_t in_row_bytes,
                                                           uint8_t* out, int64_t out_row_bytes) {
  const __m256i low = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi8(static_cast<char>(0xF0));
  __m256i even[8], odd[8];
  for (int t = 0; t < 8; ++t) {
    const __m256i x =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + (2 * t) * in_row_bytes));
    const __m256i y =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + (2 * t + 1) * in_row_bytes));
    even[t] =
        _mm256_or_si256(_mm256_and_si256(x, low), _mm256_slli_epi16(_mm256_and_si256(y, low), 4));
    odd[t] =
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), low), _mm256_and_si256(y, high));
  }
  store_transposed_avx2(even, 0, out, out_row_bytes);
  store_transposed_avx2(odd, 1, out, out_row_bytes);
}
#endif

inline int code_at(const uint8_t* in, int64_t in_row_bytes, int64_t r, int64_t c) {
  const uint8_t byte = in[r * in_row_bytes + c / 2];
  return (c & 1) ? unpack_int4_hi(byte) : unpack_int4_lo(byte);
}

// Output bytes [j0, j1) of output row k (input column k), element by element, to dst[0 ..).
inline void transpose_bytes_scalar(const uint8_t* in, int64_t in_row_bytes, int64_t m, int64_t k,
                                   int64_t j0, int64_t j1, uint8_t* dst) {
  for (int64_t j = j0; j < j1; ++j) {
    const int lo = code_at(in, in_row_bytes, 2 * j, k);
    const int hi = (2 * j + 1 < m) ? code_at(in, in_row_bytes, 2 * j + 1, k) : 0;
    dst[j - j0] = pack_int4_pair(lo, hi);
  }
}

}  // namespace

void pack_int4(const TensorView& codes, TensorView packed) {
  check_matrix(codes, "codes");
  check_dtype(codes, "codes", {DType::kInt8});
  check_dtype(packed, "packed", {DType::kInt4Packed});
  const int64_t m = codes.shape[0], k = codes.shape[1];
  check_shape(packed, "packed", m, k);
  const int8_t* src = codes.ptr<const int8_t>();
  uint8_t* dst = packed.ptr<uint8_t>();
  const int64_t src_stride = row_stride(codes);
  const int64_t dst_stride = packed_row_bytes(k);
#ifdef INT4TRAIN_X86
  const bool avx2 = detail::cpu_features().avx2;
#endif
  std::atomic<bool> bad{false};
  for_each_segment(m, k, [&](int64_t r, int64_t c0, int64_t c1) {
    const int8_t* s = src + r * src_stride + c0;
    uint8_t* d = dst + r * dst_stride + c0 / 2;
    uint32_t b;
#ifdef INT4TRAIN_X86
    b = avx2 ? pack_span_avx2(s, d, c1 - c0) : pack_span_scalar(s, d, c1 - c0);
#else
    b = pack_span_scalar(s, d, c1 - c0);
#endif
    if (b != 0) bad.store(true, std::memory_order_relaxed);
  });
  if (!bad.load()) return;
  // Error path only: find the first offending code for the message.
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      const int v = src[r * src_stride + c];
      if (v < kInt4Min || v > kInt4Max) {
        throw_error(ErrorKind::kValue, "codes: expected INT4 codes in [-8, 7], got " +
                                           std::to_string(v) + " at [" + std::to_string(r) + ", " +
                                           std::to_string(c) + "]");
      }
    }
  }
}

void unpack_int4(const TensorView& packed, TensorView codes) {
  check_matrix(packed, "packed");
  check_dtype(packed, "packed", {DType::kInt4Packed});
  check_dtype(codes, "codes", {DType::kInt8});
  const int64_t m = packed.shape[0], k = packed.shape[1];
  check_shape(codes, "codes", m, k);
  const uint8_t* src = packed.ptr<const uint8_t>();
  int8_t* dst = codes.ptr<int8_t>();
  const int64_t src_stride = packed_row_bytes(k);
  const int64_t dst_stride = row_stride(codes);
#ifdef INT4TRAIN_X86
  const bool avx2 = detail::cpu_features().avx2;
#endif
  for_each_segment(m, k, [&](int64_t r, int64_t c0, int64_t c1) {
    const uint8_t* s = src + r * src_stride + c0 / 2;
    int8_t* d = dst + r * dst_stride + c0;
#ifdef INT4TRAIN_X86
    if (avx2) {
      unpack_span_avx2(s, d, c1 - c0);
      return;
    }
#endif
    unpack_span_scalar(s, d, c1 - c0);
  });
}

void transpose_int4(const TensorView& in, TensorView out) {
  check_matrix(in, "in");
  check_dtype(in, "in", {DType::kInt4Packed});
  check_dtype(out, "out", {DType::kInt4Packed});
  const int64_t m = in.shape[0], k = in.shape[1];
  check_shape(out, "out", k, m);
  if (m == 0 || k == 0) return;
  const uint8_t* src = in.ptr<const uint8_t>();
  uint8_t* dst = out.ptr<uint8_t>();
  const int64_t in_row_bytes = packed_row_bytes(k);
  const int64_t out_row_bytes = packed_row_bytes(m);
  if (src < dst + k * out_row_bytes && dst < src + m * in_row_bytes) {
    throw_error(ErrorKind::kValue, "out: must not overlap in (transpose_int4 is out of place)");
  }
#ifdef INT4TRAIN_X86
  const bool avx2 = detail::cpu_features().avx2;
#endif
  // Each thread takes groups of kGroup output rows (one 64-byte line of every input row) and walks
  // the input rows in chunks of kChunk. A chunk's output (kChunk / 2 bytes of each output row)
  // gathers in a small buffer first: written straight to the matrix, the tiles' 8-byte pieces
  // land in rows one (power-of-two) row stride apart, which all map to the same few cache sets.
  constexpr int64_t kGroup = 128;
  constexpr int64_t kChunk = 256;
  constexpr int64_t kBufRow = kChunk / 2;
  const int64_t groups = (k + kGroup - 1) / kGroup;
  detail::parallel_for(groups, 1, [&](int64_t g0, int64_t g1) {
    alignas(64) uint8_t buf[kGroup * kBufRow];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t k0 = g * kGroup;
      const int64_t nk = std::min(k, k0 + kGroup) - k0;
      for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
        const int64_t c1 = std::min(m, c0 + kChunk);
        const int64_t tiled_end = c0 + ((c1 - c0) / 16) * 16;  // input rows in full 16-row tiles
        int64_t tiled_nk = 0;  // output rows (of this group) that the tiles cover
        for (int64_t r0 = c0; r0 < tiled_end; r0 += 16) {
          const uint8_t* tile_in = src + r0 * in_row_bytes + k0 / 2;
          uint8_t* tile_out = buf + (r0 - c0) / 2;
          int64_t kk = 0;
#ifdef INT4TRAIN_X86
          if (avx2) {
            for (; kk + 64 <= nk; kk += 64) {
              transpose_tile64_avx2(tile_in + kk / 2, in_row_bytes, tile_out + kk * kBufRow,
                                    kBufRow);
            }
          }
#endif
          for (; kk + 16 <= nk; kk += 16) {
            transpose_tile16(tile_in + kk / 2, in_row_bytes, tile_out + kk * kBufRow, kBufRow);
          }
          tiled_nk = kk;
        }
        for (int64_t kk = tiled_nk; kk < nk; ++kk) {  // output rows past the last full tile
          transpose_bytes_scalar(src, in_row_bytes, m, k0 + kk, c0 / 2, tiled_end / 2,
                                 buf + kk * kBufRow);
        }
        const int64_t j_end = (c1 + 1) / 2;    // output bytes of this chunk, odd-M padding included
        for (int64_t kk = 0; kk < nk; ++kk) {  // input rows past the last full tile
          transpose_bytes_scalar(src, in_row_bytes, m, k0 + kk, tiled_end / 2, j_end,
                                 buf + kk * kBufRow + (tiled_end - c0) / 2);
        }
        for (int64_t kk = 0; kk < nk; ++kk) {
          std::memcpy(dst + (k0 + kk) * out_row_bytes + c0 / 2, buf + kk * kBufRow,
                      static_cast<size_t>(j_end - c0 / 2));
        }
      }
    }
  });
}

}  // namespace int4train
