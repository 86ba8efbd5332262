// Tests of leverage score sampling (lss.h): row norms of every input dtype, the water-filling
// probabilities (budget, saturation, proportionality), power-of-two rounding, selection
// frequencies, unbiasedness of the sampled sum (error shrinking like 1/sqrt(draws)), determinism
// and errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "expect_error.h"
#include "int4train/int4.h"
#include "int4train/lss.h"
#include "int4train/numeric.h"
#include "int4train/philox.h"

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

int64_t units_of(const std::vector<int8_t>& k, int kmax) {
  int64_t s = 0;
  for (int8_t e : k) s += e < 0 ? 0 : int64_t{1} << (kmax - e);
  return s;
}

// With room for every row at p' = 1 (max_rows = n) the search keeps tau = kLssTau0: rounding to the
// nearest power of two in the log domain.
TEST(LssRoundPow2, NearestInLogDomainWithRoom) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<double> logp(-24.0, 0.0);
  std::vector<float> p(5000);
  for (auto& v : p) v = static_cast<float>(std::exp2(logp(rng)));
  p[0] = 1.0f;
  p[1] = 0.0f;
  p[2] = 0.5f;
  p[3] = std::nextafter(std::sqrt(0.5f), 0.0f);  // just below the 0 / 1 boundary 2^-1/2
  p[4] = std::nextafter(std::sqrt(0.5f), 1.0f);
  const int64_t n = static_cast<int64_t>(p.size());
  std::vector<int8_t> k(p.size());
  lss_round_pow2(fvec(p), kLssMaxExponent, n, i8vec(k));
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
    EXPECT_EQ(k[i], lss_exponent(p[i], kLssTau0, kLssMaxExponent));
  }
  std::vector<int8_t> k5(p.size());
  lss_round_pow2(fvec(p), 5, n, i8vec(k5));
  for (size_t i = 0; i < p.size(); ++i) EXPECT_LE(k5[i], 5);
}

// Water-filled probabilities of a budget B rounded within the capacity ceil(B): the rounded sum
// fits (sum p' <= capacity), nearly fills it, and the exponents come from two close thresholds (k
// never increases with p beyond their band); a capacity with room gives the nearest rounding above.
TEST(LssRoundPow2, FitsTheCapacity) {
  std::mt19937 rng(6);
  std::lognormal_distribution<double> heavy(0.0, 1.5);
  for (const double budget : {400.0, 1000.0, 2500.5, 4000.0}) {
    std::vector<float> c(5000), p(c.size());
    for (auto& v : c) v = static_cast<float>(heavy(rng));
    for (size_t i = 0; i < c.size(); i += 7) c[i] = 0.0f;
    lss_probabilities(fvec(c), budget, fvec(p));
    const int64_t cap = lss_capacity(budget, static_cast<int64_t>(c.size()));
    ASSERT_EQ(cap, static_cast<int64_t>(std::ceil(budget)));
    std::vector<int8_t> k(c.size());
    lss_round_pow2(fvec(p), kLssMaxExponent, cap, i8vec(k));
    const int64_t units = units_of(k, kLssMaxExponent), room = cap << kLssMaxExponent;
    RecordProperty("fill_" + std::to_string(budget), std::to_string(double(units) / room));
    EXPECT_LE(units, room) << budget;
    EXPECT_GT(units, 0.97 * room) << budget;
    // lo and hi end at most lo / 2^kLssTauSteps apart, so exponents never increase with p across
    // probabilities more than a factor 1 + 2^-kLssTauSteps apart.
    std::vector<size_t> order(c.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return p[x] < p[y]; });
    const double band = 1.0 + std::ldexp(1.0, -kLssTauSteps);
    size_t lag = 0;
    for (size_t j = 0; j < order.size(); ++j) {
      const float pb = p[order[j]];
      if (pb == 0.0f) {
        EXPECT_EQ(k[order[j]], -1);
        continue;
      }
      while (lag < j && p[order[lag]] * band < pb) ++lag;
      if (lag == 0 || p[order[lag - 1]] == 0.0f) continue;
      // The largest p_a below pb / band (each such row a has k_a >= k(p_a, hi) >= k(pb, lo) >=
      // k_b).
      EXPECT_GE(k[order[lag - 1]], k[order[j]]) << p[order[lag - 1]] << " " << pb;
    }
  }
}

