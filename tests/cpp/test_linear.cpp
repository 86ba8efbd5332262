// Tests of the quantized linear layer (linear.h): every recipe's forward and backward against an fp64
// reference by signal-to-noise ratio on transformer-like inputs with outlier channels, the Hadamard
// transform's benefit, unbiasedness of the sampled backward, determinism and argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "expect_error.h"
#include "int4train/hadamard.h"
#include "int4train/linear.h"
#include "int4train/quantize.h"

namespace int4train {
namespace {

// Activations like a transformer's: Gaussian channels plus a few outlier channels ~20x larger (the
// structure that makes per-tensor 4-bit grids lose; Dettmers et al. 2022, Xi et al. 2023).
struct Problem {
  int64_t n, d, c;
  std::vector<float> x, w, b, gy;
};

Problem make_problem(int64_t n, int64_t d, int64_t c, uint32_t seed, int outliers = 4) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Problem p{n, d, c, {}, {}, {}, {}};
  p.x.resize(static_cast<size_t>(n * d));
  p.w.resize(static_cast<size_t>(c * d));
  p.b.resize(static_cast<size_t>(c));
  p.gy.resize(static_cast<size_t>(n * c));
  std::vector<float> channel_scale(static_cast<size_t>(d), 1.0f);
  for (int o = 0; o < outliers; ++o) channel_scale[static_cast<size_t>((o * 37 + 5) % d)] = 20.0f;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) p.x[i * d + j] = normal(rng) * channel_scale[j];
  const float ws = 1.0f / std::sqrt(static_cast<float>(d));
  for (auto& v : p.w) v = normal(rng) * ws;
  for (auto& v : p.b) v = 0.1f * normal(rng);
  // Output gradients are row-sparse in practice (few tokens carry most of the norm).
  for (int64_t i = 0; i < n; ++i) {
    const float row = (i % 7 == 0) ? 1.0f : 0.05f;
    for (int64_t j = 0; j < c; ++j) p.gy[i * c + j] = row * normal(rng);
  }
  return p;
}

double snr_db(const std::vector<double>& ref, const std::vector<float>& got) {
  double s = 0, e = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    s += ref[i] * ref[i];
    e += (ref[i] - got[i]) * (ref[i] - got[i]);
  }
  return 10.0 * std::log10(s / std::max(e, 1e-300));
}

// fp64 references: y = x w^T + b, dx = gy w, dw = gy^T x.
std::vector<double> ref_forward(const Problem& p) {
  std::vector<double> y(static_cast<size_t>(p.n * p.c));
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.c; ++j) {
      double acc = p.b[j];
      for (int64_t k = 0; k < p.d; ++k) acc += double(p.x[i * p.d + k]) * p.w[j * p.d + k];
      y[i * p.c + j] = acc;
    }
  return y;
}
std::vector<double> ref_grad_x(const Problem& p) {
  std::vector<double> dx(static_cast<size_t>(p.n * p.d), 0.0);
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.c; ++j) {
      const double g = p.gy[i * p.c + j];
      for (int64_t k = 0; k < p.d; ++k) dx[i * p.d + k] += g * p.w[j * p.d + k];
    }
  return dx;
}
std::vector<double> ref_grad_w(const Problem& p) {
  std::vector<double> dw(static_cast<size_t>(p.c * p.d), 0.0);
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.c; ++j) {
      const double g = p.gy[i * p.c + j];
      for (int64_t k = 0; k < p.d; ++k) dw[j * p.d + k] += g * p.x[i * p.d + k];
    }
  return dw;
}

// Owns the saved state and outputs of one forward + backward.
struct LayerRun {
  std::vector<float> y, dx, dw, db;
  std::vector<uint8_t> codes, aux;
  float saved_scale = 0, step_x = 0, step_w = 0, grad_step_x = 0, grad_step_w = 0;
  LinearBackwardStats stats;
};

int32_t choose_block(Recipe r, Problem& p) {
  if (!recipe_uses_hadamard(r)) return 1;
  return select_hadamard_block(make_matrix(p.x.data(), DType::kFloat32, p.n, p.d),
                               make_matrix(p.w.data(), DType::kFloat32, p.c, p.d))
      .block;
}

