// int4train core: the block-diagonal Hadamard transform of hadamard.h on the CPU: argument checks,
// the scalar reference, and the fast path (AVX-512 / AVX2 kernels of hadamard_simd.cpp, threaded
// over rows and row segments), which reproduces the reference bit for bit.
#include "int4train/hadamard.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "cpu_features.h"
#include "hadamard_internal.h"
#include "parallel.h"

namespace int4train {

bool is_valid_hadamard_block(int32_t block) {
  return block >= 1 && block <= kMaxHadamardBlock && (block & (block - 1)) == 0;
}

namespace {

// The strided geometry of one matrix, in bytes.
struct Matrix {
  const char* data;
  int64_t row_bytes;   // distance between rows
  int64_t elem_bytes;  // 4 (fp32) or 2 (bf16)
};

Matrix matrix_of(const TensorView& t) {
  const int64_t elem = static_cast<int64_t>(dtype_size(t.dtype));
  const int64_t stride = t.shape[0] > 1 ? t.strides[0] : t.shape[1];
  return Matrix{static_cast<const char*>(t.data), stride * elem, elem};
}

void check_hadamard_args(const TensorView& in, const TensorView& out, int32_t block) {
  check_matrix(in, "in");
  check_dtype(in, "in", {DType::kFloat32, DType::kBFloat16});
  check_dtype(out, "out", {DType::kFloat32, DType::kBFloat16});
  check_shape(out, "out", in.shape[0], in.shape[1]);
  if (!is_valid_hadamard_block(block)) {
    throw_error(ErrorKind::kValue, "block: expected a power of two in [1, " +
                                       std::to_string(kMaxHadamardBlock) + "], got " +
                                       std::to_string(block));
  }
  if (in.shape[1] % block != 0) {
    throw_error(ErrorKind::kValue,
                "block: expected a divisor of the row length D = " + std::to_string(in.shape[1]) +
                    ", got " + std::to_string(block));
  }
  // In place is allowed only as the very same view; any other overlap would read values that were
  // already overwritten.
  if (in.numel() == 0) return;
  const Matrix a = matrix_of(in), b = matrix_of(out);
  const char* a_end = a.data + (in.shape[0] - 1) * a.row_bytes + in.shape[1] * a.elem_bytes;
  const char* b_end = b.data + (out.shape[0] - 1) * b.row_bytes + out.shape[1] * b.elem_bytes;
  const bool overlap = a.data < b_end && b.data < a_end;
  const bool same_view = in.data == out.data && in.dtype == out.dtype && a.row_bytes == b.row_bytes;
  if (overlap && !same_view) {
    throw_error(ErrorKind::kValue,
                "out: overlaps in; in place needs the same data pointer, dtype and strides");
  }
}

float hadamard_scale(int32_t block) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)));
}

template <typename In, typename Out>
void span_scalar(const void* in, void* out, int64_t n, int32_t block, float scale) {
  const In* src = static_cast<const In*>(in);
  Out* dst = static_cast<Out*>(out);
  for (int64_t off = 0; off < n; off += block) {
    detail::hadamard_block_scalar(src + off, dst + off, block, scale);
  }
}

using ScalarSpanFn = void (*)(const void*, void*, int64_t, int32_t, float);

ScalarSpanFn pick_scalar(DType in, DType out) {
  const bool in_f32 = in == DType::kFloat32, out_f32 = out == DType::kFloat32;
  if (in_f32 && out_f32) return &span_scalar<float, float>;
  if (in_f32) return &span_scalar<float, BFloat16>;
  if (out_f32) return &span_scalar<BFloat16, float>;
  return &span_scalar<BFloat16, BFloat16>;
}

}  // namespace

void hadamard_transform_ref(const TensorView& in, TensorView out, int32_t block) {
  check_hadamard_args(in, out, block);
  const Matrix a = matrix_of(in), b = matrix_of(out);
  const ScalarSpanFn span = pick_scalar(in.dtype, out.dtype);
  const float scale = hadamard_scale(block);
  for (int64_t r = 0; r < in.shape[0]; ++r) {
    span(a.data + r * a.row_bytes, const_cast<char*>(b.data) + r * b.row_bytes, in.shape[1], block,
         scale);
  }
}

void hadamard_transform(const TensorView& in, TensorView out, int32_t block) {
  check_hadamard_args(in, out, block);
  const int64_t rows = in.shape[0], cols = in.shape[1];
  if (rows == 0 || cols == 0) return;
  const Matrix a = matrix_of(in), b = matrix_of(out);
  const float scale = hadamard_scale(block);

  detail::HadamardSpanFn simd = nullptr;
  const detail::CpuFeatures& cpu = detail::cpu_features();
  if (detail::hadamard_cpu_has_avx512_bf16()) {
    simd = detail::hadamard_span_avx512_bf16(block, in.dtype, out.dtype);  // bf16 outputs only
  }
  if (simd == nullptr && cpu.avx512)
    simd = detail::hadamard_span_avx512(block, in.dtype, out.dtype);
  if (simd == nullptr && cpu.avx2) simd = detail::hadamard_span_avx2(block, in.dtype, out.dtype);
  const ScalarSpanFn scalar = pick_scalar(in.dtype, out.dtype);

  // Units of work are (row, segment of kSegment values): a multiple of every block and vector
  // width, so that a matrix with few long rows still spreads over the threads.
  constexpr int64_t kSegment = 4096;
  constexpr int64_t kValuesPerChunk = 1 << 15;
  const int64_t segs = (cols + kSegment - 1) / kSegment;
  const int64_t seg_len = std::min(cols, kSegment);
  const int64_t grain = std::max<int64_t>(1, kValuesPerChunk / seg_len);
  detail::parallel_for(rows * segs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / segs;
      const int64_t c0 = (u % segs) * kSegment;
      const int64_t n = std::min(cols, c0 + kSegment) - c0;
      const char* src = a.data + r * a.row_bytes + c0 * a.elem_bytes;
      char* dst = const_cast<char*>(b.data) + r * b.row_bytes + c0 * b.elem_bytes;
      if (simd != nullptr) {
        simd(src, dst, n, scale);
      } else {
        scalar(src, dst, n, block, scale);
      }
    }
  });
}

}  // namespace int4train
