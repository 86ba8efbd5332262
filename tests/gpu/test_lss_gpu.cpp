// GPU tests of leverage score sampling on the device (lss_sample_cuda) against the CPU's
// lss_probabilities -> lss_round_pow2 -> lss_select, row for row (the selection, its exponents and
// the count), on score vectors that make the water-filling iterate, saturate, span many decades,
// hold zeros or fill the budget; invalid scores; and the weighted FP8 operands
// (codes_to_fp8_weighted_cuda) against an independent e4m3 decoder.
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

// The CPU's composition: exponent k_i for kept rows, -1 otherwise; and the count.
std::vector<int8_t> cpu_select(const std::vector<float>& c, double budget, int max_exponent,
                               const RandomKey& key, int64_t* kept) {
  const int64_t n = static_cast<int64_t>(c.size());
  std::vector<float> p(c.size());
  std::vector<int8_t> k(c.size()), out(c.size(), -1);
  std::vector<int32_t> idx(c.size() + 1);
  lss_probabilities(make_vector(const_cast<float*>(c.data()), DType::kFloat32, n), budget,
                    make_vector(p.data(), DType::kFloat32, n));
  lss_round_pow2(make_vector(p.data(), DType::kFloat32, n), max_exponent,
                 make_vector(k.data(), DType::kInt8, n));
  *kept = lss_select(make_vector(k.data(), DType::kInt8, n), key,
                     make_vector(idx.data(), DType::kInt32, n));
  for (int64_t j = 0; j < *kept; ++j) out[static_cast<size_t>(idx[j])] = k[static_cast<size_t>(idx[j])];
  return out;
}