void init_steps(Problem& p, int32_t block, LayerRun& run) {
  std::vector<float> xt(p.x.size()), wt(p.w.size());
  hadamard_transform(make_matrix(p.x.data(), DType::kFloat32, p.n, p.d),
                     make_matrix(xt.data(), DType::kFloat32, p.n, p.d), block);
  hadamard_transform(make_matrix(p.w.data(), DType::kFloat32, p.c, p.d),
                     make_matrix(wt.data(), DType::kFloat32, p.c, p.d), block);
  run.step_x = lsq_init_step(make_matrix(xt.data(), DType::kFloat32, p.n, p.d));
  run.step_w = lsq_init_step(make_matrix(wt.data(), DType::kFloat32, p.c, p.d));
}

// The forward's arguments over p and run (run's outputs filled with sentinels).
LinearForwardArgs forward_args(const LinearConfig& cfg, Problem& p, LayerRun& run) {
  const LinearSavedShapes s = linear_saved_shapes(cfg.recipe, p.n, p.d);
  run.y.assign(static_cast<size_t>(p.n * p.c), -12345.0f);
  run.codes.assign(static_cast<size_t>(s.bytes()) + 1, 0xAB);
  run.aux.assign(static_cast<size_t>(s.aux_bytes) + 1, 0xCD);
  LinearForwardArgs a;
  a.x = make_matrix(p.x.data(), DType::kFloat32, p.n, p.d);
  a.w = make_matrix(p.w.data(), DType::kFloat32, p.c, p.d);
  a.bias = make_vector(p.b.data(), DType::kFloat32, p.c);
  a.step_x = make_scalar(&run.step_x, DType::kFloat32);
  a.step_w = make_scalar(&run.step_w, DType::kFloat32);
  a.y = make_matrix(run.y.data(), DType::kFloat32, p.n, p.c);
  a.saved_codes = make_matrix(run.codes.data(), s.codes_dtype, s.codes_rows, s.codes_cols);
  a.saved_aux = make_vector(run.aux.data(), DType::kUInt8, s.aux_bytes);
  a.saved_scale = make_scalar(&run.saved_scale, DType::kFloat32);
  return a;
}

void forward(const LinearConfig& cfg, Problem& p, LayerRun& run) {
  linear_forward(cfg, forward_args(cfg, p, run));
}

void backward(const LinearConfig& cfg, Problem& p, LayerRun& run) {
  const LinearSavedShapes s = linear_saved_shapes(cfg.recipe, p.n, p.d);
  run.dx.assign(static_cast<size_t>(p.n * p.d), -12345.0f);
  run.dw.assign(static_cast<size_t>(p.c * p.d), -12345.0f);
  run.db.assign(static_cast<size_t>(p.c), -12345.0f);
  LinearBackwardArgs a;
  a.grad_y = make_matrix(p.gy.data(), DType::kFloat32, p.n, p.c);
  a.x = make_matrix(p.x.data(), DType::kFloat32, p.n, p.d);
  a.saved_codes = make_matrix(run.codes.data(), s.codes_dtype, s.codes_rows, s.codes_cols);
  a.saved_aux = make_vector(run.aux.data(), DType::kUInt8, s.aux_bytes);
  a.saved_scale = make_scalar(&run.saved_scale, DType::kFloat32);
  a.w = make_matrix(p.w.data(), DType::kFloat32, p.c, p.d);
  a.step_x = make_scalar(&run.step_x, DType::kFloat32);
  a.step_w = make_scalar(&run.step_w, DType::kFloat32);
  a.grad_x = make_matrix(run.dx.data(), DType::kFloat32, p.n, p.d);
  a.grad_w = make_matrix(run.dw.data(), DType::kFloat32, p.c, p.d);
  a.grad_bias = make_vector(run.db.data(), DType::kFloat32, p.c);
  a.grad_step_x = make_scalar(&run.grad_step_x, DType::kFloat32);
  a.grad_step_w = make_scalar(&run.grad_step_w, DType::kFloat32);
  linear_backward(cfg, a, &run.stats);
}

// Minimum SNRs (dB) against fp64, per recipe, on make_problem(256, 512, 384) with outliers.
// fp: fp32 rounding only (~24 bits: well above 100 dB). int8: per-tensor absmax 8-bit on outlier-heavy
// data keeps ~6 dB a bit minus the outlier headroom (20x = 4.3 bits): > 20 dB forward. 4-bit LSQ with
// Hadamard: ~6 dB a bit for 4 bits on both operands, minus clipping: > 12 dB forward. LSQ without
// Hadamard (lsq_luq) loses most bits to the outliers: only a positive SNR is required. The gradients
// are stochastic estimates (unbiased, with variance), so their floors are lower.
struct RecipeCase {
  Recipe recipe;
  double fwd_db, dx_db, dw_db;
};

