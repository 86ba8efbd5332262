// int4train CUDA path, sm_90a with CUTLASS: hq_bs's input-gradient product with its epilogue in the
// GEMM (kernels.h, launch_dx_fused). The INT8 product q Qw^T (q: the bit split's rows 16 hi + lo,
// Qw^T: the weight's codes transposed) runs on CUTLASS's TMA warp-specialized mainloop; instead of
// writing the int32 product for dx_epilogue_kernel to read, each consumer warpgroup turns its
// accumulators into the gradient in the input domain where they lie, with dx_epilogue_kernel's
// arithmetic element by element: v = float(s1 s2 (w h)) in fp64 (w = 2^-k of the token's row
// exponent, 1 without), the LSQ backward's mask and r from the saved codes and aux bits, the
// Hadamard back-rotation in hadamard_warp8's stage order, the bf16 or fp32 store. The same bits as
// the unfused pair; the step gradient's terms v r summed in fp64 per thread, per warp, then over
// the warps in tile order (another fixed order: within an fp32 rounding of the CPU's).
//
// Why it fits: a wgmma accumulator of m64n256 holds one output row's 256 columns in the 4 lanes of
// a quad (the PTX ISA's D fragment: value i = e + 2 h + 4 n of lane l is row 8 h + l / 4 (+ 16 per
// warp), column 8 n + 2 (l % 4) + e), so a Hadamard block of up to 256 columns is whole in a quad:
// column bit 0 is e (registers), bits 1 and 2 the quad's lanes (shuffles), bits 3 to 7 n
// (registers). The tile's N is 256; d (the input features) must be a multiple of it.
//
// Compiled only where the CUTLASS headers are found and sm_90a is built (src/CMakeLists.txt), into
// the core as INT4TRAIN_HAVE_CUTLASS_DX; linear_cuda.cpp takes this path on an sm_90 device when
// dx_fused_supported says the call fits, else the INT8 product and dx_epilogue_kernel.
#include <cuda_runtime.h>

#include <map>
#include <mutex>

#include "cuda_common.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/detail.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "device_common.cuh"
#include "kernels.h"

namespace int4train {
namespace cuda_detail {
namespace {

constexpr int kTileN = 256;

// What the epilogue reads besides the accumulators (FusedDxArgs on the device).
struct DxEpilogueParams {
  const float* s1;
  const float* s2;
  const int8_t* row_exps;  // may be null
  const uint8_t* packed;   // rows x cols codes, packed (2 a byte, low nibble first)
  const uint8_t* aux;      // rows x cols aux bits (8 a byte, bit c % 8)
  int64_t rows, cols;
  int g;  // Hadamard block
  float hscale;
  void* out;  // may be null
  bool out_bf16;
  int64_t ldo;
  double* partial;  // tiles x warps per tile
  int tiles_n;
};

__device__ __forceinline__ double pow2_dev(int e) {
  return __longlong_as_double(static_cast<long long>(1023 + e) << 52);
}

// The collective epilogue (CUTLASS's no-shared-memory interface, wrapped in its warp-specialized
// adapter below): the accumulators in registers to grad_x, per tile.
class DxEpilogue {
 public:
  using EpilogueSchedule = cutlass::epilogue::NoSmemWarpSpecialized;
  using DispatchPolicy = EpilogueSchedule;
  // The kernel and the device adapter name these; nothing is read or written through them.
  using ThreadEpilogueOp = void;
  using ElementC = int32_t;
  using ElementD = int32_t;
  using StrideC = cute::Stride<int64_t, cute::Int<1>, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct SharedStorage {};
  using TensorStorage = SharedStorage;
  struct Arguments {
    DxEpilogueParams p;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& shape, Arguments const& args) {
    return cute::get<1>(shape) % kTileN == 0 && args.p.g >= 1 && args.p.g <= kTileN;
  }

  CUTLASS_HOST_DEVICE explicit DxEpilogue(Params const& params, SharedStorage const& = {})
      : params_(params) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL, BlockShapeMNK blk_shape,
                                 BlockCoordMNKL blk_coord,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    using namespace cute;
    static_assert(size<1>(BlockShapeMNK{}) == kTileN, "one tile's N is one row's 256 columns");
    static_assert(decltype(size(accumulators))::value == 128,
                  "a thread's m64n256 accumulator: 2 rows x 64 columns");
    const DxEpilogueParams& p = params_.p;
    const int m_tile = get<0>(blk_coord), n_tile = get<1>(blk_coord);
    // This thread's first row and column in the tile, from CUTLASS's own partitioning; the
    // others follow the fragment layout above.
    const Tensor coords = tiled_mma.get_thread_slice(thread_idx)
                              .partition_C(make_identity_tensor(take<0, 2>(blk_shape)));
    const int lane = thread_idx & 31;
    const int64_t row0 =
        static_cast<int64_t>(m_tile) * int64_t{size<0>(BlockShapeMNK{})} + get<0>(coords(0));
    const int64_t col0 = static_cast<int64_t>(n_tile) * kTileN;  // the row's 256 columns
    const int q = lane & 3;
    const double scale = __dmul_rn(static_cast<double>(*p.s1), static_cast<double>(*p.s2));

