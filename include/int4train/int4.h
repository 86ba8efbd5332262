// int4train core: the packed signed INT4 storage format, written down once here.
// Every 4-bit operand (forward codes saved for backward, GEMM inputs) uses this layout.
#pragma once

#include <cstdint>

#include "int4train/common.h"
#include "int4train/macros.h"

namespace int4train {

// Signed INT4 codes are integers in [kInt4Min, kInt4Max] = [-8, 7] (two's complement nibbles).
constexpr int kInt4Min = -8;
constexpr int kInt4Max = 7;

// Two codes in one byte. Nibble order: element 2j of a row lives in the LOW nibble (bits 0-3) of byte j,
// element 2j+1 in the HIGH nibble (bits 4-7). Each nibble is the code's two's-complement low 4 bits
// (code & 0xF), so 0x8 is -8 and 0x7 is 7. Rows are packed independently: a row of K codes takes
// (K + 1) / 2 bytes, and for odd K the last byte's high nibble is padding that is always written 0
// (so padded products contribute nothing). A packed M x K matrix is M * packed_row_bytes(K) bytes,
// row-major, with no other padding.
struct Int4x2 {
  uint8_t bits;
};
static_assert(sizeof(Int4x2) == 1, "Int4x2 must be exactly one byte");

INT4TRAIN_HD constexpr int64_t packed_row_bytes(int64_t k) { return (k + 1) / 2; }

INT4TRAIN_HD uint8_t pack_int4_pair(int lo, int hi) {
  return static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
}
// Sign-extend a nibble: (n ^ 8) - 8 maps 0..7 -> 0..7 and 8..15 -> -8..-1.
INT4TRAIN_HD int unpack_int4_lo(uint8_t byte) { return static_cast<int>((byte & 0xF) ^ 0x8) - 8; }
INT4TRAIN_HD int unpack_int4_hi(uint8_t byte) { return static_cast<int>((byte >> 4) ^ 0x8) - 8; }

// codes: int8 M x K with every value in [-8, 7] (an out-of-range value is an Error naming `codes`,
// never silently wrapped; `packed` may then be partly written); packed: kInt4Packed M x K
// (contiguous).
void pack_int4(const TensorView& codes, TensorView packed);
// packed: kInt4Packed M x K; codes: int8 M x K (row stride may exceed K).
void unpack_int4(const TensorView& packed, TensorView codes);

// Transpose of a packed matrix: in is M x K, out is K x M (both kInt4Packed, not overlapping). Used
// by the backward products, whose reduction dimension is the token dimension.
void transpose_int4(const TensorView& in, TensorView out);

}  // namespace int4train