class LinearRecipe : public ::testing::TestWithParam<RecipeCase> {};

TEST_P(LinearRecipe, ForwardAndBackwardTrackFp64) {
  const RecipeCase rc = GetParam();
  Problem p = make_problem(256, 512, 384, 7);
  LinearConfig cfg;
  cfg.recipe = rc.recipe;
  cfg.seed = 1234;
  cfg.hadamard_block = choose_block(rc.recipe, p);
  LayerRun run;
  init_steps(p, cfg.hadamard_block, run);
  forward(cfg, p, run);
  backward(cfg, p, run);
  const double fwd = snr_db(ref_forward(p), run.y);
  const double dx = snr_db(ref_grad_x(p), run.dx);
  const double dw = snr_db(ref_grad_w(p), run.dw);
  RecordProperty("forward_snr_db", std::to_string(fwd));
  RecordProperty("grad_x_snr_db", std::to_string(dx));
  RecordProperty("grad_w_snr_db", std::to_string(dw));
  EXPECT_GT(fwd, rc.fwd_db) << recipe_name(rc.recipe);
  EXPECT_GT(dx, rc.dx_db) << recipe_name(rc.recipe);
  EXPECT_GT(dw, rc.dw_db) << recipe_name(rc.recipe);
  // The bias gradient is exact column sums in every recipe.
  for (int64_t j = 0; j < p.c; ++j) {
    double s = 0;
    for (int64_t i = 0; i < p.n; ++i) s += p.gy[i * p.c + j];
    EXPECT_NEAR(run.db[j], s, 1e-4 * (1 + std::abs(s)));
  }
  if (recipe_uses_lsq(rc.recipe)) {
    EXPECT_TRUE(std::isfinite(run.grad_step_x));
    EXPECT_TRUE(std::isfinite(run.grad_step_w));
  }
  if (rc.recipe == Recipe::kHqLss) {
    // At most N of the 2N rows are kept for each product (the capacity ceil(budget) at budget 1).
    EXPECT_GT(run.stats.input_rows_kept, p.n / 4);
    EXPECT_LE(run.stats.input_rows_kept, p.n);
    EXPECT_GT(run.stats.weight_rows_kept, p.n / 4);
    EXPECT_LE(run.stats.weight_rows_kept, p.n);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Recipes, LinearRecipe,
    ::testing::Values(RecipeCase{Recipe::kFp, 100, 100, 100},
                      RecipeCase{Recipe::kInt8, 20, 15, 15},
                      RecipeCase{Recipe::kLsqLuq, 0, 0, 0},
                      RecipeCase{Recipe::kHq, 12, 0, 0},
                      RecipeCase{Recipe::kHqBs, 12, 10, 10},
                      RecipeCase{Recipe::kHqLss, 12, 3, 3}),
    [](const ::testing::TestParamInfo<RecipeCase>& info) {
      return std::string(recipe_name(info.param.recipe));
    });

// The paper's point: on inputs with outlier channels, the Hadamard transform makes the 4-bit forward
// much more accurate than the same quantizer without it.
TEST(LinearHadamard, BeatsNoTransformOnOutliers) {
  Problem p = make_problem(256, 512, 384, 11, 8);
  LinearConfig with_h;
  with_h.recipe = Recipe::kHq;
  with_h.hadamard_block = choose_block(Recipe::kHq, p);
  ASSERT_GT(with_h.hadamard_block, 1);
  LinearConfig without_h = with_h;
  without_h.hadamard_block = 1;
  LayerRun a, b;
  init_steps(p, with_h.hadamard_block, a);
  init_steps(p, 1, b);
  forward(with_h, p, a);
  forward(without_h, p, b);
  const auto ref = ref_forward(p);
  const double snr_h = snr_db(ref, a.y), snr_plain = snr_db(ref, b.y);
  RecordProperty("snr_hadamard_db", std::to_string(snr_h));
  RecordProperty("snr_plain_db", std::to_string(snr_plain));
  EXPECT_GT(snr_h, snr_plain + 3.0);
}

// The sampled backward is unbiased given the forward codes: the mean over backward seeds converges to
// the expectation, with error shrinking like 1/sqrt(draws).
// A block-16 HQ config of `recipe` and the forward of `p` under it (steps initialised from p).
LinearConfig hq_config(Recipe recipe, uint64_t seed) {
  LinearConfig cfg;
  cfg.recipe = recipe;
  cfg.hadamard_block = 16;
  cfg.seed = seed;
  return cfg;
}

LayerRun initialised_forward(const LinearConfig& cfg, Problem& p) {
  LayerRun run;
  init_steps(p, cfg.hadamard_block, run);
  forward(cfg, p, run);
  return run;
}

TEST(LinearLss, BackwardIsUnbiased) {
  Problem p = make_problem(32, 64, 48, 3);
  const LinearConfig cfg = hq_config(Recipe::kHqLss, 99);
  const LayerRun base = initialised_forward(cfg, p);
  // Both hq_bs (bit split, all rows) and hq_lss (bit split + sampling) are unbiased for the same
  // expectation given the forward codes; a long hq_bs mean is an independent estimate of it.
  double cfg_budget = 1.0;
  auto mean_dx = [&](Recipe r, int draws, uint64_t seed0) {
    std::vector<double> m(static_cast<size_t>(p.n * p.d), 0.0);
    LinearConfig c2 = cfg;
    c2.recipe = r;
    c2.lss_budget = cfg_budget;
    for (int t = 0; t < draws; ++t) {
      c2.seed = seed0 + t;
      LayerRun run = base;
      backward(c2, p, run);
      for (size_t i = 0; i < m.size(); ++i) m[i] += run.dx[i];
    }
    for (auto& v : m) v /= draws;
    return m;
  };
  const auto target = mean_dx(Recipe::kHqBs, 1600, 1000000);
  auto rms = [&](const std::vector<double>& a) {
    double e = 0, s = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      e += (a[i] - target[i]) * (a[i] - target[i]);
      s += target[i] * target[i];
    }
    return std::sqrt(e / s);
  };
  // The paper's budget and a smaller one (more sampling variance, the same expectation).
  for (double budget : {1.0, 0.5}) {
    cfg_budget = budget;
    const double e1 = rms(mean_dx(Recipe::kHqLss, 25, 1));
    const double e4 = rms(mean_dx(Recipe::kHqLss, 400, 5000));
    RecordProperty("rel_err_25_budget_" + std::to_string(budget), std::to_string(e1));
    RecordProperty("rel_err_400_budget_" + std::to_string(budget), std::to_string(e4));
    // 16x the draws: the error drops ~4x if unbiased (a bias would make it plateau). Allow 2.5x.
    EXPECT_LT(e4, e1 / 2.5) << budget;
  }
}

