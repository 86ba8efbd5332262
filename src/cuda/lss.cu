// int4train CUDA path: leverage score sampling on the device (lss.h's water-filling, power-of-two
// rounding within the row capacity and stratified selection, bit for bit, without a host round
// trip) and the row scores of the layer's sampled backward products (linear.h, hq_lss).
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

// An int64 sum over the block (exact in any order): every thread gets it. Three barriers, so that
// back-to-back calls never overwrite a total still being read.
__device__ long long block_sum_ll(long long v, long long* sh) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
#pragma unroll
  for (int s = 16; s >= 1; s /= 2) v += __shfl_down_sync(0xffffffffu, v, s);
  __syncthreads();  // the previous call's readers are done with sh
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    long long w = sh[lane];
#pragma unroll
    for (int s = 16; s >= 1; s /= 2) w += __shfl_down_sync(0xffffffffu, w, s);
    if (lane == 0) sh[32] = w;
  }
  __syncthreads();
  return sh[32];
}

// Exclusive prefix sums of F values per thread over the block in thread order (field by field),
// and the totals, with the barriers of one scan. sh: 33 * F entries.
template <typename T, int F>
__device__ void block_exclusive_scan_n(const T (&v)[F], T (&before)[F], T (&total)[F], T* sh) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  T inc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) inc[f] = v[f];
#pragma unroll
  for (int s = 1; s < 32; s *= 2) {
#pragma unroll
    for (int f = 0; f < F; ++f) {
      const T o = __shfl_up_sync(0xffffffffu, inc[f], s);
      if (lane >= s) inc[f] += o;
    }
  }
  __syncthreads();  // the previous call's readers are done with sh
  if (lane == 31) {
#pragma unroll
    for (int f = 0; f < F; ++f) sh[33 * f + warp] = inc[f];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int f = 0; f < F; ++f) {
      T w = sh[33 * f + lane], winc = w;
#pragma unroll
      for (int s = 1; s < 32; s *= 2) {
        const T o = __shfl_up_sync(0xffffffffu, winc, s);
        if (lane >= s) winc += o;
      }
      sh[33 * f + lane] = winc - w;  // exclusive prefix of warp `lane`
      if (lane == 31) sh[33 * f + 32] = winc;
    }
  }
  __syncthreads();
#pragma unroll
  for (int f = 0; f < F; ++f) {
    total[f] = sh[33 * f + 32];
    before[f] = sh[33 * f + warp] + inc[f] - v[f];
  }
}

// The same for one value per thread: its exclusive prefix, and the total. sh: 33 entries.
template <typename T>
__device__ T block_exclusive_scan(T v, T* sh, T* total) {
  const T in[1] = {v};
  T before[1], tot[1];
  block_exclusive_scan_n<T, 1>(in, before, tot, sh);
  *total = tot[0];
  return before[0];
}

