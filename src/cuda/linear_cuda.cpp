// int4train CUDA path: the quantized linear layer's forward on the device, composed from the fused
// quantizer and the FP8 product exactly as src/cpu/linear.cpp composes the CPU components, so that
// the two agree bit for bit. No host synchronisation: the non-finite report stays on the device.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda_common.h"
#include "int4train/cuda.h"
#include "int4train/hadamard.h"
#include "int4train/int4.h"
#include "int4train/linear.h"
#include "int4train/lss.h"
#include "int4train/quantize.h"
#include "kernels.h"

namespace int4train {

void linear_forward_cuda(const LinearConfig& cfg, const LinearForwardArgs& a,
                         const CudaAllocator& alloc, void* stream) {
  using namespace cuda_detail;
  if (!recipe_uses_lsq(cfg.recipe)) {
    throw_error(ErrorKind::kNotImplemented,
                std::string("recipe: linear_forward_cuda implements the LSQ recipes (lsq_luq, hq, "
                            "hq_bs, hq_lss), got ") +
                    recipe_name(cfg.recipe));
  }
  check_dtype(a.x, "x", {DType::kFloat32, DType::kBFloat16});
  check_dtype(a.w, "w", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(a.x, "x");
  check_device_matrix(a.w, "w");
  const int64_t n = a.x.shape[0], d = a.x.shape[1], c = a.w.shape[0];
  if (a.w.shape[1] != d) {
    throw_error(ErrorKind::kValue, "w: expected " + std::to_string(d) +
                                       " columns (in_features of x), got " +
                                       std::to_string(a.w.shape[1]));
  }
  const int32_t g = cfg.hadamard_block;
  if (recipe_uses_hadamard(cfg.recipe)) {
    if (!is_valid_hadamard_block(g) || (d > 0 && d % g != 0)) {
      throw_error(
          ErrorKind::kValue,
          "hadamard_block: expected a power of two <= " + std::to_string(kMaxHadamardBlock) +
              " dividing in_features = " + std::to_string(d) + ", got " + std::to_string(g));
    }
  } else if (g != 1) {
    throw_error(ErrorKind::kValue,
                std::string("hadamard_block: recipe ") + recipe_name(cfg.recipe) +
                    " uses no Hadamard transform, expected 1, got " + std::to_string(g));
  }
  check_dtype(a.y, "y", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(a.y, "y");
  check_shape(a.y, "y", n, c);
  check_device_scalar(a.step_x, "step_x", DType::kFloat32);
  check_device_scalar(a.step_w, "step_w", DType::kFloat32);
  check_dtype(a.saved_codes, "saved_codes", {DType::kInt4Packed});
  check_shape(a.saved_codes, "saved_codes", n, d);
  check_dtype(a.saved_aux, "saved_aux", {DType::kUInt8});
  check_vector(a.saved_aux, "saved_aux", compact_aux_bytes(n, d));
  if (a.saved_step.data != nullptr) check_device_scalar(a.saved_step, "saved_step", DType::kInt64);
  if (a.saved_scale.data != nullptr) {
    check_device_scalar(a.saved_scale, "saved_scale", DType::kFloat32);
  }

  const bool s8 = resolve_gemm_engine(cfg.gemm, current_device()) == GemmEngine::kInt8;
  const DType op_dtype = s8 ? DType::kInt8 : DType::kFloat8E4M3;
  const cudaStream_t s = as_stream(stream);
  const int64_t dp = fp8_padded_cols(d);
  // One 256-byte-aligned temporary: the header (the passes' non-finite count, the W pass's ticket,
  // the product's scale, 16-byte aligned for cuBLASLt), then the two operands (16-byte aligned
  // rows).
  const size_t x_bytes = static_cast<size_t>(n * dp), w_bytes = static_cast<size_t>(c * dp);
  const size_t x_off = 256, w_off = x_off + (x_bytes + 255) / 256 * 256;
  DeviceBuffer tmp(alloc, w_off + w_bytes, stream);
  char* base = tmp.as<char>();
  auto* counter = reinterpret_cast<unsigned long long*>(base);
  auto* ticket = reinterpret_cast<unsigned int*>(base + 8);
  auto* alpha = reinterpret_cast<float*>(base + 16);
  // One launch for the small things: the counters zeroed, the product's scale s_x s_w (NaN after
  // the W pass where a value was not finite), the saved step and scale.
  launch_forward_prologue(counter, ticket, a.step_x.ptr<const float>(), a.step_w.ptr<const float>(),
                          alpha, cfg.device_step, static_cast<int64_t>(cfg.step),
                          a.saved_step.data != nullptr ? a.saved_step.ptr<int64_t>() : nullptr,
                          a.saved_scale.data != nullptr ? a.saved_scale.ptr<float>() : nullptr, s);
  const TensorView cnt = make_scalar(counter, DType::kInt64);
  const TensorView opx = make_matrix(base + x_off, op_dtype, n, dp);
  const TensorView opw = make_matrix(base + w_off, op_dtype, c, dp);
  const RandomKey aux_key{cfg.seed, make_stream(cfg.step, cfg.layer, RandomPurpose::kLsqAux),
                          cfg.device_step};
  hadamard_lsq_quantize_cuda(a.x, g, a.step_x, aux_key, opx, a.saved_codes, a.saved_aux, cnt,
                             stream);
  hadamard_lsq_quantize_alpha(a.w, g, a.step_w, opw, cnt, ticket, alpha, stream);
  (s8 ? gemm_s8_cuda : gemm_fp8_cuda)(opx, opw, make_scalar(alpha, DType::kFloat32), TensorView{},
                                      a.bias, a.y, alloc, stream);
}

namespace {

// A temporary matrix view over a DeviceBuffer.
struct Temp {
  cuda_detail::DeviceBuffer buf;
  TensorView view;
  Temp(const CudaAllocator& alloc, void* stream, DType dtype, int64_t rows, int64_t cols)
      : buf(alloc,
            static_cast<size_t>(dtype == DType::kInt4Packed
                                    ? rows * ((cols + 1) / 2)
                                    : rows * cols * static_cast<int64_t>(dtype_size(dtype))),
            stream),
        view(make_matrix(buf.get(), dtype, rows, cols)) {}
};

}  // namespace

void linear_backward_cuda(const LinearConfig& cfg, const LinearBackwardArgs& a,
                          const CudaAllocator& alloc, void* stream) {
  using namespace cuda_detail;
  const bool lss = cfg.recipe == Recipe::kHqLss;
  if (cfg.recipe != Recipe::kHqBs && !lss) {
    throw_error(ErrorKind::kNotImplemented,
                std::string("recipe: linear_backward_cuda implements hq_bs and hq_lss so far, got ") +
                    recipe_name(cfg.recipe));
  }
  const bool by_row = cfg.grad_scale == GradScaleMode::kRow;
  check_dtype(a.grad_y, "grad_y", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(a.grad_y, "grad_y");
  check_dtype(a.w, "w", {DType::kFloat32, DType::kBFloat16});
  check_device_matrix(a.w, "w");
  const int64_t n = a.grad_y.shape[0], c = a.grad_y.shape[1], d = a.w.shape[1];
  if (a.w.shape[0] != c) {
    throw_error(ErrorKind::kValue, "w: expected " + std::to_string(c) +
                                       " rows (out_features of grad_y), got " +
                                       std::to_string(a.w.shape[0]));
  }
  const int32_t g = cfg.hadamard_block;
  if (!is_valid_hadamard_block(g) || (d > 0 && d % g != 0)) {
    throw_error(ErrorKind::kValue,
                "hadamard_block: expected a power of two <= " + std::to_string(kMaxHadamardBlock) +
                    " dividing in_features = " + std::to_string(d) + ", got " + std::to_string(g));
  }
  check_device_scalar(a.step_x, "step_x", DType::kFloat32);
  check_device_scalar(a.step_w, "step_w", DType::kFloat32);
  check_dtype(a.saved_codes, "saved_codes", {DType::kInt4Packed});
  check_shape(a.saved_codes, "saved_codes", n, d);
  check_dtype(a.saved_aux, "saved_aux", {DType::kUInt8});
  check_vector(a.saved_aux, "saved_aux", compact_aux_bytes(n, d));
  const bool want_dx = a.grad_x.data != nullptr, want_dw = a.grad_w.data != nullptr;
  if (want_dx) {
    check_dtype(a.grad_x, "grad_x", {DType::kFloat32, DType::kBFloat16});
    check_shape(a.grad_x, "grad_x", n, d);
  }
  if (want_dw) {
    check_dtype(a.grad_w, "grad_w", {DType::kFloat32, DType::kBFloat16});
    check_shape(a.grad_w, "grad_w", c, d);
  }
  if (lss) {
    check_lss_budget(cfg.lss_budget);
    // The device sampling's limits (the CPU's are wider): 2N rows in one int32-indexed selection,
    // and exact int32 row sums of squared codes (at most 64 per element) of grad_y's and the saved
    // codes' rows.
    constexpr int64_t kMaxRow = (int64_t{1} << 31) / 64 - 1;
    if (2 * n > INT32_MAX) {
      throw_error(
          ErrorKind::kValue,
          "grad_y: hq_lss on the device samples 2N <= 2^31 - 1 rows, got N = " + std::to_string(n));
    }
    if (c > kMaxRow) {
      throw_error(ErrorKind::kValue, "grad_y: hq_lss on the device takes rows of at most " +
                                         std::to_string(kMaxRow) + " elements, got " +
                                         std::to_string(c));
    }
    if (d > kMaxRow && (want_dw || a.grad_step_w.data != nullptr)) {  // the saved codes' row sums
      throw_error(ErrorKind::kValue, "saved_codes: hq_lss on the device takes rows of at most " +
                                         std::to_string(kMaxRow) + " elements, got " +
                                         std::to_string(d));
    }
  }
  long long* kept = nullptr;  // rows_kept: (input, weight), int64 device vector
  if (a.rows_kept.data != nullptr) {
    check_dtype(a.rows_kept, "rows_kept", {DType::kInt64});
    check_vector(a.rows_kept, "rows_kept", 2);
    kept = a.rows_kept.ptr<long long>();
  }
  // The one product on FP8 is hq_lss's compacted input gradient under the FP8 engine; hq_bs's
  // products, the weight gradient and the INT8 engine's everything run on INT8 operands.
  const bool fp8_dx = lss && resolve_gemm_engine(cfg.gemm, current_device()) == GemmEngine::kFp8;
  const DType dx_op = fp8_dx ? DType::kFloat8E4M3 : DType::kInt8;
  const cudaStream_t s = as_stream(stream);
  if (kept != nullptr) INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(kept, 0, 2 * sizeof *kept, s));
  if (a.grad_bias.data != nullptr) {
    check_dtype(a.grad_bias, "grad_bias", {DType::kFloat32, DType::kBFloat16});
    check_vector(a.grad_bias, "grad_bias", c);
  }
  const bool dom_dx = want_dx || a.grad_step_x.data != nullptr;
  const bool dom_dw = want_dw || a.grad_step_w.data != nullptr;
  if (!dom_dx && !dom_dw) {
    // The bias gradient alone: the bit split's reduction pass without the split.
    if (a.grad_bias.data != nullptr) {
      launch_absmax_column_sums(a.grad_y, nullptr, a.grad_bias, alloc, s);
    }
    return;
  }

  // Bit split of grad_y. hq_bs: q = 16 hi + lo as one INT8 operand row per token (INT8 rows cost
  // what FP8 rows cost on Hopper, so both products have N rows, like hq_lss's compacted ones, and
  // sample nothing), and q^T for the weight gradient from the same pass. hq_lss: the stacked FP8
  // operand [hi; lo] and the packed codes for the transposes (one buffer of 2N code rows, hi
  // first: the compacted gather indexes it by bit-split row).
  // The bias gradient's row-block totals and the two step gradients' sums: one launch at the end
  // (sums.finish()) instead of one after each pass.
  DeferredSums sums(alloc, stream);
  const RandomKey gkey{cfg.seed, make_stream(cfg.step, cfg.layer, RandomPurpose::kGradRound),
                       cfg.device_step};
  const int64_t cp = fp8_padded_cols(c), np = fp8_padded_cols(n);
  Temp r_op(alloc, stream, dx_op, lss ? 2 * n : (dom_dx ? n : 0), cp);
  Temp q_t(alloc, stream, DType::kInt8, !lss && dom_dw ? c : 0, np);
  Temp hilo(alloc, stream, DType::kInt4Packed, lss ? 2 * n : 0, c);
  const int64_t row_bytes = packed_row_bytes(c);
  const TensorView hi = make_matrix(hilo.buf.get(), DType::kInt4Packed, n, c);
  const TensorView lo =
      make_matrix(hilo.buf.as<uint8_t>() + n * row_bytes, DType::kInt4Packed, n, c);
  Temp sg(alloc, stream, DType::kFloat32, 1, 1);
  const TensorView sg_v = make_scalar(sg.buf.get(), DType::kFloat32);
  // grad_scale=row: each token's exponent k (its rows of q, or of hi and lo, at s_g 2^-k). The
  // input gradient's token rows are scaled by 2^-k in the epilogue; the weight gradient's reduction
  // runs over tokens, so 2^(4 - k) goes into the tokens' x codes (|8 * 16| <= 128, int8) and the
  // sum is scaled by 2^-4: the CPU's integers (src/cpu/linear.cpp). hq_lss's scores carry 2^-k.
  Temp row_exp(alloc, stream, DType::kInt8, by_row ? 1 : 0, by_row ? n : 0);
  if (by_row) row_exp.view = make_vector(row_exp.buf.get(), DType::kInt8, n);
  // hq_lss: the rows' exact sums of squared codes (the scores), then per gradient the scores and
  // the selection (lss.h, the same rows as the CPU's): exponents (hi rows first; -1 dropped) and
  // the kept rows' slots in the compacted products of `capacity` rows. Both selections in one
  // launch.
  Temp rsq(alloc, stream, DType::kInt32, 1, lss ? 2 * n : 0);
  const TensorView rsq_v = lss ? make_vector(rsq.buf.get(), DType::kInt32, 2 * n) : TensorView{};
  const bool lss_dx = lss && dom_dx, lss_dw = lss && dom_dw;
  if (lss) {
    quantize_bitsplit(a.grad_y, gkey, r_op.view, lss_dw ? hi : TensorView{},
                      lss_dw ? lo : TensorView{}, rsq_v, sg_v, a.grad_bias, alloc, stream,
                      by_row ? row_exp.view : TensorView{}, &sums);
  } else {
    quantize_bitsplit_q8(a.grad_y, gkey, dom_dx ? r_op.view : TensorView{},
                         dom_dw ? q_t.view : TensorView{}, sg_v, a.grad_bias, alloc, stream,
                         by_row ? row_exp.view : TensorView{}, &sums);
  }
  const double budget = cfg.lss_budget * static_cast<double>(n);
  const int64_t capacity = lss ? lss_capacity(budget, 2 * n) : 0;
  struct Selection {
    Temp scores, exps, slots, slot_rows;
    Selection(const CudaAllocator& al, void* st, int64_t rows, int64_t slotted, int64_t cap)
        : scores(al, st, DType::kFloat32, 1, rows),
          exps(al, st, DType::kInt8, 1, rows),
          slots(al, st, DType::kInt32, 1, slotted),
          slot_rows(al, st, DType::kInt32, 1, cap) {}
    LssSampleArgs args(const LinearConfig& cfg, RandomPurpose purpose, double budget,
                       long long* kept) {
      return LssSampleArgs{scores.buf.as<float>(),
                           exps.view.shape[1],
                           budget,
                           kLssMaxExponent,
                           slot_rows.view.shape[1],
                           cfg.seed,
                           make_stream(cfg.step, cfg.layer, purpose),
                           cfg.device_step,
                           exps.buf.as<int8_t>(),
                           slots.view.shape[1] > 0 ? slots.buf.as<int32_t>() : nullptr,
                           slot_rows.buf.as<int32_t>(),
                           kept};
    }
  };
  Selection sel_x(alloc, stream, lss_dx ? 2 * n : 0, lss_dx ? 2 * n : 0, lss_dx ? capacity : 0);
  Selection sel_w(alloc, stream, lss_dw ? 2 * n : 0, 0, lss_dw ? capacity : 0);
  const int8_t* row_exps = by_row ? row_exp.buf.as<int8_t>() : nullptr;
  if (lss) {
    LssSampleArgs batch[kMaxLssBatch];
    int count = 0;
    if (lss_dx) {
      launch_lss_scores(rsq.buf.as<int32_t>(), nullptr, row_exps, n, sel_x.scores.buf.as<float>(),
                        s);
      batch[count++] = sel_x.args(cfg, RandomPurpose::kSampleInput, budget, kept);
    }
    if (lss_dw) {
      Temp xsq(alloc, stream, DType::kInt32, 1, n);
      launch_packed_row_sumsq(a.saved_codes.ptr<const uint8_t>(), n, d, xsq.buf.as<int32_t>(), s);
      launch_lss_scores(rsq.buf.as<int32_t>(), xsq.buf.as<int32_t>(), row_exps, n,
                        sel_w.scores.buf.as<float>(), s);
      batch[count++] = sel_w.args(cfg, RandomPurpose::kSampleWeight, budget,
                                  kept != nullptr ? kept + 1 : nullptr);
    }
    if (count > 0) launch_lss_sample(batch, count, s);
  }

  // The products over K beyond the INT8 bound (kMaxKInt8, any int8 values) run in K-chunks, whose
  // int32 partial products the epilogues add in fp64: column block k0 .. k0 + kc of an operand.
  const int64_t kmax = kMaxKInt8 / kFp8Align * kFp8Align;
  const auto k_chunks = [&](int64_t kdim) { return kdim > kmax ? (kdim + kmax - 1) / kmax : 1; };
  const auto k_cols = [&](const Temp& t, int64_t rows, int64_t kdim, int64_t k) {
    const int64_t k0 = k * kmax, kc = kdim - k0 < kmax ? kdim - k0 : kmax;
    if (k0 == 0 && kc == kdim) return t.view;
    TensorView v = make_matrix(t.buf.as<char>() + k0, t.view.dtype, rows, kc);
    v.strides[0] = kdim;
    return v;
  };
  // The int32 products of a x b^T chunk by chunk into `out` (chunks x rows x cols).
  const auto s8_product = [&](const Temp& at, int64_t rows, const Temp& bt, int64_t cols,
                              int64_t kdim, const Temp& out) {
    for (int64_t k = 0; k < k_chunks(kdim); ++k) {
      gemm_s8_s32_cuda(
          k_cols(at, rows, kdim, k), k_cols(bt, cols, kdim, k),
          make_matrix(out.buf.as<int32_t>() + k * rows * cols, DType::kInt32, rows, cols), alloc,
          stream);
    }
  };

  // The input gradient's product takes W's codes transposed (W is unchanged since the forward: its
  // codes again, the forward's bits, as an operand). The weight gradient's epilogue, which
  // computes them for the weight's LSQ backward, writes them, so it runs first; where it does not
  // (no weight gradient wanted, a layout it does not take, more than 65,535 tiles of 16 rows of
  // W), the W pass does.
  Temp qwt(alloc, stream, dx_op, dom_dx ? d : 0, cp);
  bool qwt_ready = false;
  if (dom_dw) {
    // dW~ = s_g s_x (16 Qhi^T + Qlo^T) Qx, one INT8 product whose reduction runs over tokens.
    // hq_bs: q^T against the x codes (K = N). hq_lss: over the `capacity` compacted slots: slot j
    // holds kept bit-split row i's codes times 2^k_i and its token's x codes times 16 for a hi row
    // (both int8: |code 2^k| <= 128, |16 x| <= 128), so K = capacity and the product is the whole
    // sum; such terms (|ab| <= 2^14) are not summed exactly by the FP8 tensor cores (cuda.h).
    // hq_lss with row scales: the token side holds 2^(4 - k) x for both rows, which leaves no room
    // for the hi rows' 16, so the hi and lo rows take a product each over the same slots (gt with
    // the lo rows' exponents -1, zero columns; gt_lo with the hi rows'), added as 16 hi + lo.
    const int64_t kdim = lss ? fp8_padded_cols(capacity) : np;
    const bool lss_rows = lss && by_row;
    Temp gt(alloc, stream, DType::kInt8, lss ? c : 0, kdim),
        gt_lo(alloc, stream, DType::kInt8, lss_rows ? c : 0, kdim),
        qxt(alloc, stream, DType::kInt8, d, kdim);
    if (lss) {
      const TensorView map = make_vector(sel_w.slot_rows.buf.get(), DType::kInt32, capacity);
      const TensorView exps = make_vector(sel_w.exps.buf.get(), DType::kInt8, 2 * n);
      // The token side's exponents of the 2N bit-split rows: 4 for the hi rows (their x16), 0 for
      // the lo rows; with row scales 4 - k for both.
      Temp xexp(alloc, stream, DType::kInt8, 1, 2 * n);
      if (lss_rows) {
        Temp half(alloc, stream, DType::kInt8, 1, 2 * n);  // the exponents of one half, -1 else
        if (n > 0) {
          INT4TRAIN_CUDA_CHECK(
              cudaMemcpyAsync(half.buf.get(), exps.data, n, cudaMemcpyDeviceToDevice, s));
          INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(half.buf.as<int8_t>() + n, 0xFF, n, s));
        }
        const TensorView half_v = make_vector(half.buf.get(), DType::kInt8, 2 * n);
        gather_codes_to_s8_cuda(hilo.view, map, half_v, gt.view, TensorView{}, stream);
        if (n > 0) {
          INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(half.buf.get(), 0xFF, n, s));
          INT4TRAIN_CUDA_CHECK(cudaMemcpyAsync(half.buf.as<int8_t>() + n, exps.ptr<int8_t>() + n, n,
                                               cudaMemcpyDeviceToDevice, s));
        }
        gather_codes_to_s8_cuda(hilo.view, map, half_v, gt_lo.view, TensorView{}, stream);
        launch_fold_exponents(row_exps, n, kGradRowMaxExponent, xexp.buf.as<int8_t>(), s);
        launch_fold_exponents(row_exps, n, kGradRowMaxExponent, xexp.buf.as<int8_t>() + n, s);
      } else {
        gather_codes_to_s8_cuda(hilo.view, map, exps, gt.view, TensorView{}, stream);
        if (n > 0) {
          INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(xexp.buf.get(), 4, n, s));
          INT4TRAIN_CUDA_CHECK(cudaMemsetAsync(xexp.buf.as<int8_t>() + n, 0, n, s));
        }
      }
      gather_codes_to_s8_cuda(a.saved_codes, map, make_vector(xexp.buf.get(), DType::kInt8, 2 * n),
                              qxt.view, TensorView{}, stream);
    } else if (by_row) {
      Temp fold(alloc, stream, DType::kInt8, 1, n);
      launch_fold_exponents(row_exp.buf.as<int8_t>(), n, kGradRowMaxExponent, fold.buf.as<int8_t>(),
                            s);
      codes_to_s8_cuda(a.saved_codes, make_vector(fold.buf.get(), DType::kInt8, n), true, qxt.view,
                       TensorView{}, stream);
    } else {
      codes_to_s8_cuda(a.saved_codes, TensorView{}, true, qxt.view, TensorView{}, stream);
    }
    Temp phi(alloc, stream, DType::kInt32, k_chunks(kdim) * c, d),
        phi_lo(alloc, stream, DType::kInt32, lss_rows ? k_chunks(kdim) * c : 0, d);
    s8_product(lss ? gt : q_t, c, qxt, d, kdim, phi);
    if (lss_rows) s8_product(gt_lo, c, qxt, d, kdim, phi_lo);
    SplitPartials pp{phi.buf.get(), d, true, static_cast<int>(k_chunks(kdim)), c * d};
    if (by_row) pp.scale_exp = -kGradRowMaxExponent;
    if (lss_rows) pp.lo = phi_lo.buf.as<int32_t>();
    const bool w_bf16 = a.w.dtype == DType::kBFloat16;
    if (d % 8 == 0 && aligned(a.w.data, w_bf16 ? 16 : 32) && (c == 1 || row_stride(a.w) % 8 == 0)) {
      // Recombination, W~ = W B, LSQ backward and back-rotation in one pass.
      // With the input gradient's operand of W's codes, which the pass computes anyway.
      qwt_ready = launch_dw_epilogue(pp, sg.buf.as<float>(), a.step_x.ptr<float>(), a.w, a.step_w,
                                     g, want_dw ? a.grad_w : TensorView{}, a.grad_step_w,
                                     dom_dx ? qwt.view : TensorView{}, alloc, s, &sums);
    } else {
      Temp dw(alloc, stream, DType::kFloat32, c, d);
      launch_combine_bitsplit(pp, nullptr, sg.buf.as<float>(), a.step_x.ptr<float>(),
                              dw.buf.as<float>(), d, c, d, s);
      Temp wt(alloc, stream, DType::kFloat32, c, d);
      hadamard_transform_cuda(a.w, wt.view, g, stream);
      lsq_backward_cuda(wt.view, a.step_w, dw.view, dw.view, a.grad_step_w, alloc, stream);
      if (want_dw) hadamard_transform_cuda(dw.view, a.grad_w, g, stream);
    }
  }
  if (dom_dx) {
    // dX~ = s_g s_w (16 Qhi + Qlo) Qw (K = C). hq_bs: one INT8 product of the N rows of q. hq_lss:
    // the kept FP8 (INT8 engine: INT8) rows gathered into `capacity` rows (empty slots zero), one
    // product over them; the epilogue finds each token's hi and lo rows through the slots and
    // weights them by their exponents (no reduction over rows here, so FP8 stays exact; the INT8
    // engine keeps kMaxKFp8Int4 as its bound, so its int32 sums are exact in fp32 as FP8's).
    SplitPartials pp{};
    const int8_t* ex = nullptr;
    if (!qwt_ready) hadamard_lsq_codes_t_cuda(a.w, g, a.step_w, qwt.view, alloc, stream);
    Temp p(alloc, stream, fp8_dx ? DType::kFloat32 : DType::kInt32,
           lss ? capacity : k_chunks(cp) * n, d);
    if (lss) {
      Temp kept_op(alloc, stream, dx_op, capacity, cp);
      gather_operand_rows_cuda(r_op.view,
                               make_vector(sel_x.slot_rows.buf.get(), DType::kInt32, capacity),
                               kept_op.view, TensorView{}, stream);
      if (fp8_dx) {
        gemm_fp8_cuda(kept_op.view, qwt.view, TensorView{}, TensorView{}, TensorView{}, p.view,
                      alloc, stream);
      } else {
        gemm_s8_s32_cuda(kept_op.view, qwt.view, p.view, alloc, stream, kMaxKFp8Int4);
      }
      pp = SplitPartials{p.buf.get(), d, !fp8_dx, 1, 0, sel_x.slots.buf.as<int32_t>()};
      ex = sel_x.exps.buf.as<int8_t>();
    } else {
      s8_product(r_op, n, qwt, d, cp, p);
      pp = SplitPartials{p.buf.get(), d, true, static_cast<int>(k_chunks(cp)), n * d};
    }
    pp.row_exps = row_exps;
    if (d % 8 == 0 && aligned(a.saved_codes.data, 4)) {
      // Recombination, LSQ backward and back-rotation in one pass.
      launch_dx_epilogue(pp, ex, sg.buf.as<float>(), a.step_w.ptr<float>(), a.saved_codes,
                         a.saved_aux, g, want_dx ? a.grad_x : TensorView{}, a.grad_step_x, alloc, s,
                         &sums);
    } else {
      Temp dx(alloc, stream, DType::kFloat32, n, d);
      launch_combine_bitsplit(pp, ex, sg.buf.as<float>(), a.step_w.ptr<float>(), dx.buf.as<float>(),
                              d, n, d, s);
      lsq_backward_compact_cuda(a.saved_codes, a.saved_aux, dx.view, dx.view, a.grad_step_x, alloc,
                                stream);
      if (want_dx) hadamard_transform_cuda(dx.view, a.grad_x, g, stream);
    }
  }
  sums.finish();
}

}  // namespace int4train
