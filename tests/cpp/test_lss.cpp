// Tests of leverage score sampling (lss.h): row norms of every input dtype, the water-filling
// probabilities (budget, saturation, proportionality), power-of-two rounding, selection
// frequencies, unbiasedness of the sampled sum (error shrinking like 1/sqrt(draws)), determinism
// and errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "int4train/int4.h"
#include "int4train/lss.h"
#include "int4train/numeric.h"
#include "int4train/philox.h"

#include "expect_error.h"

namespace int4train {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

RandomKey key(uint64_t seed) { return RandomKey{seed, make_stream(1, 2, RandomPurpose::kTest)}; }

TensorView fvec(std::vector<float>& v) {
  return make_vector(v.data(), DType::kFloat32, static_cast<int64_t>(v.size()));
}
TensorView i8vec(std::vector<int8_t>& v) {
  return make_vector(v.data(), DType::kInt8, static_cast<int64_t>(v.size()));
}
TensorView i32vec(std::vector<int32_t>& v) {
  return make_vector(v.data(), DType::kInt32, static_cast<int64_t>(v.size()));
}

// ------------------------------------------------------------------- row norms

TEST(RowNorms, EveryDtype) {
  const int64_t rows = 13, cols = 37, stride = 41;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> code(-8, 7);
  std::vector<float> f(rows * stride, 0.0f);
  std::vector<BFloat16> b(rows * cols);
  std::vector<int8_t> q(rows * cols);
  std::vector<uint8_t> packed(rows * packed_row_bytes(cols), 0);
  std::vector<double> ef(rows, 0), eb(rows, 0), eq(rows, 0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const float v = normal(rng);
      f[i * stride + j] = v;
      b[i * cols + j] = float_to_bf16(v);
      q[i * cols + j] = static_cast<int8_t>(code(rng));
      ef[i] += static_cast<double>(v) * v;
      const double bv = bf16_to_float(b[i * cols + j]);
      eb[i] += bv * bv;
      eq[i] += q[i * cols + j] * q[i * cols + j];
    }
    for (int64_t j = 0; j < cols; j += 2) {
      packed[i * packed_row_bytes(cols) + j / 2] =
          pack_int4_pair(q[i * cols + j], j + 1 < cols ? q[i * cols + j + 1] : 0);
    }
  }
  std::vector<float> norms(rows);
  TensorView fv = make_matrix(f.data(), DType::kFloat32, rows, cols);
  fv.strides[0] = stride;
  row_norms(fv, fvec(norms));
  for (int64_t i = 0; i < rows; ++i) EXPECT_EQ(norms[i], static_cast<float>(std::sqrt(ef[i])));
  row_norms(make_matrix(b.data(), DType::kBFloat16, rows, cols), fvec(norms));
  for (int64_t i = 0; i < rows; ++i) EXPECT_EQ(norms[i], static_cast<float>(std::sqrt(eb[i])));
  row_norms(make_matrix(q.data(), DType::kInt8, rows, cols), fvec(norms));
  for (int64_t i = 0; i < rows; ++i) EXPECT_EQ(norms[i], static_cast<float>(std::sqrt(eq[i])));
  row_norms(make_matrix(packed.data(), DType::kInt4Packed, rows, cols), fvec(norms));
  for (int64_t i = 0; i < rows; ++i) EXPECT_EQ(norms[i], static_cast<float>(std::sqrt(eq[i])));
}

// ------------------------------------------------------------------- water-filling

struct ProbCase {
  int64_t n;
  double budget_fraction;  // budget = fraction * n
  double zero_fraction;    // share of zero scores
};

class LssProbabilities : public ::testing::TestWithParam<ProbCase> {};

// Heavy-tailed scores (a few rows carry most of the norm, as gradient rows do).
std::vector<float> heavy_scores(int64_t n, double zero_fraction, uint32_t seed) {
  std::mt19937 rng(seed);
  std::lognormal_distribution<float> ln(0.0f, 1.5f);
  std::bernoulli_distribution zero(zero_fraction);
  std::vector<float> c(static_cast<size_t>(n));
  for (auto& v : c) v = zero(rng) ? 0.0f : ln(rng);
  return c;
}

