// int4train core: counter-based random numbers (Philox4x32-10, Salmon et al. 2011), header-only so
// that the CPU and the GPU compute the same bits for the same (seed, stream, index).
//
// Keying, written once here:
//   key      = {seed low 32 bits, seed high 32 bits}
//   counter  = {block low 32, block high 32, stream low 32, stream high 32}, block = index / 4
//   element `index` takes word (index % 4) of Philox4x32-10(counter, key)  (random_u32);
//   a 16-bit draw `index` takes half (index % 2), low half first, of word index / 2 (random_u16),
//   so one Philox block serves 8 elements.
// A stream names one use of randomness: make_stream(step, layer, purpose). The element index is the
// row-major flat index of the tensor element (or row) that consumes the number. Per-element
// stochastic rounding (the gradient quantizers, the compact LSQ aux bit) draws 16-bit uniforms;
// LSS's per-row draws take the top bits of 32-bit words.
#pragma once

#include <cstdint>

#include "int4train/macros.h"

namespace int4train {

// What a random number is used for; part of the stream so that uses never share bits.
enum class RandomPurpose : uint32_t {
  kGradRound = 1,     // stochastic rounding of the output gradient (bit split, plain 4/8-bit, LUQ)
  kSampleInput = 2,   // LSS selection (its strata's draws) for the input-gradient product
  kSampleWeight = 3,  // LSS selection (its strata's draws) for the weight-gradient product
  kLsqAux = 4,        // the 1-bit stochastic rounding residual saved by the compact LSQ state
  kTest = 15,         // reserved for tests
};

// stream = step << 32 | layer << 8 | purpose  (step: 32 bits, layer: 24 bits, purpose: 8 bits).
INT4TRAIN_HD uint64_t make_stream(uint32_t step, uint32_t layer, RandomPurpose purpose) {
  return (static_cast<uint64_t>(step) << 32) | (static_cast<uint64_t>(layer & 0xFFFFFFu) << 8) |
         static_cast<uint64_t>(static_cast<uint32_t>(purpose) & 0xFFu);
}

struct Philox4x32 {
  uint32_t v[4];
};

INT4TRAIN_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  // The same two words; written as __umulhi and a 32-bit product, nvcc (13.0, sm_90a) emits one
  // IMAD.WIDE.U32 per product, where the 64-bit form also added a zero register to the high word
  // (two wasted instructions a round, a third of Philox's instructions in the quantizers).
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10's constants, those of Random123 (and cuRAND): the rounds' multipliers and the
// key's per-round increments (Weyl's constants).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// A key schedule: round r (0 .. kPhiloxRounds - 1) uses the key words {k0 + r W0, k1 + r W1}
// (32-bit wrap-around), k0, k1 the seed's low and high words. PhiloxSeedKeys computes them as the
// rounds go (one addition a word and round); PhiloxKeys keeps them, computed once by philox_keys:
// the CUDA kernels take it as a kernel parameter, so that each round reads its key from constant
// memory instead of recomputing the additions for every block (nvcc 13.0, sm_90a: 5 instructions a
// round, not 6), and the CPU's vector paths take it for their batches.
struct PhiloxSeedKeys {
  uint32_t k0, k1;
  INT4TRAIN_HD uint32_t round0(int r) const { return k0 + static_cast<uint32_t>(r) * kPhiloxW0; }
  INT4TRAIN_HD uint32_t round1(int r) const { return k1 + static_cast<uint32_t>(r) * kPhiloxW1; }
};
struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds], k1[kPhiloxRounds];
  INT4TRAIN_HD uint32_t round0(int r) const { return k0[r]; }
  INT4TRAIN_HD uint32_t round1(int r) const { return k1[r]; }
};
INT4TRAIN_HD PhiloxKeys philox_keys(uint64_t seed) {
  const PhiloxSeedKeys s{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  PhiloxKeys keys{};
  for (int round = 0; round < kPhiloxRounds; ++round) {
    keys.k0[round] = s.round0(round);
    keys.k1[round] = s.round1(round);
  }
  return keys;
}

// The ten rounds of Philox4x32-10 on counter (c0, c1, c2, c3) under a key schedule (one of the two
// above).
template <typename Keys>
INT4TRAIN_HD Philox4x32 philox_rounds(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                      const Keys& keys) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ keys.round0(round);
    const uint32_t n2 = hi0 ^ c3 ^ keys.round1(round);
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// Philox4x32 with 10 rounds under the key (k0, k1).
INT4TRAIN_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                      uint32_t k0, uint32_t k1) {
  return philox_rounds(c0, c1, c2, c3, PhiloxSeedKeys{k0, k1});
}

