// GPU tests of philox_words_cuda (cuda.h) against philox.h's random_u32 on the host, word for word:
// lengths that end inside a Philox block, a step (stream_hi) read from the device, and no step.
#include <cstdint>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "int4train/cuda.h"
#include "int4train/philox.h"

namespace {

using namespace int4train;
using gputest::DevBuf;

void test_words(int64_t n, uint64_t seed, uint32_t stream_lo, bool with_step, int64_t step) {
  DevBuf words(static_cast<size_t>(n + 4) * sizeof(int64_t));
  words.poison();
  DevBuf step_buf = gputest::upload(std::vector<int64_t>{step});
  TensorView hi;
  if (with_step) hi = make_scalar(step_buf.get(), DType::kInt64);
  philox_words_cuda(seed, stream_lo, hi, make_vector(words.get(), DType::kInt64, n), nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  const std::vector<int64_t> got = gputest::download<int64_t>(words, static_cast<size_t>(n + 4));
  const uint64_t stream =
      (with_step ? static_cast<uint64_t>(static_cast<uint32_t>(step)) << 32 : 0) | stream_lo;
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (got[static_cast<size_t>(i)] != static_cast<int64_t>(random_u32(seed, stream, i))) ++bad;
  }
  GPU_CHECK_MSG(bad == 0, bad << " of " << n << " words differ from random_u32");
  // Nothing past n is written (the poison pattern stays).
  int64_t poison;
  std::memset(&poison, 0xA5, sizeof poison);
  for (int64_t i = n; i < n + 4; ++i) GPU_CHECK(got[static_cast<size_t>(i)] == poison);
}

const bool registered = [] {
  using gputest::add_case;
  for (int64_t n : {0, 1, 3, 4, 5, 1023, 1 << 20}) {
    add_case("philox_words/n" + std::to_string(n) + "/step", n > 4096,
             [=] { test_words(n, 0x123456789abcdefULL, 0x00020301u, true, 7); });
  }
  add_case("philox_words/n1000/no_step", false,
           [] { test_words(1000, 42, 5, false, 0); });
  add_case("philox_words/n1000/step_high_bits", false,
           [] { test_words(1000, 42, 5, true, (int64_t{3} << 32) | 0xFFFFFFF0LL); });
  return true;
}();

}  // namespace