    float v[128];
    double acc = 0.0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + 8 * h;
      const bool valid = row < p.rows;
      const double w = valid && p.row_exps != nullptr ? pow2_dev(-p.row_exps[row]) : 1.0;
      // The row's 256 codes (128 bytes: byte 4 n + q holds this lane's columns 8 n + 2 q + e,
      // low nibble first) and aux bits (32 bytes: byte n, bits 2 q + e).
      uint4 cw[8], aw[2];
      if (valid) {
        const uint4* cp = reinterpret_cast<const uint4*>(p.packed + row * (p.cols / 2) + col0 / 2);
        const uint4* ap = reinterpret_cast<const uint4*>(p.aux + (row * p.cols + col0) / 8);
#pragma unroll
        for (int j = 0; j < 8; ++j) cw[j] = cp[j];
        aw[0] = ap[0];
        aw[1] = ap[1];
      }
#pragma unroll
      for (int n = 0; n < 32; ++n) {
        const uint4 c4 = cw[n / 4];
        const uint32_t word = (n % 4 == 0)   ? c4.x
                              : (n % 4 == 1) ? c4.y
                              : (n % 4 == 2) ? c4.z
                                             : c4.w;
        const uint32_t byte = (word >> (8 * q)) & 0xFFu;
        const uint4 a4 = aw[n / 16];
        const int aw_i = (n % 16) / 4;
        const uint32_t abytes = aw_i == 0 ? a4.x : aw_i == 1 ? a4.y : aw_i == 2 ? a4.z : a4.w;
        const uint32_t bits = (abytes >> (8 * (n % 4) + 2 * q)) & 3u;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = e + 2 * h + 4 * n;
          float x = 0.0f;
          if (valid) {
            const double a = __dmul_rn(static_cast<double>(accumulators(i)), w);
            x = __double2float_rn(__dmul_rn(scale, a));
            const int code = static_cast<int>(((byte >> (4 * e)) & 0xFu) ^ 0x8u) - 8;
            const MaskR m = lsq_compact_decode(code, (bits >> e) & 1u);
            acc += static_cast<double>(x) * m.r;
            x = m.inside ? x : 0.0f;
          }
          v[i] = x;
        }
      }
    }

    // The back-rotation, hadamard_warp8's stages in its order: column bit 0 (e), 1 and 2 (the
    // quad's lanes: the upper lane of a pair computes a - b = fma(-1, b, a), the lower b + a),
    // then 3 to 7 (n); a block of g columns takes its first log2(g) bits.
    if (p.g >= 2) {
#pragma unroll
      for (int i = 0; i < 128; i += 2) {
        const float a = v[i], b = v[i + 1];
        v[i] = __fadd_rn(a, b);
        v[i + 1] = __fsub_rn(a, b);
      }
    }
#pragma unroll
    for (int m = 1; m <= 2; m *= 2) {
      if (p.g >= 4 * m) {
        const float sign = (lane & m) != 0 ? -1.0f : 1.0f;
#pragma unroll
        for (int i = 0; i < 128; ++i) {
          const float o = __shfl_xor_sync(0xFFFFFFFFu, v[i], m);
          v[i] = __fmaf_rn(sign, v[i], o);
        }
      }
    }
#pragma unroll
    for (int b = 0; b < 5; ++b) {
      if (p.g >= (16 << b)) {
#pragma unroll
        for (int n = 0; n < 32; ++n) {
          if ((n & (1 << b)) == 0) {
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const int i = 4 * n + k, j = 4 * (n | (1 << b)) + k;
              const float a = v[i], c = v[j];
              v[i] = __fadd_rn(a, c);
              v[j] = __fsub_rn(a, c);
            }
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 128; ++i) v[i] = __fmul_rn(v[i], p.hscale);

    if (p.out != nullptr) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + 8 * h;
        if (row >= p.rows) continue;
        const int64_t base = row * p.ldo + col0 + 2 * q;
        if (p.out_bf16) {
          // float_to_bf16's bits (store8's rule): the hardware pair conversion unless a value of
          // the row's 64 is an Inf or a NaN.
          float z = 0.0f;
#pragma unroll
          for (int n = 0; n < 32; ++n) {
            z = __fmaf_rn(v[4 * n + 2 * h], 0.0f, z);
            z = __fmaf_rn(v[4 * n + 2 * h + 1], 0.0f, z);
          }
          uint32_t* dst = reinterpret_cast<uint32_t*>(static_cast<BFloat16*>(p.out) + base);
#pragma unroll
          for (int n = 0; n < 32; ++n) {
            const float lo = v[4 * n + 2 * h], hi = v[4 * n + 2 * h + 1];
            dst[4 * n] = z == z ? bf16x2_bits(lo, hi)
                                : static_cast<uint32_t>(float_to_bf16(lo).bits) |
                                      (static_cast<uint32_t>(float_to_bf16(hi).bits) << 16);
          }
        } else {
          float2* dst = reinterpret_cast<float2*>(static_cast<float*>(p.out) + base);
#pragma unroll
          for (int n = 0; n < 32; ++n)
            dst[4 * n] = make_float2(v[4 * n + 2 * h], v[4 * n + 2 * h + 1]);
        }
      }
    }