// lss_budget: 2 keeps every non-zero bit-split row with p = 1, so hq_lss is hq_bs bit for bit;
// smaller budgets keep at most ceil(budget * N) rows in every draw (the capacity of lss.h) and, on
// average, nearly that many or every non-zero row (the rounded probabilities fill the capacity up
// to the search's last step). Unbiasedness at other budgets: BackwardIsUnbiased.
TEST(LinearLss, BudgetTwoIsBitSplitAndBudgetSetsKeptRows) {
  Problem p = make_problem(64, 64, 48, 4);
  const LinearConfig cfg = hq_config(Recipe::kHqBs, 5);
  const LayerRun base = initialised_forward(cfg, p);
  LayerRun bs = base;
  backward(cfg, p, bs);
  LinearConfig lss = cfg;
  lss.recipe = Recipe::kHqLss;
  lss.lss_budget = 2.0;
  LayerRun all = base;
  backward(lss, p, all);
  EXPECT_EQ(all.dx, bs.dx);
  EXPECT_EQ(all.dw, bs.dw);
  EXPECT_EQ(all.db, bs.db);
  EXPECT_EQ(all.grad_step_x, bs.grad_step_x);
  EXPECT_EQ(all.grad_step_w, bs.grad_step_w);
  const double nonzero = static_cast<double>(all.stats.input_rows_kept);  // every non-zero row
  for (double budget : {0.125, 0.5, 1.0, 1.5}) {
    lss.lss_budget = budget;
    const double capacity = std::ceil(budget * p.n);
    double kept = 0;
    const int draws = 64;
    for (int t = 0; t < draws; ++t) {
      lss.seed = 1000 + t;
      LayerRun run = base;
      backward(lss, p, run);
      EXPECT_LE(run.stats.input_rows_kept, capacity) << budget;
      EXPECT_LE(run.stats.weight_rows_kept, capacity) << budget;
      kept += static_cast<double>(run.stats.input_rows_kept);
    }
    kept /= draws;
    RecordProperty("kept_rows_budget_" + std::to_string(budget), std::to_string(kept));
    EXPECT_GT(kept, 0.9 * std::min(capacity, nonzero)) << budget;
  }
}

