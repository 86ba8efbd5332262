// GPU tests of leverage score sampling on the device (lss_sample_cuda) against the CPU's
// lss_probabilities -> lss_round_pow2 -> lss_select, row for row (the selection, its exponents and
// the count), on score vectors that make the water-filling iterate, saturate, span many decades,
// hold zeros or fill the budget; invalid scores; and the weight gradient's INT8 operands with the
// importance weights folded in (codes_to_s8_cuda), byte for byte.
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

// graph: the call is captured into a CUDA graph (global capture mode) on a stream of its own and
// replayed. As the first sampling call of a process (scripts/gpu_check.sh runs
// lss_sample/graph_first_call alone), the capture is also the first call on the device.
void test_sample(int64_t n, Scores kind, double budget_per_row, int max_exponent,
                 bool graph = false) {
  const auto c = make_scores(n, kind, 17 + static_cast<uint64_t>(n));
  const double budget = n == 0 ? 0.0 : std::max(1.0, budget_per_row * static_cast<double>(n));
  const RandomKey key{0xC0FFEEull + static_cast<uint64_t>(n), 0x0005000300000007ull};
  int64_t want_kept = 0;
  const auto want = cpu_select(c, budget, max_exponent, key, &want_kept);
  DevBuf dc = gputest::upload(c), dex(static_cast<size_t>(n) + 8), dkept(sizeof(int64_t));
  dex.poison();
  dkept.poison();
  cudaStream_t st = nullptr;
  cudaGraph_t g = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CUDA_OK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  }
  lss_sample_cuda(make_vector(dc.get(), DType::kFloat32, n), budget, max_exponent, key,
                  make_vector(dex.get(), DType::kInt8, n), make_scalar(dkept.get(), DType::kInt64),
                  st);
  if (graph) {
    CUDA_OK(cudaStreamEndCapture(st, &g));
    CUDA_OK(cudaGraphInstantiate(&exec, g, 0));
    CUDA_OK(cudaGraphLaunch(exec, st));
    CUDA_OK(cudaStreamSynchronize(st));
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
    cudaStreamDestroy(st);
  }
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
  }
  return true;
}();

}  // namespace
