// int4train PyTorch binding: at::Tensor -> int4train::TensorView conversion and the mapping of
// int4train::Error kinds onto c10 exceptions (Python sees ValueError / TypeError / ...). Private to
// csrc/: the kernels in ops.cpp convert, call the core, and return, nothing more.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "int4train/common.h"
#include "int4train/int4.h"

namespace int4train::pt::detail {

inline DType to_core_dtype(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kChar: return DType::kInt8;
    case at::kByte: return DType::kUInt8;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "int4train: ", arg, " has dtype ", t, ", which the core does not support");
}

// A view of a CPU tensor with up to kMaxDims dimensions (strides in elements, as the tensor's).
inline TensorView to_view(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.defined(), "int4train: ", arg, " is undefined");
  TORCH_CHECK_VALUE(t.dim() <= kMaxDims, "int4train: ", arg, " has ", t.dim(),
                    " dimensions, at most ", kMaxDims, " are supported");
  TensorView v;
  v.data = t.data_ptr();
  v.dtype = to_core_dtype(t.scalar_type(), arg);
  v.ndim = static_cast<int32_t>(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) {
    v.shape[i] = t.size(i);
    v.strides[i] = t.stride(i);
  }
  return v;
}

// An optional tensor: an undefined / absent one becomes a view with a null data pointer.
inline TensorView to_view_or_null(const std::optional<at::Tensor>& t, const char* arg) {
  if (!t.has_value() || !t->defined()) return TensorView{};
  return to_view(*t, arg);
}

// Packed INT4 codes are held by a uint8 tensor of shape (rows, packed_row_bytes(cols)); the view
// carries the logical shape (rows, cols), as int4.h requires.
inline TensorView to_packed_view(const at::Tensor& t, int64_t cols, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kByte, "int4train: ", arg,
                   " (packed int4 codes) must be uint8, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) == packed_row_bytes(cols) && t.is_contiguous(),
                    "int4train: ", arg, " (packed int4 codes of ", cols,
                    " columns) must be a contiguous uint8 tensor of shape [rows, ",
                    packed_row_bytes(cols), "], got shape ", t.sizes());
  return make_matrix(t.data_ptr(), DType::kInt4Packed, t.size(0), cols);
}

[[noreturn]] inline void rethrow_core_error(const Error& e) {
  switch (e.kind()) {
    case ErrorKind::kValue: TORCH_CHECK_VALUE(false, e.what());
    case ErrorKind::kType: TORCH_CHECK_TYPE(false, e.what());
    case ErrorKind::kNotImplemented: TORCH_CHECK_NOT_IMPLEMENTED(false, e.what());
    case ErrorKind::kRuntime: break;
  }
  TORCH_CHECK(false, e.what());
}

// Runs a call into the core, translating int4train::Error into the matching c10 exception.
template <typename F>
auto call_core(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error& e) {
    rethrow_core_error(e);
  }
}

}  // namespace int4train::pt::detail
