// int4train CUDA path, sm_90a with CUTLASS: the INT8 product c = a b^T with int32 accumulation
// (kernels.h, cutlass_gemm_s8), which gemm_fp8.cpp's INT8 product takes before cuBLASLt's where it
// applies. Chosen by measurement (bench/gpu/cutlass_s8.cu, docs/cuda.md): of five CUTLASS
// configurations timed against cuBLASLt's INT8 product on the backward's ten products at issue 4's
// shapes on an H200, 128 x 128 x 128 tiles in ping-pong with clusters of 2 along M was the fastest,
// 1.00-1.07x cuBLASLt's time on nine and 0.96x on the smallest; every configuration gave
// cuBLASLt's bits (an int32 sum of int8 products is exact in any order).
//
// CUTLASS's view: A = a (m x k, K-major: row-major), B = b (n x k, K-major: CUTLASS's column-major
// k x n), D = c (m x n row-major, row stride ldc), no C; the epilogue D = 1 * acc in int32.
// Compiled only where the CUTLASS headers are found and sm_90a is built (src/CMakeLists.txt).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_common.h"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "kernels.h"

namespace int4train {
namespace cuda_detail {
namespace {

using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, int32_t, int32_t, void,
    cutlass::layout::RowMajor, 4, int32_t, cutlass::layout::RowMajor, 4,
    cutlass::epilogue::TmaWarpSpecialized,
    cutlass::epilogue::fusion::LinearCombination<int32_t, int32_t, void, int32_t>>::CollectiveOp;
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16,
    int8_t, cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
using Kernel =
    cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
using Stride = cute::Stride<int64_t, cute::Int<1>, int64_t>;
static_assert(std::is_same_v<typename Kernel::StrideA, Stride> &&
                  std::is_same_v<typename Kernel::StrideB, Stride> &&
                  std::is_same_v<typename Kernel::StrideD, Stride>,
              "K-major operands and a row-major output: (row stride, 1, batch stride)");

// Per device, once: whether it is sm_90 (the kernel's only architecture), its SM count (the
// persistent grid) and the kernel's shared-memory attribute set.
struct DeviceInfo {
  bool sm90 = false;
  int sms = 0;
};

DeviceInfo device_info() {
  return per_device([](int dev) {
    DeviceInfo d;
    int major = 0, minor = 0;
    INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev));
    d.sm90 = major == 9 && minor == 0;
    if (d.sm90) {
      INT4TRAIN_CUDA_CHECK(cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                Kernel::SharedStorageSize));
    }
    return d;
  });
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool cutlass_gemm_s8(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                     int64_t ldc, int64_t m, int64_t n, int64_t k, const CudaAllocator& alloc,
                     cudaStream_t stream) {
  if (m <= 0 || n <= 0 || k <= 0 || m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) return false;
  // The TMA rules CUTLASS checks: 16-byte strides and, for the output's contiguous dimension, whole
  // 16-byte vectors (n a multiple of 4 int32).
  if (k % 16 != 0 || lda % 16 != 0 || ldb % 16 != 0 || ldc % 4 != 0 || n % 4 != 0) return false;
  if (!aligned16(a) || !aligned16(b) || !aligned16(c)) return false;
  const DeviceInfo dev = device_info();
  if (!dev.sm90) return false;
  cutlass::KernelHardwareInfo hw;
  hw.device_id = current_device();
  hw.sm_count = dev.sms;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1},
      {a, Stride{lda, cute::Int<1>{}, 0}, b, Stride{ldb, cute::Int<1>{}, 0}},
      {{}, nullptr, Stride{ldc, cute::Int<1>{}, 0}, c, Stride{ldc, cute::Int<1>{}, 0}},
      hw};
  args.epilogue.thread.alpha = 1;
  args.epilogue.thread.beta = 0;
  const cutlass::Status ok = Gemm::can_implement(args);
  if (ok != cutlass::Status::kSuccess) {
    throw_error(ErrorKind::kRuntime, std::string("INT8 product: CUTLASS cannot implement M=") +
                                         std::to_string(m) + " N=" + std::to_string(n) + " K=" +
                                         std::to_string(k) + ": " + cutlassGetStatusString(ok));
  }
  DeviceBuffer ws(alloc, Gemm::get_workspace_size(args), stream);
  cutlass::Status st = Kernel::initialize_workspace(args, ws.get(), stream);
  if (st == cutlass::Status::kSuccess) {
    typename Kernel::Params params = Kernel::to_underlying_arguments(args, ws.get());
    st = Gemm::run(params, stream);
  }
  if (st != cutlass::Status::kSuccess) {
    throw_error(ErrorKind::kRuntime,
                std::string("INT8 product: CUTLASS failed: ") + cutlassGetStatusString(st));
  }
  INT4TRAIN_CUDA_LAUNCH_CHECK();
  return true;
}

}  // namespace cuda_detail
}  // namespace int4train