// grad_scale=row (linear.h): the same expectation as grad_scale=tensor (both unbiased given the
// forward's codes), for hq_bs and hq_lss; with hq_bs a much smaller error on the tokens whose
// gradient is small (make_problem's rows of 0.05 against 1: k = 4, 4 more bits); lss_budget 2 is
// hq_bs bit for bit with row scales too.
TEST(LinearGradScale, RowScalesAreUnbiasedAndResolveSmallRows) {
  Problem p = make_problem(42, 64, 48, 6);
  LinearConfig cfg = hq_config(Recipe::kHqBs, 5);
  const LayerRun base = initialised_forward(cfg, p);
  LinearConfig row = cfg;
  row.grad_scale = GradScaleMode::kRow;
  LayerRun bs = base, lss2 = base;
  backward(row, p, bs);
  LinearConfig all = row;
  all.recipe = Recipe::kHqLss;
  all.lss_budget = 2.0;
  backward(all, p, lss2);
  EXPECT_EQ(lss2.dx, bs.dx);
  EXPECT_EQ(lss2.dw, bs.dw);
  // Per-element mean and variance of dx and dw over `draws` seeds.
  struct Moments {
    std::vector<double> mean, var;
  };
  auto moments = [&](const LinearConfig& c, int draws, uint64_t seed0) {
    const size_t m = static_cast<size_t>(p.n * p.d + p.c * p.d);
    std::vector<double> s1(m, 0.0), s2(m, 0.0);
    LinearConfig c2 = c;
    for (int t = 0; t < draws; ++t) {
      c2.seed = seed0 + t;
      LayerRun run = base;
      backward(c2, p, run);
      for (size_t i = 0; i < m; ++i) {
        const double v = i < run.dx.size() ? run.dx[i] : run.dw[i - run.dx.size()];
        s1[i] += v;
        s2[i] += v * v;
      }
    }
    Moments out{std::vector<double>(m), std::vector<double>(m)};
    for (size_t i = 0; i < m; ++i) {
      out.mean[i] = s1[i] / draws;
      out.var[i] = std::max(0.0, (s2[i] - s1[i] * out.mean[i]) / (draws - 1));
    }
    return out;
  };
  // RMS of the small-row tokens' (i % 7 != 0) input-gradient error of one draw against a mean,
  // relative to the mean's norm there.
  auto small_rows_error = [&](const std::vector<float>& dx, const std::vector<double>& ref) {
    double e = 0, n = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      if (i % 7 == 0) continue;
      for (int64_t j = 0; j < p.d; ++j) {
        const size_t at = static_cast<size_t>(i * p.d + j);
        e += (dx[at] - ref[at]) * (dx[at] - ref[at]);
        n += ref[at] * ref[at];
      }
    }
    return std::sqrt(e / n);
  };
  const int draws = 600;
  for (Recipe r : {Recipe::kHqBs, Recipe::kHqLss}) {
    LinearConfig t = cfg, rr = row;
    t.recipe = rr.recipe = r;
    const Moments mt = moments(t, draws, 1000), mr = moments(rr, draws, 90000);
    // Unbiased: the two means differ by their noise only, z = (m_r - m_t) / sqrt(v_r/D + v_t/D)
    // has an RMS of about 1 over the elements (a bias of either would raise it).
    double z2 = 0;
    int64_t counted = 0;
    for (size_t i = 0; i < mt.mean.size(); ++i) {
      const double v = (mr.var[i] + mt.var[i]) / draws;
      if (v == 0.0) {
        EXPECT_EQ(mr.mean[i], mt.mean[i]) << i;
        continue;
      }
      z2 += (mr.mean[i] - mt.mean[i]) * (mr.mean[i] - mt.mean[i]) / v;
      ++counted;
    }
    const double zrms = std::sqrt(z2 / static_cast<double>(counted));
    RecordProperty(std::string(recipe_name(r)) + "_z_rms", std::to_string(zrms));
    EXPECT_GT(counted, static_cast<int64_t>(mt.mean.size() / 2)) << recipe_name(r);
    EXPECT_NEAR(zrms, 1.0, 0.15) << recipe_name(r);
    // One draw against the long mean: hq_bs's small tokens several times more precise.
    LayerRun one_t = base, one_r = base;
    t.seed = rr.seed = 7;
    backward(t, p, one_t);
    backward(rr, p, one_r);
    const double et = small_rows_error(one_t.dx, mt.mean), er = small_rows_error(one_r.dx, mt.mean);
    RecordProperty(std::string(recipe_name(r)) + "_small_rows_err_tensor", std::to_string(et));
    RecordProperty(std::string(recipe_name(r)) + "_small_rows_err_row", std::to_string(er));
    if (r == Recipe::kHqBs) EXPECT_LT(er, 0.25 * et);
  }
}

