// int4train core: the fast CPU quantizers of quantize.h (LSQ forward/backward and its compact
// state, absmax INT8, bit splitting, stochastic 4/8-bit, LUQ). Work is cut into shape-fixed tiles
// run on the thread pool, each tile through the SIMD element kernels of quantize_kernels.h.
#include "int4train/quantize.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "int4train/int4.h"
#include "int4train/numeric.h"
#include "parallel.h"
#include "quantize_kernels.h"

// One rounding per operation, exactly as written: no fused multiply-add (CPU and GPU must agree).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace int4train {
namespace detail {

void check_float_matrix(const TensorView& t, const char* arg) {
  check_matrix(t, arg);
  check_dtype(t, arg, {DType::kFloat32, DType::kBFloat16});
}

float read_lsq_step(const TensorView& step, const char* arg) {
  check_scalar(step, arg);
  check_dtype(step, arg, {DType::kFloat32});
  const float s = *step.ptr<const float>();
  if (!(s > 0.0f) || !std::isfinite(s)) {
    throw_error(
        ErrorKind::kValue,
        std::string(arg) + ": expected a positive finite step size, got " + std::to_string(s));
  }
  return s;
}

void check_codes_out(const TensorView& codes, const char* arg, int64_t rows, int64_t cols,
                     bool allow_packed) {
  if (allow_packed) {
    check_dtype(codes, arg, {DType::kInt8, DType::kInt4Packed});
  } else {
    check_dtype(codes, arg, {DType::kInt8});
  }
  check_shape(codes, arg, rows, cols);
}

void check_scale_out(const TensorView& scale, const char* arg) {
  check_scalar(scale, arg);
  check_dtype(scale, arg, {DType::kFloat32});
}

}  // namespace detail

namespace {

using detail::kQuantTile;
using detail::kUniformScratch;
using detail::QuantKernels;

// Tiles of work per parallel chunk: cheap elementwise passes take bigger chunks than the ones that
// draw random numbers.
constexpr int64_t kGrainCheap = 16;
constexpr int64_t kGrainRandom = 4;

// Calls f(row, col, len, offset) for the pieces of rows that flat range [eb, ee) covers.
template <class F>
void for_segments(int64_t cols, int64_t eb, int64_t ee, F&& f) {
  for (int64_t e = eb; e < ee;) {
    const int64_t i = e / cols, j = e % cols;
    const int64_t len = std::min(cols - j, ee - e);
    f(i, j, len, e - eb);
    e += len;
  }
}

// Runs f(tile, eb, ee) over the tiles of a rows x cols matrix on the thread pool.
template <class F>
void run_tiles(int64_t rows, int64_t cols, int64_t grain, F&& f) {
  const int64_t numel = rows * cols;
  if (numel <= 0) return;
  const int64_t tiles = detail::num_tiles(numel);
  detail::parallel_for(tiles, grain, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      f(t, detail::tile_bound(t, numel, cols), detail::tile_bound(t + 1, numel, cols));
    }
  });
}

// Whether flat range [eb, ee) of t is one contiguous run of memory.
bool range_contiguous(const TensorView& t, int64_t eb, int64_t ee) {
  const int64_t cols = t.shape[1];
  return eb / cols == (ee - 1) / cols || t.strides[0] == cols;
}

int64_t elem_offset(const TensorView& t, int64_t e) {
  const int64_t cols = t.shape[1];
  return (e / cols) * t.strides[0] + e % cols;
}

// x's flat range [eb, ee) as fp32: a pointer into x where possible, else converted into buf.
const float* load_tile(const TensorView& x, int64_t eb, int64_t ee, float* buf,
                       const QuantKernels& k) {
  if (x.dtype == DType::kFloat32) {
    const float* base = x.ptr<const float>();
    if (range_contiguous(x, eb, ee)) return base + elem_offset(x, eb);
    for_segments(x.shape[1], eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
      std::memcpy(buf + off, base + i * x.strides[0] + j, static_cast<size_t>(len) * sizeof(float));
    });
    return buf;
  }
  const uint16_t* base = x.ptr<const uint16_t>();
  for_segments(x.shape[1], eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
    k.bf16_to_f32(base + i * x.strides[0] + j, len, buf + off);
  });
  return buf;
}

// Where an fp32 (or int8) output tile can be written in place, else null.
float* direct_f32(const TensorView& t, int64_t eb, int64_t ee) {
  if (t.dtype != DType::kFloat32 || !range_contiguous(t, eb, ee)) return nullptr;
  return t.ptr<float>() + elem_offset(t, eb);
}
int8_t* direct_i8(const TensorView& t, int64_t eb, int64_t ee) {
  if (t.dtype != DType::kInt8 || !range_contiguous(t, eb, ee)) return nullptr;
  return t.ptr<int8_t>() + elem_offset(t, eb);
}

