// int4train core: tensor views, dtypes and the argument checks every component uses.
#include "int4train/common.h"

#include <sstream>

namespace int4train {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat64: return "float64";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kInt4Packed: return "int4 (packed)";
    case DType::kFloat8E4M3: return "float8_e4m3";
  }
  return "unknown dtype";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    case DType::kInt8: return 1;
    case DType::kUInt8: return 1;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kInt4Packed: return 0;
    case DType::kFloat8E4M3: return 1;
  }
  return 0;
}

void throw_error(ErrorKind kind, const std::string& message) { throw Error(kind, message); }

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

TensorView make_view(void* data, DType dtype, std::initializer_list<int64_t> shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  if (shape.size() > static_cast<size_t>(kMaxDims)) {
    throw_error(ErrorKind::kValue, "make_view: at most 4 dimensions are supported");
  }
  v.ndim = static_cast<int32_t>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

TensorView make_matrix(void* data, DType dtype, int64_t rows, int64_t cols) {
  return make_view(data, dtype, {rows, cols});
}
TensorView make_vector(void* data, DType dtype, int64_t n) { return make_view(data, dtype, {n}); }
TensorView make_scalar(void* data, DType dtype) { return make_view(data, dtype, {}); }

namespace {
std::string shape_string(const TensorView& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.ndim; ++i) os << (i ? ", " : "") << t.shape[i];
  os << "]";
  return os.str();
}
}  // namespace

void check_not_null(const TensorView& t, const char* arg) {
  if (t.data == nullptr && t.numel() > 0) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected a non-null data pointer");
  }
}

void check_dtype(const TensorView& t, const char* arg, std::initializer_list<DType> allowed) {
  for (DType d : allowed) {
    if (t.dtype == d) return;
  }
  std::string names;
  for (DType d : allowed) names += (names.empty() ? "" : ", ") + std::string(dtype_name(d));
  throw_error(ErrorKind::kType, std::string(arg) + ": expected dtype " + names + ", got " +
                                    dtype_name(t.dtype));
}

void check_matrix(const TensorView& t, const char* arg) {
  if (t.ndim != 2) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected a 2-D matrix, got " +
                                       std::to_string(t.ndim) + " dimensions " + shape_string(t));
  }
  if (t.shape[0] < 0 || t.shape[1] < 0) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": negative size " + shape_string(t));
  }
  check_not_null(t, arg);
  if (t.dtype == DType::kInt4Packed) {
    if (!t.is_contiguous()) {
      throw_error(ErrorKind::kValue, std::string(arg) + ": packed INT4 matrices must be contiguous");
    }
    return;
  }
  if (t.shape[1] > 1 && t.strides[1] != 1) {
    throw_error(ErrorKind::kValue,
                std::string(arg) + ": expected contiguous rows (last stride 1), got stride " +
                    std::to_string(t.strides[1]));
  }
  if (t.shape[0] > 1 && t.strides[0] < t.shape[1]) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": row stride " + std::to_string(t.strides[0]) +
                                       " is smaller than the row length " +
                                       std::to_string(t.shape[1]));
  }
}

void check_shape(const TensorView& t, const char* arg, int64_t rows, int64_t cols) {
  check_matrix(t, arg);
  if (t.shape[0] != rows || t.shape[1] != cols) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected shape [" + std::to_string(rows) +
                                       ", " + std::to_string(cols) + "], got " + shape_string(t));
  }
}

void check_vector(const TensorView& t, const char* arg, int64_t n) {
  if (t.numel() != n || !t.is_contiguous()) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected a contiguous vector of " +
                                       std::to_string(n) + " elements, got shape " +
                                       shape_string(t));
  }
  check_not_null(t, arg);
}

void check_scalar(const TensorView& t, const char* arg) {
  if (t.numel() != 1) {
    throw_error(ErrorKind::kValue, std::string(arg) + ": expected a single element, got shape " +
                                       shape_string(t));
  }
  check_not_null(t, arg);
}

}  // namespace int4train
