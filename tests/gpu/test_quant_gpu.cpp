// GPU tests of the quantizers and transforms (cuda.h) against the CPU core, bit for bit: the fused
// Hadamard + LSQ pass (operand, packed codes, compact aux bits, non-finite count) against
// hadamard_transform_ref + lsq_quantize_compact; the plain transform against
// hadamard_transform_ref; the bit split against quantize_bitsplit_ref; the compact LSQ backward
// against lsq_backward_compact. Shapes include 1, odd, non-multiple-of-8 and strided rows.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gpu_test_util.h"
#include "int4train/cuda.h"
#include "int4train/hadamard.h"
#include "int4train/int4.h"
#include "int4train/linear.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"

namespace {

using namespace int4train;
using gputest::DevBuf;

enum class Data { kNormal, kOutliers, kNonFinite, kTies };

const char* data_name(Data d) {
  switch (d) {
    case Data::kNormal:
      return "normal";
    case Data::kOutliers:
      return "outliers";
    case Data::kNonFinite:
      return "nonfinite";
    default:
      return "ties";
  }
}

// rows x cols values; outlier channels x30; a few NaN/Inf; or exact half-integer multiples of 1/4.
std::vector<float> make_data(int64_t rows, int64_t cols, Data d, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> id(-40, 40);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float v = nd(rng);
      if (d == Data::kOutliers && c % 37 == 5) v *= 30.0f;
      if (d == Data::kTies) v = (static_cast<float>(id(rng)) + 0.5f) * 0.25f;
      x[static_cast<size_t>(r * cols + c)] = v;
    }
  }
  if (d == Data::kNonFinite && !x.empty()) {
    x[x.size() / 3] = std::numeric_limits<float>::quiet_NaN();
    x[x.size() / 2] = std::numeric_limits<float>::infinity();
    x[x.size() - 1] = -std::numeric_limits<float>::infinity();
  }
  return x;
}

// A device copy of host values as fp32 or bf16 with row stride ld >= cols (the gap poisoned).
struct DevMatrix {
  DevBuf buf;
  TensorView view;
};

DevMatrix to_device(const std::vector<float>& x, int64_t rows, int64_t cols, bool bf16,
                    int64_t ld) {
  const size_t esz = bf16 ? 2 : 4;
  DevMatrix m{DevBuf(static_cast<size_t>(std::max<int64_t>(1, rows * ld)) * esz), {}};
  m.buf.poison();
  std::vector<uint8_t> host(static_cast<size_t>(std::max<int64_t>(1, rows * ld)) * esz, 0xA5);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float v = x[static_cast<size_t>(r * cols + c)];
      if (bf16) {
        const uint16_t b = float_to_bf16(v).bits;
        std::memcpy(&host[static_cast<size_t>(r * ld + c) * 2], &b, 2);
      } else {
        std::memcpy(&host[static_cast<size_t>(r * ld + c) * 4], &v, 4);
      }
    }
  }
  cudaMemcpy(m.buf.get(), host.data(), host.size(), cudaMemcpyHostToDevice);
  m.view = make_matrix(m.buf.get(), bf16 ? DType::kBFloat16 : DType::kFloat32, rows, cols);
  m.view.strides[0] = ld;
  return m;
}

// The same values as the CPU sees them (bf16-rounded when the device copy is bf16), as a view of a
// host vector the caller keeps.
std::vector<float> as_seen(const std::vector<float>& x, bool bf16) {
  if (!bf16) return x;
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = bf16_to_float(float_to_bf16(x[i]));
  return y;
}

template <typename T>
int64_t count_diff(const std::vector<T>& a, const std::vector<T>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) n += !(a[i] == b[i]);
  return n + static_cast<int64_t>(std::max(a.size(), b.size()) - std::min(a.size(), b.size()));
}

// ---- fused Hadamard + LSQ
// How many bytes of a GEMM operand (FP8 e4m3 or INT8: rows x padded columns, or transposed, cols x
// padded rows; fp8_padded_cols) differ from the codes `want` (rows x cols), the padding zero.
int64_t operand_diff(const std::vector<uint8_t>& got, const std::vector<int8_t>& want, int64_t rows,
                     int64_t cols, bool s8, bool transposed) {
  const int64_t outer = transposed ? cols : rows, len = transposed ? rows : cols;
  const int64_t padded = fp8_padded_cols(len);
  int64_t bad = 0;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < padded; ++i) {
      const int64_t r = transposed ? i : o, c = transposed ? o : i;
      const float w = i < len ? want[static_cast<size_t>(r * cols + c)] : 0.0f;
      const uint8_t byte = got[static_cast<size_t>(o * padded + i)];
      bad +=
          !((s8 ? static_cast<float>(static_cast<int8_t>(byte)) : gputest::decode_e4m3(byte)) == w);
    }
  }
  return bad;
}