// Writes a tile of fp32 values to t (fp32 or bf16).
void store_f32_tile(const TensorView& t, int64_t eb, int64_t ee, const float* v,
                    const QuantKernels& k) {
  for_segments(t.shape[1], eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
    if (t.dtype == DType::kFloat32) {
      float* dst = t.ptr<float>() + i * t.strides[0] + j;
      if (dst != v + off) std::memcpy(dst, v + off, static_cast<size_t>(len) * sizeof(float));
    } else {
      k.f32_to_bf16(v + off, len, t.ptr<uint16_t>() + i * t.strides[0] + j);
    }
  });
}

// Writes a tile of codes to an int8 or packed matrix (packed segments start at even columns).
void store_codes_tile(const TensorView& codes, int64_t eb, int64_t ee, const int8_t* c,
                      const QuantKernels& k) {
  const int64_t cols = codes.shape[1];
  if (codes.dtype == DType::kInt8) {
    for_segments(cols, eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
      int8_t* dst = codes.ptr<int8_t>() + i * codes.strides[0] + j;
      if (dst != c + off) std::memcpy(dst, c + off, static_cast<size_t>(len));
    });
    return;
  }
  const int64_t row_bytes = packed_row_bytes(cols);
  for_segments(cols, eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
    k.pack_codes(c + off, len, codes.ptr<uint8_t>() + i * row_bytes + j / 2);
  });
}

// Reads a tile of codes (int8 or packed) as int8.
const int8_t* load_codes_tile(const TensorView& codes, int64_t eb, int64_t ee, int8_t* buf,
                              const QuantKernels& k) {
  const int64_t cols = codes.shape[1];
  if (codes.dtype == DType::kInt8) {
    if (range_contiguous(codes, eb, ee)) return codes.ptr<const int8_t>() + elem_offset(codes, eb);
    for_segments(cols, eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
      std::memcpy(buf + off, codes.ptr<const int8_t>() + i * codes.strides[0] + j,
                  static_cast<size_t>(len));
    });
    return buf;
  }
  const int64_t row_bytes = packed_row_bytes(cols);
  for_segments(cols, eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
    k.unpack_codes(codes.ptr<const uint8_t>() + i * row_bytes + j / 2, len, buf + off);
  });
  return buf;
}

// Zero codes (all-zero gradients).
void zero_codes(const TensorView& codes) {
  const int64_t rows = codes.shape[0], cols = codes.shape[1];
  if (rows == 0 || cols == 0) return;
  if (codes.dtype == DType::kInt4Packed) {
    std::memset(codes.data, 0, static_cast<size_t>(rows * packed_row_bytes(cols)));
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    std::memset(codes.ptr<int8_t>() + i * codes.strides[0], 0, static_cast<size_t>(cols));
  }
}

void write_scale(const TensorView& scale, float s) { *scale.ptr<float>() = s; }

int64_t sum_counts(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (int64_t c : v) s += c;
  return s;
}

double sum_in_order(const std::vector<double>& v) {
  double s = 0.0;
  for (double p : v) s += p;
  return s;
}

// The bits of flat range [eb, ee) (one byte 0/1 each) into the packed aux vector: bit e % 8 of byte
// e / 8. Bytes shared with a neighbouring tile are OR-ed atomically into the zeroed vector.
void store_bits_tile(uint8_t* aux, int64_t eb, int64_t ee, const uint8_t* bits) {
  for (int64_t e = eb; e < ee;) {
    const int64_t byte = e >> 3, start = byte << 3;
    const int64_t s1 = std::min(ee, start + 8);
    if (e == start && s1 == start + 8) {
      // Gather 8 bytes of 0/1 into one: byte i of w lands on bit 56 + i of w * magic.
      uint64_t w;
      std::memcpy(&w, bits + (e - eb), 8);
      aux[byte] = static_cast<uint8_t>((w * 0x0102040810204080ull) >> 56);
    } else {
      uint8_t v = 0;
      for (int64_t q = e; q < s1; ++q) v |= static_cast<uint8_t>(bits[q - eb] << (q & 7));
      __atomic_fetch_or(&aux[byte], v, __ATOMIC_RELAXED);
    }
    e = s1;
  }
}

void load_bits_tile(const uint8_t* aux, int64_t eb, int64_t ee, uint8_t* bits) {
  for (int64_t e = eb; e < ee; ++e) bits[e - eb] = (aux[e >> 3] >> (e & 7)) & 1u;
}

// max |x| from partial maxima of |x| bit patterns, which order like their values with every NaN
// above +Inf (a NaN anywhere gives NaN).
float absmax_of_bits(const std::vector<uint32_t>& part) {
  uint32_t m = 0;
  for (uint32_t p : part) m = std::max(m, p);
  if (m > 0x7F800000u) return std::numeric_limits<float>::quiet_NaN();
  return float_from_bits(m);
}

