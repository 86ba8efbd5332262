// int4train core (internal): the element kernels behind the fast CPU quantizers (quantize.h,
// lss.h). Each kernel works on contiguous tile buffers and exists twice, scalar and AVX-512, with
// bit-identical results; quant_kernels() picks one at run time. The scalar element rules below are
// the spec of both.
#pragma once

#include <cstdint>

#include "int4train/common.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"

namespace int4train {
namespace detail {

// Work is cut into tiles of the flat row-major index space (about kQuantTile elements each; see
// tile_bounds). The cut depends only on the shape, never on the thread count, so per-tile partial
// sums combined in tile order give the same result on any machine.
constexpr int64_t kQuantTile = 2048;
// Scratch words a tile of random numbers needs: up to 3 leading words of the first Philox block,
// the tile (kQuantTile + 1 elements at most) and the rest of the last 64-word batch of the SIMD
// generator.
constexpr int64_t kUniformScratch = kQuantTile + 128;

// ---- scalar element rules (numeric.h rounding; fp32 throughout)

// Bit split of one stochastic-rounded code q in [-119, 119]: hi = floor((q + 8) / 16), lo = q - 16
// hi.
inline int bitsplit_hi(int q) { return (q + 8 + 128) / 16 - 8; }  // numerator > 0: division floors

// The compact LSQ auxiliary bit of one element (quantize.h): interior codes a Bernoulli(r + 1/2)
// draw, floor(r + 1/2 + u) with r = rint(v) - v; boundary codes the clip flag.
inline int lsq_aux_bit(float v, int code, float u) {
  if (code == -kLsqQn) return v < static_cast<float>(-kLsqQn) ? 1 : 0;
  if (code == kLsqQp) return v > static_cast<float>(kLsqQp) ? 1 : 0;
  const float r = rintf(v) - v;
  return stochastic_round_clamp(r + 0.5f, u, 0, 1);
}

// ---- kernel table
struct QuantKernels {
  const char* name;
  // out[k] = random_uniform(seed, stream, e0 + k) for k < n (n <= kQuantTile + 1), computed in
  // `scratch` (kUniformScratch floats); returns the pointer to out[0] inside scratch.
  const float* (*uniforms)(uint64_t seed, uint64_t stream, uint64_t e0, int64_t n, float* scratch);
  // Largest |x| as the bit pattern of an fp32 (so NaN > Inf > finite); bf16 is widened first.
  uint32_t (*absmax_bits_f32)(const float* x, int64_t n);
  uint32_t (*absmax_bits_bf16)(const uint16_t* x, int64_t n);
  void (*bf16_to_f32)(const uint16_t* in, int64_t n, float* out);
  void (*f32_to_bf16)(const float* in, int64_t n, uint16_t* out);
  // out = round_clamp(x * inv, lo, hi); returns how many x are not finite.
  int64_t (*round_codes)(const float* x, int64_t n, float inv, int lo, int hi, int8_t* out);
  // out = stochastic_round_clamp(x * inv, u, lo, hi).
  void (*stochastic_codes)(const float* x, const float* u, int64_t n, float inv, int lo, int hi,
                           int8_t* out);
  // q = stochastic_round_clamp(x * inv, u, -119, 119) split into hi, lo.
  void (*bitsplit_codes)(const float* x, const float* u, int64_t n, float inv, int8_t* hi,
                         int8_t* lo);
  // LSQ codes round_clamp(x * inv, -8, 7) and lsq_aux_bit (0/1 per element); returns non-finite x.
  int64_t (*lsq_compact_codes)(const float* x, const float* u, int64_t n, float inv, int8_t* codes,
                               uint8_t* bits);
  // LSQ backward of one tile: gx = g * 1[-8 <= v <= 7] (gx may be null or equal g) and the fp64 sum
  // of g * r in the fixed pattern of lsq_tile_sum.
  double (*lsq_backward_tile)(const float* x, const float* g, int64_t n, float inv, float* gx);
  // The same from the compact state: codes (int8), bits (0/1 per element).
  double (*lsq_backward_compact_tile)(const int8_t* codes, const uint8_t* bits, const float* g,
                                      int64_t n, float* gx);
  // Two codes a byte (int4.h); for odd n the last high nibble is 0.
  void (*pack_codes)(const int8_t* codes, int64_t n, uint8_t* out);
  void (*unpack_codes)(const uint8_t* in, int64_t n, int8_t* out);
};

// The AVX-512 table where the CPU has AVX-512 F/BW/VL (and INT4TRAIN_SIMD is not 0), else scalar.
const QuantKernels& quant_kernels();
const QuantKernels& quant_kernels_scalar();
#if defined(__x86_64__)
const QuantKernels& quant_kernels_avx512();
#endif

// Fixed-order fp64 sums: element k of a tile goes to accumulator k % kSumLanes; the tile's partial
// is the sequential sum of the accumulators. Both kernel tables follow it, so their sums agree
// exactly.
constexpr int kSumLanes = 16;

// Tile t of a rows x cols matrix covers flat indices [tile_bounds(t), tile_bounds(t + 1)): the
// multiples of kQuantTile moved up to the next even column, so that no packed byte straddles two
// tiles.
inline int64_t tile_bound(int64_t t, int64_t numel, int64_t cols) {
  int64_t e = t * kQuantTile;
  if (e >= numel) return numel;
  if ((e % cols) & 1) ++e;
  return e < numel ? e : numel;
}
inline int64_t num_tiles(int64_t numel) { return (numel + kQuantTile - 1) / kQuantTile; }

// ---- argument checks shared by the fast and the _ref quantizers (each throws Error naming `arg`)
void check_float_matrix(const TensorView& t, const char* arg);  // fp32 or bf16 matrix
// A positive finite fp32 scalar step, returned.
float read_lsq_step(const TensorView& step, const char* arg);
// An output of codes: int8 (or kInt4Packed where allowed) rows x cols.
void check_codes_out(const TensorView& codes, const char* arg, int64_t rows, int64_t cols,
                     bool allow_packed);
void check_scale_out(const TensorView& scale, const char* arg);  // fp32 scalar

}  // namespace detail
}  // namespace int4train
