// int4train CUDA path (internal): error checks for the CUDA runtime and cuBLASLt, argument checks
// of device views, and a scoped temporary from a CudaAllocator. Shared by the .cu and .cpp files.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "int4train/common.h"
#include "int4train/cuda.h"
#include "int4train/numeric.h"
#include "int4train/quantize.h"

namespace int4train {
namespace cuda_detail {

[[noreturn]] void throw_cuda(cudaError_t err, const char* what, const char* file, int line);

#define INT4TRAIN_CUDA_CHECK(expr)                                                     \
  do {                                                                                 \
    const cudaError_t int4train_err_ = (expr);                                         \
    if (int4train_err_ != cudaSuccess) {                                               \
      ::int4train::cuda_detail::throw_cuda(int4train_err_, #expr, __FILE__, __LINE__); \
    }                                                                                  \
  } while (0)

// After a kernel launch: reports a bad configuration at once (asynchronous faults surface at the
// next synchronising call, as everywhere in CUDA).
#define INT4TRAIN_CUDA_LAUNCH_CHECK() INT4TRAIN_CUDA_CHECK(cudaGetLastError())

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// A device matrix view: ndim 2, row-contiguous, non-null unless empty.
void check_device_matrix(const TensorView& t, const char* arg);
// A GEMM operand (cuda.h): `dtype` (kFloat8E4M3 or kInt8), cols a multiple of 16, row stride a
// multiple of 16, base address 16-byte aligned.
void check_gemm_operand(const TensorView& t, const char* arg, DType dtype);
// The codes of a rows x cols matrix as a GEMM operand: one of `dtypes`, check_gemm_operand's
// alignment, shape rows x fp8_padded_cols(cols) (a transposed operand: pass cols, rows).
void check_codes_operand(const TensorView& t, const char* arg, int64_t rows, int64_t cols,
                         std::initializer_list<DType> dtypes);
// An fp32 / int64 / uint32 device scalar (one element).
void check_device_scalar(const TensorView& t, const char* arg, DType dtype);

// The longest row (in elements) that the warp-per-chunk kernels take, so that their column indices
// fit in int32; check_row_length throws an Error naming `arg` beyond it.
constexpr int64_t kMaxRowLength = (int64_t{1} << 31) - 512;
void check_row_length(const TensorView& t, const char* arg);

// Row stride in elements of a matrix view (the row length when there is one row).
inline int64_t row_stride(const TensorView& t) {
  return t.shape[0] > 1 ? t.strides[0] : t.shape[1];
}

// Blocks for a persistent grid-stride kernel: as many as fill every multiprocessor of the current
// device at the kernel's occupancy (threads per block, no dynamic shared memory), at most `needed`
// and at least 1. The grid of a kernel depends only on the device and `needed`, never on which
// kernels ran before.
int resident_blocks(const void* kernel, int threads);  // cached per (kernel, device, threads)

// The calling thread's current CUDA device (cudaGetDevice).
int current_device();
template <typename Kernel>
int persistent_blocks(Kernel kernel, int threads, int64_t needed) {
  const int64_t full = resident_blocks(reinterpret_cast<const void*>(kernel), threads);
  return static_cast<int>(needed < 1 ? 1 : (needed < full ? needed : full));
}

// Blocks for a grid-stride kernel over `items` work items, `per_block` per block: at least 1, at
// most `cap` (the kernels loop over what a capped grid leaves).
inline int grid_blocks(int64_t items, int64_t per_block, int64_t cap = int64_t{1} << 20) {
  int64_t b = (items + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<int>(b);
}

inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// float(1 / sqrt(double(block))): the Hadamard transform's scale, as the CPU computes it.
inline float hadamard_scale(int32_t block) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
}

// LSQ's step-gradient scale 1 / sqrt(numel * Qp) (0 for an empty tensor), as the CPU computes it.
inline double lsq_step_gamma(int64_t numel) {
  return numel > 0 ? 1.0 / std::sqrt(static_cast<double>(numel) * kLsqQp) : 0.0;
}

// f(std::integral_constant<int, G>{}) for the Hadamard block G = block (a power of two <= 256): the
// one place where a runtime block picks a kernel instantiation. Any other block is an Error naming
// `block` (the callers check it first).
template <typename F>
decltype(auto) dispatch_block(int32_t block, F&& f) {
  switch (block) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 8:
      return f(std::integral_constant<int, 8>{});
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    default:
      throw_error(ErrorKind::kValue,
                  "block: expected a power of two <= 256, got " + std::to_string(block));
  }
}

// f(In{}, std::bool_constant<a>{}, std::bool_constant<b>{}) with In = BFloat16 or float (bf16)
// for two runtime flags: where a kernel's input type and two flags pick its instantiation. f gets a
// value of In only as a tag (its type).
template <typename F>
void dispatch_input_flags(bool bf16, bool a, bool b, F&& f) {
  auto flags = [&](auto in) {
    auto second = [&](auto fa) { b ? f(in, fa, std::true_type{}) : f(in, fa, std::false_type{}); };
    a ? second(std::true_type{}) : second(std::false_type{});
  };
  bf16 ? flags(BFloat16{}) : flags(float{});
}

// A temporary from an allocator, released (stream-ordered) when it goes out of scope.
class DeviceBuffer {
 public:
  DeviceBuffer(const CudaAllocator& alloc, size_t bytes, void* stream);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  CudaAllocator alloc_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  void* stream_ = nullptr;
};

}  // namespace cuda_detail
}  // namespace int4train