// One block of kLanes threads; element i belongs to thread i % kLanes through the water-filling and
// the exponents' search, so the sampling state is only ever read back by the thread that wrote it;
// the stratified draw then gives thread t the contiguous rows [t L, (t + 1) L) (its ranks are
// prefix sums in index order). With kStaged the scores and states live in dynamic shared memory
// (n * 5 bytes), loaded once: every pass then reads shared memory instead of waiting on global
// loads (one SM runs the whole selection, so latency is its cost). The strided loops are
// branch-free so that the loads of a thread's elements can be in flight at once.
template <bool kStaged>
__device__ __forceinline__ void lss_sample_block(
    const float* __restrict__ c_global, int64_t n, double budget, int max_exponent,
    int64_t max_rows, uint64_t seed, uint64_t stream, int8_t* __restrict__ ex,
    int32_t* __restrict__ slots, int32_t* __restrict__ slot_rows, long long* __restrict__ kept) {
  extern __shared__ float staged[];
  __shared__ double sh[33];
  __shared__ int shn[33];
  __shared__ long long shl[33];
  const int t = threadIdx.x;
  const float* c = kStaged ? staged : c_global;
  int8_t* st = kStaged ? reinterpret_cast<int8_t*>(staged + n) : ex;
  for (int64_t j = t; j < max_rows; j += kLanes) slot_rows[j] = -1;  // before any slot is written
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
    for (int64_t i = t; i < n; i += kLanes) {
      ex[i] = kZero;
      if (slots != nullptr) slots[i] = -1;
    }
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
  // lss_round_pow2: the probabilities p_i = float(kappa c_i) (1 saturated, 0 zero), the threshold
  // search of lss.h on the exact unit sums, then every exponent (into the state, same thread).
  const int K = max_exponent;
  auto prob_of = [&](int64_t i) {
    const int8_t s = st[i];
    return s == kZero        ? 0.0f
           : s == kSaturated ? 1.0f
                             : __double2float_rn(__dmul_rn(kappa, static_cast<double>(c[i])));
  };
  // Staged: each probability once, in place of its score (same thread), for the search's passes.
  if (kStaged) {
    for (int64_t i = t; i < n; i += kLanes) staged[i] = prob_of(i);
    __syncthreads();  // the passes in thread-contiguous order read other threads' probabilities
  }
  auto prob = [&](int64_t i) { return kStaged ? staged[i] : prob_of(i); };
  auto units = [&](double tau) {
    long long mine = 0;
#pragma unroll 4
    for (int64_t i = t; i < n; i += kLanes) mine += lss_units(lss_exponent(prob(i), tau, K), K);
    return block_sum_ll(mine, shl);
  };
  const long long room = static_cast<long long>(max_rows) << K;
  // Thread t's contiguous rows [b, e) (index order across threads) for the passes that need it.
  // The chunk length is 4 times an odd number: threads' first bytes then lie in distinct shared
  // memory banks (the int8 passes are free of bank conflicts, the fp32 ones 4-way at most).
  int64_t len = ((n + kLanes - 1) / kLanes + 3) / 4 * 4;
  if ((len / 4) % 2 == 0) len += 4;
  const int64_t b = t * len < n ? t * len : n, e = b + len < n ? b + len : n;
  if (units(kLssTau0) <= room) {
    for (int64_t i = t; i < n; i += kLanes) {
      st[i] = static_cast<int8_t>(lss_exponent(prob(i), kLssTau0, K));
    }
  } else {
    double lo = kLssTau0, hi = kLssTau0;
    long long at_lo = 0;  // S(lo), kept from the pass that tested lo
#pragma unroll 1
    for (int j = 1; j <= K; ++j) {
      hi = lo;
      lo = __dmul_rn(lo, 0.5);
      at_lo = units(lo);
      if (at_lo <= room) break;
    }
#pragma unroll 1
    for (int s = 0; s < kLssTauSteps; ++s) {
      const double mid = __dmul_rn(__dadd_rn(lo, hi), 0.5);
      const long long at_mid = units(mid);
      if (at_mid <= room) {
        lo = mid;
        at_lo = at_mid;
      } else {
        hi = mid;
      }
    }
    // Rows whose exponent differs between lo and hi take hi's in index order while the extra units
    // fit the slack: an exclusive scan of each thread's extra units, then its rows in order.
    const long long slack = room - at_lo;
    long long extra = 0;
    for (int64_t i = b; i < e; ++i) {
      const float pi = prob(i);
      extra += lss_units(lss_exponent(pi, hi, K), K) - lss_units(lss_exponent(pi, lo, K), K);
    }
    long long total = 0;
    long long taken = block_exclusive_scan(extra, shl, &total);
    for (int64_t i = b; i < e; ++i) {
      const float pi = prob(i);
      const int klo = lss_exponent(pi, lo, K), khi = lss_exponent(pi, hi, K);
      taken += lss_units(khi, K) - lss_units(klo, K);
      st[i] = static_cast<int8_t>(taken <= slack ? khi : klo);
    }
  }
  __syncthreads();  // the draw reads other threads' exponents
  // The stratified draw (lss_select): thread t's contiguous rows, their starts in the dyadic order
  // from one exclusive scan per exponent, then the stratum's draw decides each row.
  int count[31];
  for (int k = 0; k <= K; ++k) count[k] = 0;
  for (int64_t i = b; i < e; ++i) {
    const int k = st[i];
    if (k >= 0) ++count[k];
  }
  long long start[31];
  long long base = 0;
  if (K <= kLssMaxExponent) {  // the layers' K: every exponent's scan at once
    constexpr int F = kLssMaxExponent + 1;
    __shared__ int shf[33 * F];
    int c[F], before[F], total[F];
#pragma unroll
    for (int k = 0; k < F; ++k) c[k] = k <= K ? count[k] : 0;
    block_exclusive_scan_n<int, F>(c, before, total, shf);
#pragma unroll
    for (int k = 0; k < F; ++k) {
      if (k > K) break;
      const long long u = lss_units(k, K);
      start[k] = base + u * before[k];
      base += u * total[k];
    }
  } else {
#pragma unroll 1
    for (int k = 0; k <= K; ++k) {
      int total = 0;
      const int before = block_exclusive_scan(count[k], shn, &total);
      const long long u = lss_units(k, K);
      start[k] = base + u * before;
      base += u * total;
    }
  }
  long long mine = 0;
  int32_t* const staged_slots = reinterpret_cast<int32_t*>(staged);  // kStaged only
  const long long mask = (1ll << K) - 1;
  uint64_t cached[31];
  Philox4x32 words[31];
  for (int k = 0; k <= K; ++k) cached[k] = ~uint64_t{0};
  for (int64_t i = b; i < e; ++i) {
    const int k = st[i];
    bool keep = false;
    long long m = -1;
    if (k >= 0) {
      const long long a = start[k];
      const long long u = lss_units(k, K);
      start[k] = a + u;
      m = a >> K;
      const long long o = a & mask;
      // random_u32(seed, stream, m): the Philox block of m, kept per exponent (consecutive rows
      // of one exponent fall into the same or the next strata).
      const uint64_t blk = static_cast<uint64_t>(m) >> 2;
      if (cached[k] != blk) {
        words[k] = random_block(seed, stream, blk);
        cached[k] = blk;
      }
      const long long v = K == 0 ? 0 : static_cast<long long>(words[k].v[m & 3] >> (32 - K));
      keep = v >= o && v < o + u;
    }
    const int8_t out_k = keep ? static_cast<int8_t>(k) : kZero;
    const int32_t out_slot = keep ? static_cast<int32_t>(m) : -1;
    if (kStaged) {  // this thread's own rows: the scores' words hold the slots now
      st[i] = out_k;
      staged_slots[i] = out_slot;
    } else {
      ex[i] = out_k;
      if (slots != nullptr) slots[i] = out_slot;
    }
    if (keep) slot_rows[m] = static_cast<int32_t>(i);
    mine += keep ? 1 : 0;
  }
  if (kStaged) {
    // Written out in index order across the threads (coalesced) instead of each thread's run of
    // rows, whose byte stores touched a sector per thread.
    // Four rows a thread at a time where the outputs allow it (the staged arrays are aligned).
    __syncthreads();
    const bool vec = reinterpret_cast<uintptr_t>(ex) % 4 == 0 &&
                     (slots == nullptr || reinterpret_cast<uintptr_t>(slots) % 16 == 0);
    const int64_t n4 = vec ? n / 4 : 0;
    for (int64_t j = t; j < n4; j += kLanes) {
      reinterpret_cast<uint32_t*>(ex)[j] = reinterpret_cast<const uint32_t*>(st)[j];
      if (slots != nullptr) {
        reinterpret_cast<int4*>(slots)[j] = reinterpret_cast<const int4*>(staged_slots)[j];
      }
    }
    for (int64_t i = 4 * n4 + t; i < n; i += kLanes) {
      ex[i] = st[i];
      if (slots != nullptr) slots[i] = staged_slots[i];
    }
  }
  // The count by one block sum: an atomicAdd of every thread on one shared 64-bit counter is a
  // compare-and-swap loop, which the 1,024 threads retried about 11,000 times (warp iterations,
  // ncu on an H200). With the coalesced writes above: 110 -> 72 us at 8,192 tokens.
  const long long total = block_sum_ll(mine, shl);
  if (t == 0 && kept != nullptr) *kept = total;
}