void test_sample(int64_t n, Scores kind, double budget_per_row, int max_exponent) {
  const auto c = make_scores(n, kind, 17 + static_cast<uint64_t>(n));
  const double budget = n == 0 ? 0.0 : std::max(1.0, budget_per_row * static_cast<double>(n));
  const RandomKey key{0xC0FFEEull + static_cast<uint64_t>(n), 0x0005000300000007ull};
  int64_t want_kept = 0;
  const auto want = cpu_select(c, budget, max_exponent, key, &want_kept);
  DevBuf dc = gputest::upload(c), dex(static_cast<size_t>(n) + 8), dkept(sizeof(int64_t));
  dex.poison();
  dkept.poison();
  lss_sample_cuda(make_vector(dc.get(), DType::kFloat32, n), budget, max_exponent, key,
                  make_vector(dex.get(), DType::kInt8, n), make_scalar(dkept.get(), DType::kInt64),
                  nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<int8_t>(dex, static_cast<size_t>(n) + 8);
  const auto kept = gputest::download<int64_t>(dkept, 1);
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
  for (int64_t i = n; i < n + 8; ++i) {
    GPU_CHECK(static_cast<uint8_t>(got[static_cast<size_t>(i)]) == 0xA5);  // nothing past n
  }
  // The selection is not degenerate: about the budget is kept where the budget binds.
  if (n >= 1000 && kind != Scores::kZeros && budget < static_cast<double>(n)) {
    GPU_CHECK_MSG(std::abs(static_cast<double>(want_kept) - budget) < 0.5 * budget,
                  "kept " << want_kept << " of budget " << budget);
  }
}

void test_invalid(float bad_value) {
  std::vector<float> c = make_scores(3000, Scores::kUniform, 5);
  c[1234] = bad_value;
  DevBuf dc = gputest::upload(c), dex(c.size()), dkept(sizeof(int64_t));
  dex.poison();
  lss_sample_cuda(make_vector(dc.get(), DType::kFloat32, 3000), 100.0, kLssMaxExponent,
                  RandomKey{1, 2}, make_vector(dex.get(), DType::kInt8, 3000),
                  make_scalar(dkept.get(), DType::kInt64), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<int8_t>(dex, c.size());
  const auto kept = gputest::download<int64_t>(dkept, 1);
  int64_t not_dropped = 0;
  for (int8_t e : got) not_dropped += e != -1;
  GPU_CHECK_MSG(not_dropped == 0, not_dropped << " rows kept despite an invalid score");
  GPU_CHECK_MSG(kept[0] == -1, "kept " << kept[0] << ", want -1 (invalid scores)");
}

void test_arg_errors() {
  DevBuf dc(64), dex(64);
  const TensorView c = make_vector(dc.get(), DType::kFloat32, 16);
  const TensorView e = make_vector(dex.get(), DType::kInt8, 16);
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
  expect([&] { lss_sample_cuda(c, 0.0, 4, RandomKey{}, e, TensorView{}, nullptr); }, "budget");
  expect([&] { lss_sample_cuda(c, NAN, 4, RandomKey{}, e, TensorView{}, nullptr); }, "budget");
  expect([&] { lss_sample_cuda(c, 4.0, 33, RandomKey{}, e, TensorView{}, nullptr); },
         "max_exponent");
  expect([&] {
    lss_sample_cuda(c, 4.0, 4, RandomKey{}, make_vector(dex.get(), DType::kInt8, 15), TensorView{},
                    nullptr);
  }, "exponents");
  expect([&] {
    lss_sample_cuda(make_vector(dc.get(), DType::kInt32, 16), 4.0, 4, RandomKey{}, e, TensorView{},
                    nullptr);
  }, "scores");
  expect([&] {
    lss_sample_cuda(c, 4.0, 4, RandomKey{}, e, make_scalar(dex.get(), DType::kFloat32), nullptr);
  }, "kept");
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

// codes * 2^e per code row (e in [-1, 4]; 5 and -2 give NaN rows), plain and transposed, against
// the decoder: every byte, the padding zero.
void test_weighted(int64_t rows, int64_t cols, bool transpose, bool out_of_range) {
  std::mt19937 rng(static_cast<unsigned>(rows * 7 + cols));
  std::uniform_int_distribution<int> code(-8, 7), ex(-1, kLssMaxExponent);
  std::vector<int> codes(static_cast<size_t>(rows * cols));
  for (auto& v : codes) v = code(rng);
  if (!codes.empty()) codes[0] = -8;  // the extreme: -8 * 16 = -128
  std::vector<int8_t> exps(static_cast<size_t>(rows));
  for (auto& e : exps) e = static_cast<int8_t>(ex(rng));
  if (rows > 0) exps[0] = static_cast<int8_t>(kLssMaxExponent);
  if (out_of_range && rows > 2) {
    exps[1] = static_cast<int8_t>(kLssMaxExponent + 1);
    exps[2] = -2;
  }
  DevBuf dp = gputest::upload(pack_codes(codes, rows, cols)), de = gputest::upload(exps);
  const int64_t out_rows = transpose ? cols : rows, k = transpose ? rows : cols;
  const int64_t kp = fp8_padded_cols(k);
  DevBuf op(static_cast<size_t>(std::max<int64_t>(1, out_rows * kp)));
  op.poison();
  codes_to_fp8_weighted_cuda(make_matrix(dp.get(), DType::kInt4Packed, rows, cols),
                             make_vector(de.get(), DType::kInt8, rows), transpose,
                             make_matrix(op.get(), DType::kFloat8E4M3, out_rows, kp), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto bytes = gputest::download<uint8_t>(op, static_cast<size_t>(out_rows * kp));
  int64_t bad = 0;
  for (int64_t r = 0; r < out_rows; ++r) {
    for (int64_t c = 0; c < kp; ++c) {
      const float got = gputest::decode_e4m3(bytes[static_cast<size_t>(r * kp + c)]);
      if (c >= k) {
        bad += !(got == 0.0f);
        continue;
      }
      const int64_t cr = transpose ? c : r, cc = transpose ? r : c;  // code row, code column
      const int e = exps[static_cast<size_t>(cr)];
      if (e < -1 || e > kLssMaxExponent) {
        bad += !std::isnan(got);
        continue;
      }
      const float want = e < 0 ? 0.0f : std::ldexp(static_cast<float>(codes[static_cast<size_t>(cr * cols + cc)]), e);
      bad += !(got == want);
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " weighted operand bytes differ");
}

// The weight gradient's products with folded weights (|a| <= 128, |b| <= 8, so |a b| <= 1024) at the
// bound kMaxKFp8Weighted, on data built to expose an accumulator narrower than fp32 inside the tensor
// core: tokens whose products are +-1024 beside tokens whose products are 1, large first, small first,
// and interleaved (every 128-token block then holds a partial sum of about 2^16 next to terms of 1).
// Random data keeps partial sums small and cannot show such a loss. Each output must equal the exact
// integer sum (below 2^24, so representable in the fp32 result).
enum class Order { kLargeFirst, kSmallFirst, kInterleaved };
void test_weighted_exact(Order order) {
  const int64_t k = kMaxKFp8Weighted, m = 2, n = 16;
  // Code rows are tokens: a (tokens x m) with a weight per token, b (tokens x n).
  std::vector<int> a(static_cast<size_t>(k * m)), b(static_cast<size_t>(k * n));
  std::vector<int8_t> exps(static_cast<size_t>(k));
  for (int64_t t = 0; t < k; ++t) {
    bool large = false;
    switch (order) {
      case Order::kLargeFirst: large = t < k / 2; break;
      case Order::kSmallFirst: large = t >= k / 2; break;
      case Order::kInterleaved: large = t % 2 == 0; break;
    }
    exps[static_cast<size_t>(t)] = static_cast<int8_t>(large ? kLssMaxExponent : 0);
    for (int64_t j = 0; j < m; ++j) {
      a[static_cast<size_t>(t * m + j)] = large ? (j == 0 ? -8 : 7) : 1;
    }
    for (int64_t j = 0; j < n; ++j) {
      // column 0: -8 (products 1024 / 896), column 1: 1, the rest alternate in sign with t.
      const int v = j == 0 ? -8 : (j == 1 ? 1 : ((t + j) % 2 == 0 ? 7 : -8));
      b[static_cast<size_t>(t * n + j)] = large ? v : (j % 3 == 0 ? 1 : -1);
    }
  }
  DevBuf da = gputest::upload(pack_codes(a, k, m)), db = gputest::upload(pack_codes(b, k, n)),
         de = gputest::upload(exps);
  const int64_t kp = fp8_padded_cols(k);
  DevBuf opa(static_cast<size_t>(m * kp)), opb(static_cast<size_t>(n * kp)), out(m * n * 4);
  out.poison();
  codes_to_fp8_weighted_cuda(make_matrix(da.get(), DType::kInt4Packed, k, m),
                             make_vector(de.get(), DType::kInt8, k), true,
                             make_matrix(opa.get(), DType::kFloat8E4M3, m, kp), nullptr);
  codes_to_fp8_cuda(make_matrix(db.get(), DType::kInt4Packed, k, n), true,
                    make_matrix(opb.get(), DType::kFloat8E4M3, n, kp), nullptr);
  gemm_fp8_cuda(make_matrix(opa.get(), DType::kFloat8E4M3, m, kp),
                make_matrix(opb.get(), DType::kFloat8E4M3, n, kp), TensorView{}, TensorView{},
                TensorView{}, make_matrix(out.get(), DType::kFloat32, m, n),
                default_cuda_allocator(), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = gputest::download<float>(out, static_cast<size_t>(m * n));
  int64_t bad = 0;
  std::string first;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      int64_t want = 0;
      for (int64_t t = 0; t < k; ++t) {
        const int64_t w = int64_t{1} << exps[static_cast<size_t>(t)];
        want += static_cast<int64_t>(a[static_cast<size_t>(t * m + i)]) * w *
                b[static_cast<size_t>(t * n + j)];
      }
      if (static_cast<double>(got[static_cast<size_t>(i * n + j)]) != static_cast<double>(want)) {
        if (bad++ == 0) {
          first = "(" + std::to_string(i) + ", " + std::to_string(j) + "): " +
                  std::to_string(got[static_cast<size_t>(i * n + j)]) + " want " + std::to_string(want);
        }
      }
    }
  }
  GPU_CHECK_MSG(bad == 0, bad << " of " << m * n << " weighted sums inexact, first " << first);
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
  add_case("lss_sample/heavy/n3000/budget_above_positives", false,
           [] { test_sample(3000, Scores::kZeros, 0.9, kLssMaxExponent); });
  add_case("lss_sample/invalid/nan", false, [] { test_invalid(NAN); });
  add_case("lss_sample/invalid/negative", false, [] { test_invalid(-1.0f); });
  add_case("lss_sample/invalid/inf", false, [] { test_invalid(INFINITY); });
  add_case("lss_sample/errors", false, test_arg_errors);
  add_case("fp8_weighted_exact/large_first", false, [] { test_weighted_exact(Order::kLargeFirst); });
  add_case("fp8_weighted_exact/small_first", false, [] { test_weighted_exact(Order::kSmallFirst); });
  add_case("fp8_weighted_exact/interleaved", false, [] { test_weighted_exact(Order::kInterleaved); });
  for (bool t : {false, true}) {
    const std::string tn = t ? "transposed/" : "plain/";
    add_case("fp8_weighted/" + tn + "64x128", false, [=] { test_weighted(64, 128, t, false); });
    add_case("fp8_weighted/" + tn + "33x50", false, [=] { test_weighted(33, 50, t, false); });
    add_case("fp8_weighted/" + tn + "1000x96/out_of_range", false,
             [=] { test_weighted(1000, 96, t, true); });
  }
  return true;
}();

}  // namespace
