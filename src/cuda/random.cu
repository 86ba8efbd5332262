// int4train CUDA path: Philox4x32-10 words on the device (philox.h), for the device-generic PyTorch
// implementation, whose random streams are keyed by a step that stays on the device.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_common.h"
#include "int4train/cuda.h"
#include "int4train/philox.h"

namespace int4train {
namespace {

// One thread per Philox block: words 4b .. 4b+3 of the stream (the tail block writes fewer).
__global__ void philox_words_kernel(uint64_t seed, uint32_t stream_lo, const int64_t* stream_hi,
                                    int64_t* out, int64_t n) {
  const uint64_t hi = stream_hi != nullptr ? static_cast<uint32_t>(*stream_hi) : 0u;
  const uint64_t stream = (hi << 32) | stream_lo;
  const int64_t blocks = (n + 3) / 4;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4x32 r = random_block(seed, stream, static_cast<uint64_t>(b));
    const int64_t base = 4 * b;
    for (int j = 0; j < 4 && base + j < n; ++j) out[base + j] = static_cast<int64_t>(r.v[j]);
  }
}

}  // namespace

void philox_words_cuda(uint64_t seed, uint32_t stream_lo, const TensorView& stream_hi,
                       TensorView words, void* stream) {
  check_dtype(words, "words", {DType::kInt64});
  if (words.ndim != 1 || (words.shape[0] > 1 && words.strides[0] != 1)) {
    throw_error(ErrorKind::kValue, "words: expected a contiguous int64 vector");
  }
  const int64_t n = words.shape[0];
  if (stream_hi.data != nullptr) cuda_detail::check_device_scalar(stream_hi, "stream_hi", DType::kInt64);
  if (n == 0) return;
  check_not_null(words, "words");
  const int64_t blocks = (n + 3) / 4;
  const int threads = 256;
  const int64_t grid = std::min<int64_t>((blocks + threads - 1) / threads, 65535);
  philox_words_kernel<<<static_cast<unsigned>(grid), threads, 0, cuda_detail::as_stream(stream)>>>(
      seed, stream_lo, stream_hi.ptr<const int64_t>(), words.ptr<int64_t>(), n);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

}  // namespace int4train
