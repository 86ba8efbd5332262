// int4train CUDA path (internal): host launchers of the small kernels that the cuBLASLt wrapper
// (a .cpp file) needs around its products. Defined in gemm_epilogue.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "int4train/common.h"
#include "int4train/cuda.h"

namespace int4train {
namespace cuda_detail {

// out[m, n] = s * acc[m, n] + bias[n] (gemm.h's Epilogue order: v = s * acc; v = v + bias), with
// s = (*scale_a) * (*scale_b) in fp32 (a null scale counts as 1), acc fp32 M x N (row stride
// ld_acc; acc == nullptr means K = 0, an all-zero accumulator). bias: fp32 or bf16 (bias_bf16) or
// null. out: fp32 or bf16 (out_bf16), row stride ld_out.
void launch_scale_bias(const float* acc, int64_t ld_acc, const float* scale_a, const float* scale_b,
                       const void* bias, bool bias_bf16, void* out, bool out_bf16, int64_t ld_out,
                       int64_t m, int64_t n, cudaStream_t stream);
// The same for an int32 accumulator (an INT8 product), taken as float(acc) rounded to nearest,
// gemm.h's Epilogue.
void launch_scale_bias(const int32_t* acc, int64_t ld_acc, const float* scale_a,
                       const float* scale_b, const void* bias, bool bias_bf16, void* out,
                       bool out_bf16, int64_t ld_out, int64_t m, int64_t n, cudaStream_t stream);

// *out = (*scale_a) * (*scale_b) in fp32 (a null scale counts as 1): the one scale handed to
// cuBLASLt, so that the product's scale is rounded once, as gemm.h's alpha.
void launch_scale_product(const float* scale_a, const float* scale_b, float* out,
                          cudaStream_t stream);

// c[m, n] = int32(acc[m, n]) for an fp32 accumulator holding integers (exact below 2^24); acc ==
// nullptr writes zeros.
void launch_f32_to_s32(const float* acc, int64_t ld_acc, int32_t* c, int64_t ld_c, int64_t m,
                       int64_t n, cudaStream_t stream);

// The layer forward's first launch (one thread): *counter and *ticket = 0 (the passes' non-finite
// count, the W pass's ticket), *alpha = (*step_x) * (*step_w) in fp32 (launch_scale_product's
// scale, the product's one scale), and the call's small outputs where given: *saved_step = the
// step the random bits are keyed with (*device_step, or host_step without it), kept for the
// backward; *saved_scale = 0 (the int8 recipe's scale, which the LSQ recipes do not use).
void launch_forward_prologue(unsigned long long* counter, unsigned int* ticket, const float* step_x,
                             const float* step_w, float* alpha, const int64_t* device_step,
                             int64_t host_step, int64_t* saved_step, float* saved_scale,
                             cudaStream_t stream);

// hadamard_lsq_quantize_cuda (cuda.h) as the layer forward's W pass, without packed codes or aux
// bits: after counting into nonfinite (the X pass's count before it; required), the grid's last
// block (ticket: 0 on entry) sets *alpha to NaN if the count is not 0, so that y is NaN
// throughout (linear.h's report of a non-finite input or a bad step).
void hadamard_lsq_quantize_alpha(const TensorView& w, int32_t block, const TensorView& step,
                                 TensorView operand, TensorView nonfinite, unsigned int* ticket,
                                 float* alpha, void* stream);

// The product the bit-split backward's epilogues read (row stride ld), one of two forms:
//   s32: an int32 INT8 product that holds the recombined sum 16 hi + lo itself (hq_bs: the rows of
//        q = 16 hi + lo; hq_lss's weight gradient: the importance weights folded into its
//        operands), in `chunks` K-chunk partial products chunk_stride elements apart, summed
//        exactly by the consumers;
//   slots (hq_lss's compacted input gradient, one chunk): the fp32 FP8 product of the kept rows
//        (s32: the INT8 engine's int32 product, its values below 2^24); output row r's hi and lo
//        partials are its rows slots[r] and slots[rows + r], -1 for a dropped row, weighted by the
//        rows' LSS exponents (exps).
// grad_scale=row: output row r's sum times 2^(scale_exp - row_exps[r]), exact, before the scaling
// by s1 s2 (the CPU's ldexp of its int64 sum); row_exps may be null (0), scale_exp is 0 in the
// slots form. lo (s32 form only; hq_lss's weight gradient with row scales): a second int32 product
// of the same layout and chunks, the lo rows' sum where prod then holds the hi rows', so that the
// sum is 16 prod + lo.
struct SplitPartials {
  const void* prod;
  int64_t ld;
  bool s32;
  int chunks;
  int64_t chunk_stride;
  const int32_t* slots = nullptr;
  const int8_t* row_exps = nullptr;
  int scale_exp = 0;
  const int32_t* lo = nullptr;
};

// out[i] = max_exp - k[i] (int8 device vectors of n): grad_scale=row's token-side exponents of the
// weight gradient (codes_to_s8_cuda's row_exponents), from quantize_bitsplit_q8_cuda's row_exp.
void launch_fold_exponents(const int8_t* k, int64_t n, int max_exp, int8_t* out,
                           cudaStream_t stream);

// out (fp32 rows x cols, row stride ldo) = float(double(*s1) * double(*s2) * (16 hi + lo)), the sum
// exact: the bit-split recombination of src/cpu/linear.cpp, rounded as there. For the slots form,
// exps (the 2N rows' LSS exponents, hi rows first, -1 dropped) makes the sum 2^(4 + k_hi) hi +
// 2^k_lo lo over the kept rows; the s32 form takes no exps.
void launch_combine_bitsplit(const SplitPartials& partials, const int8_t* exps, const float* s1,
                             const float* s2, float* out, int64_t ldo, int64_t rows, int64_t cols,
                             cudaStream_t stream);

// Sums that the layer's backward finishes in one launch at its end (finish()) instead of a launch
// after each pass that leaves partials: the epilogues' step gradients (sum_partials_kernel's
// order) and the bias gradient's row-block totals (bias_total_kernel's), the same bits. It owns
// the partials' buffers until its destruction (stream-ordered, after finish()'s launch); an
// object destroyed without finish() writes nothing.
class DeferredSums {
 public:
  DeferredSums(const CudaAllocator& alloc, void* stream);
  ~DeferredSums();  // out of line: Impl is complete only in backward_layer.cu
  DeferredSums(const DeferredSums&) = delete;
  DeferredSums& operator=(const DeferredSums&) = delete;
  // A buffer of `count` step-gradient partials; finish() writes float(gamma * their sum) to *out.
  double* step_partials(int64_t count, double gamma, float* out);
  // A buffer of blocks x cols row-block column sums; finish() writes column j's total to out[j]
  // (fp32 or bf16).
  double* bias_partials(int64_t blocks, int64_t cols, void* out, bool out_bf16);
  void finish();