TEST(LssRoundPow2, TiesFillTheCapacityInIndexOrder) {
  std::vector<float> p(1000, 1e-6f);
  for (int i = 0; i < 600; ++i) p[static_cast<size_t>(i * 5 / 3)] = 1.0f;
  std::vector<int8_t> k(p.size());
  lss_round_pow2(fvec(p), kLssMaxExponent, 500, i8vec(k));
  const int64_t units = units_of(k, kLssMaxExponent);
  EXPECT_LE(units, 500 * 16);
  EXPECT_GT(units, 500 * 16 - 16);
  int last_full = -1, first_half = -1;
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] != 1.0f) {
      EXPECT_EQ(k[i], kLssMaxExponent);
      continue;
    }
    ASSERT_TRUE(k[i] == 0 || k[i] == 1) << i;
    if (k[i] == 0) last_full = static_cast<int>(i);
    if (k[i] == 1 && first_half < 0) first_half = static_cast<int>(i);
  }
  ASSERT_GE(first_half, 0);
  EXPECT_LT(last_full, first_half);  // index order
}

// ------------------------------------------------------------------- selection

// lss.h's dyadic layout, written out: the start a_i of each row (exponent 0 first, index order
// within an exponent), -1 for k = -1.
std::vector<int64_t> dyadic_starts(const std::vector<int8_t>& k, int kmax) {
  std::vector<int64_t> start(k.size(), -1);
  int64_t at = 0;
  for (int e = 0; e <= kmax; ++e) {
    for (size_t i = 0; i < k.size(); ++i) {
      if (k[i] != e) continue;
      start[i] = at;
      at += int64_t{1} << (kmax - e);
    }
  }
  return start;
}

TEST(LssSelect, FrequencyMatchesPowerOfTwoAndSlotsAreFull) {
  const int per = 512, levels = 10, kmax = 8;  // exponents -1, 0, ..., 8
  std::vector<int8_t> k(per * levels);
  for (int i = 0; i < per * levels; ++i) k[i] = static_cast<int8_t>(i % levels - 1);
  const int64_t units = units_of(k, kmax), strata = (units + (1 << kmax) - 1) >> kmax;
  std::vector<int32_t> slots(strata + 3);
  std::vector<int64_t> kept(levels, 0);
  const int draws = 200;
  for (int d = 0; d < draws; ++d) {
    const int64_t m = lss_select(i8vec(k), kmax, key(d), i32vec(slots));
    int64_t filled = 0;
    for (int64_t j = 0; j < static_cast<int64_t>(slots.size()); ++j) {
      if (j >= strata) {
        ASSERT_EQ(slots[j], -1);  // past the strata: written, empty
        continue;
      }
      if (slots[j] < 0) {
        ASSERT_EQ(j, strata - 1);  // only the last (partial) stratum may come out empty
        continue;
      }
      ++filled;
      ++kept[slots[j] % levels];
    }
    ASSERT_EQ(filled, m);
  }
  EXPECT_EQ(kept[0], 0);                                  // p = 0: never
  EXPECT_EQ(kept[1], static_cast<int64_t>(per) * draws);  // k = 0: always
  for (int l = 2; l < levels; ++l) {
    const double p = std::ldexp(1.0, -(l - 1)), trials = static_cast<double>(per) * draws;
    EXPECT_NEAR(kept[l] / trials, p, 5.0 * std::sqrt(p * (1 - p) / trials)) << "k = " << l - 1;
  }
}