TEST_P(LssProbabilities, BudgetSaturationProportionality) {
  const ProbCase pc = GetParam();
  std::vector<float> c = heavy_scores(pc.n, pc.zero_fraction, 3);
  int64_t positive = 0;
  for (float v : c) positive += v > 0;
  const double budget = pc.budget_fraction * pc.n;
  std::vector<float> p(c.size(), -1.0f);
  lss_probabilities(fvec(c), budget, fvec(p));
  double sum = 0, ratio = -1;
  float min_saturated = std::numeric_limits<float>::infinity(), max_unsaturated = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    ASSERT_GE(p[i], 0.0f);
    ASSERT_LE(p[i], 1.0f);
    sum += p[i];
    if (c[i] == 0.0f) {
      EXPECT_EQ(p[i], 0.0f);
    } else if (p[i] == 1.0f) {
      min_saturated = std::min(min_saturated, c[i]);
    } else {
      max_unsaturated = std::max(max_unsaturated, c[i]);
      const double r = p[i] / static_cast<double>(c[i]);  // the common kappa
      if (ratio < 0) ratio = r;
      EXPECT_NEAR(r, ratio, 1e-6 * ratio);
    }
  }
  if (budget >= positive) {
    EXPECT_EQ(sum, static_cast<double>(positive));
  } else {
    EXPECT_NEAR(sum, budget, 1e-6 * budget);
    EXPECT_GE(min_saturated, max_unsaturated);  // larger scores saturate first
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, LssProbabilities,
    ::testing::Values(ProbCase{1, 0.5, 0.0}, ProbCase{7, 0.5, 0.0}, ProbCase{1000, 0.5, 0.0},
                      ProbCase{1000, 0.1, 0.2}, ProbCase{4097, 0.5, 0.3}, ProbCase{1000, 0.9, 0.5},
                      ProbCase{1000, 2.0, 0.1}),
    [](const ::testing::TestParamInfo<ProbCase>& info) {
      return "n" + std::to_string(info.param.n) + "_budget" +
             std::to_string(static_cast<int>(info.param.budget_fraction * 100)) + "pct_zeros" +
             std::to_string(static_cast<int>(info.param.zero_fraction * 100)) + "pct";
    });

TEST(LssProbabilitiesEdge, LargeBudgetAllOnesAndZeroScores) {
  std::vector<float> c = {0.0f, 3.0f, 1e-30f, 0.0f, 7.0f};
  std::vector<float> p(5);
  lss_probabilities(fvec(c), 3.0, fvec(p));
  EXPECT_EQ(p, (std::vector<float>{0, 1, 1, 0, 1}));
  std::vector<float> z(4, 0.0f), pz(4, -1.0f);
  lss_probabilities(fvec(z), 2.0, fvec(pz));
  EXPECT_EQ(pz, (std::vector<float>(4, 0.0f)));
  // A dominant score saturates, the rest share the remaining budget in proportion.
  std::vector<float> d = {100.0f, 1.0f, 1.0f, 2.0f};
  p.assign(4, -1.0f);
  lss_probabilities(fvec(d), 2.0, fvec(p));
  EXPECT_EQ(p[0], 1.0f);
  EXPECT_FLOAT_EQ(p[1], 0.25f);
  EXPECT_FLOAT_EQ(p[3], 0.5f);
}

// The fp64 sums follow lss.h's lane order (the GPU's), not index order: with terms of 1e16 and 1
// they differ (1e16 + 1 rounds), so p equals the documented order's kappa bit for bit. One pass
// suffices here (nothing saturates), so kappa = budget / sum.
TEST(LssProbabilitiesEdge, SumsInTheDocumentedLaneOrder) {
  const int64_t n = 3 * kLssSumLanes + 77;
  std::vector<float> c(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) c[static_cast<size_t>(i)] = (i % 5 == 0) ? 1e16f : 1.0f;
  double lanes[kLssSumLanes] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i % kLssSumLanes] += c[static_cast<size_t>(i)];
  // The tree written out: pairs within groups of 32 lanes, then over the 32 group sums.
  double groups[32];
  for (int g = 0; g < 32; ++g) {
    double* v = lanes + 32 * g;
    for (int s = 16; s >= 1; s /= 2) {
      for (int t = 0; t < s; ++t) v[t] += v[t + s];
    }
    groups[g] = v[0];
  }
  for (int s = 16; s >= 1; s /= 2) {
    for (int t = 0; t < s; ++t) groups[t] += groups[t + s];
  }
  double serial = 0.0;
  for (float v : c) serial += v;
  ASSERT_NE(serial, groups[0]);  // the orders differ on this input
  const double budget = 50.0;
  std::vector<float> p(static_cast<size_t>(n));
  lss_probabilities(fvec(c), budget, fvec(p));
  const double kappa = budget / groups[0];
  ASSERT_LT(kappa * 1e16, 1.0);  // nothing saturates
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(p[static_cast<size_t>(i)], static_cast<float>(kappa * c[static_cast<size_t>(i)]))
        << i;
  }
}

// ------------------------------------------------------------------- power-of-two rounding