float absmax_impl(const TensorView& g, const QuantKernels& k) {
  const int64_t rows = g.shape[0], cols = g.shape[1];
  std::vector<uint32_t> part(static_cast<size_t>(detail::num_tiles(rows * cols)), 0u);
  run_tiles(rows, cols, kGrainCheap, [&](int64_t t, int64_t eb, int64_t ee) {
    uint32_t m = 0;
    for_segments(cols, eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t) {
      const uint32_t b =
          g.dtype == DType::kFloat32
              ? k.absmax_bits_f32(g.ptr<const float>() + i * g.strides[0] + j, len)
              : k.absmax_bits_bf16(g.ptr<const uint16_t>() + i * g.strides[0] + j, len);
      m = std::max(m, b);
    });
    part[static_cast<size_t>(t)] = m;
  });
  return absmax_of_bits(part);
}

// The scale and 1/scale of a stochastic gradient quantizer; false for an all-zero tensor.
struct GradScale {
  float scale = 0.0f, inv = 0.0f;
  bool zero = true;
};

// Bytes a row-contiguous matrix view spans.
bool overlaps(const TensorView& a, const TensorView& b) {
  auto extent = [](const TensorView& t) {
    const int64_t rows = t.shape[0], cols = t.shape[1];
    if (rows == 0 || cols == 0) return int64_t{0};
    return static_cast<int64_t>(((rows - 1) * t.strides[0] + cols) * dtype_size(t.dtype));
  };
  const char* pa = static_cast<const char*>(a.data);
  const char* pb = static_cast<const char*>(b.data);
  return pa < pb + extent(b) && pb < pa + extent(a);
}

// grad_x may be grad_xhat itself (fp32, in place) but must not overlap it otherwise.
void check_grad_x(const TensorView& grad_x, const TensorView& grad_xhat, int64_t rows,
                  int64_t cols) {
  check_shape(grad_x, "grad_x", rows, cols);
  check_dtype(grad_x, "grad_x", {DType::kFloat32, DType::kBFloat16});
  const bool same = grad_x.dtype == DType::kFloat32 && grad_x.data == grad_xhat.data &&
                    (rows <= 1 || grad_x.strides[0] == grad_xhat.strides[0]);
  if (!same && overlaps(grad_x, grad_xhat)) {
    throw_error(ErrorKind::kValue,
                "grad_x: expected either grad_xhat itself (fp32, in place) or memory that does "
                "not overlap it");
  }
}

void check_gradient_quantizer(const TensorView& g, const TensorView& scale) {
  detail::check_float_matrix(g, "g");
  detail::check_scale_out(scale, "scale");
}