TEST(LinearLss, RecipeSpecParsesAndRejects) {
  LinearConfig cfg;
  parse_recipe_spec("hq_bs", &cfg);
  EXPECT_EQ(cfg.recipe, Recipe::kHqBs);
  EXPECT_EQ(cfg.lss_budget, kLssDefaultBudget);
  parse_recipe_spec("hq_lss:lss_budget=1.5", &cfg);
  EXPECT_EQ(cfg.recipe, Recipe::kHqLss);
  EXPECT_EQ(cfg.lss_budget, 1.5);
  parse_recipe_spec("hq_lss:lss_budget=0.125", &cfg);
  EXPECT_EQ(cfg.lss_budget, kLssMinBudget);
  parse_recipe_spec("hq_lss", &cfg);
  EXPECT_EQ(cfg.lss_budget, kLssDefaultBudget);
  EXPECT_EQ(cfg.gemm, GemmEngine::kAuto);
  parse_recipe_spec("hq_bs:gemm=int8", &cfg);
  EXPECT_EQ(cfg.recipe, Recipe::kHqBs);
  EXPECT_EQ(cfg.gemm, GemmEngine::kInt8);
  parse_recipe_spec("hq_lss:lss_budget=1.5,gemm=fp8", &cfg);
  EXPECT_EQ(cfg.lss_budget, 1.5);
  EXPECT_EQ(cfg.gemm, GemmEngine::kFp8);
  parse_recipe_spec("lsq_luq:gemm=auto", &cfg);
  EXPECT_EQ(cfg.gemm, GemmEngine::kAuto);
  parse_recipe_spec("fp:gemm=auto", &cfg);  // the default, accepted for every recipe (as Python's)
  EXPECT_EQ(cfg.recipe, Recipe::kFp);
  parse_recipe_spec("hq", &cfg);  // every option back to its default
  EXPECT_EQ(cfg.gemm, GemmEngine::kAuto);
  EXPECT_EQ(cfg.lss_budget, kLssDefaultBudget);
  EXPECT_EQ(cfg.grad_scale, GradScaleMode::kTensor);
  parse_recipe_spec("hq_lss:lss_budget=1.5,grad_scale=row", &cfg);
  EXPECT_EQ(cfg.grad_scale, GradScaleMode::kRow);
  EXPECT_EQ(cfg.lss_budget, 1.5);
  parse_recipe_spec("hq_bs:grad_scale=tensor", &cfg);
  EXPECT_EQ(cfg.grad_scale, GradScaleMode::kTensor);
  parse_recipe_spec("hq_bs:grad_scale=row,gemm=int8", &cfg);
  EXPECT_EQ(cfg.grad_scale, GradScaleMode::kRow);
  EXPECT_EQ(cfg.gemm, GemmEngine::kInt8);
  parse_recipe_spec("hq_bs", &cfg);
  EXPECT_EQ(cfg.grad_scale, GradScaleMode::kTensor);
  for (const char* bad : {"hq_bs:lss_budget=1.5",
                          "hq:grad_scale=row",
                          "lsq_luq:grad_scale=row",
                          "fp:grad_scale=tensor",
                          "hq_bs:grad_scale=",
                          "hq_bs:grad_scale=token",
                          "hq_bs:grad_scale=row,grad_scale=row",
                          "hq_lss:lss_budget=",
                          "hq_lss:lss_budget",
                          "hq_lss:lss_budget=abc",
                          "hq_lss:lss_budget=1.5x",
                          "hq_lss:lss_budget=2.5",
                          "hq_lss:lss_budget=0",
                          "hq_lss:lss_budget=0.1",
                          "hq_lss:lss_budget=-1",
                          "hq_lss:lss_budget=nan",
                          "hq_lss:budget=1",
                          "hq_lss:",
                          "hq_lss4",
                          "",
                          "hq_bs:gemm=",
                          "hq_bs:gemm=fp16",
                          "hq_bs:gemm=INT8",
                          "fp:gemm=int8",
                          "int8:gemm=fp8",
                          "hq_bs:gemm=int8,gemm=fp8",
                          "hq_lss:lss_budget=1.5,lss_budget=1.5",
                          "hq_bs:gemm=int8,"}) {
    try {
      parse_recipe_spec(bad, &cfg);
      ADD_FAILURE() << "expected an error for '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kValue) << bad;
      const std::string what = e.what();
      EXPECT_TRUE(what.find("recipe") != std::string::npos ||
                  what.find("lss_budget") != std::string::npos ||
                  what.find("gemm") != std::string::npos ||
                  what.find("grad_scale") != std::string::npos)
          << bad << ": " << what;
    }
  }
  // A budget set directly on the config is checked by the layer.
  Problem p = make_problem(4, 16, 3, 1);
  LinearConfig direct;
  direct.recipe = Recipe::kHqLss;
  direct.hadamard_block = 16;
  direct.lss_budget = 3.0;
  LayerRun run;
  run.step_x = 0.5f;
  run.step_w = 0.05f;
  try {
    forward(direct, p, run);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lss_budget"), std::string::npos) << e.what();
  }
}