    if (p.partial != nullptr) {
      constexpr int kWarps = decltype(size(tiled_mma))::value / 32;
      acc = warp_sum_f64(acc);
      if (lane == 0) {
        const int64_t tile = static_cast<int64_t>(m_tile) * p.tiles_n + n_tile;
        p.partial[tile * kWarps + thread_idx / 32] = acc;
      }
    }
  }

 private:
  Params params_;
};

// The GEMM: A = q (rows x K, K-major), B = Qw^T (cols x K, K-major: CUTLASS's column-major K x N),
// int32 accumulation; a 64 x 256 tile per consumer warpgroup, ping-pong (one warpgroup's epilogue
// runs while the other's products do).
using TileShape = cute::Shape<cute::_64, cute::_256, cute::_128>;
using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<DxEpilogue>;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16,
    int8_t, cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<0>, KernelSchedule>::CollectiveOp;
using Kernel =
    cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
constexpr int kWarpsPerTile = static_cast<int>(cute::size(typename Kernel::TiledMma{})) / 32;
constexpr int kTileM = cute::size<0>(TileShape{});

int sm_count() {
  static std::mutex mu;
  static std::map<int, int> counts;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = counts.find(dev);
  if (it != counts.end()) return it->second;
  int n = 0;
  INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  counts[dev] = n;
  return n;
}

bool sm90_device() {
  static std::mutex mu;
  static std::map<int, bool> is90;
  const int dev = current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = is90.find(dev);
  if (it != is90.end()) return it->second;
  int major = 0, minor = 0;
  INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  is90[dev] = major == 9 && minor == 0;
  return is90[dev];
}

template <typename T>
bool aligned_to(const T* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}
}  // namespace

bool dx_fused_supported(const FusedDxArgs& a) {
  if (a.rows <= 0 || a.cols <= 0 || a.k <= 0 || a.cols % kTileN != 0) return false;
  if (a.block < 1 || a.block > kTileN) return false;
  if (a.k % 16 != 0 || a.ldq % 16 != 0 || a.ldw % 16 != 0) return false;
  if (!aligned_to(a.q, 16) || !aligned_to(a.wt, 16)) return false;
  if (!aligned_to(a.packed, 16) || !aligned_to(a.aux, 16)) return false;
  if (a.out != nullptr && (a.ldo % 2 != 0 || !aligned_to(a.out, a.out_bf16 ? 4 : 8))) return false;
  if (a.rows > INT32_MAX || a.cols > INT32_MAX || a.k > INT32_MAX) return false;
  return sm90_device();
}

void launch_dx_fused(const FusedDxArgs& a, const CudaAllocator& alloc, cudaStream_t stream) {
  const int64_t tiles_m = (a.rows + kTileM - 1) / kTileM, tiles_n = a.cols / kTileN;
  const int64_t parts = tiles_m * tiles_n * kWarpsPerTile;
  DeviceBuffer partial(alloc, a.grad_step != nullptr ? sizeof(double) * parts : 0, stream);
  DxEpilogueParams ep{a.s1,
                      a.s2,
                      a.row_exps,
                      a.packed,
                      a.aux,
                      a.rows,
                      a.cols,
                      a.block,
                      hadamard_scale(a.block),
                      a.out,
                      a.out_bf16,
                      a.ldo,
                      a.grad_step != nullptr ? partial.as<double>() : nullptr,
                      static_cast<int>(tiles_n)};
  cutlass::KernelHardwareInfo hw;
  hw.device_id = current_device();
  hw.sm_count = sm_count();
  using Stride = cute::Stride<int64_t, cute::Int<1>, int64_t>;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(a.rows), static_cast<int>(a.cols), static_cast<int>(a.k), 1},
      {a.q, Stride{a.ldq, cute::Int<1>{}, 0}, a.wt, Stride{a.ldw, cute::Int<1>{}, 0}},
      {DxEpilogue::Arguments{ep}},
      hw};
  Gemm gemm;
  cutlass::Status st = Gemm::can_implement(args);
  if (st != cutlass::Status::kSuccess) {
    throw_error(ErrorKind::kRuntime,
                std::string("launch_dx_fused: CUTLASS cannot implement rows=") +
                    std::to_string(a.rows) + " cols=" + std::to_string(a.cols) +
                    " k=" + std::to_string(a.k) + ": " + cutlassGetStatusString(st));
  }
  DeviceBuffer ws(alloc, Gemm::get_workspace_size(args), stream);
  st = gemm.run(args, ws.get(), stream);
  if (st != cutlass::Status::kSuccess) {
    throw_error(ErrorKind::kRuntime,
                std::string("launch_dx_fused: CUTLASS run failed: ") + cutlassGetStatusString(st));
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  if (a.grad_step != nullptr) {
    sum_partials_kernel<<<1, kSumThreads, 0, stream>>>(
        partial.as<double>(), static_cast<int>(parts), lsq_step_gamma(a.rows * a.cols),
        a.grad_step);
    INT4TRAIN_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace cuda_detail
}  // namespace int4train