// Block b samples problem b (the layer's two samplings run side by side, one SM each).
struct SampleBatch {
  LssSampleArgs a[kMaxLssBatch];
};
template <bool kStaged>
__global__ void __launch_bounds__(kLanes) lss_sample_kernel(const SampleBatch batch) {
  const LssSampleArgs& a = batch.a[blockIdx.x];
  lss_sample_block<kStaged>(a.scores, a.n, a.budget, a.max_exponent, a.max_rows, a.seed,
                            stream_with_step(a.stream, a.device_step), a.exponents, a.slots,
                            a.slot_rows, a.kept);
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
// (16 * norm_hi) * norm_x, then with row_exps (grad_scale=row) times 2^-k of the row's token.
__global__ void __launch_bounds__(256)
    lss_scores_kernel(const int32_t* __restrict__ r_sumsq, const int32_t* __restrict__ x_sumsq,
                      const int8_t* __restrict__ row_exps, int64_t n, float* __restrict__ scores) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < 2 * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tok = i < n ? i : i - n;
    float s = __double2float_rn(__dsqrt_rn(static_cast<double>(r_sumsq[i])));
    if (i < n) s = __fmul_rn(16.0f, s);
    if (x_sumsq != nullptr) {
      s = __fmul_rn(s, __double2float_rn(__dsqrt_rn(static_cast<double>(x_sumsq[tok]))));
    }
    // grad_scale=row: times the token's 2^-k (k in [0, 4]: 2^-k a normal fp32), last, as the CPU.
    if (row_exps != nullptr) s = __fmul_rn(s, __int_as_float((127 - row_exps[tok]) << 23));
    scores[i] = s;
  }
}

