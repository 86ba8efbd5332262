// GPU test of the device side's bf16 stores (device_common.cuh's store8, which the epilogues and
// the transform write their bf16 outputs with) against numeric.h's float_to_bf16, the CPU's
// rounding: every one of the 2^32 float bit patterns, through both store forms (16-byte vector and
// per element), so that the hardware conversion's fast path and its non-finite fallback are each
// checked where they apply.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "device_common.cuh"
#include "gpu_test_util.h"
#include "int4train/numeric.h"

namespace {

using gputest::DevBuf;
using int4train::BFloat16;
using int4train::float_to_bf16;

// Groups of 8 consecutive bit patterns from `first`, one group a thread at a time: store8 into the
// thread's own 8 slots of `slots`, then each stored value compared with float_to_bf16's; mismatches
// counted and the smallest mismatching pattern kept.
template <bool kVec>
__global__ void store8_check_kernel(uint64_t first, uint64_t groups, BFloat16* slots,
                                    unsigned long long* bad, unsigned long long* first_bad) {
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  BFloat16* mine = slots + 8 * tid;
  for (uint64_t g = tid; g < groups; g += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    float v[8];
    uint32_t u[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      u[i] = static_cast<uint32_t>(first + 8 * g + i);
      v[i] = __uint_as_float(u[i]);
    }
    int4train::cuda_detail::store8<kVec>(mine, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (static_cast<volatile const BFloat16*>(mine)[i].bits != float_to_bf16(v[i]).bits) {
        atomicAdd(bad, 1ull);
        atomicMin(first_bad, static_cast<unsigned long long>(u[i]));
      }
    }
  }
}

template <bool kVec>
void test_store8_all_floats() {
  constexpr int kThreads = 256, kBlocks = 1024;
  constexpr uint64_t kGroups = (uint64_t{1} << 32) / 8;
  DevBuf slots(sizeof(BFloat16) * 8 * kThreads * kBlocks);
  DevBuf counters(2 * sizeof(unsigned long long));
  const unsigned long long init[2] = {0ull, ~0ull};
  CUDA_OK(cudaMemcpy(counters.get(), init, sizeof init, cudaMemcpyHostToDevice));
  auto* c = counters.as<unsigned long long>();
  store8_check_kernel<kVec><<<kBlocks, kThreads>>>(0, kGroups, slots.as<BFloat16>(), c, c + 1);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  unsigned long long got[2];
  CUDA_OK(cudaMemcpy(got, c, sizeof got, cudaMemcpyDeviceToHost));
  GPU_CHECK_MSG(got[0] == 0, got[0] << " of 2^32 floats stored with other bits than float_to_bf16's"
                                    << "; the first: 0x" << std::hex << got[1]);
}

const bool registered = [] {
  using gputest::add_case;
  // Big: 2^32 values (well under a second on an H100/H200), skipped under compute-sanitizer.
  add_case("bf16_store8/all_floats/vec", true, test_store8_all_floats<true>);
  add_case("bf16_store8/all_floats/elementwise", true, test_store8_all_floats<false>);
  return true;
}();

}  // namespace