TEST(LssRoundPow2, NearestInLogDomain) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<double> logp(-24.0, 0.0);
  std::vector<float> p(5000);
  for (auto& v : p) v = static_cast<float>(std::exp2(logp(rng)));
  p[0] = 1.0f;
  p[1] = 0.0f;
  p[2] = 0.5f;
  p[3] = std::nextafter(std::sqrt(0.5f), 0.0f);  // just below the 0 / 1 boundary 2^-1/2
  p[4] = std::nextafter(std::sqrt(0.5f), 1.0f);
  std::vector<int8_t> k(p.size());
  lss_round_pow2(fvec(p), kLssMaxExponent, i8vec(k));
  EXPECT_EQ(k[0], 0);
  EXPECT_EQ(k[1], -1);
  EXPECT_EQ(k[2], 1);
  EXPECT_EQ(k[3], 1);
  EXPECT_EQ(k[4], 0);
  for (size_t i = 5; i < p.size(); ++i) {
    const double exact = -std::log2(static_cast<double>(p[i]));
    if (exact > kLssMaxExponent + 0.5) {
      EXPECT_EQ(k[i], kLssMaxExponent);  // clamped: p' = 2^-max >= p, still unbiased
      continue;
    }
    EXPECT_EQ(k[i], static_cast<int>(std::lround(exact))) << p[i];
    const double ratio = std::ldexp(1.0, -k[i]) / p[i];
    EXPECT_GE(ratio, 1.0 / std::sqrt(2.0));
    EXPECT_LE(ratio, std::sqrt(2.0));
  }
  std::vector<int8_t> k5(p.size());
  lss_round_pow2(fvec(p), 5, i8vec(k5));
  for (size_t i = 0; i < p.size(); ++i) EXPECT_LE(k5[i], 5);
}

// ------------------------------------------------------------------- selection

TEST(LssSelect, FrequencyMatchesPowerOfTwo) {
  const int per = 512, levels = 10;  // exponents -1, 0, ..., 8
  std::vector<int8_t> k(per * levels);
  for (int i = 0; i < per * levels; ++i) k[i] = static_cast<int8_t>(i % levels - 1);
  std::vector<int32_t> idx(k.size());
  std::vector<int64_t> kept(levels, 0);
  const int draws = 200;
  for (int d = 0; d < draws; ++d) {
    const int64_t m = lss_select(i8vec(k), key(d), i32vec(idx));
    for (int64_t j = 0; j < m; ++j) {
      if (j > 0) {
        ASSERT_LT(idx[j - 1], idx[j]);  // ascending
      }
      ++kept[idx[j] % levels];
    }
  }
  EXPECT_EQ(kept[0], 0);                                  // p = 0: never
  EXPECT_EQ(kept[1], static_cast<int64_t>(per) * draws);  // k = 0: always
  for (int l = 2; l < levels; ++l) {
    const double p = std::ldexp(1.0, -(l - 1)), trials = static_cast<double>(per) * draws;
    EXPECT_NEAR(kept[l] / trials, p, 5.0 * std::sqrt(p * (1 - p) / trials)) << "k = " << l - 1;
  }
}

TEST(LssSelect, DeterministicPerSeed) {
  std::vector<int8_t> k(3001);
  for (size_t i = 0; i < k.size(); ++i) k[i] = static_cast<int8_t>(i % 5);
  std::vector<int32_t> a(k.size()), b(k.size()), c(k.size());
  const int64_t na = lss_select(i8vec(k), key(42), i32vec(a));
  const int64_t nb = lss_select(i8vec(k), key(42), i32vec(b));
  const int64_t nc = lss_select(i8vec(k), key(43), i32vec(c));
  ASSERT_EQ(na, nb);
  EXPECT_TRUE(std::equal(a.begin(), a.begin() + na, b.begin()));
  EXPECT_FALSE(na == nc && std::equal(a.begin(), a.begin() + na, c.begin()));
  // The documented rule, element by element.
  int64_t m = 0;
  for (size_t i = 0; i < k.size(); ++i) {
    if (bernoulli_pow2(random_u32(42, key(42).stream, i), k[i])) {
      ASSERT_LT(m, na);
      EXPECT_EQ(a[m++], static_cast<int32_t>(i));
    }
  }
  EXPECT_EQ(m, na);
}