TEST(LssSelect, DeterministicPerSeedAndTheDocumentedRule) {
  for (const int kmax : {0, 3, kLssMaxExponent}) {
    std::vector<int8_t> k(3001);
    for (size_t i = 0; i < k.size(); ++i) {
      k[i] = static_cast<int8_t>((i * 7 + i / 5) % (kmax + 2)) - 1;
    }
    const int64_t strata = (units_of(k, kmax) + (1 << kmax) - 1) >> kmax;
    std::vector<int32_t> a(strata), b(strata), c(strata);
    const int64_t na = lss_select(i8vec(k), kmax, key(42), i32vec(a));
    const int64_t nb = lss_select(i8vec(k), kmax, key(42), i32vec(b));
    lss_select(i8vec(k), kmax, key(43), i32vec(c));
    ASSERT_EQ(na, nb);
    EXPECT_EQ(a, b);
    if (kmax > 0) EXPECT_NE(a, c);
    // The rule, row by row.
    const std::vector<int64_t> start = dyadic_starts(k, kmax);
    std::vector<int32_t> expect(strata, -1);
    for (size_t i = 0; i < k.size(); ++i) {
      if (k[i] < 0) continue;
      const int64_t m = start[i] >> kmax, o = start[i] & ((1 << kmax) - 1);
      const int64_t v = kmax == 0 ? 0 : random_u32(42, key(42).stream, m) >> (32 - kmax);
      if (v >= o && v < o + (int64_t{1} << (kmax - k[i]))) {
        ASSERT_EQ(expect[m], -1);
        expect[m] = static_cast<int32_t>(i);
      }
    }
    EXPECT_EQ(a, expect) << kmax;
  }
}

// The LSS estimate of sum_i R_i (n rows of m columns): sum over kept rows of 2^k_i R_i, with p from
// the row norms and a budget. Its mean over D draws converges to the exact sum like 1/sqrt(D): the
// RMS error over independent replicates, in units of the predicted per-draw standard deviation, is
// 1/sqrt(D) at D and half that at 4D draws (a bias would add a floor). The per-draw variance of the
// stratified draw: per stratum, sum_i 2^k_i R_i^2 - (sum_i R_i)^2 over its rows.
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
  lss_round_pow2(fvec(p), kLssMaxExponent, 64, i8vec(k));
  const std::vector<int64_t> start = dyadic_starts(k, kLssMaxExponent);
  const int64_t strata = (units_of(k, kLssMaxExponent) + 15) >> 4;
  std::vector<double> sd(m, 0.0);
  for (int64_t j = 0; j < m; ++j) {
    std::vector<double> sum(strata, 0.0), wsq(strata, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      if (k[i] < 0) continue;
      const int64_t s = start[i] >> kLssMaxExponent;
      sum[s] += r[i * m + j];
      wsq[s] += std::ldexp(1.0, k[i]) * r[i * m + j] * r[i * m + j];
    }
    for (int64_t s = 0; s < strata; ++s) sd[j] += wsq[s] - sum[s] * sum[s];
    sd[j] = std::sqrt(sd[j]);
    ASSERT_GT(sd[j], 0.0);
  }
  std::vector<int32_t> slots(64);
  const int replicates = 1000;
  auto normalised_error = [&](int draws, uint64_t first) {
    double sq = 0;
    for (int rep = 0; rep < replicates; ++rep) {
      std::vector<double> acc(m, 0.0);
      for (int d = 0; d < draws; ++d) {
        lss_select(i8vec(k), kLssMaxExponent, key(first + static_cast<uint64_t>(rep) * draws + d),
                   i32vec(slots));
        for (const int32_t i : slots) {
          if (i < 0) continue;
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
  expect_error([&] { lss_round_pow2(fvec(bad_p), kLssMaxExponent, 3, i8vec(k)); }, "probs");
  expect_error([&] { lss_round_pow2(fvec(c), 31, 3, i8vec(k)); }, "max_exponent");
  expect_error([&] { lss_round_pow2(fvec(p), 0, 2, i8vec(k)); }, "max_rows");  // 3 rows, room for 2
  expect_error([&] { lss_round_pow2(fvec(p), 1, 1, i8vec(k)); }, "max_rows");
  lss_round_pow2(fvec(p), 1, 2, i8vec(k));  // 3 rows fit 2 rows of 2 units at p' >= 1/2
  std::vector<int32_t> k32(3);
  expect_error([&] { lss_round_pow2(fvec(p), 20, 3, i32vec(k32)); }, "exponents", ErrorKind::kType);
  std::vector<int8_t> k0 = {0, 0, 0};
  std::vector<int32_t> idx(2);
  expect_error([&] { lss_select(i8vec(k0), 4, key(1), i32vec(idx)); }, "slot_rows");
  std::vector<int8_t> kb = {0, 5, 1};
  std::vector<int32_t> idx3(3);
  expect_error([&] { lss_select(i8vec(kb), 4, key(1), i32vec(idx3)); }, "exponents");
  expect_error([&] { lss_select(i8vec(k0), -1, key(1), i32vec(idx3)); }, "max_exponent");
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
