// GPU tests of hq_bs's fused input-gradient kernel (src/cuda/cutlass/dx_fused.cu, launch_dx_fused)
// against the pair it replaces, the INT8 product (gemm_s8_s32_cuda) followed by launch_dx_epilogue,
// which the layer tests hold equal to the CPU core: grad_x bit for bit (bf16 and fp32, every
// Hadamard block, row exponents, rows that do not fill a tile, a row stride beyond the row, values
// that overflow to Inf and NaN) and the step gradient within one fp32 ulp (the same fp64 terms
// summed in another fixed order). Built only with the fused kernel (INT4TRAIN_HAVE_CUTLASS_DX); on
// a device other than sm_90 the cases check that the kernel is declined.
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "int4train/cuda.h"
#include "int4train/quantize.h"
#include "kernels.h"

#ifdef INT4TRAIN_HAVE_CUTLASS_DX
namespace {

using namespace int4train;
using namespace int4train::cuda_detail;
using gputest::DevBuf;

struct FusedCase {
  int64_t rows, cols, k;
  int32_t block;
  bool row_exps, bf16, out, step;
  int64_t ld_pad;  // grad_x's row stride beyond cols
  float s1;        // the gradient's scale (large: values that overflow)
};

std::string case_name(const FusedCase& c) {
  return std::to_string(c.rows) + "x" + std::to_string(c.cols) + "_k" + std::to_string(c.k) + "_g" +
         std::to_string(c.block) + (c.row_exps ? "_rows" : "") +
         (c.out ? (c.bf16 ? "_bf16" : "_f32") : "_noout") + (c.step ? "_step" : "") +
         (c.ld_pad ? "_ld" : "") + (c.s1 > 1e30f ? "_inf" : "");
}

bool sm90() {
  int dev = 0;
  cudaGetDevice(&dev);
  return cuda_compute_capability(dev) == 90;
}

void run_case(const FusedCase& c) {
  std::mt19937 rng(static_cast<uint32_t>(c.rows * 131 + c.cols * 7 + c.k + c.block));
  std::uniform_int_distribution<int> q8(-128, 127), code(-8, 7), byte(0, 255), kexp(-3, 12);
  std::vector<int8_t> q(c.rows * c.k), wt(c.cols * c.k);
  for (auto& v : q) v = static_cast<int8_t>(q8(rng));
  for (auto& v : wt) v = static_cast<int8_t>(code(rng));
  std::vector<uint8_t> packed(c.rows * c.cols / 2), aux(compact_aux_bytes(c.rows, c.cols));
  for (auto& v : packed) v = static_cast<uint8_t>(byte(rng));
  for (auto& v : aux) v = static_cast<uint8_t>(byte(rng));
  std::vector<int8_t> rexp(c.rows);
  for (auto& v : rexp) v = static_cast<int8_t>(kexp(rng));
  const std::vector<float> scales = {c.s1, 0.0371f};
  DevBuf dq = gputest::upload(q), dwt = gputest::upload(wt), dpacked = gputest::upload(packed),
         daux = gputest::upload(aux), drexp = gputest::upload(rexp),
         dscales = gputest::upload(scales);
  const int64_t ldo = c.cols + c.ld_pad, esize = c.bf16 ? 2 : 4;
  DevBuf out_ref(c.out ? c.rows * ldo * esize : 0), out_fused(c.out ? c.rows * ldo * esize : 0);
  DevBuf step_ref(4), step_fused(4), prod(c.rows * c.cols * 4);
  if (c.out) {
    out_ref.poison();
    out_fused.poison();
  }
  const CudaAllocator alloc = default_cuda_allocator();
  const DType odt = c.bf16 ? DType::kBFloat16 : DType::kFloat32;
  auto out_view = [&](const DevBuf& b) {
    if (!c.out) return TensorView{};
    TensorView v = make_matrix(b.get(), odt, c.rows, c.cols);
    v.strides[0] = ldo;
    return v;
  };
  const int8_t* row_exps = c.row_exps ? drexp.as<int8_t>() : nullptr;
  const float* s1 = dscales.as<float>();
  const float* s2 = dscales.as<float>() + 1;

  // The reference: the product, then the epilogue kernel.
  gemm_s8_s32_cuda(make_matrix(dq.get(), DType::kInt8, c.rows, c.k),
                   make_matrix(dwt.get(), DType::kInt8, c.cols, c.k),
                   make_matrix(prod.get(), DType::kInt32, c.rows, c.cols), alloc, nullptr);
  SplitPartials pp{prod.get(), c.cols, true, 1, 0};
  pp.row_exps = row_exps;
  launch_dx_epilogue(
      pp, nullptr, s1, s2, make_matrix(dpacked.get(), DType::kInt4Packed, c.rows, c.cols),
      make_vector(daux.get(), DType::kUInt8, static_cast<int64_t>(aux.size())), c.block,
      out_view(out_ref), c.step ? make_scalar(step_ref.get(), DType::kFloat32) : TensorView{},
      alloc, nullptr);

  const FusedDxArgs args{dq.as<int8_t>(),
                         c.k,
                         dwt.as<int8_t>(),
                         c.k,
                         c.rows,
                         c.cols,
                         c.k,
                         s1,
                         s2,
                         row_exps,
                         dpacked.as<uint8_t>(),
                         daux.as<uint8_t>(),
                         c.block,
                         c.out ? out_fused.get() : nullptr,
                         c.bf16,
                         c.out ? ldo : 0,
                         c.step ? step_fused.as<float>() : nullptr};
  if (!sm90()) {
    GPU_CHECK_MSG(!dx_fused_supported(args), "the fused kernel is sm_90a only");
    return;
  }
  GPU_CHECK_MSG(dx_fused_supported(args), "the fused kernel must take " << case_name(c));
  launch_dx_fused(args, alloc, nullptr);
  CUDA_OK(cudaDeviceSynchronize());

  if (c.out) {
    const size_t n = c.rows * ldo * esize;
    const std::vector<uint8_t> a = gputest::download<uint8_t>(out_ref, n),
                               b = gputest::download<uint8_t>(out_fused, n);
    int64_t bad = 0, first = -1;
    for (int64_t r = 0; r < c.rows; ++r) {
      for (int64_t j = r * ldo * esize; j < (r * ldo + c.cols) * esize; ++j) {
        if (a[j] != b[j]) {
          if (first < 0) first = j / esize;
          ++bad;
        }
      }
      // The row stride's padding stays untouched (poisoned).
      for (int64_t j = (r * ldo + c.cols) * esize; j < (r + 1) * ldo * esize; ++j) {
        if (b[j] != 0xA5) ++bad;
      }
    }
    GPU_CHECK_MSG(bad == 0, bad << " bytes differ from the unfused pair's; first element " << first
                                << " (row " << (first >= 0 ? first / ldo : -1) << ")");
  }
  if (c.step) {
    const float a = gputest::download<float>(step_ref, 1)[0],
                b = gputest::download<float>(step_fused, 1)[0];
    GPU_CHECK_MSG(gputest::ulp_distance(a, b) <= 1,
                  "step gradient " << b << " against the unfused pair's " << a);
  }
}

// Arguments the fused kernel must decline (the layer then takes the unfused pair).
void test_declines() {
  alignas(16) static int8_t dummy[64];
  const FusedDxArgs ok{dummy,
                       16,
                       dummy,
                       16,
                       8,
                       256,
                       16,
                       nullptr,
                       nullptr,
                       nullptr,
                       reinterpret_cast<uint8_t*>(dummy),
                       reinterpret_cast<uint8_t*>(dummy),
                       256,
                       nullptr,
                       true,
                       0,
                       nullptr};
  GPU_CHECK(dx_fused_supported(ok) == sm90());
  FusedDxArgs a = ok;
  a.cols = 384;  // not whole 256-column tiles
  GPU_CHECK(!dx_fused_supported(a));
  a = ok;
  a.k = 24;  // K not a multiple of 16
  GPU_CHECK(!dx_fused_supported(a));
  a = ok;
  a.q = dummy + 1;  // a misaligned operand
  GPU_CHECK(!dx_fused_supported(a));
  a = ok;
  a.aux = reinterpret_cast<uint8_t*>(dummy) + 4;
  GPU_CHECK(!dx_fused_supported(a));
  a = ok;
  a.out = dummy;
  a.ldo = 257;  // bf16 rows not 4-byte aligned
  GPU_CHECK(!dx_fused_supported(a));
  a = ok;
  a.rows = 0;
  GPU_CHECK(!dx_fused_supported(a));
}

const bool registered = [] {
  const FusedCase cases[] = {
      {1, 256, 16, 256, false, true, true, true, 0, 1.5e-3f},
      {130, 512, 64, 16, true, false, true, true, 8, 2.0e-3f},
      {333, 768, 4096, 128, true, true, true, true, 0, 1.0e-6f},
      {64, 256, 48, 1, false, true, false, true, 0, 1.0e-3f},
      {200, 256, 32, 2, false, true, true, false, 0, 1.0e-3f},
      {200, 256, 32, 4, true, true, true, true, 0, 1.0e-3f},
      {200, 256, 32, 8, false, false, true, true, 0, 1.0e-3f},
      {200, 256, 32, 32, true, true, true, true, 2, 1.0e-3f},
      {200, 256, 32, 64, false, true, true, true, 0, 1.0e-3f},
      {129, 1024, 160, 256, true, true, true, true, 0, 1.0e-3f},
      {70, 256, 32, 256, false, true, true, true, 0, 3.0e38f},  // Inf, and NaN after the rotation
      {4096, 4096, 4096, 256, true, true, true, true, 0, 1.0e-5f},
  };
  for (const FusedCase& c : cases) {
    gputest::add_case("dx_fused/" + case_name(c), c.rows * c.cols > (int64_t{1} << 22),
                      [=] { run_case(c); });
  }
  gputest::add_case("dx_fused/declines", false, test_declines);
  return true;
}();

}  // namespace
#endif  // INT4TRAIN_HAVE_CUTLASS_DX
