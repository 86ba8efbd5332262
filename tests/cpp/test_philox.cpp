// Tests of the counter-based generator (philox.h): Random123's published known-answer vectors for
// Philox4x32-10, the keying written in the header (32-bit words and 16-bit draws), and statistical
// checks of the derived uniforms and power-of-two Bernoulli draws (means within a few standard
// errors, errors shrinking like 1/sqrt(draws), no correlation between neighbouring indices, streams
// or seeds).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "int4train/philox.h"

namespace int4train {
namespace {

// ---------------------------------------------------------------- known answers
// From Random123's tests/kat_vectors (lines "philox4x32 10 <ctr x4> <key x2> <expected x4>"), as
// also reproduced by TensorFlow's and several other Philox test suites.
struct KnownAnswer {
  const char* name;
  uint32_t ctr[4];
  uint32_t key[2];
  uint32_t expected[4];
};

const KnownAnswer kKnownAnswers[] = {
    {"zeros", {0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {"ones",
     {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {"pi",
     {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

class PhiloxKnownAnswer : public ::testing::TestWithParam<KnownAnswer> {};

TEST_P(PhiloxKnownAnswer, MatchesRandom123) {
  const KnownAnswer& k = GetParam();
  const Philox4x32 r = philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(r.v[i], k.expected[i]) << "word " << i;
}

// The header's keying: key = seed (low, high), counter = (block low, block high, stream low,
// stream high), block = index / 4, word index % 4.
TEST_P(PhiloxKnownAnswer, KeyingOfRandomBlock) {
  const KnownAnswer& k = GetParam();
  const uint64_t seed = static_cast<uint64_t>(k.key[1]) << 32 | k.key[0];
  const uint64_t block = static_cast<uint64_t>(k.ctr[1]) << 32 | k.ctr[0];
  const uint64_t stream = static_cast<uint64_t>(k.ctr[3]) << 32 | k.ctr[2];
  const Philox4x32 r = random_block(seed, stream, block);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(r.v[i], k.expected[i]) << "word " << i;
    if (block < (uint64_t{1} << 62)) {
      EXPECT_EQ(random_u32(seed, stream, 4 * block + static_cast<uint64_t>(i)), k.expected[i]);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Random123, PhiloxKnownAnswer, ::testing::ValuesIn(kKnownAnswers),
                         [](const ::testing::TestParamInfo<KnownAnswer>& info) {
                           return std::string(info.param.name);
                         });

// 16-bit draws: block = index / 8, word (index / 2) % 4, its low half for even indices; Random123's
// all-zero vector is block 0 of stream 0 under seed 0.
TEST(Philox, KeyingOfRandomU16) {
  const KnownAnswer& k = kKnownAnswers[0];
  ASSERT_STREQ(k.name, "zeros");
  for (int i = 0; i < 4; ++i) {
    const uint64_t e = 2 * static_cast<uint64_t>(i);
    EXPECT_EQ(random_u16(0, 0, e), k.expected[i] & 0xFFFFu) << "word " << i;
    EXPECT_EQ(random_u16(0, 0, e + 1), k.expected[i] >> 16) << "word " << i;
    EXPECT_EQ(random_uniform(0, 0, e + 1), static_cast<float>(k.expected[i] >> 16) * 0x1.0p-16f);
  }
  // Index 8 opens block 1.
  EXPECT_EQ(random_u16(0, 0, 8), random_block(0, 0, 1).v[0] & 0xFFFFu);
  EXPECT_EQ(random_u16(0, 0, 15), random_block(0, 0, 1).v[3] >> 16);
}

// The key schedule given (philox_keys, as the CUDA kernels take it): round r's key is the seed's
// words plus r times Weyl's constants, wrapping at 32 bits, and every word and 16-bit draw equals
// the schedule computed per block.
TEST_P(PhiloxKnownAnswer, KeyScheduleGiven) {
  const KnownAnswer& k = GetParam();
  const uint64_t seed = static_cast<uint64_t>(k.key[1]) << 32 | k.key[0];
  const PhiloxKeys keys = philox_keys(seed);
  for (int r = 0; r < 10; ++r) {
    EXPECT_EQ(keys.k0[r], static_cast<uint32_t>(k.key[0] + 0x9E3779B9ull * r)) << "round " << r;
    EXPECT_EQ(keys.k1[r], static_cast<uint32_t>(k.key[1] + 0xBB67AE85ull * r)) << "round " << r;
  }
  const Philox4x32 r = philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], keys);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(r.v[i], k.expected[i]) << "word " << i;
}

TEST(Philox, KeyScheduleGivenMatchesPerBlock) {
  const uint64_t seeds[] = {0, 1, 0xFFFFFFFFull, 0x123456789ABCDEF0ull, ~uint64_t{0}};
  const uint64_t streams[] = {0, make_stream(7, 3, RandomPurpose::kLsqAux), ~uint64_t{0}};
  const uint64_t blocks[] = {0, 1, 4095, uint64_t{1} << 32, (uint64_t{1} << 61) - 1};
  for (uint64_t seed : seeds) {
    const PhiloxKeys keys = philox_keys(seed);
    for (uint64_t stream : streams) {
      for (uint64_t block : blocks) {
        const Philox4x32 want = random_block(seed, stream, block),
                         got = random_block(keys, stream, block);
        for (int i = 0; i < 4; ++i) {
          EXPECT_EQ(got.v[i], want.v[i])
              << "seed " << seed << " stream " << stream << " block " << block << " word " << i;
        }
        for (uint64_t j = 0; j < 8; ++j) {
          const uint64_t index = 8 * block + j;
          EXPECT_EQ(random_u16(keys, stream, index), random_u16(seed, stream, index))
              << "seed " << seed << " index " << index;
        }
      }
    }
  }
}

TEST(Philox, StreamLayout) {
  EXPECT_EQ(make_stream(0, 0, RandomPurpose::kGradRound), 1u);
  EXPECT_EQ(make_stream(3, 5, RandomPurpose::kSampleWeight), (uint64_t{3} << 32) | (5u << 8) | 3u);
  EXPECT_EQ(make_stream(0xFFFFFFFFu, 0xFFFFFFu, RandomPurpose::kTest), 0xFFFFFFFFFFFFFF0Full);
  // The layer keeps 24 bits: higher bits must not spill into the step.
  EXPECT_EQ(make_stream(1, 0x1000001u, RandomPurpose::kTest),
            (uint64_t{1} << 32) | (1u << 8) | 15u);
}

TEST(Philox, UniformFromU16) {
  EXPECT_EQ(uniform_from_u16(0u), 0.0f);
  EXPECT_EQ(uniform_from_u16(1u), 0x1.0p-16f);
  EXPECT_EQ(uniform_from_u16(0x8000u), 0.5f);
  EXPECT_EQ(uniform_from_u16(0xFFFFu), 1.0f - 0x1.0p-16f);
  EXPECT_LT(uniform_from_u16(0xFFFFu), 1.0f);
}

TEST(Philox, BernoulliPow2Edges) {
  for (const uint32_t u : {0u, 1u, 0x7FFFFFFFu, 0x80000000u, 0xFFFFFFFFu}) {
    EXPECT_TRUE(bernoulli_pow2(u, 0));
    EXPECT_TRUE(bernoulli_pow2(u, -1));
    EXPECT_EQ(bernoulli_pow2(u, 1), u < 0x80000000u);
    EXPECT_EQ(bernoulli_pow2(u, 3), u < 0x20000000u);
    EXPECT_EQ(bernoulli_pow2(u, 31), u < 2u);
    EXPECT_EQ(bernoulli_pow2(u, 32), u == 0u);
    EXPECT_EQ(bernoulli_pow2(u, 40), u == 0u);
  }
}

// ---------------------------------------------------------------- statistics
// Every check is |estimate - truth| <= 5 standard errors: a false alarm has probability ~6e-7 per
// check, and the seeds are fixed, so the suite is deterministic.
constexpr double kSigmas = 5.0;
constexpr uint64_t kSeed = 0x1234ABCD5678EF01ull;

TEST(PhiloxStats, UniformMeanAndVarianceConvergeLikeInverseSqrt) {
  const uint64_t stream = make_stream(7, 3, RandomPurpose::kTest);
  double sum = 0.0, sum_sq = 0.0;
  uint64_t n = 0;
  for (const uint64_t draws : {uint64_t{1} << 12, uint64_t{1} << 16, uint64_t{1} << 20}) {
    for (; n < draws; ++n) {
      const double u = random_uniform(kSeed, stream, n);
      ASSERT_GE(u, 0.0);
      ASSERT_LT(u, 1.0);
      sum += u;
      sum_sq += u * u;
    }
    const double mean = sum / static_cast<double>(n);
    const double var = sum_sq / static_cast<double>(n) - mean * mean;
    // Uniform on [0, 1): mean 1/2 (exactly 1/2 - 2^-17 for the 16-bit grid), variance 1/12,
    // sd of the sample mean sqrt(1/12 / n), of the sample variance sqrt((mu4 - 1/144) / n) with
    // the fourth central moment mu4 = 1/80, i.e. sqrt(1/180 / n).
    EXPECT_NEAR(mean, 0.5 - 0x1.0p-17, kSigmas * std::sqrt(1.0 / 12.0 / n)) << n << " draws";
    EXPECT_NEAR(var, 1.0 / 12.0, kSigmas * std::sqrt(1.0 / 180.0 / n) + 1e-6) << n << " draws";
  }
}

// 16 equal bins: the chi-square statistic with 15 degrees of freedom has mean 15 and sd sqrt(30).
TEST(PhiloxStats, UniformHistogram) {
  const uint64_t stream = make_stream(1, 1, RandomPurpose::kTest);
  const uint64_t n = uint64_t{1} << 20;
  std::vector<double> bins(16, 0.0);
  for (uint64_t i = 0; i < n; ++i)
    bins[static_cast<size_t>(random_uniform(kSeed, stream, i) * 16)]++;
  double chi2 = 0.0;
  const double expected = static_cast<double>(n) / 16.0;
  for (const double b : bins) chi2 += (b - expected) * (b - expected) / expected;
  EXPECT_LT(chi2, 15.0 + kSigmas * std::sqrt(30.0));
}

// Each of the 32 bits of a word is a fair coin.
TEST(PhiloxStats, EveryBitIsFair) {
  const uint64_t stream = make_stream(2, 9, RandomPurpose::kTest);
  const uint64_t n = uint64_t{1} << 18;
  std::vector<double> ones(32, 0.0);
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t u = random_u32(kSeed, stream, i);
    for (int b = 0; b < 32; ++b) ones[static_cast<size_t>(b)] += (u >> b) & 1u;
  }
  for (int b = 0; b < 32; ++b) {
    EXPECT_NEAR(ones[static_cast<size_t>(b)] / static_cast<double>(n), 0.5,
                kSigmas * std::sqrt(0.25 / static_cast<double>(n)))
        << "bit " << b;
  }
}

class PhiloxBernoulli : public ::testing::TestWithParam<int> {};

// P[bernoulli_pow2(u, k)] = 2^-k: the frequency is within 5 binomial standard errors at every
// sample size, and the error at 2^20 draws is a small multiple of sqrt(p(1-p)/n).
TEST_P(PhiloxBernoulli, FrequencyIsTwoToMinusK) {
  const int k = GetParam();
  const double p = std::ldexp(1.0, -k);
  const uint64_t stream = make_stream(11, static_cast<uint32_t>(k), RandomPurpose::kSampleWeight);
  double hits = 0.0;
  uint64_t n = 0;
  for (const uint64_t draws : {uint64_t{1} << 12, uint64_t{1} << 16, uint64_t{1} << 20}) {
    for (; n < draws; ++n) hits += bernoulli_pow2(random_u32(kSeed, stream, n), k) ? 1.0 : 0.0;
    const double se = std::sqrt(p * (1.0 - p) / static_cast<double>(n));
    EXPECT_NEAR(hits / static_cast<double>(n), p, kSigmas * se) << n << " draws";
  }
}

INSTANTIATE_TEST_SUITE_P(K, PhiloxBernoulli, ::testing::Range(1, 7),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "k" + std::to_string(info.param);
                         });

// Sample correlation of uniforms paired by a relation; for independent pairs its sd is 1/sqrt(n).
template <typename PairFn>
double correlation(uint64_t n, const PairFn& pair) {
  double sa = 0, sb = 0, sab = 0, saa = 0, sbb = 0;
  for (uint64_t i = 0; i < n; ++i) {
    double a, b;
    pair(i, &a, &b);
    sa += a;
    sb += b;
    sab += a * b;
    saa += a * a;
    sbb += b * b;
  }
  const double dn = static_cast<double>(n);
  const double cov = sab / dn - (sa / dn) * (sb / dn);
  const double va = saa / dn - (sa / dn) * (sa / dn);
  const double vb = sbb / dn - (sb / dn) * (sb / dn);
  return cov / std::sqrt(va * vb);
}

TEST(PhiloxStats, NoCorrelationBetweenNeighboursStreamsAndSeeds) {
  const uint64_t n = uint64_t{1} << 18;
  const double bound = kSigmas / std::sqrt(static_cast<double>(n));
  const uint64_t s0 = make_stream(5, 2, RandomPurpose::kGradRound);
  const uint64_t s1 = make_stream(5, 2, RandomPurpose::kSampleInput);  // differs in purpose only
  const uint64_t s2 = make_stream(6, 2, RandomPurpose::kGradRound);    // next step
  // Halves of one word (indices 2i, 2i + 1), words of one block (8i + 1, 8i + 2) and neighbouring
  // blocks (8i + 7, 8i + 8).
  EXPECT_NEAR(correlation(n,
                          [&](uint64_t i, double* a, double* b) {
                            *a = random_uniform(kSeed, s0, 2 * i);
                            *b = random_uniform(kSeed, s0, 2 * i + 1);
                          }),
              0.0, bound);
  EXPECT_NEAR(correlation(n,
                          [&](uint64_t i, double* a, double* b) {
                            *a = random_uniform(kSeed, s0, 8 * i + 1);
                            *b = random_uniform(kSeed, s0, 8 * i + 2);
                          }),
              0.0, bound);
  EXPECT_NEAR(correlation(n,
                          [&](uint64_t i, double* a, double* b) {
                            *a = random_uniform(kSeed, s0, 8 * i + 7);
                            *b = random_uniform(kSeed, s0, 8 * i + 8);
                          }),
              0.0, bound);
  for (const uint64_t other : {s1, s2}) {
    EXPECT_NEAR(correlation(n,
                            [&](uint64_t i, double* a, double* b) {
                              *a = random_uniform(kSeed, s0, i);
                              *b = random_uniform(kSeed, other, i);
                            }),
                0.0, bound);
  }
  EXPECT_NEAR(correlation(n,
                          [&](uint64_t i, double* a, double* b) {
                            *a = random_uniform(kSeed, s0, i);
                            *b = random_uniform(kSeed + 1, s0, i);
                          }),
              0.0, bound);
  // Equal words across streams would be a keying bug: 2^18 draws of 32 bits should (almost) never
  // collide position by position (expected 2^18 / 2^32 = 6e-5 collisions).
  int equal = 0;
  for (uint64_t i = 0; i < n; ++i) equal += random_u32(kSeed, s0, i) == random_u32(kSeed, s1, i);
  EXPECT_LE(equal, 1);
}

// The same (seed, stream, index) always gives the same bits; the block/word mapping is index/4, %4,
// and a 16-bit draw is half index % 2 of word index / 2.
TEST(Philox, DeterministicAndIndexedByBlockAndWord) {
  const uint64_t stream = make_stream(9, 4, RandomPurpose::kLsqAux);
  for (uint64_t i : {uint64_t{0}, uint64_t{5}, uint64_t{1} << 33, (uint64_t{1} << 40) + 7}) {
    EXPECT_EQ(random_u32(kSeed, stream, i), random_u32(kSeed, stream, i));
    EXPECT_EQ(random_u32(kSeed, stream, i), random_block(kSeed, stream, i / 4).v[i % 4]);
    const uint32_t w = random_block(kSeed, stream, i / 8).v[(i / 2) % 4];
    EXPECT_EQ(random_u16(kSeed, stream, i), i % 2 == 0 ? (w & 0xFFFFu) : (w >> 16));
  }
}

}  // namespace
}  // namespace int4train