void check_qmax(int qmax, int hi) {
  if (qmax < 1 || qmax > hi) {
    throw_error(ErrorKind::kValue, "qmax: expected an integer in [1, " + std::to_string(hi) +
                                       "], got " + std::to_string(qmax));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------- LSQ

float lsq_init_step(const TensorView& x, int qp) {
  detail::check_float_matrix(x, "x");
  if (qp < 1) {
    throw_error(ErrorKind::kValue, "qp: expected a positive integer, got " + std::to_string(qp));
  }
  const auto& k = detail::quant_kernels();
  const int64_t rows = x.shape[0], cols = x.shape[1], numel = rows * cols;
  const size_t tiles = static_cast<size_t>(detail::num_tiles(numel));
  std::vector<double> part(tiles, 0.0);
  std::vector<int64_t> bad(tiles, 0);
  run_tiles(rows, cols, kGrainCheap, [&](int64_t t, int64_t eb, int64_t ee) {
    float buf[kQuantTile + 2];
    const float* v = load_tile(x, eb, ee, buf, k);
    double s = 0.0;
    int64_t nb = 0;
    for (int64_t q = 0; q < ee - eb; ++q) {
      s += std::fabs(static_cast<double>(v[q]));
      nb += std::isfinite(v[q]) ? 0 : 1;
    }
    part[static_cast<size_t>(t)] = s;
    bad[static_cast<size_t>(t)] = nb;
  });
  const int64_t nonfinite = sum_counts(bad);
  if (nonfinite > 0) {
    throw_error(ErrorKind::kValue, "x: expected finite values to initialise the LSQ step, found " +
                                       std::to_string(nonfinite) + " non-finite");
  }
  const double total = sum_in_order(part);
  if (!(total > 0.0)) return 1.0f;  // all zero (or empty): any positive step quantizes exactly
  const double mean = total / static_cast<double>(numel);
  const float s = static_cast<float>(2.0 * mean / std::sqrt(static_cast<double>(qp)));
  // A denormal step would make 1/s overflow; the smallest normal float is as good a start.
  return std::max(s, FLT_MIN);
}

float lsq_mse_step(const TensorView& x, int qp) {
  detail::check_float_matrix(x, "x");
  if (qp < 1) {
    throw_error(ErrorKind::kValue, "qp: expected a positive integer, got " + std::to_string(qp));
  }
  const int64_t rows = x.shape[0], cols = x.shape[1];
  const int64_t stride = lsq_mse_sample_stride(rows, cols);
  std::vector<float> v;
  v.reserve(static_cast<size_t>((rows + stride - 1) / stride * cols));
  const bool bf16 = x.dtype == DType::kBFloat16;
  int64_t nonfinite = 0;  // over all of x
  double total = 0.0;     // over the sample
  for (int64_t r = 0; r < rows; ++r) {
    const bool sampled = r % stride == 0;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t off = r * x.strides[0] + c;
      const float e = bf16 ? bf16_to_float(x.ptr<const BFloat16>()[off]) : x.ptr<const float>()[off];
      nonfinite += std::isfinite(e) ? 0 : 1;
      if (sampled) {
        total += std::fabs(static_cast<double>(e));
        v.push_back(e);
      }
    }
  }
  if (nonfinite > 0) {
    throw_error(ErrorKind::kValue, "x: expected finite values to initialise the LSQ step, found " +
                                       std::to_string(nonfinite) + " non-finite");
  }
  if (!(total > 0.0)) return 1.0f;
  const float m0 = std::max(
      static_cast<float>(2.0 * (total / static_cast<double>(v.size())) /
                         std::sqrt(static_cast<double>(qp))),
      FLT_MIN);
  const int lo = -(qp + 1), hi = qp;
  const auto error = [&](float s) {
    const float inv = 1.0f / s;
    double e = 0.0;
    for (const float t : v) {
      const double d = static_cast<double>(s) * round_clamp(t * inv, lo, hi) - static_cast<double>(t);
      e += d * d;
    }
    return e;
  };
  // Each candidate's error is its own index-order sum, so the candidates run on the pool's threads
  // and are then considered in grid order, which keeps "the first smallest wins" and every bit of
  // the sequential search. (One candidate at a time on one core, a search took about 0.3 s at a
  // 1M-element sample, one per layer and step size: the full lm preset's first training step, with
  // 48 of them, took 13 s on an H200 machine.)
  float best_f = 0.0f, best_s = m0;
  double best_e = std::numeric_limits<double>::infinity();
  const auto valid = [](float step) { return step >= FLT_MIN && std::isfinite(step); };
  const auto consider_all = [&](const std::vector<float>& fs) {
    std::vector<double> errs(fs.size(), 0.0);
    detail::parallel_for(static_cast<int64_t>(fs.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float step = m0 * fs[static_cast<size_t>(i)];
        if (valid(step)) errs[static_cast<size_t>(i)] = error(step);
      }
    });
    for (size_t i = 0; i < fs.size(); ++i) {
      const float step = m0 * fs[i];
      if (valid(step) && errs[i] < best_e) best_e = errs[i], best_f = fs[i], best_s = step;
    }
  };
  std::vector<float> coarse;
  for (int i = 0; i <= 90; ++i) coarse.push_back(static_cast<float>(0.20 + 0.02 * i));
  consider_all(coarse);
  const double centre = best_f;
  std::vector<float> fine;
  for (int j = -9; j <= 9; ++j) {
    if (j != 0) fine.push_back(static_cast<float>(centre + 0.002 * j));
  }
  consider_all(fine);
  return best_s;
}

int64_t lsq_quantize(const TensorView& x, const TensorView& step, TensorView codes) {
  detail::check_float_matrix(x, "x");
  const float s = detail::read_lsq_step(step, "step");
  const int64_t rows = x.shape[0], cols = x.shape[1];
  detail::check_codes_out(codes, "codes", rows, cols, true);
  const float inv = 1.0f / s;
  const auto& k = detail::quant_kernels();
  std::vector<int64_t> bad(static_cast<size_t>(detail::num_tiles(rows * cols)), 0);
  run_tiles(rows, cols, kGrainCheap, [&](int64_t t, int64_t eb, int64_t ee) {
    float xbuf[kQuantTile + 2];
    int8_t cbuf[kQuantTile + 2];
    const float* xv = load_tile(x, eb, ee, xbuf, k);
    int8_t* out = direct_i8(codes, eb, ee);
    int8_t* dst = out != nullptr ? out : cbuf;
    bad[static_cast<size_t>(t)] = k.round_codes(xv, ee - eb, inv, -kLsqQn, kLsqQp, dst);
    if (out == nullptr) store_codes_tile(codes, eb, ee, dst, k);
  });
  return sum_counts(bad);
}

