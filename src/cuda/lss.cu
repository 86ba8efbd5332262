// int4train CUDA path: leverage score sampling on the device (lss.h's water-filling, power-of-two
// rounding and Bernoulli selection, bit for bit, without a host round trip) and the row scores of
// the layer's sampled backward products (linear.h, hq_lss).
#include <atomic>
#include <climits>
#include <cmath>
#include <string>

#include "cuda_common.h"
#include "device_common.cuh"
#include "int4train/cuda.h"
#include "int4train/int4.h"
#include "int4train/lss.h"
#include "kernels.h"

namespace int4train {
namespace cuda_detail {
namespace {

constexpr int kLanes = kLssSumLanes;  // one thread per lane of lss.h's fixed summation order
constexpr int8_t kActive = 64;        // sampling state: a positive, unsaturated score
constexpr int8_t kSaturated = 0;      // p = 1 (its final exponent)
constexpr int8_t kZero = -1;          // c = 0 (never kept; its final exponent)

// lss.h's sum with one count beside it: thread t holds lane t; within each warp the tree s = 16 .. 1
// (lane t += lane t + s) by shuffles, then warp 0 runs the same tree over the 32 warp sums. The
// int count is summed the same way (exact in any order). Two barriers; every thread gets both.
struct SumCount {
  double sum;
  int count;
};
__device__ SumCount lane_tree_sum(double v, int n, double* sh, int* shn) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
#pragma unroll
  for (int s = 16; s >= 1; s /= 2) {
    v = __dadd_rn(v, __shfl_down_sync(0xffffffffu, v, s));
    n += __shfl_down_sync(0xffffffffu, n, s);
  }
  if (lane == 0) {
    sh[warp] = v;
    shn[warp] = n;
  }
  __syncthreads();
  if (warp == 0) {
    double w = sh[lane];
    int m = shn[lane];
#pragma unroll
    for (int s = 16; s >= 1; s /= 2) {
      w = __dadd_rn(w, __shfl_down_sync(0xffffffffu, w, s));
      m += __shfl_down_sync(0xffffffffu, m, s);
    }
    if (lane == 0) {
      sh[32] = w;
      shn[32] = m;
    }
  }
  __syncthreads();
  return SumCount{sh[32], shn[32]};  // read before the next call's first barrier overwrites it
}

// lss_round_pow2 of one probability p in [0, 1].
__device__ __forceinline__ int round_pow2(float p, int max_exponent) {
  if (p == 0.0f) return -1;
  int e;
  const double m = frexp(static_cast<double>(p), &e);
  int k = (__dmul_rn(m, m) < 0.5) ? 1 - e : -e;
  k = k < 0 ? 0 : (k > max_exponent ? max_exponent : k);
  return k;
}

// One block of kLanes threads; element i belongs to thread i % kLanes throughout, so the sampling
// state is only ever read back by the thread that wrote it. With kStaged the scores and states live
// in dynamic shared memory (n * 5 bytes), loaded once: every water-filling round then reads shared
// memory instead of waiting on global loads (one SM runs the whole selection, so latency is its
// cost). The loops are branch-free so that the loads of a thread's elements can be in flight at once.
template <bool kStaged>
__global__ void __launch_bounds__(kLanes)
    lss_sample_kernel(const float* __restrict__ c_global, int64_t n, double budget,
                      int max_exponent, uint64_t seed, uint64_t stream, int8_t* __restrict__ ex,
                      long long* __restrict__ kept) {
  extern __shared__ float staged[];
  __shared__ double sh[33];
  __shared__ int shn[33];
  const int t = threadIdx.x;
  const float* c = kStaged ? staged : c_global;
  int8_t* st = kStaged ? reinterpret_cast<int8_t*>(staged + n) : ex;
  // Pass 0: validate, stage, and sum every positive score (the first round's sum) and count them.
  int bad = 0, pos = 0;
  double lane = 0.0;
#pragma unroll 4
  for (int64_t i = t; i < n; i += kLanes) {
    const float v = c_global[i];
    if (kStaged) staged[i] = v;
    bad |= !(v >= 0.0f) || isinf(v);
    st[i] = v > 0.0f ? kActive : kZero;
    pos += v > 0.0f ? 1 : 0;
    const double sum = __dadd_rn(lane, static_cast<double>(v));
    lane = v > 0.0f ? sum : lane;
  }
  bad = __syncthreads_or(bad);
  if (bad) {  // lss_probabilities' Error, reported on the device
    for (int64_t i = t; i < n; i += kLanes) ex[i] = kZero;
    if (t == 0 && kept != nullptr) *kept = -1;
    return;
  }
  SumCount r = lane_tree_sum(lane, pos, sh, shn);
  const long long positives = r.count;  // n < 2^31 rows (int32 counts)
  double kappa = 0.0;
  if (budget >= static_cast<double>(positives)) {
    for (int64_t i = t; i < n; i += kLanes) {
      if (st[i] == kActive) st[i] = kSaturated;
    }
  } else {
    // Each round: kappa from the active sum; one pass marks the rows it saturates and sums the rest
    // (the next round's sum, in the same lane order); stop when a pass saturates nothing.
    long long saturated = 0;
#pragma unroll 1
    for (;;) {
      kappa = __ddiv_rn(__dsub_rn(budget, static_cast<double>(saturated)), r.sum);
      int mine = 0;
      lane = 0.0;
#pragma unroll 4
      for (int64_t i = t; i < n; i += kLanes) {
        const bool active = st[i] == kActive;
        const double v = static_cast<double>(c[i]);
        const bool sat = active && __dmul_rn(kappa, v) >= 1.0;
        if (sat) st[i] = kSaturated;
        mine += sat ? 1 : 0;
        const double sum = __dadd_rn(lane, v);
        lane = (active && !sat) ? sum : lane;
      }
      r = lane_tree_sum(lane, mine, sh, shn);
      if (r.count == 0) break;
      saturated += r.count;
    }
  }
  __shared__ unsigned long long kept_count;
  if (t == 0) kept_count = 0;
  __syncthreads();
  unsigned long long mine = 0;
#pragma unroll 2
  for (int64_t i = t; i < n; i += kLanes) {
    const int8_t s = st[i];
    const int k = s == kZero ? -1
                  : s == kSaturated
                      ? 0
                      : round_pow2(__double2float_rn(__dmul_rn(kappa, static_cast<double>(c[i]))),
                                   max_exponent);
    const bool keep =
        k >= 0 && bernoulli_pow2(random_u32(seed, stream, static_cast<uint64_t>(i)), k);
    ex[i] = keep ? static_cast<int8_t>(k) : kZero;
    mine += keep ? 1 : 0;
  }
  if (mine != 0) atomicAdd(&kept_count, mine);
  __syncthreads();
  if (t == 0 && kept != nullptr) *kept = static_cast<long long>(kept_count);
}

// Dynamic shared memory for the staged kernel on the current device, set once per device. A first
// call while `stream` is being captured into a CUDA graph does not touch device attributes (0: the
// unstaged kernel, same results, goes into the graph); the next call outside a capture sets them.
size_t staged_limit(cudaStream_t stream) {
  int dev = 0;
  INT4TRAIN_CUDA_CHECK(cudaGetDevice(&dev));
  static std::atomic<int> limits[64];
  if (dev < 0 || dev >= 64) return 0;
  int lim = limits[dev].load();
  if (lim == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    INT4TRAIN_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return 0;
    int optin = 0;
    INT4TRAIN_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    // Leave room for the kernel's static shared memory (the tree's 33 sums and counts).
    lim = optin > 4096 ? optin - 4096 : 1;
    INT4TRAIN_CUDA_CHECK(cudaFuncSetAttribute(lss_sample_kernel<true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize, lim));
    limits[dev].store(lim);
  }
  return static_cast<size_t>(lim);
}

// Scores of the 2N bit-split rows from their exact sums of squared codes: ||R_i|| up to the common
// s_g (x16 for the hi rows i < n) and, with x_sumsq, times ||x_(i mod n)|| of the saved codes; the
// CPU's fp32 operations in its order (src/cpu/linear.cpp): norm = float(sqrt(double(sum))),
// (16 * norm_hi) * norm_x.
__global__ void __launch_bounds__(256)
    lss_scores_kernel(const int32_t* __restrict__ r_sumsq, const int32_t* __restrict__ x_sumsq,
                      int64_t n, float* __restrict__ scores) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < 2 * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = __double2float_rn(__dsqrt_rn(static_cast<double>(r_sumsq[i])));
    if (i < n) s = __fmul_rn(16.0f, s);
    if (x_sumsq != nullptr) {
      const int64_t tok = i < n ? i : i - n;
      s = __fmul_rn(s, __double2float_rn(__dsqrt_rn(static_cast<double>(x_sumsq[tok]))));
    }
    scores[i] = s;
  }
}

