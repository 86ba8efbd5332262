// What the standalone GPU benchmarks of bench/gpu (lt_algos.cu, cutlass_s8.cu) share: the status
// check that ends the program, and the bit-for-bit comparison of two device outputs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace int4train_bench {

// Prints "tool: what failed with status N" and exits with exit_code unless status is 0 (a
// cudaError_t or a cublasStatus_t: 0 is success in both).
inline void check_status(int status, const char* tool, const char* what, int exit_code) {
  if (status != 0) {
    std::printf("%s: %s failed with status %d\n", tool, what, status);
    std::exit(exit_code);
  }
}

namespace detail {
__global__ void count_diff_words(const uint32_t* x, const uint32_t* y, size_t words,
                                 unsigned long long* diff) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    if (x[i] != y[i]) atomicAdd(diff, 1ull);
  }
}
}  // namespace detail

// How many of the `words` 32-bit words at x and y (device memory, 4-byte aligned) differ; `diff` is
// a device counter it zeroes first. Synchronises (the count is copied back); a failed call ends
// the program as check_status does.
inline unsigned long long count_different_words(const void* x, const void* y, size_t words,
                                                unsigned long long* diff, const char* tool,
                                                int exit_code) {
  check_status(cudaMemset(diff, 0, sizeof *diff), tool, "memset diff", exit_code);
  detail::count_diff_words<<<1024, 256>>>(static_cast<const uint32_t*>(x),
                                          static_cast<const uint32_t*>(y), words, diff);
  check_status(cudaGetLastError(), tool, "count_diff launch", exit_code);
  unsigned long long count = 0;
  check_status(cudaMemcpy(&count, diff, sizeof count, cudaMemcpyDeviceToHost), tool, "copy diff",
               exit_code);
  return count;
}

}  // namespace int4train_bench