// data_scale: the data times a power of two; step (if > 0): the step, else LSQ's initial one.
void test_hadamard_lsq(int64_t rows, int64_t cols, int32_t block, bool bf16, Data data,
                       int64_t ld_extra, bool bad_step, float data_scale = 1.0f,
                       float force_step = 0.0f) {
  auto x0 = make_data(rows, cols, data, 11 + rows * 3 + cols + block);
  for (float& v : x0) v *= data_scale;
  const auto x = as_seen(x0, bf16);
  // CPU: x~ = x B_g (fp32), then the compact quantizer.
  std::vector<float> xt(x.size());
  hadamard_transform_ref(make_matrix(const_cast<float*>(x.data()), DType::kFloat32, rows, cols),
                         make_matrix(xt.data(), DType::kFloat32, rows, cols), block);
  double mean = 0.0;
  int64_t finite = 0;
  for (float v : xt) {
    if (std::isfinite(v)) mean += std::fabs(v), ++finite;
  }
  float step =
      finite > 0 && mean > 0 ? static_cast<float>(2.0 * mean / finite / std::sqrt(7.0)) : 1.0f;
  if (data == Data::kTies) step = 0.25f;
  if (force_step > 0.0f) step = force_step;
  const RandomKey key{0x1234 + static_cast<uint64_t>(cols),
                      make_stream(3, 7, RandomPurpose::kLsqAux)};
  std::vector<uint8_t> want_packed(static_cast<size_t>(rows * packed_row_bytes(cols)));
  std::vector<uint8_t> want_aux(static_cast<size_t>(compact_aux_bytes(rows, cols)));
  int64_t want_bad = 0;
  if (!bad_step) {
    want_bad = lsq_quantize_compact(
        make_matrix(xt.data(), DType::kFloat32, rows, cols), make_scalar(&step, DType::kFloat32),
        key, make_matrix(want_packed.data(), DType::kInt4Packed, rows, cols),
        make_vector(want_aux.data(), DType::kUInt8, static_cast<int64_t>(want_aux.size())));
  }
  std::vector<int8_t> want_codes(static_cast<size_t>(rows * cols));
  if (!bad_step) {
    unpack_int4(make_matrix(want_packed.data(), DType::kInt4Packed, rows, cols),
                make_matrix(want_codes.data(), DType::kInt8, rows, cols));
  }

  DevMatrix dx = to_device(x0, rows, cols, bf16, cols + ld_extra);
  const float dev_step = bad_step ? 0.0f : step;
  DevBuf dstep = gputest::upload(std::vector<float>{dev_step});
  const int64_t kp = fp8_padded_cols(cols);
  DevBuf dop(static_cast<size_t>(std::max<int64_t>(1, rows * kp)));
  DevBuf dpk(std::max<size_t>(1, want_packed.size()));
  DevBuf daux(std::max<size_t>(1, want_aux.size()));
  DevBuf dcnt = gputest::upload(std::vector<int64_t>{5});  // incremented, not overwritten
  dop.poison();
  dpk.poison();
  daux.poison();
  hadamard_lsq_quantize_cuda(
      dx.view, block, make_scalar(dstep.get(), DType::kFloat32), key,
      make_matrix(dop.get(), DType::kFloat8E4M3, rows, kp),
      make_matrix(dpk.get(), DType::kInt4Packed, rows, cols),
      make_vector(daux.get(), DType::kUInt8, static_cast<int64_t>(want_aux.size())),
      make_scalar(dcnt.get(), DType::kInt64), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const int64_t got_bad = gputest::download<int64_t>(dcnt, 1)[0] - 5;
  if (bad_step) {
    GPU_CHECK_MSG(got_bad == rows * cols, "a zero step must count every element, got " << got_bad);
    return;
  }
  GPU_CHECK_MSG(got_bad == want_bad, "non-finite count " << got_bad << " want " << want_bad);
  const auto got_packed = gputest::download<uint8_t>(dpk, want_packed.size());
  const auto got_aux = gputest::download<uint8_t>(daux, want_aux.size());
  GPU_CHECK_MSG(count_diff(got_packed, want_packed) == 0, count_diff(got_packed, want_packed)
                                                              << " packed bytes differ");
  GPU_CHECK_MSG(count_diff(got_aux, want_aux) == 0, count_diff(got_aux, want_aux)
                                                        << " aux bytes differ");
  const auto op = gputest::download<uint8_t>(dop, static_cast<size_t>(rows * kp));
  const int64_t bad_op = operand_diff(op, want_codes, rows, cols, false, false);
  GPU_CHECK_MSG(bad_op == 0, bad_op << " operand bytes differ");
  // Each output alone, as the W pass asks for them (the kernels specialise on what is asked for,
  // e.g. no nibbles for the FP8 operand alone): the FP8 operand, the INT8 operand, the packed
  // codes.
  for (int alone = 0; alone < 3; ++alone) {
    const bool s8 = alone == 1, pk = alone == 2;
    DevBuf d(pk ? std::max<size_t>(1, want_packed.size())
                : static_cast<size_t>(std::max<int64_t>(1, rows * kp)));
    d.poison();
    hadamard_lsq_quantize_cuda(
        dx.view, block, make_scalar(dstep.get(), DType::kFloat32), RandomKey{},
        pk ? TensorView{} : make_matrix(d.get(), s8 ? DType::kInt8 : DType::kFloat8E4M3, rows, kp),
        pk ? make_matrix(d.get(), DType::kInt4Packed, rows, cols) : TensorView{}, TensorView{},
        TensorView{}, nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    if (pk) {
      const auto got = gputest::download<uint8_t>(d, want_packed.size());
      GPU_CHECK_MSG(count_diff(got, want_packed) == 0,
                    count_diff(got, want_packed) << " packed bytes differ (packed alone)");
      continue;
    }
    const auto got = gputest::download<uint8_t>(d, static_cast<size_t>(rows * kp));
    const int64_t bad = operand_diff(got, want_codes, rows, cols, s8, false);
    GPU_CHECK_MSG(bad == 0, bad << (s8 ? " INT8" : " FP8") << " operand bytes differ (alone)");
  }
  // The same codes as a transposed operand (hadamard_lsq_codes_t_cuda, the input gradient's weight
  // operand), FP8 and INT8: cols x padded rows, padding zero.
  const int64_t np = fp8_padded_cols(rows);
  for (bool s8 : {false, true}) {
    DevBuf dt(static_cast<size_t>(std::max<int64_t>(1, cols * np)));
    dt.poison();
    hadamard_lsq_codes_t_cuda(
        dx.view, block, make_scalar(dstep.get(), DType::kFloat32),
        make_matrix(dt.get(), s8 ? DType::kInt8 : DType::kFloat8E4M3, cols, np),
        default_cuda_allocator(), nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    const auto t = gputest::download<uint8_t>(dt, static_cast<size_t>(cols * np));
    const int64_t bad_t = operand_diff(t, want_codes, rows, cols, s8, true);
    GPU_CHECK_MSG(bad_t == 0,
                  bad_t << (s8 ? " INT8" : " FP8") << " transposed operand bytes differ");
  }
}

// ---- plain transform
void test_transform(int64_t rows, int64_t cols, int32_t block, bool in_bf16, bool out_bf16,
                    bool in_place) {
  if (in_place && in_bf16 != out_bf16) return;
  const auto x0 = make_data(rows, cols, Data::kOutliers, 77 + cols);
  const auto x = as_seen(x0, in_bf16);
  const size_t oesz = out_bf16 ? 2 : 4;
  std::vector<uint8_t> want(static_cast<size_t>(rows * cols) * oesz);
  hadamard_transform_ref(
      make_matrix(const_cast<float*>(x.data()), DType::kFloat32, rows, cols),
      make_matrix(want.data(), out_bf16 ? DType::kBFloat16 : DType::kFloat32, rows, cols), block);
  DevMatrix din = to_device(x0, rows, cols, in_bf16, cols);
  DevBuf dout(std::max<size_t>(1, want.size()));
  dout.poison();
  TensorView out =
      in_place ? din.view
               : make_matrix(dout.get(), out_bf16 ? DType::kBFloat16 : DType::kFloat32, rows, cols);
  hadamard_transform_cuda(din.view, out, block, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<uint8_t>(in_place ? din.buf : dout, want.size());
  GPU_CHECK_MSG(count_diff(got, want) == 0, count_diff(got, want) << " bytes differ");
}

// ---- bit split
// by_row: grad_scale=row (quantize_bitsplit_rows), rows scaled by 2^(-0.7 (r mod 8)) and every
// 7th row zero, so that every exponent 0..kGradRowMaxExponent occurs; both device forms write
// row_exp.
// last_col: every row's last entry times 8, so that each row's maximum (hence its exponent) sits in
// the last column, past the reduction passes' tile and lane boundaries.
// absmax_bits_cuda against the CPU's absmax: the same bits (any NaN for a NaN), into a poisoned
// word (the function zeroes it before the kernel raises it); an empty g gives 0.
void test_absmax_bits(int64_t rows, int64_t cols, bool bf16, Data data, int64_t ld_extra = 0) {
  const auto g = as_seen(make_data(rows, cols, data, 7 + rows + cols), bf16);
  const float want =
      rows * cols == 0
          ? 0.0f
          : absmax(make_matrix(const_cast<float*>(g.data()), DType::kFloat32, rows, cols));
  uint32_t want_bits = 0;
  std::memcpy(&want_bits, &want, 4);
  DevMatrix dg = to_device(g, rows, cols, bf16, cols + ld_extra);
  DevBuf dout(4);
  dout.poison();
  absmax_bits_cuda(dg.view, make_scalar(dout.get(), DType::kInt32), nullptr);
  GPU_CHECK(cudaDeviceSynchronize() == cudaSuccess);
  const uint32_t got = gputest::download<uint32_t>(dout, 1)[0];
  if (std::isnan(want)) {
    GPU_CHECK_MSG(got > 0x7F800000u && got <= 0x7FFFFFFFu, "want a NaN, got bits " << got);
  } else {
    GPU_CHECK_MSG(got == want_bits, "absmax bits " << got << " want " << want_bits);
  }
  if (rows * cols == 0) GPU_CHECK_MSG(got == 0u, "empty g: bits " << got);
}

void test_bitsplit(int64_t rows, int64_t cols, bool bf16, Data data, bool zeros,
                   int64_t ld_extra = 0, bool by_row = false, bool last_col = false,
                   float scale = 1e-3f) {
  auto g0 = make_data(rows, cols, data, 99 + rows + cols);
  for (auto& v : g0) v *= scale;
  // Tiny data (a non-finite inverse scale): some exact zeros, whose 0 * Inf is NaN (code 0).
  if (scale < 1e-30f) {
    for (size_t i = 0; i < g0.size(); i += 7) g0[i] = 0.0f;
  }
  if (zeros) std::fill(g0.begin(), g0.end(), 0.0f);
  if (last_col) {
    for (int64_t r = 0; r < rows; ++r) g0[static_cast<size_t>(r * cols + cols - 1)] *= 8.0f;
  }
  if (by_row) {
    for (int64_t r = 0; r < rows; ++r) {
      const float f = r % 7 == 3 ? 0.0f : std::exp2(-0.7f * static_cast<float>(r % 8));
      for (int64_t c = 0; c < cols; ++c) g0[static_cast<size_t>(r * cols + c)] *= f;
    }
  }
  const auto g = as_seen(g0, bf16);
  const RandomKey key{42, make_stream(9, 2, RandomPurpose::kGradRound)};
  const size_t pb = static_cast<size_t>(rows * packed_row_bytes(cols));
  std::vector<uint8_t> want_hi(std::max<size_t>(1, pb)), want_lo(std::max<size_t>(1, pb));
  float want_scale = -1.0f;
  std::vector<int8_t> want_exp(static_cast<size_t>(std::max<int64_t>(1, rows)), 0);
  const TensorView gv = make_matrix(const_cast<float*>(g.data()), DType::kFloat32, rows, cols);
  if (by_row) {
    quantize_bitsplit_rows(gv, kGradRowMaxExponent, key,
                           make_matrix(want_hi.data(), DType::kInt4Packed, rows, cols),
                           make_matrix(want_lo.data(), DType::kInt4Packed, rows, cols),
                           make_scalar(&want_scale, DType::kFloat32),
                           make_vector(want_exp.data(), DType::kInt8, rows));
  } else {
    quantize_bitsplit_ref(gv, key, make_matrix(want_hi.data(), DType::kInt4Packed, rows, cols),
                          make_matrix(want_lo.data(), DType::kInt4Packed, rows, cols),
                          make_scalar(&want_scale, DType::kFloat32));
  }
  DevBuf dexp(static_cast<size_t>(std::max<int64_t>(1, rows)));
  const TensorView exp_view = by_row ? make_vector(dexp.get(), DType::kInt8, rows) : TensorView{};
  // The row exponents against the CPU's (after each device form).
  const auto check_exps = [&](const char* form) {
    if (!by_row) return;
    const auto got = gputest::download<int8_t>(dexp, static_cast<size_t>(rows));
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; ++r)
      bad += got[static_cast<size_t>(r)] != want_exp[static_cast<size_t>(r)];
    GPU_CHECK_MSG(bad == 0, form << ": " << bad << " row exponents differ");
  };
  if (by_row && rows >= 42) {  // the data reach every exponent
    for (int k = 0; k <= kGradRowMaxExponent; ++k) {
      GPU_CHECK_MSG(std::count(want_exp.begin(), want_exp.end(), static_cast<int8_t>(k)) > 0,
                    "no row with exponent " << k);
    }
  }
  DevMatrix dg = to_device(g0, rows, cols, bf16, cols + ld_extra);
  const int64_t kp = fp8_padded_cols(cols);
  DevBuf dop(static_cast<size_t>(std::max<int64_t>(1, 2 * rows * kp)));
  DevBuf dhi(std::max<size_t>(1, pb)), dlo(std::max<size_t>(1, pb));
  DevBuf dsq(static_cast<size_t>(std::max<int64_t>(1, 2 * rows)) * 4), dscale(4);
  dop.poison();
  dhi.poison();
  dlo.poison();
  dsq.poison();
  dexp.poison();
  const CudaAllocator alloc = default_cuda_allocator();
  quantize_bitsplit_cuda(dg.view, key, make_matrix(dop.get(), DType::kFloat8E4M3, 2 * rows, kp),
                         make_matrix(dhi.get(), DType::kInt4Packed, rows, cols),
                         make_matrix(dlo.get(), DType::kInt4Packed, rows, cols),
                         make_vector(dsq.get(), DType::kInt32, 2 * rows),
                         make_scalar(dscale.get(), DType::kFloat32), TensorView{}, alloc, nullptr,
                         exp_view);
  CUDA_OK(cudaDeviceSynchronize());
  check_exps("stacked operand");
  const float got_scale = gputest::download<float>(dscale, 1)[0];
  GPU_CHECK_MSG(gputest::bits_of(got_scale) == gputest::bits_of(want_scale) ||
                    (std::isnan(got_scale) && std::isnan(want_scale)),
                "scale " << got_scale << " want " << want_scale);
  const auto hi = gputest::download<uint8_t>(dhi, pb), lo = gputest::download<uint8_t>(dlo, pb);
  want_hi.resize(pb);
  want_lo.resize(pb);
  GPU_CHECK_MSG(count_diff(hi, want_hi) == 0, count_diff(hi, want_hi) << " hi bytes differ");
  GPU_CHECK_MSG(count_diff(lo, want_lo) == 0, count_diff(lo, want_lo) << " lo bytes differ");
  // Operand rows and squared norms from the CPU's codes.
  std::vector<int8_t> ch(static_cast<size_t>(rows * cols)), cl(static_cast<size_t>(rows * cols));
  unpack_int4(make_matrix(want_hi.data(), DType::kInt4Packed, rows, cols),
              make_matrix(ch.data(), DType::kInt8, rows, cols));
  unpack_int4(make_matrix(want_lo.data(), DType::kInt4Packed, rows, cols),
              make_matrix(cl.data(), DType::kInt8, rows, cols));
  const auto op = gputest::download<uint8_t>(dop, static_cast<size_t>(2 * rows * kp));
  const auto sq = gputest::download<int32_t>(dsq, static_cast<size_t>(2 * rows));
  int64_t bad_op = 0, bad_sq = 0;
  for (int64_t r = 0; r < 2 * rows; ++r) {
    const std::vector<int8_t>& src = r < rows ? ch : cl;
    const int64_t rr = r < rows ? r : r - rows;
    int32_t s = 0;
    for (int64_t c = 0; c < kp; ++c) {
      const int v = c < cols ? src[static_cast<size_t>(rr * cols + c)] : 0;
      s += v * v;
      bad_op +=
          !(gputest::decode_e4m3(op[static_cast<size_t>(r * kp + c)]) == static_cast<float>(v));
    }
    bad_sq += sq[static_cast<size_t>(r)] != s;
  }
  GPU_CHECK_MSG(bad_op == 0, bad_op << " operand bytes differ");
  GPU_CHECK_MSG(bad_sq == 0, bad_sq << " row sums of squares differ");
  // hq_bs's form (quantize_bitsplit_q8_cuda): one INT8 row of q = 16 hi + lo per row of g and/or
  // q^T (cols x padded rows), padding zero, the same scale; with the column sums of g from the same
  // reduction pass (linear.h's bias-gradient order: fp64 sums of row blocks of kBiasGradBlockRows,
  // added in block order, rounded once). Modes: both operands with the sums, q^T alone (the tiles
  // or, for rows not a multiple of 8 long, the rows then their transpose), q alone, both operands
  // with row strides wider than their padded widths (the bytes between stay untouched).
  const int64_t np = fp8_padded_cols(rows);
  const DType sums_dtype = bf16 ? DType::kBFloat16 : DType::kFloat32;
  for (int mode = 0; mode < 4; ++mode) {
    const bool want_q = mode != 1, want_qt = mode != 2, want_sums = mode == 0;
    const int64_t ldq = mode == 3 ? kp + 16 : kp, ldt = mode == 3 ? np + 32 : np;
    DevBuf dq(static_cast<size_t>(std::max<int64_t>(1, rows * ldq)));
    DevBuf dqt(static_cast<size_t>(std::max<int64_t>(1, cols * ldt)));
    DevBuf dsums(static_cast<size_t>(std::max<int64_t>(1, cols)) * 4);
    dq.poison();
    dqt.poison();
    dscale.poison();
    dsums.poison();
    dexp.poison();
    TensorView q_view = make_matrix(dq.get(), DType::kInt8, rows, kp);
    TensorView qt_view = make_matrix(dqt.get(), DType::kInt8, cols, np);
    q_view.strides[0] = ldq;
    qt_view.strides[0] = ldt;
    quantize_bitsplit_q8_cuda(dg.view, key, want_q ? q_view : TensorView{},
                              want_qt ? qt_view : TensorView{},
                              make_scalar(dscale.get(), DType::kFloat32),
                              want_sums ? make_vector(dsums.get(), sums_dtype, cols) : TensorView{},
                              alloc, nullptr, exp_view);
    CUDA_OK(cudaDeviceSynchronize());
    check_exps("INT8 operand");
    const float q_scale = gputest::download<float>(dscale, 1)[0];
    GPU_CHECK_MSG(gputest::bits_of(q_scale) == gputest::bits_of(got_scale),
                  "INT8 mode " << mode << " scale " << q_scale << " want " << got_scale);
    const auto want_at = [&](int64_t r, int64_t c) {  // q of row r, column c (0 in the padding)
      const size_t i = static_cast<size_t>(r * cols + c);
      return r < rows && c < cols ? 16 * ch[i] + cl[i] : 0;
    };
    if (want_sums) {
      const auto sums =
          gputest::download<uint8_t>(dsums, static_cast<size_t>(cols) * dtype_size(sums_dtype));
      int64_t bad_sums = 0;
      for (int64_t c = 0; c < cols; ++c) {
        double total = 0.0;
        for (int64_t i0 = 0; i0 < rows; i0 += kBiasGradBlockRows) {
          double block = 0.0;
          for (int64_t i = i0; i < std::min(rows, i0 + kBiasGradBlockRows); ++i) {
            block += static_cast<double>(g[static_cast<size_t>(i * cols + c)]);
          }
          total += block;
        }
        const float want = static_cast<float>(total);
        uint32_t want_bits = gputest::bits_of(want), got_bits = 0;
        if (bf16) {
          want_bits = float_to_bf16(want).bits;
          std::memcpy(&got_bits, &sums[static_cast<size_t>(2 * c)], 2);
        } else {
          std::memcpy(&got_bits, &sums[static_cast<size_t>(4 * c)], 4);
        }
        bad_sums += got_bits != want_bits;
      }
      GPU_CHECK_MSG(bad_sums == 0, bad_sums << " column sums differ");
    }
    const int8_t untouched = static_cast<int8_t>(0xA5);  // DevBuf::poison's byte
    if (want_q) {
      const auto q = gputest::download<int8_t>(dq, static_cast<size_t>(rows * ldq));
      int64_t bad_q = 0, bad_gap = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < kp; ++c)
          bad_q += q[static_cast<size_t>(r * ldq + c)] != want_at(r, c);
        for (int64_t c = kp; c < ldq; ++c)
          bad_gap += q[static_cast<size_t>(r * ldq + c)] != untouched;
      }
      GPU_CHECK_MSG(bad_q == 0, "mode " << mode << ": " << bad_q
                                        << " INT8 operand bytes (q = 16 hi + lo) differ");
      GPU_CHECK_MSG(bad_gap == 0,
                    "mode " << mode << ": " << bad_gap << " bytes past q's padded width written");
    }
    if (want_qt) {
      const auto qt = gputest::download<int8_t>(dqt, static_cast<size_t>(cols * ldt));
      int64_t bad_qt = 0, bad_gap = 0;
      for (int64_t c = 0; c < cols; ++c) {
        for (int64_t r = 0; r < np; ++r)
          bad_qt += qt[static_cast<size_t>(c * ldt + r)] != want_at(r, c);
        for (int64_t r = np; r < ldt; ++r)
          bad_gap += qt[static_cast<size_t>(c * ldt + r)] != untouched;
      }
      GPU_CHECK_MSG(bad_qt == 0, "mode " << mode << ": " << bad_qt << " bytes of q^T differ");
      GPU_CHECK_MSG(bad_gap == 0,
                    "mode " << mode << ": " << bad_gap << " bytes past q^T's padded width written");
    }
  }
}

// ---- compact LSQ backward
void test_lsq_backward(int64_t rows, int64_t cols, bool out_bf16, bool in_place) {
  const auto x = make_data(rows, cols, Data::kOutliers, 5 + cols);
  const float step = 0.35f;
  const RandomKey key{7, make_stream(1, 1, RandomPurpose::kLsqAux)};
  std::vector<uint8_t> packed(static_cast<size_t>(rows * packed_row_bytes(cols)));
  std::vector<uint8_t> aux(static_cast<size_t>(compact_aux_bytes(rows, cols)));
  float s = step;
  lsq_quantize_compact(make_matrix(const_cast<float*>(x.data()), DType::kFloat32, rows, cols),
                       make_scalar(&s, DType::kFloat32), key,
                       make_matrix(packed.data(), DType::kInt4Packed, rows, cols),
                       make_vector(aux.data(), DType::kUInt8, static_cast<int64_t>(aux.size())));
  const auto g = make_data(rows, cols, Data::kNormal, 1234 + rows);
  const DType odt = out_bf16 ? DType::kBFloat16 : DType::kFloat32;
  const size_t esz = out_bf16 ? 2 : 4;
  std::vector<uint8_t> want(static_cast<size_t>(rows * cols) * esz);
  float want_gs = 0.0f;
  lsq_backward_compact(make_matrix(packed.data(), DType::kInt4Packed, rows, cols),
                       make_vector(aux.data(), DType::kUInt8, static_cast<int64_t>(aux.size())),
                       make_matrix(const_cast<float*>(g.data()), DType::kFloat32, rows, cols),
                       make_matrix(want.data(), odt, rows, cols),
                       make_scalar(&want_gs, DType::kFloat32));
  DevBuf dpk = gputest::upload(packed), daux = gputest::upload(aux), dg = gputest::upload(g);
  DevBuf dout(std::max<size_t>(1, want.size())), dgs(4);
  dout.poison();
  const CudaAllocator alloc = default_cuda_allocator();
  TensorView gx = in_place ? make_matrix(dg.get(), DType::kFloat32, rows, cols)
                           : make_matrix(dout.get(), odt, rows, cols);
  lsq_backward_compact_cuda(
      make_matrix(dpk.get(), DType::kInt4Packed, rows, cols),
      make_vector(daux.get(), DType::kUInt8, static_cast<int64_t>(aux.size())),
      make_matrix(dg.get(), DType::kFloat32, rows, cols), gx,
      make_scalar(dgs.get(), DType::kFloat32), alloc, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<uint8_t>(in_place ? dg : dout, want.size());
  GPU_CHECK_MSG(count_diff(got, want) == 0, count_diff(got, want) << " grad_x bytes differ");
  const float gs = gputest::download<float>(dgs, 1)[0];
  // The same fp64 terms summed in another order: the fp32 result may differ by one rounding.
  GPU_CHECK_MSG(gputest::ulp_distance(gs, want_gs) <= 1, "grad_step " << gs << " want " << want_gs);
}

const bool registered = [] {
  using gputest::add_case;
  struct S {
    int64_t rows, cols;
    int32_t block;
    bool big;
  };
  // The last three: the FP8-only pass's 512-element chunks (16 values a lane) with blocks of 16 or
  // less, and a last chunk whose upper half-warp lies past the end.
  const S shapes[] = {{1, 8, 1, false},      {3, 8, 8, false},      {17, 256, 256, false},
                      {5, 37, 1, false},     {7, 6, 2, false},      {9, 12, 4, false},
                      {33, 1000, 8, false},  {4, 2048, 128, false}, {128, 768, 64, false},
                      {2, 520, 8, false},    {1, 4, 4, false},      {40, 264, 8, false},
                      {64, 4096, 256, true}, {2097153, 8, 8, true}, {1024, 4096, 32, true},
                      {7, 256, 16, false},   {3, 768, 2, false},    {5, 512, 1, false}};
  for (const S& s : shapes) {
    for (bool bf16 : {false, true}) {
      for (Data d : {Data::kNormal, Data::kOutliers, Data::kNonFinite}) {
        const std::string name = "hadamard_lsq/" + std::to_string(s.rows) + "x" +
                                 std::to_string(s.cols) + "/g" + std::to_string(s.block) + "/" +
                                 (bf16 ? "bf16/" : "fp32/") + data_name(d);
        add_case(name, s.big,
                 [=] { test_hadamard_lsq(s.rows, s.cols, s.block, bf16, d, 0, false); });
      }
      add_case("hadamard_lsq/" + std::to_string(s.rows) + "x" + std::to_string(s.cols) + "/g" +
                   std::to_string(s.block) + (bf16 ? "/bf16" : "/fp32") + "/strided",
               s.big,
               [=] { test_hadamard_lsq(s.rows, s.cols, s.block, bf16, Data::kNormal, 3, false); });
    }
  }
  // Rows with a gap that keeps the 16- and 32-byte alignment (the row-wise kernel with vector
  // loads, not the flat one).
  for (bool bf16 : {false, true}) {
    add_case(std::string("hadamard_lsq/24x512/g256/") + (bf16 ? "bf16" : "fp32") + "/strided8",
             false, [=] { test_hadamard_lsq(24, 512, 256, bf16, Data::kNormal, 8, false); });
  }
  add_case("hadamard_lsq/33x64/g1/fp32/ties", false,
           [] { test_hadamard_lsq(33, 64, 1, false, Data::kTies, 0, false); });
  add_case("hadamard_lsq/5x37/g1/fp32/ties", false,
           [] { test_hadamard_lsq(5, 37, 1, false, Data::kTies, 0, false); });
  add_case("hadamard_lsq/16x64/g16/fp32/zero_step", false,
           [] { test_hadamard_lsq(16, 64, 16, false, Data::kNormal, 0, true); });
  // The flat pass folds 1 / sqrt(G) into the step's inverse where that is a power of two (G = 256,
  // 64) and the inverse lies in [2^-100, 2^98]; these steps and data scales sit at and past that
  // guard. tiny: x~ below FLT_MIN (subnormal, so x~ * inv != x * (inv / sqrt(G))) with the
  // inverse at 2^98 (folded: every |q| <= 2^-28) and at 2^126 (not folded: codes across the range,
  // which the fold would get wrong); edge: the inverse at 2^98 with codes across the range; large:
  // the inverse at 2^-101 (not folded).
  struct Guard {
    const char* name;
    float data_scale, step;
  };
  const Guard guards[] = {{"tiny_inv2^98", 0x1p-125f, 0x1p-98f},
                          {"tiny_inv2^126", 0x1p-126f, 0x1p-126f},
                          {"edge_inv2^98", 0x1p-98f, 0x1p-98f},
                          {"large_inv2^-101", 0x1p101f, 0x1p101f}};
  for (const Guard& gd : guards) {
    for (int32_t block : {256, 128, 64}) {
      for (bool bf16 : {false, true}) {
        for (Data d : {Data::kNormal, Data::kNonFinite}) {
          add_case("hadamard_lsq/32x1024/g" + std::to_string(block) + (bf16 ? "/bf16/" : "/fp32/") +
                       data_name(d) + "/" + gd.name,
                   false, [=] {
                     test_hadamard_lsq(32, 1024, block, bf16, d, 0, false, gd.data_scale, gd.step);
                   });
        }
      }
    }
  }
  // Rows longer than the kernels' 32-bit column indices: an Error naming the argument, before any
  // launch (the view's shape is never dereferenced, so a small buffer serves).
  add_case("row_length/too_long", false, [] {
    const int64_t cols = int64_t{1} << 31;
    DevBuf dx(4096), dstep = gputest::upload(std::vector<float>{1.0f});
    auto names = [](const std::function<void()>& f, const char* arg) {
      try {
        f();
      } catch (const Error& e) {
        return std::string(e.what()).find(std::string(arg) + ": rows of at most") == 0;
      }
      return false;
    };
    GPU_CHECK_MSG(names([&] {
                    hadamard_lsq_quantize_cuda(make_matrix(dx.get(), DType::kBFloat16, 1, cols), 1,
                                               make_scalar(dstep.get(), DType::kFloat32),
                                               RandomKey{}, TensorView{}, TensorView{},
                                               TensorView{}, TensorView{}, nullptr);
                  }, "x"),
                  "hadamard_lsq_quantize_cuda: expected an Error naming x");
    GPU_CHECK_MSG(names([&] {
                    hadamard_transform_cuda(make_matrix(dx.get(), DType::kBFloat16, 1, cols),
                                            make_matrix(dx.get(), DType::kBFloat16, 1, cols), 1,
                                            nullptr);
                  }, "in"),
                  "hadamard_transform_cuda: expected an Error naming in");
    GPU_CHECK_MSG(names(
                      [&] {
                        quantize_bitsplit_cuda(make_matrix(dx.get(), DType::kBFloat16, 1, cols),
                                               RandomKey{}, TensorView{}, TensorView{},
                                               TensorView{}, TensorView{},
                                               make_scalar(dstep.get(), DType::kFloat32),
                                               TensorView{}, default_cuda_allocator(), nullptr);
                      },
                      "g"),
                  "quantize_bitsplit_cuda: expected an Error naming g");
  });
  add_case("hadamard_lsq/0x64/g16/fp32/empty", false, [] {
    DevBuf dx(64), dstep = gputest::upload(std::vector<float>{1.0f});
    DevBuf dcnt = gputest::upload(std::vector<int64_t>{0});
    hadamard_lsq_quantize_cuda(make_matrix(dx.get(), DType::kFloat32, 0, 64), 16,
                               make_scalar(dstep.get(), DType::kFloat32), RandomKey{},
                               make_matrix(dx.get(), DType::kFloat8E4M3, 0, 64), TensorView{},
                               TensorView{}, make_scalar(dcnt.get(), DType::kInt64), nullptr);
    CUDA_OK(cudaDeviceSynchronize());
    GPU_CHECK(gputest::download<int64_t>(dcnt, 1)[0] == 0);
  });

  for (const S& s : shapes) {
    for (int mode = 0; mode < 5; ++mode) {
      const bool in_bf16 = mode == 1 || mode == 3, out_bf16 = mode == 2 || mode == 3;
      const bool in_place = mode == 4;
      add_case("hadamard/" + std::to_string(s.rows) + "x" + std::to_string(s.cols) + "/g" +
                   std::to_string(s.block) + (in_bf16 ? "/bf16" : "/fp32") +
                   (out_bf16 ? "_to_bf16" : "_to_fp32") + (in_place ? "/in_place" : ""),
               s.big,
               [=] { test_transform(s.rows, s.cols, s.block, in_bf16, out_bf16, in_place); });
    }
  }

  struct B {
    int64_t rows, cols;
    bool big;
  };
  for (B b :
       {B{1, 1, false}, B{3, 7, false}, B{5, 37, false}, B{64, 256, false}, B{33, 1000, false},
        B{128, 768, false}, B{2, 12, false}, B{129, 33, false}, B{300, 70, false}, B{1, 8, false},
        B{40, 264, false}, B{50, 256, false}, B{300, 1024, false}, B{512, 4096, true}}) {
    for (bool bf16 : {false, true}) {
      for (Data d : {Data::kNormal, Data::kOutliers}) {
        add_case("bitsplit/" + std::to_string(b.rows) + "x" + std::to_string(b.cols) +
                     (bf16 ? "/bf16/" : "/fp32/") + data_name(d),
                 b.big, [=] { test_bitsplit(b.rows, b.cols, bf16, d, false); });
      }
    }
  }
  // grad_scale=row: the row exponents and the codes at each row's scale, both device forms; the
  // vectorised and element-wise passes, a strided g, bf16.
  for (B b : {B{5, 37, false}, B{64, 256, false}, B{129, 33, false}, B{300, 70, false}}) {
    for (bool bf16 : {false, true}) {
      add_case("bitsplit_rows/" + std::to_string(b.rows) + "x" + std::to_string(b.cols) +
                   (bf16 ? "/bf16" : "/fp32"),
               false, [=] { test_bitsplit(b.rows, b.cols, bf16, Data::kNormal, false, 0, true); });
    }
  }
  add_case("bitsplit_rows/40x264/bf16/strided", false,
           [] { test_bitsplit(40, 264, true, Data::kOutliers, false, 5, true); });
  // The rows' maxima from the reduction passes (docs/cuda.md): contiguous rows whose 8-element
  // groups do not come in whole warps (the absmax pass groups its lanes by row) and whose last
  // 64-column tile is partial (the column-sums pass), each row's maximum in its last column; and
  // more groups than one pass of either grid covers (the absmax pass's uniform and grouped forms).
  add_case("bitsplit_rows/40x264/bf16/last_col", false,
           [] { test_bitsplit(40, 264, true, Data::kNormal, false, 0, true, true); });
  add_case("bitsplit_rows/33x1000/fp32/last_col", false,
           [] { test_bitsplit(33, 1000, false, Data::kNormal, false, 0, true, true); });
  add_case("bitsplit_rows/1100x4000/bf16/last_col", true,
           [] { test_bitsplit(1100, 4000, true, Data::kNormal, false, 0, true, true); });
  add_case("bitsplit_rows/2100x2048/fp32/last_col", true,
           [] { test_bitsplit(2100, 2048, false, Data::kNormal, false, 0, true, true); });
  add_case("bitsplit_rows/16x64/fp32/zeros", false,
           [] { test_bitsplit(16, 64, false, Data::kNormal, true, 0, true); });
  add_case("bitsplit/16x64/fp32/zeros", false,
           [] { test_bitsplit(16, 64, false, Data::kNormal, true); });
  add_case("bitsplit/16x64/fp32/nonfinite", false,
           [] { test_bitsplit(16, 64, false, Data::kNonFinite, false); });
  add_case("bitsplit/5x9/fp32/nonfinite", false,
           [] { test_bitsplit(5, 9, false, Data::kNonFinite, false); });
  // Rows with a gap (the kernels' element-wise loads), and more rows than the transposed write's
  // grid takes (2^21 + 1 > 65535 tiles of 32: q^T from a transpose of q's rows).
  add_case("bitsplit/33x1000/fp32/strided", false,
           [] { test_bitsplit(33, 1000, false, Data::kNormal, false, 3); });
  add_case("bitsplit/40x264/bf16/strided", false,
           [] { test_bitsplit(40, 264, true, Data::kOutliers, false, 5); });
  add_case("bitsplit/2097153x8/fp32/normal", true,
           [] { test_bitsplit(2097153, 8, false, Data::kNormal, false); });
  // bf16 rows with 16-byte loads (the q^T tiles' vector loads): many tiles (the last row and
  // column tiles partial), aligned rows with a gap, grad_scale=row over many tiles, and Inf / NaN
  // (the split's checked path; finite data take the path without the NaN test).
  add_case("bitsplit/4100x4104/bf16/outliers", true,
           [] { test_bitsplit(4100, 4104, true, Data::kOutliers, false); });
  add_case("bitsplit/1000x776/bf16/strided", false,
           [] { test_bitsplit(1000, 776, true, Data::kNormal, false, 8); });
  add_case("bitsplit_rows/2100x2056/bf16", true,
           [] { test_bitsplit(2100, 2056, true, Data::kNormal, false, 0, true); });
  add_case("bitsplit/64x256/bf16/nonfinite", false,
           [] { test_bitsplit(64, 256, true, Data::kNonFinite, false); });
  add_case("bitsplit/40x264/bf16/nonfinite", false,
           [] { test_bitsplit(40, 264, true, Data::kNonFinite, false); });
  // Finite g whose inverse scale is not finite: a subnormal max|g| (about 4e-39, also in bf16,
  // whose smallest subnormal is 9.2e-41) makes 119 / max|g| overflow
  // (a g of 0 then gives 0 * Inf = NaN, code 0); with grad_scale=row, max|g| near 1e-36 leaves
  // 119 / max|g| finite but not times a row's 2^k (the zero rows' k = 4). Both must take the
  // checked path, not the one without the NaN test.
  for (bool bf16 : {false, true}) {
    add_case(std::string("bitsplit/64x256/subnormal") + (bf16 ? "/bf16" : "/fp32"), false,
             [=] { test_bitsplit(64, 256, bf16, Data::kNormal, false, 0, false, false, 1e-39f); });
    add_case(std::string("bitsplit_rows/64x256/tiny") + (bf16 ? "/bf16" : "/fp32"), false,
             [=] { test_bitsplit(64, 256, bf16, Data::kNormal, false, 0, true, false, 2e-37f); });
  }
  // Empty g: nothing to write, so no operand is needed; the scale is 0.
  // absmax_bits_cuda: empty, one element, a row longer than a warp's pass, strided bf16 rows,
  // outliers, Inf and NaN.
  for (const auto& a : {std::make_tuple(0, 64, false, Data::kNormal, 0),
                        std::make_tuple(16, 0, true, Data::kNormal, 0),
                        std::make_tuple(1, 1, false, Data::kNormal, 0),
                        std::make_tuple(33, 1000, false, Data::kOutliers, 0),
                        std::make_tuple(40, 264, true, Data::kNormal, 8),
                        std::make_tuple(1100, 4000, true, Data::kOutliers, 0),
                        std::make_tuple(5, 9, false, Data::kNonFinite, 0),
                        std::make_tuple(64, 256, true, Data::kNonFinite, 0)}) {
    const auto [rows, cols, bf16, data, extra] = a;
    add_case("absmax_bits/" + std::to_string(rows) + "x" + std::to_string(cols) +
                 (bf16 ? "/bf16/" : "/fp32/") + data_name(data) + (extra > 0 ? "/strided" : ""),
             false, [=] { test_absmax_bits(rows, cols, bf16, data, extra); });
  }
  add_case("bitsplit/q8_empty", false, [] {
    DevBuf dscale(4), dg(4);
    for (const auto& shape : {std::pair<int64_t, int64_t>{0, 64}, {3, 0}}) {
      const int64_t rows = shape.first, cols = shape.second;
      dscale.poison();
      quantize_bitsplit_q8_cuda(make_matrix(dg.get(), DType::kFloat32, rows, cols), RandomKey{},
                                make_matrix(nullptr, DType::kInt8, rows, fp8_padded_cols(cols)),
                                make_matrix(nullptr, DType::kInt8, cols, fp8_padded_cols(rows)),
                                make_scalar(dscale.get(), DType::kFloat32), TensorView{},
                                default_cuda_allocator(), nullptr);
      CUDA_OK(cudaDeviceSynchronize());
      GPU_CHECK_MSG(gputest::download<float>(dscale, 1)[0] == 0.0f,
                    rows << "x" << cols << ": scale of an empty g must be 0");
    }
  });
  // The one-row-per-token INT8 operand is quantize_bitsplit_q8_cuda's: quantize_bitsplit_cuda takes
  // 2N stacked rows, and the q8 form needs an operand; each an Error naming operand, raised before
  // any launch.
  add_case("bitsplit/operand_errors", false, [] {
    const int64_t rows = 4, cols = 64;
    DevBuf dg(rows * cols * 4), dq(rows * fp8_padded_cols(cols)), dscale(4);
    const TensorView g = make_matrix(dg.get(), DType::kFloat32, rows, cols);
    const TensorView scale = make_scalar(dscale.get(), DType::kFloat32);
    const auto error_of = [](const std::function<void()>& f) {
      try {
        f();
      } catch (const Error& e) {
        return std::string(e.what());
      }
      return std::string();
    };
    const std::string split = error_of([&] {
      quantize_bitsplit_cuda(g, RandomKey{},
                             make_matrix(dq.get(), DType::kInt8, rows, fp8_padded_cols(cols)),
                             TensorView{}, TensorView{}, TensorView{}, scale, TensorView{},
                             default_cuda_allocator(), nullptr);
    });
    GPU_CHECK_MSG(split.rfind("operand: expected the 2N", 0) == 0, "got '" << split << "'");
    const std::string none = error_of([&] {
      quantize_bitsplit_q8_cuda(g, RandomKey{}, TensorView{}, TensorView{}, scale, TensorView{},
                                default_cuda_allocator(), nullptr);
    });
    GPU_CHECK_MSG(none.rfind("operand: ", 0) == 0, "got '" << none << "'");
  });

  struct L {
    int64_t rows, cols;
  };
  for (L l : {L{1, 1}, L{3, 7}, L{64, 256}, L{129, 1000}, L{512, 768}}) {
    for (int mode = 0; mode < 3; ++mode) {
      add_case("lsq_backward/" + std::to_string(l.rows) + "x" + std::to_string(l.cols) +
                   (mode == 0   ? "/fp32"
                    : mode == 1 ? "/bf16"
                                : "/in_place"),
               false, [=] { test_lsq_backward(l.rows, l.cols, mode == 1, mode == 2); });
    }
  }
  return true;
}();

}  // namespace