  static constexpr int kMaxSteps = 2;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One pass over g (fp32 or bf16 rows x cols): *amax = max |g| as fp32 bits (NaN > Inf > finite, as
// launch_absmax) and column_sums (fp32 or bf16 vector of cols) = the column sums of g in fp64 in
// linear.h's kBiasGradBlockRows order (the CPU's bias gradient, bit for bit); temporaries from
// alloc. row_max (optional, rows entries): each row's max |g| bits, for grad_scale=row's
// exponents, from the same read. amax may be null (the bias gradient alone). *amax and row_max
// must be zero on entry (the caller zeroes them): the kernel only raises them.
// defer (optional): where there is more than one row block, the totals are left to it (its
// finish()) instead of a launch here.
void launch_absmax_column_sums(const TensorView& g, uint32_t* amax, TensorView column_sums,
                               const CudaAllocator& alloc, cudaStream_t stream,
                               uint32_t* row_max = nullptr, DeferredSums* defer = nullptr);

// The fused epilogues of the bit-split backward (hq_bs, hq_lss), bit-exact with
// launch_combine_bitsplit followed by lsq_backward_compact_cuda (dX) or lsq_backward_cuda on the
// Hadamard transform of w (dW), and hadamard_transform_cuda into grad_x / grad_w; the step gradient
// in another fixed fp64 order (within an fp32 rounding). partials: the rows and cols of packed / w,
// 32-byte aligned, ld % 8 == 0 (dX: either form, the slots form with exps; dW: the s32 form);
// cols % 8 == 0; block divides cols. dX: packed (4-byte aligned)
// and aux are the forward's saved codes and compact aux bits; exps as launch_combine_bitsplit's.
// dW: w is fp32 or bf16, 16-byte (bf16) or 32-byte (fp32) aligned with a row stride % 8 == 0.
// grad_x / grad_w and grad_step are optional (data == nullptr). dW's codes_t (optional): W's codes
// as the input gradient's transposed operand, hadamard_lsq_codes_t_cuda's operand_t (INT8 or FP8,
// cols x fp8_padded_cols(rows)), written by the same pass (W read once for both) where its tile
// grid fits (W's rows at most 65,535 tiles of 16); it returns whether it wrote them (false: the
// caller runs hadamard_lsq_codes_t_cuda). defer (optional): grad_step is left to it (its
// finish()) instead of a launch after the epilogue.
void launch_dx_epilogue(const SplitPartials& partials, const int8_t* exps, const float* s1,
                        const float* s2, const TensorView& packed, const TensorView& aux,
                        int32_t block, TensorView grad_x, TensorView grad_step,
                        const CudaAllocator& alloc, cudaStream_t stream,
                        DeferredSums* defer = nullptr);
bool launch_dw_epilogue(const SplitPartials& partials, const float* s1, const float* s2,
                        const TensorView& w, const TensorView& step_w, int32_t block,
                        TensorView grad_w, TensorView grad_step, TensorView codes_t,
                        const CudaAllocator& alloc, cudaStream_t stream,
                        DeferredSums* defer = nullptr);

// quantize_bitsplit_cuda and quantize_bitsplit_q8_cuda (cuda.h) with the column sums' totals left
// to defer (launch_absmax_column_sums').
void quantize_bitsplit(const TensorView& g, const RandomKey& rng, TensorView operand, TensorView hi,
                       TensorView lo, TensorView row_sumsq, TensorView scale,
                       TensorView column_sums, const CudaAllocator& alloc, void* stream,
                       TensorView row_exp, DeferredSums* defer);
void quantize_bitsplit_q8(const TensorView& g, const RandomKey& rng, TensorView operand,
                          TensorView operand_t, TensorView scale, TensorView column_sums,
                          const CudaAllocator& alloc, void* stream, TensorView row_exp,
                          DeferredSums* defer);

// lss_sample_cuda's problem, unchecked (lss.cu; the caller guarantees its arguments' rules), and
// one launch for up to kMaxLssBatch of them, one block each (the layer's two samplings at once).
struct LssSampleArgs {
  const float* scores;
  int64_t n;
  double budget;
  int max_exponent;
  int64_t max_rows;
  uint64_t seed, stream;
  const int64_t* device_step;  // RandomKey::device_step (optional)
  int8_t* exponents;
  int32_t* slots;      // optional
  int32_t* slot_rows;  // max_rows
  long long* kept;     // optional
};
constexpr int kMaxLssBatch = 2;
void launch_lss_sample(const LssSampleArgs* args, int count, cudaStream_t stream);

// LSS scores of the 2N bit-split rows (lss.cu): scores[i] = ||R_i|| / s_g from the exact sums of
// squared codes r_sumsq (2N; x16 for i < n), times ||x_(i mod n)|| from x_sumsq (n) when given,
// times 2^-row_exps[i mod n] when given (grad_scale=row); the CPU's fp32 operations and order
// (src/cpu/linear.cpp).
void launch_lss_scores(const int32_t* r_sumsq, const int32_t* x_sumsq, const int8_t* row_exps,
                       int64_t n, float* scores, cudaStream_t stream);

// out[r] = sum of squared codes of row r of packed INT4 codes (rows x cols), exact int32.
void launch_packed_row_sumsq(const uint8_t* codes, int64_t rows, int64_t cols, int32_t* out,
                             cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace int4train