// The LSS estimate of sum_i R_i (n rows of m columns): sum over kept rows of 2^k_i R_i, with p from
// the row norms and a budget. Its mean over D draws converges to the exact sum like 1/sqrt(D): the
// RMS error over independent replicates, in units of the predicted per-draw standard deviation, is
// 1/sqrt(D) at D and half that at 4D draws (a bias would add a floor).
TEST(LssSelect, SampledSumIsUnbiased) {
  const int64_t n = 256, m = 4;
  std::mt19937 rng(5);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> r(n * m), exact(m, 0.0);
  std::vector<float> scores(n);
  for (int64_t i = 0; i < n; ++i) {
    const double row_scale = (i % 9 == 0) ? 10.0 : std::exp(normal(rng));
    double sq = 0;
    for (int64_t j = 0; j < m; ++j) {
      r[i * m + j] = row_scale * normal(rng);
      exact[j] += r[i * m + j];
      sq += r[i * m + j] * r[i * m + j];
    }
    scores[i] = static_cast<float>(std::sqrt(sq));
  }
  std::vector<float> p(n);
  std::vector<int8_t> k(n);
  lss_probabilities(fvec(scores), 64.0, fvec(p));
  lss_round_pow2(fvec(p), kLssMaxExponent, i8vec(k));
  // Per-draw variance of column j: sum_i R_ij^2 (2^k_i - 1).
  std::vector<double> sd(m, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      sd[j] += r[i * m + j] * r[i * m + j] * (std::ldexp(1.0, k[i]) - 1);
    }
  }
  for (auto& v : sd) v = std::sqrt(v);
  std::vector<int32_t> idx(n);
  const int replicates = 1000;
  auto normalised_error = [&](int draws, uint64_t first) {
    double sq = 0;
    for (int rep = 0; rep < replicates; ++rep) {
      std::vector<double> acc(m, 0.0);
      for (int d = 0; d < draws; ++d) {
        const int64_t kept =
            lss_select(i8vec(k), key(first + static_cast<uint64_t>(rep) * draws + d), i32vec(idx));
        for (int64_t q = 0; q < kept; ++q) {
          const int64_t i = idx[q];
          const double w = std::ldexp(1.0, k[i]);
          for (int64_t j = 0; j < m; ++j) acc[j] += w * r[i * m + j];
        }
      }
      for (int64_t j = 0; j < m; ++j) {
        const double e = (acc[j] / draws - exact[j]) / sd[j];
        sq += e * e;
      }
    }
    return std::sqrt(sq / (replicates * m));
  };
  const int d = 16;
  const double e1 = normalised_error(d, 1), e4 = normalised_error(4 * d, 1000000);
  EXPECT_NEAR(e1 / e4, 2.0, 0.25) << e1 << " " << e4;
  EXPECT_NEAR(e4 * std::sqrt(4.0 * d), 1.0, 0.12);
}

// ------------------------------------------------------------------- errors

TEST(LssErrors, BadArguments) {
  std::vector<float> c = {1.0f, 2.0f, 3.0f}, p(3), short_p(2);
  for (float bad : {-1.0f, kNaN, std::numeric_limits<float>::infinity()}) {
    std::vector<float> cb = c;
    cb[1] = bad;
    expect_error([&] { lss_probabilities(fvec(cb), 1.0, fvec(p)); }, "scores");
  }
  for (double budget : {0.0, -1.0, static_cast<double>(kNaN)}) {
    expect_error([&] { lss_probabilities(fvec(c), budget, fvec(p)); }, "budget");
  }
  std::vector<float> none, none_p;
  lss_probabilities(fvec(none), 0.0, fvec(none_p));  // an empty batch: nothing to distribute
  expect_error([&] { lss_probabilities(fvec(none), -1.0, fvec(none_p)); }, "budget");
  std::vector<double> c64(3, 1.0);
  expect_error(
      [&] { lss_probabilities(make_vector(c64.data(), DType::kFloat64, 3), 1.0, fvec(p)); },
      "scores", ErrorKind::kType);
  expect_error([&] { lss_probabilities(fvec(c), 1.0, fvec(short_p)); }, "probs");
  std::vector<int8_t> k(3);
  std::vector<float> bad_p = {0.5f, 1.5f, 0.1f};
  expect_error([&] { lss_round_pow2(fvec(bad_p), kLssMaxExponent, i8vec(k)); }, "probs");
  expect_error([&] { lss_round_pow2(fvec(c), 40, i8vec(k)); }, "max_exponent");
  std::vector<int32_t> k32(3);
  expect_error([&] { lss_round_pow2(fvec(p), 20, i32vec(k32)); }, "exponents", ErrorKind::kType);
  std::vector<int32_t> idx(2);
  expect_error([&] { lss_select(i8vec(k), key(1), i32vec(idx)); }, "indices");
  std::vector<int8_t> kb = {0, 33, 1};
  std::vector<int32_t> idx3(3);
  expect_error([&] { lss_select(i8vec(kb), key(1), i32vec(idx3)); }, "exponents");
  std::vector<float> norms(2);
  std::vector<float> m(6);
  expect_error([&] { row_norms(make_matrix(m.data(), DType::kFloat32, 3, 2), fvec(norms)); },
               "norms");
  std::vector<int32_t> mi(6);
  expect_error([&] { row_norms(make_matrix(mi.data(), DType::kInt32, 3, 2), fvec(norms)); }, "in",
               ErrorKind::kType);
}

}  // namespace
}  // namespace int4train