// Sum of squared codes of each row of packed INT4 codes (rows x cols): one warp per row, exact
// int32 (cols * 64 < 2^31). kVec (rows of a multiple of 16 bytes, 16-byte aligned): 16 bytes a
// lane at a time, each word's 8 codes c = u - 8 (u = nibble ^ 8, in [0, 15]) summed as
// sum u^2 - 16 sum u + 64 * 8 with dp4a (exact integers), one load per 16 bytes instead of per
// byte.
__device__ __forceinline__ int32_t word_sumsq(uint32_t w) {
  const uint32_t lo = (w & 0x0F0F0F0Fu) ^ 0x08080808u, hi = ((w >> 4) & 0x0F0F0F0Fu) ^ 0x08080808u;
  const int32_t sq = __dp4a(lo, lo, __dp4a(hi, hi, 0u));
  const int32_t sum = __dp4a(lo, 0x01010101u, __dp4a(hi, 0x01010101u, 0u));
  return sq - 16 * sum + 64 * 8;
}

template <bool kVec>
__global__ void __launch_bounds__(256)
    packed_row_sumsq_kernel(const uint8_t* __restrict__ codes, int64_t rows, int64_t cols,
                            int32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t bytes = (cols + 1) / 2;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x / 32) {
    const uint8_t* row = codes + r * bytes;
    int32_t acc = 0;
    if (kVec) {
      const uint4* row4 = reinterpret_cast<const uint4*>(row);
      for (int64_t b = lane; b < bytes / 16; b += 32) {
        const uint4 q = row4[b];
        acc += word_sumsq(q.x) + word_sumsq(q.y) + word_sumsq(q.z) + word_sumsq(q.w);
      }
    } else {
      for (int64_t b = lane; b < bytes; b += 32) {
        const int lo = unpack_int4_lo(row[b]), hi = unpack_int4_hi(row[b]);
        acc += lo * lo + hi * hi;  // odd cols: the padding nibble is 0
      }
    }
#pragma unroll
    for (int s = 16; s >= 1; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) out[r] = acc;
  }
}

}  // namespace

