// int4train core: the scalar element kernels of the CPU quantizers and the run-time choice between
// them and the AVX-512 ones. The scalar table is what every CPU can run; the SIMD table must match
// it bit for bit (tests compare both against the _ref quantizers).
#include "quantize_kernels.h"

#include "cpu_features.h"
#include "int4train/int4.h"
#include "int4train/philox.h"

// One rounding per operation, exactly as written: no fused multiply-add (CPU and GPU must agree).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace int4train {
namespace detail {
namespace {

bool is_finite_bits(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// random_uniform's 16-bit draws: a Philox block per 8 elements, each word's low half first.
const float* uniforms_scalar(uint64_t seed, uint64_t stream, uint64_t e0, int64_t n,
                             float* scratch) {
  const uint64_t first = e0 >> 3;
  const int64_t offset = static_cast<int64_t>(e0 & 7u);
  const int64_t blocks = (offset + n + 7) / 8;
  for (int64_t b = 0; b < blocks; ++b) {
    const Philox4x32 r = random_block(seed, stream, first + static_cast<uint64_t>(b));
    for (int i = 0; i < 8; ++i) scratch[8 * b + i] = uniform_from_u16(block_u16(r, i));
  }
  return scratch + offset;
}

uint32_t absmax_bits_f32_scalar(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t a = float_bits(x[k]) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  return m;
}

uint32_t absmax_bits_bf16_scalar(const uint16_t* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t a = static_cast<uint32_t>(x[k] & 0x7FFFu);
    m = a > m ? a : m;
  }
  return m << 16;
}

void bf16_to_f32_scalar(const uint16_t* in, int64_t n, float* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = bf16_to_float(BFloat16{in[k]});
}

void f32_to_bf16_scalar(const float* in, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = float_to_bf16(in[k]).bits;
}

int64_t round_codes_scalar(const float* x, int64_t n, float inv, int lo, int hi, int8_t* out) {
  int64_t bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * inv;
    out[k] = static_cast<int8_t>(round_clamp(v, lo, hi));
    bad += is_finite_bits(x[k]) ? 0 : 1;
  }
  return bad;
}

void stochastic_codes_scalar(const float* x, const float* u, int64_t n, float inv, int lo, int hi,
                             int8_t* out) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * inv;
    out[k] = static_cast<int8_t>(stochastic_round_clamp(v, u[k], lo, hi));
  }
}

void bitsplit_codes_scalar(const float* x, const float* u, int64_t n, float inv, int8_t* hi,
                           int8_t* lo) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * inv;
    const int q = stochastic_round_clamp(v, u[k], -kBitSplitLevels, kBitSplitLevels);
    const int h = bitsplit_hi(q);
    hi[k] = static_cast<int8_t>(h);
    lo[k] = static_cast<int8_t>(q - 16 * h);
  }
}

int64_t lsq_compact_codes_scalar(const float* x, const float* u, int64_t n, float inv,
                                 int8_t* codes, uint8_t* bits) {
  int64_t bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * inv;
    const int c = round_clamp(v, -kLsqQn, kLsqQp);
    codes[k] = static_cast<int8_t>(c);
    bits[k] = static_cast<uint8_t>(lsq_aux_bit(v, c, u[k]));
    bad += is_finite_bits(x[k]) ? 0 : 1;
  }
  return bad;
}

double sum_lanes(const double* acc) {
  double s = 0.0;
  for (int l = 0; l < kSumLanes; ++l) s += acc[l];
  return s;
}

double lsq_backward_tile_scalar(const float* x, const float* g, int64_t n, float inv, float* gx) {
  double acc[kSumLanes] = {};
  const float lo = static_cast<float>(-kLsqQn), hi = static_cast<float>(kLsqQp);
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * inv;
    float r = rintf(v) - v;
    if (v < lo) r = lo;
    if (v > hi) r = hi;
    const float gk = g[k];
    if (gx != nullptr) gx[k] = (v >= lo && v <= hi) ? gk : 0.0f;
    acc[k % kSumLanes] += static_cast<double>(gk) * static_cast<double>(r);
  }
  return sum_lanes(acc);
}

double lsq_backward_compact_tile_scalar(const int8_t* codes, const uint8_t* bits, const float* g,
                                        int64_t n, float* gx) {
  double acc[kSumLanes] = {};
  for (int64_t k = 0; k < n; ++k) {
    const int c = codes[k];
    const bool b = bits[k] != 0;
    float r;
    bool inside = true;
    if (c == -kLsqQn) {
      inside = !b;
      r = b ? static_cast<float>(-kLsqQn) : -0.25f;
    } else if (c == kLsqQp) {
      inside = !b;
      r = b ? static_cast<float>(kLsqQp) : 0.25f;
    } else {
      r = b ? 0.5f : -0.5f;
    }
    const float gk = g[k];
    if (gx != nullptr) gx[k] = inside ? gk : 0.0f;
    acc[k % kSumLanes] += static_cast<double>(gk) * static_cast<double>(r);
  }
  return sum_lanes(acc);
}

void pack_codes_scalar(const int8_t* codes, int64_t n, uint8_t* out) {
  for (int64_t j = 0; 2 * j + 1 < n; ++j) out[j] = pack_int4_pair(codes[2 * j], codes[2 * j + 1]);
  if (n & 1) out[n / 2] = pack_int4_pair(codes[n - 1], 0);
}

void unpack_codes_scalar(const uint8_t* in, int64_t n, int8_t* out) {
  for (int64_t j = 0; 2 * j + 1 < n; ++j) {
    out[2 * j] = static_cast<int8_t>(unpack_int4_lo(in[j]));
    out[2 * j + 1] = static_cast<int8_t>(unpack_int4_hi(in[j]));
  }
  if (n & 1) out[n - 1] = static_cast<int8_t>(unpack_int4_lo(in[n / 2]));
}

}  // namespace

const QuantKernels& quant_kernels_scalar() {
  static const QuantKernels k = {
      "scalar",
      uniforms_scalar,
      absmax_bits_f32_scalar,
      absmax_bits_bf16_scalar,
      bf16_to_f32_scalar,
      f32_to_bf16_scalar,
      round_codes_scalar,
      stochastic_codes_scalar,
      bitsplit_codes_scalar,
      lsq_compact_codes_scalar,
      lsq_backward_tile_scalar,
      lsq_backward_compact_tile_scalar,
      pack_codes_scalar,
      unpack_codes_scalar,
  };
  return k;
}

const QuantKernels& quant_kernels() {
  static const QuantKernels* k = [] {
#if defined(__x86_64__)
    if (cpu_features().avx512) return &quant_kernels_avx512();
#endif
    return &quant_kernels_scalar();
  }();
  return *k;
}

}  // namespace detail
}  // namespace int4train
