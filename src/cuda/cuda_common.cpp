// int4train CUDA path: error reporting, device-view checks, the default stream-ordered allocator,
// cuda_available() and the devices' capabilities. Host code only (compiled by the C++ compiler
// against the CUDA runtime).
#include "cuda_common.h"

#include <map>
#include <mutex>
#include <string>
#include <tuple>

namespace int4train {
namespace cuda_detail {

void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw_error(ErrorKind::kRuntime, std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                                       cudaGetErrorString(err) + ") in " + what + " at " + file +
                                       ":" + std::to_string(line));
}

void check_device_matrix(const TensorView& t, const char* arg) {
  if (t.ndim != 2) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected a matrix (2 dimensions), got " +
                                       std::to_string(t.ndim));
  }
  if (t.shape[0] < 0 || t.shape[1] < 0) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected non-negative sizes");
  }
  if (t.numel() == 0) return;
  check_not_null(t, arg);
  if (t.dtype == DType::kInt4Packed) {
    if (!t.is_contiguous()) {
      throw_error(ErrorKind::kValue, std::string(arg) + ": packed INT4 must be contiguous");
    }
    return;
  }
  if (t.shape[1] > 1 && t.strides[1] != 1) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": rows must be contiguous (stride 1), got " +
                                       std::to_string(t.strides[1]));
  }
  if (t.shape[0] > 1 && t.strides[0] < t.shape[1]) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": row stride " +
                                       std::to_string(t.strides[0]) + " is below the row length " +
                                       std::to_string(t.shape[1]));
  }
}

void check_gemm_operand(const TensorView& t, const char* arg, DType dtype) {
  check_dtype(t, arg, {dtype});
  check_device_matrix(t, arg);
  const std::string what =
      std::string(arg) + (dtype == DType::kInt8 ? ": INT8 operand " : ": FP8 operand ");
  if (t.shape[1] % kFp8Align != 0) {
    throw_error(ErrorKind::kValue, what + "width must be a multiple of " +
                                       std::to_string(kFp8Align) + " (fp8_padded_cols), got " +
                                       std::to_string(t.shape[1]));
  }
  if (t.shape[0] > 1 && t.strides[0] % kFp8Align != 0) {
    throw_error(ErrorKind::kValue, what + "row stride must be a multiple of " +
                                       std::to_string(kFp8Align) + ", got " +
                                       std::to_string(t.strides[0]));
  }
  if (reinterpret_cast<uintptr_t>(t.data) % 16 != 0) {
    throw_error(ErrorKind::kValue, what + "must be 16-byte aligned");
  }
}

void check_codes_operand(const TensorView& t, const char* arg, int64_t rows, int64_t cols,
                         std::initializer_list<DType> dtypes) {
  check_dtype(t, arg, dtypes);
  check_gemm_operand(t, arg, t.dtype);
  check_shape(t, arg, rows, fp8_padded_cols(cols));
}

void check_device_scalar(const TensorView& t, const char* arg, DType dtype) {
  check_dtype(t, arg, {dtype});
  check_scalar(t, arg);
  check_not_null(t, arg);
}

void check_row_length(const TensorView& t, const char* arg) {
  if (t.ndim == 2 && t.shape[1] > kMaxRowLength) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": rows of at most " +
                                       std::to_string(kMaxRowLength) + " elements expected, got " +
                                       std::to_string(t.shape[1]));
  }
}

int current_device() {
  int dev = 0;
  INT4TRAIN_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

int resident_blocks(const void* kernel, int threads) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, int> cache;
  int dev = 0;
  INT4TRAIN_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_tuple(kernel, dev, threads);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int per_sm = 0, sms = 0;
  INT4TRAIN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int blocks = (per_sm < 1 ? 1 : per_sm) * (sms < 1 ? 1 : sms);
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = blocks;
  return blocks;
}

DeviceBuffer::DeviceBuffer(const CudaAllocator& alloc, size_t bytes, void* stream)
    : alloc_(alloc), bytes_(bytes), stream_(stream) {
  if (alloc_.allocate == nullptr || alloc_.deallocate == nullptr) {
    throw_error(ErrorKind::kValue, "alloc: expected allocate and deallocate functions");
  }
  if (bytes_ > 0) ptr_ = alloc_.allocate(alloc_.ctx, bytes_, stream_);
  if (bytes_ > 0 && ptr_ == nullptr) {
    throw_error(ErrorKind::kRuntime,
                "alloc: allocation of " + std::to_string(bytes_) + " bytes returned null");
  }
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_ != nullptr) alloc_.deallocate(alloc_.ctx, ptr_, bytes_, stream_);
}

}  // namespace cuda_detail

namespace {
void* default_allocate(void*, size_t bytes, void* stream) {
  void* p = nullptr;
  INT4TRAIN_CUDA_CHECK(cudaMallocAsync(&p, bytes, cuda_detail::as_stream(stream)));
  return p;
}
void default_deallocate(void*, void* ptr, size_t, void* stream) {
  // Never throws (called from destructors); a failure here surfaces at the next checked call.
  (void)cudaFreeAsync(ptr, cuda_detail::as_stream(stream));
}
}  // namespace

CudaAllocator default_cuda_allocator() {
  CudaAllocator a;
  a.allocate = &default_allocate;
  a.deallocate = &default_deallocate;
  return a;
}

bool cuda_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return count > 0;
}

int cuda_compute_capability(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = cache.find(device);
    if (it != cache.end()) return it->second;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
  }
  if (device < 0 || device >= count) {
    throw_error(ErrorKind::kValue, "device: expected a CUDA device index in [0, " +
                                       std::to_string(count) + "), got " + std::to_string(device));
  }
  int major = 0, minor = 0;
  INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  INT4TRAIN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const int cc = 10 * major + minor;
  std::lock_guard<std::mutex> lock(mu);
  cache[device] = cc;
  return cc;
}

GemmEngine resolve_gemm_engine(GemmEngine gemm, int device) {
  const int cc = cuda_compute_capability(device);
  const bool fp8 = cc >= kMinCapabilityFp8;
  if (gemm == GemmEngine::kAuto) return fp8 ? GemmEngine::kFp8 : GemmEngine::kInt8;
  if (gemm == GemmEngine::kFp8 && !fp8) {
    throw_error(ErrorKind::kValue,
                "gemm: fp8 needs FP8 tensor cores (compute capability 8.9 or newer); device " +
                    std::to_string(device) + " has " + std::to_string(cc / 10) + "." +
                    std::to_string(cc % 10) + " (use gemm=int8 or auto)");
  }
  return gemm;
}

}  // namespace int4train
