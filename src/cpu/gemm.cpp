// int4train core: the CPU matrix products of gemm.h: the scalar integer reference, the fast blocked
// integer GEMM (packed panels, SIMD micro-kernels of gemm_x86.cpp, exact int32 results equal to the
// reference bit for bit), its scaled epilogue, the fp32 GEMM with a fixed K order, and transposes.
#include "int4train/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "gemm_kernels.h"
#include "int4train/int4.h"
#include "int4train/numeric.h"
#include "parallel.h"

namespace int4train {
namespace detail {

namespace {

// ------------------------------------------------------------------------------- argument checks

struct Dims {
  int64_t m, n, k;
};

Dims check_s32_operands(const TensorView& a, const TensorView& b) {
  check_matrix(a, "a");
  check_dtype(a, "a", {DType::kInt8, DType::kInt4Packed});
  check_matrix(b, "b");
  check_dtype(b, "b", {a.dtype});  // int8 with int8, packed INT4 with packed INT4
  const Dims d{a.shape[0], b.shape[0], a.shape[1]};
  if (b.shape[1] != d.k) {
    throw_error(ErrorKind::kValue, "b: expected " + std::to_string(d.k) +
                                       " columns (K, the columns of a), got " +
                                       std::to_string(b.shape[1]));
  }
  const bool int4 = a.dtype == DType::kInt4Packed;
  const int64_t max_k = int4 ? kMaxKInt4 : kMaxKInt8;
  if (d.k > max_k) {
    throw_error(ErrorKind::kValue,
                "a: K = " + std::to_string(d.k) + " exceeds " + (int4 ? "kMaxKInt4" : "kMaxKInt8") +
                    " = " + std::to_string(max_k) + ", beyond which the int32 sum can overflow");
  }
  return d;
}

Dims check_f32_operands(const TensorView& a, const TensorView& b) {
  check_matrix(a, "a");
  check_dtype(a, "a", {DType::kFloat32});
  check_matrix(b, "b");
  check_dtype(b, "b", {DType::kFloat32});
  const Dims d{a.shape[0], b.shape[0], a.shape[1]};
  if (b.shape[1] != d.k) {
    throw_error(ErrorKind::kValue, "b: expected " + std::to_string(d.k) +
                                       " columns (K, the columns of a), got " +
                                       std::to_string(b.shape[1]));
  }
  return d;
}

// ------------------------------------------------------------------------------ row expansion

// Byte j of a packed row -> its two codes as int8, low nibble first (little-endian uint16).
struct Int4Lut {
  uint16_t pair[256];
  Int4Lut() {
    for (int v = 0; v < 256; ++v) {
      const uint8_t byte = static_cast<uint8_t>(v);
      const uint8_t lo = static_cast<uint8_t>(static_cast<int8_t>(unpack_int4_lo(byte)));
      const uint8_t hi = static_cast<uint8_t>(static_cast<int8_t>(unpack_int4_hi(byte)));
      pair[v] = static_cast<uint16_t>(lo | (hi << 8));
    }
  }
};
const Int4Lut& int4_lut() {
  static const Int4Lut lut;
  return lut;
}

// Codes [k0, k1) of row `row` of an int8 or packed INT4 matrix (K columns) as int8; k0 even. For
// odd K the padding nibble of the last byte is never read, so a nonzero pad cannot leak into a
// product.
void expand_row(const TensorView& x, int64_t row, int64_t k, int64_t k0, int64_t k1, int8_t* out) {
  if (x.dtype == DType::kInt8) {
    std::memcpy(out, x.ptr<const int8_t>() + row * x.strides[0] + k0, static_cast<size_t>(k1 - k0));
    return;
  }
  const uint8_t* src = x.ptr<const uint8_t>() + row * packed_row_bytes(k) + k0 / 2;
  const int64_t pairs = (k1 - k0) / 2;
  int64_t j = cpu_features().avx2 ? expand_int4_avx2(src, pairs, out) : 0;
  const uint16_t* lut = int4_lut().pair;
  for (; j < pairs; ++j) std::memcpy(out + 2 * j, &lut[src[j]], 2);
  if ((k1 - k0) & 1) out[2 * pairs] = static_cast<int8_t>(unpack_int4_lo(src[pairs]));
}

// 64-byte aligned scratch memory (panels are read with full-vector loads).
struct AlignedBuffer {
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> mem;
  explicit AlignedBuffer(size_t bytes) {
    const size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
    mem.reset(std::aligned_alloc(64, rounded));
    if (!mem) throw_error(ErrorKind::kRuntime, "gemm: out of memory for packed panels");
  }
  template <typename T>
  T* get() const {
    return static_cast<T*>(mem.get());
  }
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Products below this many multiply-adds run on the calling thread (the pool costs microseconds).
constexpr int64_t kParallelMinWork = int64_t{1} << 18;

void maybe_parallel_for(bool parallel, int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (parallel) {
    parallel_for(n, 1, fn);
  } else if (n > 0) {
    fn(0, n);
  }
}

// ----------------------------------------------------------------------------- blocked driver
//
// Shared by the integer and fp32 products. Panels hold 4-byte units (4 or 2 integer codes, or one
// float) as [unit][row]. K is processed in chunks whose packed panels fit kPackBudget bytes; within
// a chunk every output tile (mc x nc) runs on one thread over K blocks of kc units: a B micro-panel
// (kc x NR) stays in L1 while the A micro-panels of the tile stream beneath it. Tiles never depend
// on the thread count, and each output element is accumulated in ascending K order.

constexpr int64_t kPackBudget = int64_t{64} << 20;

struct Geometry {
  int mr, nr;
  int64_t m, n, units;  // K in units
  int64_t mc, nc, kc;   // tile rows, tile columns, K block in units
};

// pack(is_a, p0, p1, u0, u1, dst, start): panels [p0, p1) of A (MR rows each) or B (NR rows), units
// [u0, u1), written at dst (panel p at (p - p0) * rows * (u1 - u0) * 4 bytes); for B also the start
// values of the accumulators of each column. kernel(a, b, ku, c, ldc, start or nullptr) as in
// gemm_kernels.h. combine(acc, start) merges a partial result from an earlier chunk with the start
// value of the next. sink(m0, n0, rows, cols, tile, ld) takes each finished tile.
template <typename Acc, typename Pack, typename Kernel, typename Combine, typename Sink>
void run_blocked(const Geometry& g, bool parallel, const Pack& pack, const Kernel& kernel,
                 const Combine& combine, const Sink& sink) {
  if (g.m == 0 || g.n == 0) return;
  const int64_t mp = round_up(g.m, g.mr), np = round_up(g.n, g.nr);
  int64_t cu = std::max<int64_t>(g.kc, kPackBudget / ((mp + np) * 4) / g.kc * g.kc);
  cu = std::max<int64_t>(1, std::min(cu, g.units));
  const int64_t chunks = g.units == 0 ? 1 : (g.units + cu - 1) / cu;
  AlignedBuffer ap(static_cast<size_t>(mp * cu * 4)), bp(static_cast<size_t>(np * cu * 4));
  std::vector<Acc> start(static_cast<size_t>(np), Acc{0});
  std::vector<Acc> partial(chunks > 1 ? static_cast<size_t>(g.m * g.n) : 0);
  const int64_t mc = round_up(g.mc, g.mr), nc = round_up(g.nc, g.nr);
  const int64_t tiles_m = (g.m + mc - 1) / mc, tiles_n = (g.n + nc - 1) / nc;

  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t u0 = ch * cu, u1 = std::min(g.units, u0 + cu), un = u1 - u0;
    const int64_t a_panel = g.mr * un * 4, b_panel = g.nr * un * 4;  // bytes
    maybe_parallel_for(parallel, mp / g.mr, [&](int64_t p0, int64_t p1) {
      pack(true, p0, p1, u0, u1, ap.get<uint8_t>() + p0 * a_panel, nullptr);
    });
    maybe_parallel_for(parallel, np / g.nr, [&](int64_t p0, int64_t p1) {
      pack(false, p0, p1, u0, u1, bp.get<uint8_t>() + p0 * b_panel, start.data() + p0 * g.nr);
    });
    const bool first = ch == 0, last = ch + 1 == chunks;
    maybe_parallel_for(parallel, tiles_m * tiles_n, [&](int64_t t0, int64_t t1) {
      std::vector<Acc> tile(static_cast<size_t>(mc * nc), Acc{0});
      const int64_t ld = nc;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = (t / tiles_n) * mc, n0 = (t % tiles_n) * nc;
        const int64_t mt = std::min(mc, mp - m0), nt = std::min(nc, np - n0);
        const int64_t rows = std::min(mt, g.m - m0), cols = std::min(nt, g.n - n0);
        if (un == 0) {  // K = 0: the accumulators keep their start values
          for (int64_t i = 0; i < mt; ++i)
            std::copy(start.begin() + n0, start.begin() + n0 + nt, tile.begin() + i * ld);
        } else if (!first) {  // continue from the previous chunks
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < cols; ++j)
              tile[i * ld + j] = combine(partial[(m0 + i) * g.n + n0 + j], start[n0 + j]);
        }
        for (int64_t k0 = 0; k0 < un; k0 += g.kc) {
          const int64_t ku = std::min(g.kc, un - k0);
          for (int64_t jr = 0; jr < nt; jr += g.nr) {
            const uint8_t* bpan = bp.get<uint8_t>() + (n0 + jr) / g.nr * b_panel + k0 * g.nr * 4;
            const Acc* st = (first && k0 == 0) ? start.data() + n0 + jr : nullptr;
            for (int64_t ir = 0; ir < mt; ir += g.mr) {
              const uint8_t* apan = ap.get<uint8_t>() + (m0 + ir) / g.mr * a_panel + k0 * g.mr * 4;
              kernel(apan, bpan, ku, &tile[ir * ld + jr], ld, st);
            }
          }
        }
        if (last) {
          sink(m0, n0, rows, cols, tile.data(), ld);
        } else {
          for (int64_t i = 0; i < rows; ++i)
            std::copy(tile.begin() + i * ld, tile.begin() + i * ld + cols,
                      partial.begin() + (m0 + i) * g.n + n0);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------- integer packing

// Integer tiling: kc = 512 codes keeps a 64-column B micro-panel at 32 KiB.
constexpr int64_t kS32KcCodes = 512;
constexpr int64_t kS32Mc = 96;
constexpr int64_t kS32Nc = 256;

// Panels [p0, p1) of rr rows of x over units [u0, u1) (rows past the matrix are zeros). Byte
// layout: A bytes are code + 128 (XOR 0x80), B bytes the codes, and B's start values -128 * sum_k
// b[n, k] over the chunk (mod 2^32). int16 layout: codes widened to int16, start values 0. The rows
// are expanded a block of units at a time into scratch, then the panel is written in order.
constexpr int64_t kPackBlockUnits = 128;

void pack_s32(const TensorView& x, int64_t k, bool int16_layout, bool is_a, int rr, int64_t p0,
              int64_t p1, int64_t u0, int64_t u1, uint8_t* dst, int32_t* start) {
  const int64_t unit_k = int16_layout ? 2 : 4;
  const int64_t un = u1 - u0;
  const uint32_t flip = (is_a && !int16_layout) ? 0x80808080u : 0u;
  std::vector<uint32_t> units(static_cast<size_t>(rr * kPackBlockUnits));  // [row][unit]
  std::vector<int8_t> codes(static_cast<size_t>(kPackBlockUnits * unit_k));
  std::vector<int32_t> sums(static_cast<size_t>(rr));
  for (int64_t p = p0; p < p1; ++p) {
    uint8_t* panel = dst + (p - p0) * rr * un * 4;
    std::fill(sums.begin(), sums.end(), 0);
    for (int64_t ub = 0; ub < un; ub += kPackBlockUnits) {
      const int64_t ue = std::min(un, ub + kPackBlockUnits);
      const int64_t k0 = (u0 + ub) * unit_k, k1 = std::min(k, (u0 + ue) * unit_k);
      for (int r = 0; r < rr; ++r) {
        const int64_t row = p * rr + r;
        const int64_t valid = row < x.shape[0] ? std::max<int64_t>(0, k1 - k0) : 0;
        if (valid > 0) expand_row(x, row, k, k0, k1, codes.data());
        std::memset(codes.data() + valid, 0, static_cast<size_t>((ue - ub) * unit_k - valid));
        uint32_t* out = units.data() + r * kPackBlockUnits;
        if (!int16_layout) {
          std::memcpy(out, codes.data(), static_cast<size_t>((ue - ub) * 4));
        } else {
          for (int64_t u = 0; u < ue - ub; ++u) {
            const int16_t pair[2] = {codes[2 * u], codes[2 * u + 1]};
            std::memcpy(out + u, pair, 4);
          }
        }
        int32_t sum = 0;
        for (int64_t t = 0; t < valid; ++t) sum += codes[t];
        sums[r] += sum;
      }
      uint32_t* w = reinterpret_cast<uint32_t*>(panel) + ub * rr;
      for (int64_t u = 0; u < ue - ub; ++u)
        for (int r = 0; r < rr; ++r) w[u * rr + r] = units[r * kPackBlockUnits + u] ^ flip;
    }
    if (start != nullptr) {
      for (int r = 0; r < rr; ++r)
        start[(p - p0) * rr + r] =
            int16_layout ? 0 : static_cast<int32_t>(0u - 128u * static_cast<uint32_t>(sums[r]));
    }
  }
}

int32_t wrap_add(int32_t x, int32_t y) {
  return static_cast<int32_t>(static_cast<uint32_t>(x) + static_cast<uint32_t>(y));
}

// Called once per finished output tile (rows x cols at [m0, n0]; tile row stride ld), possibly from
// several threads at once for disjoint tiles.
using S32Sink = std::function<void(int64_t m0, int64_t n0, int64_t rows, int64_t cols,
                                   const int32_t* tile, int64_t ld)>;

void run_s32(const S32Kernel& kern, bool parallel, const TensorView& a, const TensorView& b,
             const Dims& d, const S32Sink& sink) {
  const int64_t unit_k = kern.int16_layout ? 2 : 4;
  const int64_t units = round_up(d.k, unit_k) / unit_k;
  const Geometry g{kern.mr, kern.nr, d.m, d.n, units, kS32Mc, kS32Nc, kS32KcCodes / unit_k};
  parallel = parallel && d.m * d.n * std::max<int64_t>(d.k, 1) >= kParallelMinWork;
  auto pack = [&](bool is_a, int64_t p0, int64_t p1, int64_t u0, int64_t u1, uint8_t* dst,
                  int32_t* start) {
    pack_s32(is_a ? a : b, d.k, kern.int16_layout, is_a, is_a ? kern.mr : kern.nr, p0, p1, u0, u1,
             dst, start);
  };
  auto kernel = [&](const uint8_t* ap, const uint8_t* bp, int64_t ku, int32_t* c, int64_t ldc,
                    const int32_t* start) { kern.fn(ap, bp, ku, c, ldc, start); };
  run_blocked<int32_t>(g, parallel, pack, kernel, wrap_add, sink);
}

// ------------------------------------------------------------------------------- fp32 packing

constexpr int64_t kF32Kc = 128;  // 128 x 64 fp32 B micro-panel = 32 KiB
constexpr int64_t kF32Mc = 96;
constexpr int64_t kF32Nc = 256;

void pack_f32(const TensorView& x, int rr, int64_t p0, int64_t p1, int64_t k0, int64_t k1,
              uint8_t* dst) {
  const int64_t kn = k1 - k0;
  std::vector<const float*> src(static_cast<size_t>(rr));
  for (int64_t p = p0; p < p1; ++p) {
    float* panel = reinterpret_cast<float*>(dst) + (p - p0) * rr * kn;
    for (int r = 0; r < rr; ++r) {
      const int64_t row = p * rr + r;
      src[r] = row < x.shape[0] ? x.ptr<const float>() + row * x.strides[0] + k0 : nullptr;
    }
    for (int64_t t = 0; t < kn; ++t)
      for (int r = 0; r < rr; ++r) panel[t * rr + r] = src[r] != nullptr ? src[r][t] : 0.0f;
  }
}

void run_f32(const F32Kernel& kern, bool parallel, const TensorView& a, const TensorView& b,
             const Dims& d, float alpha, bool accumulate, TensorView out) {
  const Geometry g{kern.mr, kern.nr, d.m, d.n, d.k, kF32Mc, kF32Nc, kF32Kc};
  parallel = parallel && d.m * d.n * std::max<int64_t>(d.k, 1) >= kParallelMinWork;
  auto pack = [&](bool is_a, int64_t p0, int64_t p1, int64_t u0, int64_t u1, uint8_t* dst, float*) {
    pack_f32(is_a ? a : b, is_a ? kern.mr : kern.nr, p0, p1, u0, u1, dst);
  };
  // The start values are zeros (a fresh fma chain); later chunks continue the chain unchanged.
  auto kernel = [&](const uint8_t* ap, const uint8_t* bp, int64_t ku, float* c, int64_t ldc,
                    const float* start) {
    kern.fn(reinterpret_cast<const float*>(ap), reinterpret_cast<const float*>(bp), ku, c, ldc,
            start != nullptr);
  };
  auto combine = [](float acc, float) { return acc; };
  float* o = out.ptr<float>();
  const int64_t ldo = out.strides[0];
  auto sink = [&](int64_t m0, int64_t n0, int64_t rows, int64_t cols, const float* tile,
                  int64_t ld) {
    for (int64_t i = 0; i < rows; ++i) {
      const float* src = tile + i * ld;
      float* dst = o + (m0 + i) * ldo + n0;
      if (accumulate) {
        for (int64_t j = 0; j < cols; ++j) dst[j] = alpha * src[j] + dst[j];
      } else {
        for (int64_t j = 0; j < cols; ++j) dst[j] = alpha * src[j];
      }
    }
  };
  run_blocked<float>(g, parallel, pack, kernel, combine, sink);
}

// ------------------------------------------------------------------------ scalar micro-kernels

constexpr int kScalarMr = 4, kScalarNr = 16;

// Byte layout; uint32 arithmetic wraps like the SIMD accumulators (see gemm_kernels.h).
void s32_scalar_4x16(const void* ap, const void* bp, int64_t kgroups, int32_t* c, int64_t ldc,
                     const int32_t* init) {
  const uint8_t* a = static_cast<const uint8_t*>(ap);
  const int8_t* b = static_cast<const int8_t*>(bp);
  uint32_t acc[kScalarMr][kScalarNr];
  for (int r = 0; r < kScalarMr; ++r)
    for (int j = 0; j < kScalarNr; ++j)
      acc[r][j] = static_cast<uint32_t>(init != nullptr ? init[j] : c[r * ldc + j]);
  for (int64_t g = 0; g < kgroups; ++g) {
    const uint8_t* ag = a + g * kScalarMr * 4;
    const int8_t* bg = b + g * kScalarNr * 4;
    for (int r = 0; r < kScalarMr; ++r)
      for (int j = 0; j < kScalarNr; ++j) {
        uint32_t s = 0;
        for (int t = 0; t < 4; ++t)
          s += static_cast<uint32_t>(ag[r * 4 + t]) *
               static_cast<uint32_t>(static_cast<int32_t>(bg[j * 4 + t]));
        acc[r][j] += s;
      }
  }
  for (int r = 0; r < kScalarMr; ++r)
    for (int j = 0; j < kScalarNr; ++j) c[r * ldc + j] = static_cast<int32_t>(acc[r][j]);
}

void f32_scalar_4x16(const float* a, const float* b, int64_t k, float* c, int64_t ldc,
                     bool init_zero) {
  float acc[kScalarMr][kScalarNr];
  for (int r = 0; r < kScalarMr; ++r)
    for (int j = 0; j < kScalarNr; ++j) acc[r][j] = init_zero ? 0.0f : c[r * ldc + j];
  for (int64_t p = 0; p < k; ++p)
    for (int r = 0; r < kScalarMr; ++r)
      for (int j = 0; j < kScalarNr; ++j)
        acc[r][j] = std::fma(a[p * kScalarMr + r], b[p * kScalarNr + j], acc[r][j]);
  for (int r = 0; r < kScalarMr; ++r)
    for (int j = 0; j < kScalarNr; ++j) c[r * ldc + j] = acc[r][j];
}

// ------------------------------------------------------------------------ kernel selection

S32Kernel s32_kernel(GemmIsa isa) {
  S32Kernel k{nullptr, 1, 1, false};
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case GemmIsa::kScalar:
      k = {s32_scalar_4x16, kScalarMr, kScalarNr, false};
      break;
    case GemmIsa::kAvx2:
      if (f.avx2) k = s32_kernel_avx2();
      break;
    case GemmIsa::kAvxVnni:
      if (f.avx_vnni) k = s32_kernel_avx_vnni();
      break;
    case GemmIsa::kAvx512:
      if (f.avx512_vnni) k = s32_kernel_avx512_vnni();
      break;
  }
  return k;
}

F32Kernel f32_kernel(GemmIsa isa) {
  F32Kernel k{nullptr, 1, 1};
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case GemmIsa::kScalar:
      k = {f32_scalar_4x16, kScalarMr, kScalarNr};
      break;
    case GemmIsa::kAvx2:
      if (f.avx2) k = f32_kernel_avx2();
      break;
    case GemmIsa::kAvxVnni:
      break;
    case GemmIsa::kAvx512:
      if (f.avx512) k = f32_kernel_avx512();
      break;
  }
  return k;
}

}  // namespace

// ------------------------------------------------------------------------ internal entry points

const char* gemm_isa_name(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::kScalar:
      return "scalar";
    case GemmIsa::kAvx2:
      return "avx2";
    case GemmIsa::kAvxVnni:
      return "avx_vnni";
    case GemmIsa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

std::vector<GemmIsa> gemm_s32_isas() {
  std::vector<GemmIsa> r;
  for (GemmIsa isa : {GemmIsa::kScalar, GemmIsa::kAvx2, GemmIsa::kAvxVnni, GemmIsa::kAvx512})
    if (s32_kernel(isa).fn != nullptr) r.push_back(isa);
  return r;
}

std::vector<GemmIsa> gemm_f32_isas() {
  std::vector<GemmIsa> r;
  for (GemmIsa isa : {GemmIsa::kScalar, GemmIsa::kAvx2, GemmIsa::kAvx512})
    if (f32_kernel(isa).fn != nullptr) r.push_back(isa);
  return r;
}

GemmIsa gemm_s32_best_isa() {
  static const GemmIsa best = gemm_s32_isas().back();
  return best;
}

GemmIsa gemm_f32_best_isa() {
  static const GemmIsa best = gemm_f32_isas().back();
  return best;
}

void gemm_s32_with(GemmIsa isa, bool parallel, const TensorView& a, const TensorView& b,
                   TensorView c) {
  const Dims d = check_s32_operands(a, b);
  check_dtype(c, "c", {DType::kInt32});
  check_shape(c, "c", d.m, d.n);
  const S32Kernel kern = s32_kernel(isa);
  if (kern.fn == nullptr) {
    throw_error(ErrorKind::kNotImplemented,
                std::string("isa: the ") + gemm_isa_name(isa) + " integer kernel cannot run here");
  }
  int32_t* out = c.ptr<int32_t>();
  const int64_t ldc = c.strides[0];
  run_s32(kern, parallel, a, b, d,
          [&](int64_t m0, int64_t n0, int64_t rows, int64_t cols, const int32_t* tile, int64_t ld) {
            for (int64_t i = 0; i < rows; ++i)
              std::memcpy(out + (m0 + i) * ldc + n0, tile + i * ld, static_cast<size_t>(cols) * 4);
          });
}

void gemm_f32_with(GemmIsa isa, bool parallel, const TensorView& a, const TensorView& b,
                   float alpha, bool accumulate, TensorView out) {
  const Dims d = check_f32_operands(a, b);
  check_dtype(out, "out", {DType::kFloat32});
  check_shape(out, "out", d.m, d.n);
  const F32Kernel kern = f32_kernel(isa);
  if (kern.fn == nullptr) {
    throw_error(ErrorKind::kNotImplemented,
                std::string("isa: the ") + gemm_isa_name(isa) + " fp32 kernel cannot run here");
  }
  run_f32(kern, parallel, a, b, d, alpha, accumulate, out);
}

}  // namespace detail

// ---------------------------------------------------------------------------------- public API

void gemm_s32_ref(const TensorView& a, const TensorView& b, TensorView c) {
  const detail::Dims d = detail::check_s32_operands(a, b);
  check_dtype(c, "c", {DType::kInt32});
  check_shape(c, "c", d.m, d.n);
  // Codes of one row: int8 as stored; packed INT4 element 2j from the low nibble of byte j, 2j + 1
  // from the high nibble.
  auto codes = [&d](const TensorView& x, int64_t row, int8_t* out) {
    for (int64_t k = 0; k < d.k; ++k) {
      if (x.dtype == DType::kInt8) {
        out[k] = x.ptr<const int8_t>()[row * x.strides[0] + k];
      } else {
        const uint8_t byte = x.ptr<const uint8_t>()[row * packed_row_bytes(d.k) + k / 2];
        out[k] = static_cast<int8_t>((k % 2 == 0) ? unpack_int4_lo(byte) : unpack_int4_hi(byte));
      }
    }
  };
  std::vector<int8_t> bcodes(static_cast<size_t>(d.n * d.k)), arow(static_cast<size_t>(d.k));
  for (int64_t n = 0; n < d.n; ++n) codes(b, n, bcodes.data() + n * d.k);
  for (int64_t m = 0; m < d.m; ++m) {
    codes(a, m, arow.data());
    for (int64_t n = 0; n < d.n; ++n) {
      const int8_t* bn = bcodes.data() + n * d.k;
      int32_t acc = 0;  // exact: |partial sums| <= K * max|a * b| < 2^31 by the K bound
      for (int64_t k = 0; k < d.k; ++k) acc += int32_t{arow[k]} * int32_t{bn[k]};
      c.ptr<int32_t>()[m * c.strides[0] + n] = acc;
    }
  }
}

void gemm_s32(const TensorView& a, const TensorView& b, TensorView c) {
  detail::gemm_s32_with(detail::gemm_s32_best_isa(), true, a, b, c);
}

void gemm_scaled(const TensorView& a, const TensorView& b, const Epilogue& epilogue,
                 TensorView out) {
  const detail::Dims d = detail::check_s32_operands(a, b);
  check_dtype(out, "out", {DType::kFloat32, DType::kBFloat16});
  check_shape(out, "out", d.m, d.n);
  const float* row_scale = nullptr;
  if (epilogue.row_scale.data != nullptr) {
    check_dtype(epilogue.row_scale, "epilogue.row_scale", {DType::kFloat32});
    check_vector(epilogue.row_scale, "epilogue.row_scale", d.m);
    row_scale = epilogue.row_scale.ptr<const float>();
  }
  const void* bias = epilogue.bias.data;
  const bool bias_bf16 = epilogue.bias.dtype == DType::kBFloat16;
  if (bias != nullptr) {
    check_dtype(epilogue.bias, "epilogue.bias", {DType::kFloat32, DType::kBFloat16});
    check_vector(epilogue.bias, "epilogue.bias", d.n);
  }
  const bool out_bf16 = out.dtype == DType::kBFloat16;
  if (epilogue.accumulate && out_bf16) {
    throw_error(ErrorKind::kValue,
                "epilogue.accumulate: accumulation needs an fp32 out, got bfloat16");
  }
  const float alpha = epilogue.alpha;
  const bool accumulate = epilogue.accumulate;
  const int64_t ldo = out.strides[0];
  const detail::S32Kernel kern = detail::s32_kernel(detail::gemm_s32_best_isa());
  detail::run_s32(
      kern, true, a, b, d,
      [&](int64_t m0, int64_t n0, int64_t rows, int64_t cols, const int32_t* tile, int64_t ld) {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t m = m0 + i;
          const float s = row_scale != nullptr ? alpha * row_scale[m] : alpha;
          const int32_t* acc = tile + i * ld;
          for (int64_t j = 0; j < cols; ++j) {
            const int64_t n = n0 + j;
            float v = s * static_cast<float>(acc[j]);
            if (bias != nullptr) {
              v = v + (bias_bf16 ? bf16_to_float(static_cast<const BFloat16*>(bias)[n])
                                 : static_cast<const float*>(bias)[n]);
            }
            if (out_bf16) {
              out.ptr<BFloat16>()[m * ldo + n] = float_to_bf16(v);
            } else {
              float* o = out.ptr<float>() + m * ldo + n;
              *o = accumulate ? v + *o : v;
            }
          }
        }
      });
}

void gemm_f32(const TensorView& a, const TensorView& b, float alpha, bool accumulate,
              TensorView out) {
  detail::gemm_f32_with(detail::gemm_f32_best_isa(), true, a, b, alpha, accumulate, out);
}

namespace {

template <typename T>
void transpose_typed(const TensorView& in, TensorView out) {
  const int64_t rows = in.shape[0], cols = in.shape[1];
  const int64_t ldi = in.strides[0], ldo = out.strides[0];
  const T* src = in.ptr<const T>();
  T* dst = out.ptr<T>();
  constexpr int64_t kBlock = 64;  // a 64 x 64 block of either side stays in L1
  const int64_t row_blocks = (rows + kBlock - 1) / kBlock;
  auto body = [&](int64_t b0, int64_t b1) {
    for (int64_t rb = b0; rb < b1; ++rb) {
      const int64_t r0 = rb * kBlock, r1 = std::min(rows, r0 + kBlock);
      for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
        const int64_t c1 = std::min(cols, c0 + kBlock);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * ldo + r] = src[r * ldi + c];
      }
    }
  };
  if (rows * cols >= (int64_t{1} << 16)) {
    detail::parallel_for(row_blocks, 1, body);
  } else {
    body(0, row_blocks);
  }
}

}  // namespace

void transpose(const TensorView& in, TensorView out) {
  check_matrix(in, "in");
  check_dtype(in, "in", {DType::kFloat32, DType::kInt8, DType::kInt32});
  check_dtype(out, "out", {in.dtype});
  check_shape(out, "out", in.shape[1], in.shape[0]);
  if (in.numel() == 0) return;
  switch (in.dtype) {
    case DType::kFloat32:
      transpose_typed<float>(in, out);
      break;
    case DType::kInt8:
      transpose_typed<int8_t>(in, out);
      break;
    default:
      transpose_typed<int32_t>(in, out);
      break;
  }
}

}  // namespace int4train
