// int4train GPU tests: a minimal test runner (the device machine has no GoogleTest), device buffers
// and the host-side helpers the tests share. Every check compares against the CPU core.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "int4train/common.h"
#include "int4train/numeric.h"

namespace gputest {

// ---- runner: named cases, CHECKs that record the first failures of a case and carry on.
struct Case {
  std::string name;
  std::function<void()> fn;
  bool big;  // skipped with --quick (used under compute-sanitizer)
};
std::vector<Case>& registry();
void fail(const char* file, int line, const std::string& what);
int add_case(const std::string& name, bool big, std::function<void()> fn);

#define GPU_CHECK(cond)                                                          \
  do {                                                                           \
    if (!(cond)) ::gputest::fail(__FILE__, __LINE__, "CHECK(" #cond ") failed"); \
  } while (0)

#define GPU_CHECK_MSG(cond, msg)                              \
  do {                                                        \
    if (!(cond)) {                                            \
      std::ostringstream gputest_os_;                         \
      gputest_os_ << "CHECK(" #cond ") failed: " << msg;      \
      ::gputest::fail(__FILE__, __LINE__, gputest_os_.str()); \
    }                                                         \
  } while (0)

#define CUDA_OK(expr)                                                                          \
  do {                                                                                         \
    const cudaError_t e_ = (expr);                                                             \
    if (e_ != cudaSuccess) {                                                                   \
      ::gputest::fail(__FILE__, __LINE__, std::string(#expr " -> ") + cudaGetErrorString(e_)); \
      return;                                                                                  \
    }                                                                                          \
  } while (0)

// ---- device memory
class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0 && cudaMalloc(&ptr_, bytes_) != cudaSuccess) {
      ptr_ = nullptr;
      throw std::runtime_error("cudaMalloc failed");
    }
  }
  ~DevBuf() {
    if (ptr_) cudaFree(ptr_);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }
  // Poison: every byte 0xA5, so unwritten outputs show.
  void poison() { cudaMemset(ptr_, 0xA5, bytes_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

template <typename T>
DevBuf upload(const std::vector<T>& h) {
  DevBuf d(h.size() * sizeof(T));
  if (!h.empty()) cudaMemcpy(d.get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
std::vector<T> download(const DevBuf& d, size_t n) {
  std::vector<T> h(n);
  if (n > 0) cudaMemcpy(h.data(), d.get(), n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

// Runs fn(stream) on the default stream, or (graph) captures it into a CUDA graph on a stream of
// its own (global capture mode) and replays it `replays` times; synchronised either way. With a
// `reset`, a captured fn first runs once outside the capture (cuBLASLt handles and heuristics are
// set up there, not in the graph) and reset() then re-poisons the outputs before the capture.
template <typename Fn>
void run_maybe_captured(bool graph, Fn&& fn, int replays = 1,
                        const std::function<void()>& reset = nullptr) {
  if (!graph) {
    fn(cudaStream_t{nullptr});
    CUDA_OK(cudaDeviceSynchronize());
    return;
  }
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  if (reset) {
    fn(s);
    CUDA_OK(cudaStreamSynchronize(s));
    reset();
  }
  cudaGraph_t g;
  CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  fn(s);
  CUDA_OK(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t exec;
  CUDA_OK(cudaGraphInstantiate(&exec, g, 0));
  for (int i = 0; i < replays; ++i) CUDA_OK(cudaGraphLaunch(exec, s));
  CUDA_OK(cudaStreamSynchronize(s));
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
}

// Independent e4m3 decoder (sign, 4-bit exponent with bias 7, 3-bit mantissa; 0x7F/0xFF NaN).
inline float decode_e4m3(uint8_t b) {
  const int sign = b >> 7, exp = (b >> 3) & 0xF, man = b & 7;
  if (exp == 0xF && man == 7) return NAN;
  const float mag = exp == 0 ? std::ldexp(static_cast<float>(man) / 8.0f, -6)
                             : std::ldexp(1.0f + static_cast<float>(man) / 8.0f, exp - 7);
  return sign ? -mag : mag;
}

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = int4train::float_to_bf16(v[i]).bits;
  return out;
}

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Distance in units in the last place between two floats of the same sign (large for mixed signs).
inline int64_t ulp_distance(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return (std::isnan(a) && std::isnan(b)) ? 0 : INT64_MAX;
  auto key = [](float f) {
    int32_t i;
    std::memcpy(&i, &f, 4);
    return i < 0 ? static_cast<int64_t>(INT32_MIN) - i : static_cast<int64_t>(i);
  };
  const int64_t d = key(a) - key(b);
  return d < 0 ? -d : d;
}

}  // namespace gputest

#define GPU_TEST_CASE(name, big, fn) \
  static const int gputest_reg_##fn = ::gputest::add_case(name, big, fn)