TEST(LinearDeterminism, SameSeedSameBits) {
  for (Recipe r : {Recipe::kInt8, Recipe::kLsqLuq, Recipe::kHq, Recipe::kHqBs, Recipe::kHqLss}) {
    Problem p = make_problem(40, 64, 24, 5);
    LinearConfig cfg;
    cfg.recipe = r;
    cfg.hadamard_block = recipe_uses_hadamard(r) ? 32 : 1;
    cfg.seed = 77;
    cfg.step = 3;
    cfg.layer = 2;
    LayerRun a, b;
    init_steps(p, cfg.hadamard_block, a);
    b = a;
    forward(cfg, p, a);
    backward(cfg, p, a);
    forward(cfg, p, b);
    backward(cfg, p, b);
    EXPECT_EQ(a.y, b.y) << recipe_name(r);
    EXPECT_EQ(a.dx, b.dx) << recipe_name(r);
    EXPECT_EQ(a.dw, b.dw) << recipe_name(r);
    EXPECT_EQ(a.grad_step_x, b.grad_step_x) << recipe_name(r);
    // A different seed changes the stochastic backward.
    LinearConfig other = cfg;
    other.seed = 78;
    LayerRun c = a;
    backward(other, p, c);
    EXPECT_NE(a.dx, c.dx) << recipe_name(r);
  }
}

TEST(LinearShapes, OddSizesAndEmptyBatch) {
  for (int64_t n : {0, 1, 3, 17}) {
    Problem p = make_problem(n, 48, 5, 9);
    for (Recipe r : {Recipe::kFp, Recipe::kInt8, Recipe::kLsqLuq, Recipe::kHqBs, Recipe::kHqLss}) {
      LinearConfig cfg;
      cfg.recipe = r;
      cfg.hadamard_block = recipe_uses_hadamard(r) ? 16 : 1;
      LayerRun run;
      run.step_x = 0.5f;
      run.step_w = 0.05f;
      forward(cfg, p, run);
      backward(cfg, p, run);
      for (float v : run.y) EXPECT_TRUE(std::isfinite(v)) << recipe_name(r) << " n=" << n;
      for (float v : run.dx) EXPECT_TRUE(std::isfinite(v)) << recipe_name(r) << " n=" << n;
      for (float v : run.dw) EXPECT_TRUE(std::isfinite(v)) << recipe_name(r) << " n=" << n;
      if (n == 0) {
        for (float v : run.dw) EXPECT_EQ(v, 0.0f) << recipe_name(r);
      }
    }
  }
}

