// int4train core: tensor views, dtypes and error reporting shared by every component.
// The core knows nothing of PyTorch: every API takes plain views (pointer, dtype, shape, strides)
// and reports bad input by throwing int4train::Error, whose message names the argument.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace int4train {

// Element types a view can hold. kInt4Packed is the packed signed 4-bit format of int4.h: two codes
// per byte, so a row of K codes occupies (K + 1) / 2 bytes. A view's shape always counts logical
// elements (codes), never bytes.
enum class DType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat64 = 2,
  kInt8 = 3,
  kUInt8 = 4,
  kInt32 = 5,
  kInt64 = 6,
  kInt4Packed = 7,
  kFloat8E4M3 = 8,
};

const char* dtype_name(DType dtype);
// Bytes per element; 0 for kInt4Packed (half a byte, see packed_row_bytes in int4.h).
size_t dtype_size(DType dtype);

// Kinds of failure, so that bindings can map them to their own exception types
// (PyTorch: ValueError, TypeError, NotImplementedError, RuntimeError).
enum class ErrorKind : int32_t { kValue = 0, kType = 1, kNotImplemented = 2, kRuntime = 3 };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] void throw_error(ErrorKind kind, const std::string& message);

constexpr int kMaxDims = 4;

// A non-owning view of a strided tensor in host or device memory. Strides count elements, not bytes.
// Most core functions require matrices (ndim == 2) whose rows are contiguous (strides[1] == 1); the
// row stride may exceed the number of columns. Packed INT4 views must be fully contiguous.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int32_t ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};

  int64_t numel() const;
  int64_t rows() const { return ndim == 2 ? shape[0] : (ndim == 1 ? 1 : 0); }
  int64_t cols() const { return ndim >= 1 ? shape[ndim - 1] : 1; }
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// Contiguous views. A null pointer is allowed here and rejected by the function that receives it.
TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape);
TensorView make_matrix(void* data, DType dtype, int64_t rows, int64_t cols);
TensorView make_vector(void* data, DType dtype, int64_t n);
TensorView make_scalar(void* data, DType dtype);  // ndim 0, one element

// ---- argument checks used by every component; each throws Error naming `arg` ----
void check_not_null(const TensorView& t, const char* arg);
void check_dtype(const TensorView& t, const char* arg, std::initializer_list<DType> allowed);
// ndim == 2, non-null, row-contiguous (packed INT4: fully contiguous), non-negative sizes.
void check_matrix(const TensorView& t, const char* arg);
void check_shape(const TensorView& t, const char* arg, int64_t rows, int64_t cols);
void check_vector(const TensorView& t, const char* arg, int64_t n);  // contiguous, n elements
void check_scalar(const TensorView& t, const char* arg);             // exactly one element

}  // namespace int4train