void lsq_backward(const TensorView& x, const TensorView& step, const TensorView& grad_xhat,
                  TensorView grad_x, TensorView grad_step) {
  detail::check_float_matrix(x, "x");
  const float s = detail::read_lsq_step(step, "step");
  const int64_t rows = x.shape[0], cols = x.shape[1], numel = rows * cols;
  check_shape(grad_xhat, "grad_xhat", rows, cols);
  check_dtype(grad_xhat, "grad_xhat", {DType::kFloat32});
  const bool want_gx = grad_x.data != nullptr, want_gs = grad_step.data != nullptr;
  if (want_gx) check_grad_x(grad_x, grad_xhat, rows, cols);
  if (want_gs) detail::check_scale_out(grad_step, "grad_step");
  if (!want_gx && !want_gs) return;
  const float inv = 1.0f / s;
  const auto& k = detail::quant_kernels();
  std::vector<double> part(static_cast<size_t>(detail::num_tiles(numel)), 0.0);
  run_tiles(rows, cols, kGrainCheap, [&](int64_t t, int64_t eb, int64_t ee) {
    float xbuf[kQuantTile + 2], gbuf[kQuantTile + 2], obuf[kQuantTile + 2];
    const float* xv = load_tile(x, eb, ee, xbuf, k);
    const float* gv = load_tile(grad_xhat, eb, ee, gbuf, k);
    float* out = nullptr;
    if (want_gx) {
      out = direct_f32(grad_x, eb, ee);
      if (out == nullptr) out = obuf;
    }
    part[static_cast<size_t>(t)] = k.lsq_backward_tile(xv, gv, ee - eb, inv, out);
    if (want_gx && out == obuf) store_f32_tile(grad_x, eb, ee, obuf, k);
  });
  if (want_gs) {
    const double gamma = numel > 0 ? 1.0 / std::sqrt(static_cast<double>(numel) * kLsqQp) : 0.0;
    write_scale(grad_step, static_cast<float>(gamma * sum_in_order(part)));
  }
}

int64_t compact_aux_bytes(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) {
    throw_error(ErrorKind::kValue, "compact_aux_bytes: expected non-negative rows and cols, got " +
                                       std::to_string(rows) + " x " + std::to_string(cols));
  }
  return (rows * cols + 7) / 8;
}

int64_t lsq_quantize_compact(const TensorView& x, const TensorView& step, const RandomKey& rng,
                             TensorView packed_codes, TensorView aux) {
  detail::check_float_matrix(x, "x");
  const float s = detail::read_lsq_step(step, "step");
  const int64_t rows = x.shape[0], cols = x.shape[1];
  check_dtype(packed_codes, "packed_codes", {DType::kInt4Packed});
  check_shape(packed_codes, "packed_codes", rows, cols);
  check_dtype(aux, "aux", {DType::kUInt8});
  check_vector(aux, "aux", compact_aux_bytes(rows, cols));
  uint8_t* aux_bytes = aux.ptr<uint8_t>();
  if (aux.numel() > 0) std::memset(aux_bytes, 0, static_cast<size_t>(aux.numel()));
  const float inv = 1.0f / s;
  const auto& k = detail::quant_kernels();
  std::vector<int64_t> bad(static_cast<size_t>(detail::num_tiles(rows * cols)), 0);
  run_tiles(rows, cols, kGrainRandom, [&](int64_t t, int64_t eb, int64_t ee) {
    float xbuf[kQuantTile + 2], ubuf[kUniformScratch];
    int8_t cbuf[kQuantTile + 2];
    uint8_t bbuf[kQuantTile + 8];
    const float* xv = load_tile(x, eb, ee, xbuf, k);
    const float* u = k.uniforms(rng.seed, rng.stream, static_cast<uint64_t>(eb), ee - eb, ubuf);
    bad[static_cast<size_t>(t)] = k.lsq_compact_codes(xv, u, ee - eb, inv, cbuf, bbuf);
    store_codes_tile(packed_codes, eb, ee, cbuf, k);
    store_bits_tile(aux_bytes, eb, ee, bbuf);
  });
  return sum_counts(bad);
}