// The bias gradient's summation order (linear.h, kBiasGradBlockRows) is observable: column 0 holds
// 2^60, then ones, then -2^60 at the start of the second row block, then ones. Each 1 added to +-2^60
// is lost in fp64 (its ulp there is 256). Row order gives 127 (the ones after -2^60 survive); the
// blocked order gives 0 (each block sum is +-2^60 and they cancel). Column 1 (all ones, 300 rows, a
// short last block) is exact in either order.
TEST(LinearBias, GradientFollowsTheBlockOrder) {
  ASSERT_EQ(kBiasGradBlockRows, 128);
  const int64_t n = 300;
  Problem p = make_problem(n, 16, 2, 3);
  for (int64_t i = 0; i < n; ++i) {
    float v = 1.0f;
    if (i == 0) v = 0x1.0p60f;
    if (i == kBiasGradBlockRows) v = -0x1.0p60f;
    if (i >= 2 * kBiasGradBlockRows) v = 0.0f;
    p.gy[static_cast<size_t>(i * 2)] = v;
    p.gy[static_cast<size_t>(i * 2 + 1)] = 1.0f;
  }
  LinearConfig cfg;
  cfg.recipe = Recipe::kFp;
  cfg.hadamard_block = 1;
  LayerRun run;
  forward(cfg, p, run);
  backward(cfg, p, run);
  EXPECT_EQ(run.db[0], 0.0f) << "row order would give 127, the exact sum 254";
  EXPECT_EQ(run.db[1], 300.0f);
}

TEST(LinearNonFinite, NaNInputSurfacesInOutput) {
  Problem p = make_problem(8, 32, 4, 1);
  p.x[5] = std::nanf("");
  LinearConfig cfg;
  cfg.recipe = Recipe::kHqLss;
  cfg.hadamard_block = 32;
  LayerRun run;
  run.step_x = 0.5f;
  run.step_w = 0.05f;
  forward(cfg, p, run);
  for (float v : run.y) EXPECT_TRUE(std::isnan(v));
  // A non-finite output gradient makes the gradients non-finite (so AMP's scaler skips the step).
  Problem q = make_problem(8, 32, 4, 1);
  LayerRun r2;
  r2.step_x = 0.5f;
  r2.step_w = 0.05f;
  forward(cfg, q, r2);
  q.gy[3] = INFINITY;
  backward(cfg, q, r2);
  bool any_nonfinite = false;
  for (float v : r2.dw) any_nonfinite |= !std::isfinite(v);
  EXPECT_TRUE(any_nonfinite);
}

// saved_scale belongs to the int8 recipe: the others write 0 into it (a caller need not zero it);
// saved_step is linear_forward_cuda's (the device step): the CPU rejects it, naming it.
TEST(LinearSavedOutputs, ScaleZeroOutsideInt8AndSavedStepIsCudaOnly) {
  Problem p = make_problem(8, 32, 4, 1);
  LinearConfig cfg;
  cfg.recipe = Recipe::kHqBs;
  cfg.hadamard_block = 32;
  LayerRun run;
  run.step_x = 0.5f;
  run.step_w = 0.05f;
  run.saved_scale = 7.0f;
  forward(cfg, p, run);
  EXPECT_EQ(run.saved_scale, 0.0f);
  int64_t step = 0;
  LinearForwardArgs a = forward_args(cfg, p, run);
  a.saved_step = make_scalar(&step, DType::kInt64);
  expect_error([&] { linear_forward(cfg, a); }, "saved_step");
}

TEST(LinearErrors, BadArgumentsNameTheArgument) {
  Problem p = make_problem(4, 48, 3, 1);
  LayerRun run;
  run.step_x = 0.5f;
  run.step_w = 0.05f;
  LinearConfig cfg;
  cfg.recipe = Recipe::kHq;
  cfg.hadamard_block = 32;  // does not divide 48
  try {
    forward(cfg, p, run);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("hadamard_block"), std::string::npos) << e.what();
  }
  cfg.hadamard_block = 16;
  std::vector<float> wrong(static_cast<size_t>(3 * 40));
  LinearForwardArgs a;
  a.x = make_matrix(p.x.data(), DType::kFloat32, 4, 48);
  a.w = make_matrix(wrong.data(), DType::kFloat32, 3, 40);
  try {
    linear_forward(cfg, a);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kValue);
    EXPECT_NE(std::string(e.what()).find("w:"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_recipe("int3"), Error);
  EXPECT_EQ(parse_recipe("hq_lss"), Recipe::kHqLss);
  LinearConfig fp;
  fp.recipe = Recipe::kFp;
  fp.hadamard_block = 4;
  EXPECT_THROW(forward(fp, p, run), Error);
}

}  // namespace
}  // namespace int4train