// philox4x32_10 with the key schedule given: the same words for the keys of philox_keys(seed).
INT4TRAIN_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                      const PhiloxKeys& keys) {
  return philox_rounds(c0, c1, c2, c3, keys);
}

// The four words of block `block` of (seed, stream); elements 4*block .. 4*block+3 use them in order.
INT4TRAIN_HD Philox4x32 random_block(uint64_t seed, uint64_t stream, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// random_block with the seed's key schedule given (philox_keys(seed)): the same words.
INT4TRAIN_HD Philox4x32 random_block(const PhiloxKeys& keys, uint64_t stream, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32), keys);
}

INT4TRAIN_HD uint32_t random_u32(uint64_t seed, uint64_t stream, uint64_t index) {
  return random_block(seed, stream, index >> 2).v[index & 3];
}

// Draw i (0 .. 7) of a block's eight 16-bit draws: half (i % 2) of word i / 2, the low half (bits
// 0-15) for even i.
INT4TRAIN_HD uint32_t block_u16(const Philox4x32& r, int i) {
  return (i & 1) ? r.v[i >> 1] >> 16 : r.v[i >> 1] & 0xFFFFu;
}

// The 16-bit draw `index`: draw index % 8 of block index / 8 (half (index % 2) of word index / 2).
INT4TRAIN_HD uint32_t random_u16(uint64_t seed, uint64_t stream, uint64_t index) {
  return block_u16(random_block(seed, stream, index >> 3), static_cast<int>(index & 7u));
}

// random_u16 with the seed's key schedule given (philox_keys(seed)): the same draw.
INT4TRAIN_HD uint32_t random_u16(const PhiloxKeys& keys, uint64_t stream, uint64_t index) {
  return block_u16(random_block(keys, stream, index >> 3), static_cast<int>(index & 7u));
}

// Uniform in [0, 1) with 16 random bits: h * 2^-16 for h < 2^16, exact in fp32 on every machine.
// Stochastic rounding floor(v + u) with it rounds up with probability within 2^-16 of frac(v) (the
// bias of a step's 1/65536). All 16 bits survive the fp32 addition while |v + u| < 2^8 (the sum's
// ulp is 2^-16 or finer), where a 24-bit uniform's low bits were rounded away from |v| >= 1 on (the
// bit split's |v| reaches 119). Half the Philox work of one 32-bit word per element.
INT4TRAIN_HD float uniform_from_u16(uint32_t h) { return static_cast<float>(h) * 0x1.0p-16f; }

// The uniform of element `index` of (seed, stream): uniform_from_u16(random_u16(...)).
INT4TRAIN_HD float random_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return uniform_from_u16(random_u16(seed, stream, index));
}

// A Bernoulli draw with probability exactly 2^-k (k in [0, 32]): true iff the top k bits of the word
// are zero. k == 0 is always true.
INT4TRAIN_HD bool bernoulli_pow2(uint32_t u, int k) {
  return k <= 0 ? true : (k >= 32 ? u == 0u : (u >> (32 - k)) == 0u);
}

// Where a caller's randomness comes from: the run's seed and the stream of this use.
struct RandomKey {
  uint64_t seed = 0;
  uint64_t stream = 0;
  // CUDA kernels only (cuda.h), optional: an int64 device scalar whose low 32 bits replace the
  // stream's step bits (32..63; make_stream) when the kernel runs, so that the training step can
  // stay on the device (no host read, so a training step can be captured in a CUDA graph and
  // replayed).
  const int64_t* device_step = nullptr;
};

// The stream a kernel uses: `stream` with its step bits replaced by the low 32 bits of *device_step
// when given (RandomKey::device_step).
INT4TRAIN_HD uint64_t stream_with_step(uint64_t stream, const int64_t* device_step) {
  return device_step == nullptr
             ? stream
             : (stream & 0xFFFFFFFFull) |
                   (static_cast<uint64_t>(static_cast<uint32_t>(*device_step)) << 32);
}

}  // namespace int4train