void lsq_backward_compact(const TensorView& packed_codes, const TensorView& aux,
                          const TensorView& grad_xhat, TensorView grad_x, TensorView grad_step) {
  check_matrix(packed_codes, "packed_codes");
  check_dtype(packed_codes, "packed_codes", {DType::kInt4Packed});
  const int64_t rows = packed_codes.shape[0], cols = packed_codes.shape[1], numel = rows * cols;
  check_dtype(aux, "aux", {DType::kUInt8});
  check_vector(aux, "aux", compact_aux_bytes(rows, cols));
  check_shape(grad_xhat, "grad_xhat", rows, cols);
  check_dtype(grad_xhat, "grad_xhat", {DType::kFloat32});
  const bool want_gx = grad_x.data != nullptr, want_gs = grad_step.data != nullptr;
  if (want_gx) check_grad_x(grad_x, grad_xhat, rows, cols);
  if (want_gs) detail::check_scale_out(grad_step, "grad_step");
  if (!want_gx && !want_gs) return;
  const uint8_t* aux_bytes = aux.ptr<const uint8_t>();
  const auto& k = detail::quant_kernels();
  std::vector<double> part(static_cast<size_t>(detail::num_tiles(numel)), 0.0);
  run_tiles(rows, cols, kGrainCheap, [&](int64_t t, int64_t eb, int64_t ee) {
    float gbuf[kQuantTile + 2], obuf[kQuantTile + 2];
    int8_t cbuf[kQuantTile + 2];
    uint8_t bbuf[kQuantTile + 2];
    const int8_t* c = load_codes_tile(packed_codes, eb, ee, cbuf, k);
    load_bits_tile(aux_bytes, eb, ee, bbuf);
    const float* gv = load_tile(grad_xhat, eb, ee, gbuf, k);
    float* out = nullptr;
    if (want_gx) {
      out = direct_f32(grad_x, eb, ee);
      if (out == nullptr) out = obuf;
    }
    part[static_cast<size_t>(t)] = k.lsq_backward_compact_tile(c, bbuf, gv, ee - eb, out);
    if (want_gx && out == obuf) store_f32_tile(grad_x, eb, ee, obuf, k);
  });
  if (want_gs) {
    const double gamma = numel > 0 ? 1.0 / std::sqrt(static_cast<double>(numel) * kLsqQp) : 0.0;
    write_scale(grad_step, static_cast<float>(gamma * sum_in_order(part)));
  }
}

// ---------------------------------------------------------------------------------------- absmax

void quantize_absmax(const TensorView& x, int qmax, TensorView codes, TensorView scale) {
  detail::check_float_matrix(x, "x");
  check_qmax(qmax, 127);
  const int64_t rows = x.shape[0], cols = x.shape[1];
  detail::check_codes_out(codes, "codes", rows, cols, false);
  detail::check_scale_out(scale, "scale");
  const auto& k = detail::quant_kernels();
  const float amax = absmax_impl(x, k);
  const float s = amax == 0.0f ? 1.0f : amax / static_cast<float>(qmax);
  const float inv = 1.0f / s;
  run_tiles(rows, cols, kGrainCheap, [&](int64_t, int64_t eb, int64_t ee) {
    float xbuf[kQuantTile + 2];
    int8_t cbuf[kQuantTile + 2];
    const float* xv = load_tile(x, eb, ee, xbuf, k);
    int8_t* out = direct_i8(codes, eb, ee);
    int8_t* dst = out != nullptr ? out : cbuf;
    k.round_codes(xv, ee - eb, inv, -qmax, qmax, dst);
    if (out == nullptr) store_codes_tile(codes, eb, ee, dst, k);
  });
  write_scale(scale, s);
}

float absmax(const TensorView& g) {
  detail::check_float_matrix(g, "g");
  return absmax_impl(g, detail::quant_kernels());
}

// ----------------------------------------------------------------------------------------
// gradients

