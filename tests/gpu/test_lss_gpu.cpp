// GPU tests of leverage score sampling on the device (lss_sample_cuda) against the CPU's
// lss_probabilities -> lss_round_pow2 -> lss_select, row for row (the selection, its exponents, its
// slots and the count), on score vectors that make the water-filling iterate, saturate, span many
// decades, hold zeros or fill the budget; invalid scores; and the weight gradient's INT8 operands
// with the importance weights folded in (codes_to_s8_cuda) and the compacted operands of the
// sampled products (gather_codes_to_s8_cuda, gather_operand_rows_cuda), byte for byte.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "int4train/cuda.h"
#include "int4train/int4.h"
#include "int4train/lss.h"

namespace {

using namespace int4train;
using gputest::DevBuf;

enum class Scores { kUniform, kDecades, kHeavy, kZeros, kEqual };

std::vector<float> make_scores(int64_t n, Scores kind, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<float> c(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double v = 0.0;
    switch (kind) {
      case Scores::kUniform: v = u(rng); break;
      case Scores::kDecades: v = std::pow(10.0, -30.0 + 60.0 * u(rng)); break;  // 1e-30 .. 1e30
      case Scores::kHeavy: v = std::pow(u(rng) + 1e-9, -3.0); break;  // a few rows saturate
      case Scores::kZeros: v = (i % 3 == 0) ? 0.0 : std::exp(4.0 * u(rng)); break;
      case Scores::kEqual: v = 2.5; break;
    }
    c[static_cast<size_t>(i)] = static_cast<float>(v);
  }
  return c;
}

// The CPU's composition within capacity `cap`: exponent k_i for kept rows, -1 otherwise; the
// slots (row kept in each, -1 none) and the count.
std::vector<int8_t> cpu_select(const std::vector<float>& c, double budget, int max_exponent,
                               int64_t cap, const RandomKey& key, std::vector<int32_t>* slots,
                               int64_t* kept) {
  const int64_t n = static_cast<int64_t>(c.size());
  std::vector<float> p(c.size());
  std::vector<int8_t> k(c.size()), out(c.size(), -1);
  slots->assign(static_cast<size_t>(cap), 0);
  lss_probabilities(make_vector(const_cast<float*>(c.data()), DType::kFloat32, n), budget,
                    make_vector(p.data(), DType::kFloat32, n));
  lss_round_pow2(make_vector(p.data(), DType::kFloat32, n), max_exponent, cap,
                 make_vector(k.data(), DType::kInt8, n));
  *kept = lss_select(make_vector(k.data(), DType::kInt8, n), max_exponent, key,
                     make_vector(slots->data(), DType::kInt32, cap));
  for (const int32_t i : *slots) {
    if (i >= 0) out[static_cast<size_t>(i)] = k[static_cast<size_t>(i)];
  }
  return out;
}

// graph: the call is captured into a CUDA graph (global capture mode) on a stream of its own and
// replayed. As the first sampling call of a process (scripts/gpu_check.sh runs
// lss_sample/graph_first_call alone), the capture is also the first call on the device.
void test_sample(int64_t n, Scores kind, double budget_per_row, int max_exponent,
                 bool graph = false) {
  const auto c = make_scores(n, kind, 17 + static_cast<uint64_t>(n));
  const double budget = n == 0 ? 0.0 : std::max(1.0, budget_per_row * static_cast<double>(n));
  const int64_t cap = lss_capacity(budget, n);
  const RandomKey key{0xC0FFEEull + static_cast<uint64_t>(n), 0x0005000300000007ull};
  int64_t want_kept = 0;
  std::vector<int32_t> want_slots;
  const auto want = cpu_select(c, budget, max_exponent, cap, key, &want_slots, &want_kept);
  DevBuf dc = gputest::upload(c), dex(static_cast<size_t>(n) + 8), dkept(sizeof(int64_t));
  DevBuf dsl(sizeof(int32_t) * (static_cast<size_t>(n) + 2)),
      dsr(sizeof(int32_t) * (static_cast<size_t>(cap) + 2));
  dex.poison();
  dkept.poison();
  dsl.poison();
  dsr.poison();
  gputest::run_maybe_captured(graph, [&](cudaStream_t st) {
    lss_sample_cuda(
        make_vector(dc.get(), DType::kFloat32, n), budget, max_exponent, cap, key,
        make_vector(dex.get(), DType::kInt8, n), make_vector(dsl.get(), DType::kInt32, n),
        make_vector(dsr.get(), DType::kInt32, cap), make_scalar(dkept.get(), DType::kInt64), st);
  });
  const auto got = gputest::download<int8_t>(dex, static_cast<size_t>(n) + 8);
  const auto kept = gputest::download<int64_t>(dkept, 1);
  const auto got_slots = gputest::download<int32_t>(dsl, static_cast<size_t>(n) + 2);
  const auto got_rows = gputest::download<int32_t>(dsr, static_cast<size_t>(cap) + 2);
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (got[static_cast<size_t>(i)] != want[static_cast<size_t>(i)]) {
      if (first < 0) first = i;
      ++bad;
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " of " << n << " rows differ from the CPU's selection, first at "
                              << first);
  GPU_CHECK_MSG(kept[0] == want_kept, "kept " << kept[0] << " want " << want_kept);
  int64_t bad_slots = 0;
  for (int64_t j = 0; j < cap; ++j) {
    const int32_t r = want_slots[static_cast<size_t>(j)];
    bad_slots += got_rows[static_cast<size_t>(j)] != r;
    if (r >= 0) bad_slots += got_slots[static_cast<size_t>(r)] != j;
  }
  int64_t slotted = 0;
  for (int64_t i = 0; i < n; ++i) slotted += got_slots[static_cast<size_t>(i)] >= 0;
  GPU_CHECK_MSG(bad_slots == 0 && slotted == want_kept,
                bad_slots << " slots differ from the CPU's; " << slotted << " rows slotted");
  for (int64_t i = n; i < n + 8; ++i) {
    GPU_CHECK(static_cast<uint8_t>(got[static_cast<size_t>(i)]) == 0xA5);  // nothing past n
  }
  for (int64_t i = 0; i < 2; ++i) {
    GPU_CHECK(static_cast<uint32_t>(got_slots[static_cast<size_t>(n + i)]) == 0xA5A5A5A5u);
    GPU_CHECK(static_cast<uint32_t>(got_rows[static_cast<size_t>(cap + i)]) == 0xA5A5A5A5u);
  }
  // The selection is not degenerate: about the budget is kept where the budget binds.
  if (n >= 1000 && kind != Scores::kZeros && budget < static_cast<double>(n)) {
    GPU_CHECK_MSG(std::abs(static_cast<double>(want_kept) - budget) < 0.1 * budget,
                  "kept " << want_kept << " of budget " << budget);
  }
}

void test_invalid(float bad_value) {
  std::vector<float> c = make_scores(3000, Scores::kUniform, 5);
  c[1234] = bad_value;
  DevBuf dc = gputest::upload(c), dex(c.size()), dkept(sizeof(int64_t));
  DevBuf dsl(sizeof(int32_t) * c.size()), dsr(sizeof(int32_t) * 200);
  dex.poison();
  dsl.poison();
  dsr.poison();
  lss_sample_cuda(
      make_vector(dc.get(), DType::kFloat32, 3000), 100.0, kLssMaxExponent, 200, RandomKey{1, 2},
      make_vector(dex.get(), DType::kInt8, 3000), make_vector(dsl.get(), DType::kInt32, 3000),
      make_vector(dsr.get(), DType::kInt32, 200), make_scalar(dkept.get(), DType::kInt64), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<int8_t>(dex, c.size());
  const auto kept = gputest::download<int64_t>(dkept, 1);
  const auto slots = gputest::download<int32_t>(dsl, c.size());
  const auto rows = gputest::download<int32_t>(dsr, 200);
  int64_t not_dropped = 0;
  for (int8_t e : got) not_dropped += e != -1;
  for (int32_t v : slots) not_dropped += v != -1;
  for (int32_t v : rows) not_dropped += v != -1;
  GPU_CHECK_MSG(not_dropped == 0, not_dropped << " rows or slots kept despite an invalid score");
  GPU_CHECK_MSG(kept[0] == -1, "kept " << kept[0] << ", want -1 (invalid scores)");
}

void test_arg_errors() {
  DevBuf dc(64), dex(64), dsr(64);
  const TensorView c = make_vector(dc.get(), DType::kFloat32, 16);
  const TensorView e = make_vector(dex.get(), DType::kInt8, 16);
  const TensorView r = make_vector(dsr.get(), DType::kInt32, 4);
  auto expect = [](auto fn, const char* arg) {
    try {
      fn();
    } catch (const Error& err) {
      GPU_CHECK_MSG(std::string(err.what()).find(arg) != std::string::npos,
                    "error '" << err.what() << "' does not name " << arg);
      return;
    }
    GPU_CHECK_MSG(false, "no Error for a bad " << arg);
  };
  auto call = [&](const TensorView& sc, double budget, int me, int64_t cap, const TensorView& ex,
                  const TensorView& slot_rows, const TensorView& kept) {
    lss_sample_cuda(sc, budget, me, cap, RandomKey{}, ex, TensorView{}, slot_rows, kept, nullptr);
  };
  expect([&] { call(c, 0.0, 4, 4, e, r, TensorView{}); }, "budget");
  expect([&] { call(c, NAN, 4, 4, e, r, TensorView{}); }, "budget");
  expect([&] { call(c, 4.0, 31, 4, e, r, TensorView{}); }, "max_exponent");
  expect([&] { call(c, 4.0, 2, 3, e, make_vector(dsr.get(), DType::kInt32, 3), TensorView{}); },
         "max_rows");  // 16 rows need 4 slots of 4 units
  expect([&] { call(c, 4.0, 4, 4, make_vector(dex.get(), DType::kInt8, 15), r, TensorView{}); },
         "exponents");
  expect([&] { call(make_vector(dc.get(), DType::kInt32, 16), 4.0, 4, 4, e, r, TensorView{}); },
         "scores");
  expect([&] { call(c, 4.0, 4, 4, e, make_vector(dsr.get(), DType::kInt32, 3), TensorView{}); },
         "slot_rows");
  expect([&] { call(c, 4.0, 4, 4, e, r, make_scalar(dex.get(), DType::kFloat32)); }, "kept");
  expect(
      [&] {
        lss_sample_cuda(c, 4.0, 4, 4, RandomKey{}, e, make_vector(dsr.get(), DType::kInt32, 15), r,
                        TensorView{}, nullptr);
      },
      "slots");
}

// Codes (rows x cols, row-major ints in [-8, 7]) packed two per byte as kInt4Packed.
std::vector<uint8_t> pack_codes(const std::vector<int>& codes, int64_t rows, int64_t cols) {
  std::vector<uint8_t> out(static_cast<size_t>(rows * packed_row_bytes(cols)), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 2) {
      const int lo = codes[static_cast<size_t>(r * cols + c)];
      const int hi = c + 1 < cols ? codes[static_cast<size_t>(r * cols + c + 1)] : 0;
      out[static_cast<size_t>(r * packed_row_bytes(cols) + c / 2)] = pack_int4_pair(lo, hi);
    }
  }
  return out;
}

// codes * 2^e per code row as INT8 (e in [-1, 4]; 5 and -2 give zero rows, counted in `invalid`),
// or the plain codes (no exponents), plain and transposed: every byte, the padding zero.
void test_weighted(int64_t rows, int64_t cols, bool transpose, bool weighted, bool out_of_range) {
  std::mt19937 rng(static_cast<unsigned>(rows * 7 + cols));
  std::uniform_int_distribution<int> code(-8, 7), ex(-1, kLssMaxExponent);
  std::vector<int> codes(static_cast<size_t>(rows * cols));
  for (auto& v : codes) v = code(rng);
  if (!codes.empty()) codes[0] = -8;  // the extreme: -8 * 16 = -128
  std::vector<int8_t> exps(static_cast<size_t>(rows), 0);
  if (weighted) {
    for (auto& e : exps) e = static_cast<int8_t>(ex(rng));
    if (rows > 0) exps[0] = static_cast<int8_t>(kLssMaxExponent);
  }
  int64_t n_invalid = 0;
  if (out_of_range && rows > 2) {
    exps[1] = static_cast<int8_t>(kLssMaxExponent + 1);
    exps[2] = -2;
    n_invalid = 2;
  }
  DevBuf dp = gputest::upload(pack_codes(codes, rows, cols)), de = gputest::upload(exps);
  const int64_t out_rows = transpose ? cols : rows, k = transpose ? rows : cols;
  const int64_t kp = fp8_padded_cols(k);
  DevBuf op(static_cast<size_t>(std::max<int64_t>(1, out_rows * kp))), inv(8);
  op.poison();
  CUDA_OK(cudaMemset(inv.get(), 0, 8));
  codes_to_s8_cuda(make_matrix(dp.get(), DType::kInt4Packed, rows, cols),
                   weighted ? make_vector(de.get(), DType::kInt8, rows) : TensorView{}, transpose,
                   make_matrix(op.get(), DType::kInt8, out_rows, kp),
                   make_scalar(inv.get(), DType::kInt64), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto bytes = gputest::download<int8_t>(op, static_cast<size_t>(out_rows * kp));
  const int64_t counted = gputest::download<int64_t>(inv, 1)[0];
  int64_t bad = 0;
  for (int64_t r = 0; r < out_rows; ++r) {
    for (int64_t c = 0; c < kp; ++c) {
      const int got = bytes[static_cast<size_t>(r * kp + c)];
      int want = 0;
      if (c < k) {
        const int64_t cr = transpose ? c : r, cc = transpose ? r : c;  // code row, code column
        const int e = exps[static_cast<size_t>(cr)];
        if (e >= 0 && e <= kLssMaxExponent)
          want = codes[static_cast<size_t>(cr * cols + cc)] * (1 << e);
      }
      bad += got != want;
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " INT8 operand bytes differ");
  GPU_CHECK_MSG(counted == (cols > 0 ? n_invalid : 0),
                "invalid exponents counted " << counted << ", want " << n_invalid);
}

// The compacted operands: gather_codes_to_s8_cuda (a slot map over 2 * src_rows values, wrapping
// onto the code rows, exponents per map value, empty slots, out-of-range values and exponents
// counted) and gather_operand_rows_cuda, every byte.
void test_gather(int64_t src_rows, int64_t cols, int64_t m, bool bad_values) {
  std::mt19937 rng(static_cast<unsigned>(src_rows * 31 + cols + m));
  std::uniform_int_distribution<int> code(-8, 7), ex(-1, kLssMaxExponent);
  const int64_t range = 2 * src_rows;
  std::uniform_int_distribution<int64_t> pick(-1, range - 1);
  std::vector<int> codes(static_cast<size_t>(src_rows * cols));
  for (auto& v : codes) v = code(rng);
  std::vector<int8_t> exps(static_cast<size_t>(range));
  for (auto& e : exps) e = static_cast<int8_t>(ex(rng));
  std::vector<int32_t> map(static_cast<size_t>(m));
  for (auto& v : map) v = static_cast<int32_t>(pick(rng));
  int64_t n_invalid = 0;
  if (bad_values && m > 3) {
    map[1] = static_cast<int32_t>(range);  // past the exponents
    map[2] = -2;
    exps[static_cast<size_t>(map[3] = 0)] = static_cast<int8_t>(kLssMaxExponent + 1);
    n_invalid = 3;
  }
  DevBuf dp = gputest::upload(pack_codes(codes, src_rows, cols)), de = gputest::upload(exps);
  DevBuf dm = gputest::upload(map);
  const int64_t kp = fp8_padded_cols(m);
  DevBuf op(static_cast<size_t>(std::max<int64_t>(1, cols * kp))), inv(8);
  op.poison();
  CUDA_OK(cudaMemset(inv.get(), 0, 8));
  gather_codes_to_s8_cuda(make_matrix(dp.get(), DType::kInt4Packed, src_rows, cols),
                          make_vector(dm.get(), DType::kInt32, m),
                          make_vector(de.get(), DType::kInt8, range),
                          make_matrix(op.get(), DType::kInt8, cols, kp),
                          make_scalar(inv.get(), DType::kInt64), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto bytes = gputest::download<int8_t>(op, static_cast<size_t>(cols * kp));
  int64_t bad = 0;
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t j = 0; j < kp; ++j) {
      int want = 0;
      if (j < m) {
        const int64_t v = map[static_cast<size_t>(j)];
        if (v >= 0 && v < range) {
          const int e = exps[static_cast<size_t>(v)];
          if (e >= 0 && e <= kLssMaxExponent) {
            want = codes[static_cast<size_t>((v % src_rows) * cols + c)] * (1 << e);
          }
        }
      }
      bad += bytes[static_cast<size_t>(c * kp + j)] != want;
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " gathered INT8 operand bytes differ");
  const int64_t counted = gputest::download<int64_t>(inv, 1)[0];
  GPU_CHECK_MSG(counted == (cols > 0 ? n_invalid : 0),
                "invalid map values counted " << counted << ", want " << n_invalid);
  // Rows of an operand (src_rows x padded cols, row stride padded + 16) gathered by the same map.
  const int64_t width = fp8_padded_cols(cols), ld = width + 16;
  std::vector<uint8_t> src(static_cast<size_t>(src_rows * ld));
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  DevBuf ds = gputest::upload(src), dout(static_cast<size_t>(std::max<int64_t>(1, m * width)));
  dout.poison();
  CUDA_OK(cudaMemset(inv.get(), 0, 8));
  TensorView in = make_matrix(ds.get(), DType::kFloat8E4M3, src_rows, width);
  in.strides[0] = ld;
  gather_operand_rows_cuda(in, make_vector(dm.get(), DType::kInt32, m),
                           make_matrix(dout.get(), DType::kFloat8E4M3, m, width),
                           make_scalar(inv.get(), DType::kInt64), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto rows = gputest::download<uint8_t>(dout, static_cast<size_t>(m * width));
  int64_t bad_rows = 0, want_invalid = 0;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t v = map[static_cast<size_t>(j)];
    const bool ok = v >= 0 && v < src_rows;
    want_invalid += !ok && v != -1 && width > 0;
    for (int64_t c = 0; c < width; ++c) {
      const uint8_t want = ok ? src[static_cast<size_t>(v * ld + c)] : uint8_t{0};
      bad_rows += rows[static_cast<size_t>(j * width + c)] != want;
    }
  }
  GPU_CHECK_MSG(bad_rows == 0, bad_rows << " gathered operand row bytes differ");
  const int64_t counted_rows = gputest::download<int64_t>(inv, 1)[0];
  GPU_CHECK_MSG(counted_rows == want_invalid,
                "rows out of range counted " << counted_rows << ", want " << want_invalid);
}

const bool registered = [] {
  using gputest::add_case;
  struct S {
    int64_t n;
    Scores kind;
    const char* name;
  };
  const S cases[] = {
      {0, Scores::kUniform, "uniform"},   {1, Scores::kUniform, "uniform"},
      {5, Scores::kHeavy, "heavy"},       {1023, Scores::kUniform, "uniform"},
      {1024, Scores::kHeavy, "heavy"},    {1025, Scores::kDecades, "decades"},
      {5000, Scores::kZeros, "zeros"},    {5000, Scores::kEqual, "equal"},
      {16384, Scores::kHeavy, "heavy"},   {32768, Scores::kDecades, "decades"},
      {300000, Scores::kHeavy, "heavy"},
  };
  for (const S& s : cases) {
    for (double b : {0.5, 1.0}) {
      for (int me : {kLssMaxExponent, 20}) {
        add_case("lss_sample/" + std::string(s.name) + "/n" + std::to_string(s.n) + "/budget" +
                     std::to_string(b).substr(0, 3) + "/maxexp" + std::to_string(me),
                 s.n > 100000, [=] { test_sample(s.n, s.kind, b, me); });
      }
    }
  }
  add_case("lss_sample/graph_first_call/heavy/n16384", false,
           [] { test_sample(16384, Scores::kHeavy, 1.0, kLssMaxExponent, true); });
  add_case("lss_sample/heavy/n3000/budget_above_positives", false,
           [] { test_sample(3000, Scores::kZeros, 0.9, kLssMaxExponent); });
  add_case("lss_sample/invalid/nan", false, [] { test_invalid(NAN); });
  add_case("lss_sample/invalid/negative", false, [] { test_invalid(-1.0f); });
  add_case("lss_sample/invalid/inf", false, [] { test_invalid(INFINITY); });
  add_case("lss_sample/errors", false, test_arg_errors);
  add_case("gather_operand/64x128/m70", false, [] { test_gather(64, 128, 70, false); });
  add_case("gather_operand/33x50/m17/out_of_range", false, [] { test_gather(33, 50, 17, true); });
  add_case("gather_operand/1000x96/m1000/out_of_range", false,
           [] { test_gather(1000, 96, 1000, true); });
  add_case("gather_operand/8x32/m0", false, [] { test_gather(8, 32, 0, false); });
  add_case("gather_operand/300x264/m333/out_of_range", false,
           [] { test_gather(300, 264, 333, true); });
  for (bool t : {false, true}) {
    const std::string tn = t ? "transposed/" : "plain/";
    add_case("s8_operand/" + tn + "64x128/weighted", false,
             [=] { test_weighted(64, 128, t, true, false); });
    add_case("s8_operand/" + tn + "33x50/weighted", false,
             [=] { test_weighted(33, 50, t, true, false); });
    add_case("s8_operand/" + tn + "1000x96/weighted/out_of_range", false,
             [=] { test_weighted(1000, 96, t, true, true); });
    add_case("s8_operand/" + tn + "33x50/plain", false,
             [=] { test_weighted(33, 50, t, false, false); });
    add_case("s8_operand/" + tn + "70x264/weighted/out_of_range", false,
             [=] { test_weighted(70, 264, t, true, true); });
  }
  return true;
}();

}  // namespace