// Sum of squared codes of each row of packed INT4 codes (rows x cols): one warp per row, exact
// int32 (cols * 64 < 2^31).
__global__ void __launch_bounds__(256)
    packed_row_sumsq_kernel(const uint8_t* __restrict__ codes, int64_t rows, int64_t cols,
                            int32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t bytes = (cols + 1) / 2;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x / 32) {
    const uint8_t* row = codes + r * bytes;
    int32_t acc = 0;
    for (int64_t b = lane; b < bytes; b += 32) {
      const int lo = unpack_int4_lo(row[b]), hi = unpack_int4_hi(row[b]);
      acc += lo * lo + hi * hi;  // odd cols: the padding nibble is 0
    }
#pragma unroll
    for (int s = 16; s >= 1; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) out[r] = acc;
  }
}

}  // namespace

void launch_lss_scores(const int32_t* r_sumsq, const int32_t* x_sumsq, int64_t n, float* scores,
                       cudaStream_t stream) {
  if (n == 0) return;
  lss_scores_kernel<<<grid_blocks(2 * n, 256, 4096), 256, 0, stream>>>(r_sumsq, x_sumsq, n, scores);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void launch_packed_row_sumsq(const uint8_t* codes, int64_t rows, int64_t cols, int32_t* out,
                             cudaStream_t stream) {
  if (rows == 0) return;
  packed_row_sumsq_kernel<<<grid_blocks(rows * 32, 256, 4096), 256, 0, stream>>>(codes, rows, cols,
                                                                                 out);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

}  // namespace cuda_detail

void lss_sample_cuda(const TensorView& scores, double budget, int max_exponent,
                     const RandomKey& rng, TensorView exponents, TensorView kept, void* stream) {
  using namespace cuda_detail;
  check_dtype(scores, "scores", {DType::kFloat32});
  if (scores.ndim != 1 || !scores.is_contiguous()) {
    throw_error(ErrorKind::kValue, "scores: expected a contiguous device vector");
  }
  const int64_t n = scores.numel();
  if (n > 0) check_not_null(scores, "scores");
  if (n > INT32_MAX) {
    throw_error(ErrorKind::kValue, "scores: at most 2^31 - 1 rows can be sampled on the device, got " +
                                       std::to_string(n));
  }
  if (!(budget > 0.0 || (n == 0 && budget == 0.0)) || !std::isfinite(budget)) {
    throw_error(ErrorKind::kValue,
                "budget: expected a positive finite row budget, got " + std::to_string(budget));
  }
  if (max_exponent < 0 || max_exponent > 32) {
    throw_error(ErrorKind::kValue, "max_exponent: expected an integer in [0, 32], got " +
                                       std::to_string(max_exponent));
  }
  check_dtype(exponents, "exponents", {DType::kInt8});
  if (exponents.ndim != 1 || !exponents.is_contiguous() || exponents.numel() != n) {
    throw_error(ErrorKind::kValue, "exponents: expected a contiguous int8 device vector of " +
                                       std::to_string(n) + " elements");
  }
  if (n > 0) check_not_null(exponents, "exponents");
  if (kept.data != nullptr) check_device_scalar(kept, "kept", DType::kInt64);
  const cudaStream_t s = as_stream(stream);
  const float* c = n > 0 ? scores.ptr<const float>() : nullptr;
  int8_t* ex = n > 0 ? exponents.ptr<int8_t>() : nullptr;
  long long* kp = kept.data != nullptr ? kept.ptr<long long>() : nullptr;
  const size_t staged_bytes = static_cast<size_t>(n) * (sizeof(float) + 1);
  if (n > 0 && staged_bytes <= staged_limit(s)) {
    lss_sample_kernel<true><<<1, kLanes, staged_bytes, s>>>(c, n, budget, max_exponent, rng.seed,
                                                           rng.stream, ex, kp);
  } else {
    lss_sample_kernel<false><<<1, kLanes, 0, s>>>(c, n, budget, max_exponent, rng.seed,
                                                 rng.stream, ex, kp);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

}  // namespace int4train