namespace {

// quantize_bitsplit (max_exponent 0) and quantize_bitsplit_rows.
void bitsplit_impl(const TensorView& g, int max_exponent, const RandomKey& rng, TensorView hi,
                   TensorView lo, TensorView scale, const TensorView* row_exp) {
  check_gradient_quantizer(g, scale);
  const int64_t rows = g.shape[0], cols = g.shape[1];
  detail::check_codes_out(hi, "hi", rows, cols, true);
  detail::check_codes_out(lo, "lo", rows, cols, true);
  if (row_exp != nullptr) {
    if (max_exponent < 0 || max_exponent > kGradRowMaxExponent) {
      throw_error(ErrorKind::kValue, "max_exponent: expected an integer in [0, " +
                                         std::to_string(kGradRowMaxExponent) + "], got " +
                                         std::to_string(max_exponent));
    }
    check_dtype(*row_exp, "row_exp", {DType::kInt8});
    check_vector(*row_exp, "row_exp", rows);
  }
  const auto& k = detail::quant_kernels();
  // With row scales, one read of G gives the rows' maxima and max|G| from them (the same bits as
  // absmax_impl's tiles); without, absmax_impl.
  std::vector<uint32_t> row_bits;
  if (max_exponent > 0) {
    row_bits.resize(static_cast<size_t>(rows));
    detail::parallel_for(rows, 64, [&](int64_t rb, int64_t re) {
      for (int64_t i = rb; i < re; ++i) {
        row_bits[static_cast<size_t>(i)] =
            g.dtype == DType::kFloat32
                ? k.absmax_bits_f32(g.ptr<const float>() + i * g.strides[0], cols)
                : k.absmax_bits_bf16(g.ptr<const uint16_t>() + i * g.strides[0], cols);
      }
    });
  }
  const float amax = max_exponent > 0 ? absmax_of_bits(row_bits) : absmax_impl(g, k);
  // Each row's exponent k_i (0 unless max|G| is finite and non-zero) and its 119 / max|G| * 2^k_i.
  std::vector<float> row_inv;
  int8_t* exps = row_exp != nullptr ? row_exp->ptr<int8_t>() : nullptr;  // contiguous (checked)
  if (exps != nullptr) std::fill(exps, exps + rows, int8_t{0});
  const float levels = static_cast<float>(kBitSplitLevels);
  const float inv = amax == 0.0f ? 0.0f : levels / amax;
  if (max_exponent > 0 && amax > 0.0f && std::isfinite(amax)) {
    row_inv.resize(static_cast<size_t>(rows));
    detail::parallel_for(rows, 256, [&](int64_t rb, int64_t re) {
      for (int64_t i = rb; i < re; ++i) {
        const float rmax = float_from_bits(row_bits[static_cast<size_t>(i)]);
        int e = 0;
        while (e < max_exponent && std::ldexp(rmax, e + 1) <= amax) ++e;
        if (exps != nullptr) exps[i] = static_cast<int8_t>(e);
        row_inv[static_cast<size_t>(i)] = std::ldexp(inv, e);
      }
    });
  }
  if (amax == 0.0f) {
    zero_codes(hi);
    zero_codes(lo);
    write_scale(scale, 0.0f);
    return;
  }
  run_tiles(rows, cols, kGrainRandom, [&](int64_t, int64_t eb, int64_t ee) {
    float xbuf[kQuantTile + 2], ubuf[kUniformScratch];
    int8_t hbuf[kQuantTile + 2], lbuf[kQuantTile + 2];
    const float* xv = load_tile(g, eb, ee, xbuf, k);
    const float* u = k.uniforms(rng.seed, rng.stream, static_cast<uint64_t>(eb), ee - eb, ubuf);
    int8_t* hout = direct_i8(hi, eb, ee);
    int8_t* lout = direct_i8(lo, eb, ee);
    int8_t* hdst = hout != nullptr ? hout : hbuf;
    int8_t* ldst = lout != nullptr ? lout : lbuf;
    if (row_inv.empty()) {
      k.bitsplit_codes(xv, u, ee - eb, inv, hdst, ldst);
    } else {
      for_segments(cols, eb, ee, [&](int64_t i, int64_t, int64_t len, int64_t off) {
        k.bitsplit_codes(xv + off, u + off, len, row_inv[static_cast<size_t>(i)], hdst + off,
                         ldst + off);
      });
    }
    if (hout == nullptr) store_codes_tile(hi, eb, ee, hdst, k);
    if (lout == nullptr) store_codes_tile(lo, eb, ee, ldst, k);
  });
  write_scale(scale, amax / levels);
}

}  // namespace

void quantize_bitsplit(const TensorView& g, const RandomKey& rng, TensorView hi, TensorView lo,
                       TensorView scale) {
  bitsplit_impl(g, 0, rng, hi, lo, scale, nullptr);
}

void quantize_bitsplit_rows(const TensorView& g, int max_exponent, const RandomKey& rng,
                            TensorView hi, TensorView lo, TensorView scale, TensorView row_exp) {
  bitsplit_impl(g, max_exponent, rng, hi, lo, scale, &row_exp);
}

void quantize_stochastic(const TensorView& g, int qmax, const RandomKey& rng, TensorView codes,
                         TensorView scale) {
  check_gradient_quantizer(g, scale);
  check_qmax(qmax, 127);
  const int64_t rows = g.shape[0], cols = g.shape[1];
  detail::check_codes_out(codes, "codes", rows, cols, qmax <= kInt4Max);
  const auto& k = detail::quant_kernels();
  const float amax = absmax_impl(g, k);
  if (amax == 0.0f) {
    zero_codes(codes);
    write_scale(scale, 0.0f);
    return;
  }
  const float s = amax / static_cast<float>(qmax);
  const float inv = 1.0f / s;
  run_tiles(rows, cols, kGrainRandom, [&](int64_t, int64_t eb, int64_t ee) {
    float xbuf[kQuantTile + 2], ubuf[kUniformScratch];
    int8_t cbuf[kQuantTile + 2];
    const float* xv = load_tile(g, eb, ee, xbuf, k);
    const float* u = k.uniforms(rng.seed, rng.stream, static_cast<uint64_t>(eb), ee - eb, ubuf);
    int8_t* out = direct_i8(codes, eb, ee);
    int8_t* dst = out != nullptr ? out : cbuf;
    k.stochastic_codes(xv, u, ee - eb, inv, -qmax, qmax, dst);
    if (out == nullptr) store_codes_tile(codes, eb, ee, dst, k);
  });
  write_scale(scale, s);
}