void launch_lss_sample(const LssSampleArgs* args, int count, cudaStream_t stream) {
  if (count < 1 || count > kMaxLssBatch) {
    throw_error(ErrorKind::kRuntime, "launch_lss_sample: expected 1 or 2 problems");
  }
  SampleBatch batch{};
  int64_t n = 0;
  for (int i = 0; i < count; ++i) {
    batch.a[i] = args[i];
    n = args[i].n > n ? args[i].n : n;
  }
  const size_t staged_bytes = static_cast<size_t>(n) * (sizeof(float) + 1);
  if (n > 0 && staged_bytes <= staged_limit(stream)) {
    lss_sample_kernel<true><<<count, kLanes, staged_bytes, stream>>>(batch);
  } else {
    lss_sample_kernel<false><<<count, kLanes, 0, stream>>>(batch);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void launch_lss_scores(const int32_t* r_sumsq, const int32_t* x_sumsq, const int8_t* row_exps,
                       int64_t n, float* scores, cudaStream_t stream) {
  if (n == 0) return;
  lss_scores_kernel<<<grid_blocks(2 * n, 256, 4096), 256, 0, stream>>>(r_sumsq, x_sumsq, row_exps,
                                                                       n, scores);
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

void launch_packed_row_sumsq(const uint8_t* codes, int64_t rows, int64_t cols, int32_t* out,
                             cudaStream_t stream) {
  if (rows == 0) return;
  const int grid = grid_blocks(rows * 32, 256, 4096);
  if ((cols + 1) / 2 % 16 == 0 && reinterpret_cast<uintptr_t>(codes) % 16 == 0) {
    packed_row_sumsq_kernel<true><<<grid, 256, 0, stream>>>(codes, rows, cols, out);
  } else {
    packed_row_sumsq_kernel<false><<<grid, 256, 0, stream>>>(codes, rows, cols, out);
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
}

}  // namespace cuda_detail

void lss_sample_cuda(const TensorView& scores, double budget, int max_exponent, int64_t max_rows,
                     const RandomKey& rng, TensorView exponents, TensorView slots,
                     TensorView slot_rows, TensorView kept, void* stream) {
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
  if (max_exponent < 0 || max_exponent > 30) {
    throw_error(ErrorKind::kValue, "max_exponent: expected an integer in [0, 30], got " +
                                       std::to_string(max_exponent));
  }
  if (max_rows < 0 || max_rows > INT32_MAX || (max_rows << max_exponent) < n) {
    throw_error(
        ErrorKind::kValue,
        "max_rows: expected a row capacity in [ceil(n / 2^max_exponent), 2^31 - 1] for n = " +
            std::to_string(n) + " rows, got " + std::to_string(max_rows));
  }
  auto check_vec = [&](const TensorView& v, const char* name, DType dtype, int64_t len) {
    check_dtype(v, name, {dtype});
    if (v.ndim != 1 || !v.is_contiguous() || v.numel() != len) {
      throw_error(ErrorKind::kValue, std::string(name) + ": expected a contiguous " +
                                         dtype_name(dtype) + " device vector of " +
                                         std::to_string(len) + " elements");
    }
    if (len > 0) check_not_null(v, name);
  };
  check_vec(exponents, "exponents", DType::kInt8, n);
  check_vec(slot_rows, "slot_rows", DType::kInt32, max_rows);
  if (slots.data != nullptr) check_vec(slots, "slots", DType::kInt32, n);
  if (kept.data != nullptr) check_device_scalar(kept, "kept", DType::kInt64);
  const LssSampleArgs args{n > 0 ? scores.ptr<const float>() : nullptr,
                           n,
                           budget,
                           max_exponent,
                           max_rows,
                           rng.seed,
                           rng.stream,
                           rng.device_step,
                           n > 0 ? exponents.ptr<int8_t>() : nullptr,
                           slots.data != nullptr ? slots.ptr<int32_t>() : nullptr,
                           max_rows > 0 ? slot_rows.ptr<int32_t>() : nullptr,
                           kept.data != nullptr ? kept.ptr<long long>() : nullptr};
  launch_lss_sample(&args, 1, as_stream(stream));
}

}  // namespace int4train