namespace {

// LUQ magnitude code of one element: y = |g| / (alpha 2^-6) on a log grid of 2^0 .. 2^6 (codes
// 1 .. 7); below 1 stochastic underflow to {0, 1}, between two levels 2^e and 2^(e+1) the upper one
// with probability y / 2^e - 1 (both exact in fp32), so E[level] = y.
int luq_code(float g, float inv, float u) {
  const float y = std::fabs(g) * inv * 64.0f;
  if (!(y == y)) return 0;
  int mag;
  if (y < 1.0f) {
    mag = stochastic_round_clamp(y, u, 0, 1);
  } else {
    const uint32_t bits = float_bits(y);
    const int e = static_cast<int>((bits >> 23) & 0xFFu) - 127;
    const float t = float_from_bits((bits & 0x007FFFFFu) | 0x3F800000u) - 1.0f;  // y / 2^e - 1
    mag = std::min(kLuqLevels, 1 + e + stochastic_round_clamp(t, u, 0, 1));
  }
  return std::signbit(g) ? -mag : mag;
}

}  // namespace

void quantize_luq(const TensorView& g, const RandomKey& rng, TensorView codes, TensorView scale) {
  check_gradient_quantizer(g, scale);
  const int64_t rows = g.shape[0], cols = g.shape[1];
  detail::check_codes_out(codes, "codes", rows, cols, false);
  const auto& k = detail::quant_kernels();
  const float alpha = absmax_impl(g, k);
  if (alpha == 0.0f) {
    zero_codes(codes);
    write_scale(scale, 0.0f);
    return;
  }
  const float inv = 1.0f / alpha;
  run_tiles(rows, cols, kGrainRandom, [&](int64_t, int64_t eb, int64_t ee) {
    float xbuf[kQuantTile + 2], ubuf[kUniformScratch];
    int8_t cbuf[kQuantTile + 2];
    const float* xv = load_tile(g, eb, ee, xbuf, k);
    const float* u = k.uniforms(rng.seed, rng.stream, static_cast<uint64_t>(eb), ee - eb, ubuf);
    for (int64_t q = 0; q < ee - eb; ++q) cbuf[q] = static_cast<int8_t>(luq_code(xv[q], inv, u[q]));
    store_codes_tile(codes, eb, ee, cbuf, k);
  });
  write_scale(scale, alpha);
}

void dequantize_luq(const TensorView& codes, const TensorView& scale, TensorView values) {
  check_matrix(codes, "codes");
  check_dtype(codes, "codes", {DType::kInt8});
  check_scalar(scale, "scale");
  check_dtype(scale, "scale", {DType::kFloat32});
  const int64_t rows = codes.shape[0], cols = codes.shape[1];
  check_shape(values, "values", rows, cols);
  check_dtype(values, "values", {DType::kFloat32});
  const float alpha = *scale.ptr<const float>();
  float level[2 * kLuqLevels + 1];
  for (int c = -kLuqLevels; c <= kLuqLevels; ++c) {
    const int m = c < 0 ? -c : c;
    const float v = m == 0 ? 0.0f : alpha * std::ldexp(1.0f, m - kLuqLevels);
    level[c + kLuqLevels] = c < 0 ? -v : v;
  }
  const auto& k = detail::quant_kernels();
  run_tiles(rows, cols, kGrainCheap, [&](int64_t, int64_t eb, int64_t ee) {
    int8_t cbuf[kQuantTile + 2];
    const int8_t* c = load_codes_tile(codes, eb, ee, cbuf, k);
    for_segments(cols, eb, ee, [&](int64_t i, int64_t j, int64_t len, int64_t off) {
      float* dst = values.ptr<float>() + i * values.strides[0] + j;
      for (int64_t q = 0; q < len; ++q) {
        const int code = c[off + q];
        if (code < -kLuqLevels || code > kLuqLevels) {
          throw_error(ErrorKind::kValue,
                      "codes: expected LUQ codes in [-7, 7], got " + std::to_string(code));
        }
        dst[q] = level[code + kLuqLevels];
      }
    });
  });
}

void dequantize(const TensorView& codes, const TensorView& scale, TensorView values) {
  check_matrix(codes, "codes");
  check_dtype(codes, "codes", {DType::kInt8, DType::kInt4Packed});
  check_scalar(scale, "scale");
  check_dtype(scale, "scale", {DType::kFloat32});
  const int64_t rows = codes.shape[0], cols = codes.shape[1];
  check_shape(values, "values", rows, cols);
  check_dtype(values, "values", {DType::kFloat32, DType::kBFloat16});
  const float s = *scale.ptr<const float>();
  const auto& k = detail::quant_kernels();
  run_tiles(rows, cols, kGrainCheap, [&](int64_t, int64_t eb, int64_t ee) {
    int8_t cbuf[kQuantTile + 2];
    float vbuf[kQuantTile + 2];
    const int8_t* c = load_codes_tile(codes, eb, ee, cbuf, k);
    float* out = direct_f32(values, eb, ee);
    float* dst = out != nullptr ? out : vbuf;
    for (int64_t q = 0; q < ee - eb; ++q) dst[q] = s * static_cast<float>(c[q]);
    if (out == nullptr) store_f32_tile(values, eb, ee, dst, k);
  });
}

}  // namespace int4train
