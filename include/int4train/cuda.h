// int4train CUDA path (Hopper first): the forward quantizers, the FP8-tensor-core products of 4-bit
// codes and the backward pieces, each equal to the CPU core of the other headers (the spec) bit for
// bit where the math is integer. Defined only in builds with CUDA (INT4TRAIN_WITH_CUDA=1).
//
// Conventions of every _cuda function:
//  - TensorViews point to device memory; scalars that the GPU computes or learns (LSQ steps,
//  scales,
//    counters) are device pointers too, so nothing here synchronises with the host and a training
//    step can be captured in a CUDA graph. Argument checks (shapes, dtypes, alignment) are
//    host-side and throw int4train::Error naming the argument, as in the CPU core.
//  - `stream` is a cudaStream_t (nullptr: the legacy default stream) and comes last. Temporaries
//    come from a CudaAllocator (stream-ordered), so a framework can pass its caching allocator.
//  - Hopper has no INT4 tensor cores: 4-bit codes travel to the GEMM as FP8 e4m3 values (every
//    integer in [-16, 16], and so every INT4 code, is exact in e4m3), multiplied by cuBLASLt with
//    default accumulation, which is exact for products of INT4 codes while every partial sum stays
//    below 2^24 (kMaxKFp8Int4 below; measured in docs/cuda.md, including data built to defeat it).
//    Products whose terms reach beyond |ab| <= 64 run on INT8 operands (below), and so do all
//    products on devices without FP8 tensor cores (compute capability below 8.9; the layer's
//    GemmEngine, linear.h). The kernels are built for sm_90a and sm_80 (PTX included, so later
//    devices JIT it); below 8.0 the PyTorch binding uses its device-generic path.
#pragma once

#include <cstddef>
#include <cstdint>

#include "int4train/common.h"
#include "int4train/gemm.h"
#include "int4train/linear.h"
#include "int4train/philox.h"

namespace int4train {

// True when the library was built with CUDA and a CUDA device is visible.
bool cuda_available();

// 10 * major + minor of device `device`'s compute capability (cached per device); an Error naming
// `device` if there is no such device.
int cuda_compute_capability(int device);
// FP8 e4m3 tensor cores (compute capability 8.9 or newer).
constexpr int kMinCapabilityFp8 = 89;
// The kernels of this header run on compute capability 8.0 and newer.
constexpr int kMinCapabilityKernels = 80;
// The engine a layer's products run on for `gemm` on device `device`: kAuto resolves to kFp8 where
// the device has FP8 tensor cores and to kInt8 elsewhere; kFp8 on a device without them is an Error
// naming `gemm` (linear.h, GemmEngine).
GemmEngine resolve_gemm_engine(GemmEngine gemm, int device);

// ------------------------------------------------------------------------------ temporaries
// A stream-ordered device allocator. allocate returns memory usable on `stream` (aligned to at
// least 256 bytes) or throws; deallocate may be called before the work queued on `stream` has run
// (stream-ordered semantics, as cudaFreeAsync and PyTorch's caching allocator provide).
struct CudaAllocator {
  void* ctx = nullptr;
  void* (*allocate)(void* ctx, size_t bytes, void* stream) = nullptr;
  void (*deallocate)(void* ctx, void* ptr, size_t bytes, void* stream) = nullptr;
};
// cudaMallocAsync / cudaFreeAsync on the device's default memory pool (graph-capturable).
CudaAllocator default_cuda_allocator();

// ------------------------------------------------------------------------------ FP8 operands
// The GEMM operand format: a kFloat8E4M3 matrix rows x fp8_padded_cols(K) holding integer codes,
// whose columns K .. padded-1 are zero (cuBLASLt's FP8 kernels need K, the row stride and the base
// address in multiples of 16 bytes; the producers below pad, so the products stay exact). The row
// stride may exceed the padded width if it is a multiple of 16.
constexpr int64_t kFp8Align = 16;
constexpr int64_t fp8_padded_cols(int64_t k) { return (k + kFp8Align - 1) / kFp8Align * kFp8Align; }

// Largest K for which an FP8 product of INT4 codes is exact in its fp32 result: |sum| <= 64 K must
// stay below 2^24 (the fp32 integer range). Larger K is an Error naming `a`.
constexpr int64_t kMaxKFp8Int4 = (int64_t{1} << 24) / 64;

// operand = codes as e4m3 (rows x fp8_padded_cols(K), pad zero). codes: kInt4Packed or int8 rows x
// K (int8 values must lie in [-16, 16]; others are not exact in e4m3 and are not checked here).
// With transpose, operand is K x fp8_padded_cols(rows) = codes^T (the layout of the backward
// products, whose reduction dimension is the token dimension).
void codes_to_fp8_cuda(const TensorView& codes, bool transpose, TensorView operand, void* stream);

// ------------------------------------------------------------------------------ INT8 operands
// Hopper's FP8 tensor cores keep only about 14 significant bits in the accumulator between
// promotions to fp32 (DeepSeek-V3 reports it), so an FP8 product is exact only while its partial
// sums between promotions fit: products of INT4 codes (|ab| <= 64) do, codes times an importance
// weight (|ab| <= 1024) do not (both measured with data built for it: docs/cuda.md, "Exactness on
// FP8 tensor cores"). Those products (hq_lss's weight gradient) run on INT8 tensor cores, whose
// int32 accumulation is exact by construction. The INT8 operand has the FP8 operand's layout:
// kInt8, rows x fp8_padded_cols(K), padding zero, row stride a multiple of 16, base 16-byte
// aligned.
//
// operand = codes * 2^e_r for code row r as int8, 0 where e_r = -1: the weight gradient's operands
// with each token's importance weight folded in (lss.h: |code * 2^e| <= 128, so [-128, 112] fits
// int8 exactly). codes: kInt4Packed rows x K; row_exponents: optional (empty view: every e_r = 0)
// int8 device vector of rows with values in [-1, kLssMaxExponent]; transpose as codes_to_fp8_cuda.
// An exponent outside that range cannot be reported from the device: its row is written as zeros
// and `invalid` (optional int64 device scalar, zeroed by the caller) is incremented. codes may also
// be kInt8 (any values, e.g. an INT8 operand's real columns), copied as they are, without
// row_exponents: the transposed INT8 operand of an INT8 operand (hq_bs's gradient codes).
void codes_to_s8_cuda(const TensorView& codes, const TensorView& row_exponents, bool transpose,
                      TensorView operand, TensorView invalid, void* stream);

// The compacted operands of a sampled product (hq_lss): column j of operand (cols x
// fp8_padded_cols(M), M = row_map's length) is code row row_map[j] mod codes.rows scaled by
// 2^map_exponents[row_map[j]] as int8, i.e. codes_to_s8_cuda's transposed operand of the gathered
// rows; row_map[j] = -1 (an empty slot) gives a zero column. codes: kInt4Packed rows x cols;
// row_map: int32 device vector of M with values in [-1, R); map_exponents: int8 device vector of R
// with values in [-1, kLssMaxExponent]. A map value or exponent out of range gives a zero column
// and increments `invalid` (optional int64 device scalar), as codes_to_s8_cuda.
void gather_codes_to_s8_cuda(const TensorView& codes, const TensorView& row_map,
                             const TensorView& map_exponents, TensorView operand,
                             TensorView invalid, void* stream);

// out row j = operand row row_map[j] (bytes, padding included), a zero row where row_map[j] = -1
// (or out of range, counted in `invalid` as above): the compacted rows of an FP8 or INT8 operand.
// operand and out: kFloat8E4M3 or kInt8 GEMM operands (same dtype and padded width); row_map:
// int32 device vector of out's rows.
void gather_operand_rows_cuda(const TensorView& operand, const TensorView& row_map, TensorView out,
                              TensorView invalid, void* stream);

// ------------------------------------------------------------------------------ products
// C = A B^T in gemm.h's vocabulary: a is M x Kp, b is N x Kp, both FP8 operands (same Kp). out:
// fp32 or bf16 M x N (row stride any),
//   out[m, n] = (scale_a * scale_b) * acc[m, n] + bias[n]
// with acc the fp32 accumulation of the exact integer products (cuBLASLt, default accumulation,
// not fast accumulation). scale_a, scale_b: fp32 device scalars, optional (data == nullptr: 1);
// bias: fp32 or bf16 device vector of N, optional. Fused into cuBLASLt's epilogue where it supports
// the dtypes (bf16 bias), else added by a second pass in the same order (gemm.h's Epilogue).
void gemm_fp8_cuda(const TensorView& a, const TensorView& b, const TensorView& scale_a,
                   const TensorView& scale_b, const TensorView& bias, TensorView out,
                   const CudaAllocator& alloc, void* stream);

// The exact-integer mode: c (int32 M x N) = a b^T for operands holding INT4 codes, equal to
// gemm_s32_ref on the same codes (K <= kMaxKFp8Int4).
void gemm_fp8_s32_cuda(const TensorView& a, const TensorView& b, TensorView c,
                       const CudaAllocator& alloc, void* stream);

// c (int32 M x N) = a b^T for INT8 operands (same Kp <= max_k; larger is an Error naming `a`):
// cuBLASLt's INT8 tensor-core product with int32 accumulation, equal to gemm_s32_ref on the same
// values. max_k is the caller's exactness bound for its values: kMaxKInt8 of gemm.h (the default)
// for any int8 values, kMaxKFp8Int4 where both operands hold INT4 codes (|ab| <= 64) and the sums
// must also be exact in fp32 (what an FP8 product of the same codes guarantees). c: row stride any.
void gemm_s8_s32_cuda(const TensorView& a, const TensorView& b, TensorView c,
                      const CudaAllocator& alloc, void* stream, int64_t max_k = kMaxKInt8);

// gemm_fp8_cuda's contract on INT8 operands holding INT4 codes (the engine of devices without FP8,
// GemmEngine::kInt8): the exact int32 product (Kp <= kMaxKInt4 of gemm.h, an Error naming `a`
// beyond), then out = (scale_a * scale_b) * float(acc) + bias in gemm.h's Epilogue order, in a
// second pass (cuBLASLt's INT8 kernels write int32 or int8 only); blocks of rows at a time where
// the int32 product would exceed 256 MiB of scratch. Equal to the CPU's gemm_scaled on the same
// codes bit for bit.
void gemm_s8_cuda(const TensorView& a, const TensorView& b, const TensorView& scale_a,
                  const TensorView& scale_b, const TensorView& bias, TensorView out,
                  const CudaAllocator& alloc, void* stream);

// ------------------------------------------------------------------------------ forward quantizer
// The fused Hadamard + LSQ pass (one read of x): x~ = x B_block in hadamard.h's exact fp32 order,
// codes = clamp(rint(x~ * (1 / step)), -8, 7) as lsq_quantize. x: fp32 or bf16 rows x D (D a
// multiple of block). step: fp32 device scalar. Outputs, each optional (data == nullptr skips it):
//   operand   FP8 or INT8 operand rows x fp8_padded_cols(D) (the forward GEMM's input, in the
//             layout of either engine);
//   packed    kInt4Packed rows x D, the codes saved for backward;
//   aux       uint8 compact_aux_bytes(rows, D): the compact LSQ bits of quantize.h (random key
//             `rng`), so (packed, aux) equal lsq_quantize_compact's outputs bit for bit;
//   nonfinite int64 device scalar, INCREMENTED by the number of non-finite x~ (the caller zeroes
//             it, so X and W can share one counter). A step that is not positive and finite
//             counts every element, since it cannot be reported from the device.
void hadamard_lsq_quantize_cuda(const TensorView& x, int32_t block, const TensorView& step,
                                const RandomKey& rng, TensorView operand, TensorView packed,
                                TensorView aux, TensorView nonfinite, void* stream);

// The same pass's codes (no aux bits, nothing counted) as a transposed GEMM operand: operand_t (FP8
// or INT8, D x fp8_padded_cols(rows)) = codes^T, padding zero. The input gradient's weight operand
// (its reduction runs over the weight's rows), written through shared-memory tiles in one pass over
// x instead of packed codes and a transpose (which it falls back to where D is not a multiple of 8
// or x has more than 2,097,120 rows; alloc: that fallback's temporary).
void hadamard_lsq_codes_t_cuda(const TensorView& x, int32_t block, const TensorView& step,
                               TensorView operand_t, const CudaAllocator& alloc, void* stream);

// The two steps of a layer from their learned parameters in one launch (the PyTorch layer's every
// call): input_step = lsq_step_of_param(input_param), weight_step likewise (quantize.h). Params:
// fp32 or bf16 device scalars; steps: fp32 device scalars. A pair whose param has data == nullptr
// is skipped.
void lsq_steps_cuda(const TensorView& input_param, const TensorView& weight_param,
                    TensorView input_step, TensorView weight_step, void* stream);

// Their gradients back to the parameters in one launch: grad_param = lsq_step_param_grad(param,
// grad_step) in the param's dtype (bf16 rounded to nearest even). grad_step: fp32 device scalars;
// grad_param may be the grad_step view itself for an fp32 param (read before written). A pair whose
// grad_step has data == nullptr is skipped.
void lsq_step_grads_cuda(const TensorView& input_param, const TensorView& weight_param,
                         const TensorView& grad_input_step, const TensorView& grad_weight_step,
                         TensorView grad_input_param, TensorView grad_weight_param, void* stream);

// out = in B_block (hadamard.h), bit-identical to hadamard_transform_ref. in/out: fp32 or bf16,
// same shape, may be the very same view (in place).
void hadamard_transform_cuda(const TensorView& in, TensorView out, int32_t block, void* stream);

// ------------------------------------------------------------------------------ backward quantizer
// max |g| as its fp32 bit pattern into amax_bits (an int32 device scalar holding the bits,
// overwritten): NaN > Inf > any finite value, as the CPU's absmax. g: fp32 or bf16 matrix.
void absmax_bits_cuda(const TensorView& g, TensorView amax_bits, void* stream);

// Unbiased bit splitting of quantize.h (quantize_bitsplit) with the scale on the device: a
// reduction pass (absmax) then one quantize pass. g: fp32 or bf16 N x C. Outputs, optional except
// scale:
//   operand  FP8 operand 2N x fp8_padded_cols(C): rows 0..N-1 hold hi, rows N..2N-1 hold lo (the
//            stacked R of ALGORITHM.md without its factor 16, which the consumers apply exactly);
//            or the same stacked rows as an INT8 operand (2N rows, the INT8 engine's form; one
//            INT8 row of q = 16 hi + lo per token is quantize_bitsplit_q8_cuda's);
//   hi, lo   kInt4Packed N x C codes (equal to quantize_bitsplit's);
//   row_sumsq int32 vector of 2N: sum of squared codes of each operand row (exact; LSS scores);
//   scale    fp32 device scalar s = max|g| / 119 (0 for an all-zero g);
//   column_sums fp32 or bf16 vector of C: the column sums of g in linear.h's bias-gradient order
//            (kBiasGradBlockRows), bit for bit the CPU's grad_bias, from the same reduction pass
//            as the scale (one read of g for both);
//   row_exp  int8 device vector of N: grad_scale=row (quantize_bitsplit_rows of quantize.h, the
//            same codes and exponents): each row quantized at s 2^-k_row, k_row written here;
//            the rows' maxima come from the reduction pass (still one read of g before the
//            quantize pass). Empty (the default): one scale per tensor.
void quantize_bitsplit_cuda(const TensorView& g, const RandomKey& rng, TensorView operand,
                            TensorView hi, TensorView lo, TensorView row_sumsq, TensorView scale,
                            TensorView column_sums, const CudaAllocator& alloc, void* stream,
                            TensorView row_exp = TensorView{});

// hq_bs's bit split: the same q, scale and random bits as quantize_bitsplit_cuda, but q = 16 hi +
// lo in [-119, 119] is kept whole, the 8-bit gradient in one INT8 row per token (Hopper's INT8
// tensor cores take it at the rate of an FP8 row, so the split rows would only double the
// products). Outputs, at least one of the two operands where g is not empty:
//   operand    INT8 operand N x fp8_padded_cols(C): the rows of q (the input gradient's operand);
//   operand_t  INT8 operand C x fp8_padded_cols(N): q^T (the weight gradient's, whose reduction
//              runs over tokens), written by the same pass through shared-memory tiles (by a
//              transpose of q's rows where C is not a multiple of 8 or N > 2,097,120);
//   scale, column_sums as quantize_bitsplit_cuda;
//   row_exp    int8 device vector of N: grad_scale=row (quantize_bitsplit_rows of quantize.h, the
//              same codes and exponents): each row quantized at s 2^-k_row, k_row written here.
//              Empty (the default): one scale per tensor.
void quantize_bitsplit_q8_cuda(const TensorView& g, const RandomKey& rng, TensorView operand,
                               TensorView operand_t, TensorView scale, TensorView column_sums,
                               const CudaAllocator& alloc, void* stream,
                               TensorView row_exp = TensorView{});

// ------------------------------------------------------------------------------ LSQ backward
// lsq_backward_compact on the device: grad_x = grad_xhat * mask (fp32 or bf16, may be grad_xhat
// itself when fp32), grad_step = gamma * sum(grad_xhat * r_hat) (fp32 device scalar,
// overwritten; fp64 partial sums per block added in a fixed order, so deterministic, but not the
// CPU's order: its last bit may differ). Either output may be null.
void lsq_backward_compact_cuda(const TensorView& packed_codes, const TensorView& aux,
                               const TensorView& grad_xhat, TensorView grad_x, TensorView grad_step,
                               const CudaAllocator& alloc, void* stream);

// lsq_backward of quantize.h on the device (the weight's full-information LSQ backward): x is the
// fp32 transformed input x~, step an fp32 device scalar; grad_x = grad_xhat * 1[-8 <= v <= 7] (fp32
// or bf16; may be grad_xhat itself when fp32); grad_step = gamma * sum(grad_xhat * r) (fp32 device
// scalar, overwritten; fixed-order fp64 partial sums, within one fp32 rounding of the CPU's).
void lsq_backward_cuda(const TensorView& x, const TensorView& step, const TensorView& grad_xhat,
                       TensorView grad_x, TensorView grad_step, const CudaAllocator& alloc,
                       void* stream);

// ------------------------------------------------------------------------------ sampling
// Leverage score sampling on the device: lss.h's lss_probabilities (its fixed summation order),
// lss_round_pow2 with max_exponent and max_rows, and lss_select with rng, bit for bit, in one
// kernel and without a host round trip: exponents[i] = k_i for a kept row (importance weight
// 2^k_i), -1 for a dropped one; slot_rows (int32 device vector of max_rows) = lss_select's slots
// (the row kept in each slot, -1 for none); slots (optional int32 device vector of n) the inverse:
// the slot of a kept row, -1 for a dropped one. scores: fp32 device vector of n, finite and >= 0;
// budget as lss_probabilities (checked here, on the host); max_exponent in [0, 30]; max_rows with
// max_rows * 2^max_exponent >= n; exponents: int8 device vector of n; kept: optional int64 device
// scalar, the number of rows kept (at most max_rows). A negative or non-finite score
// (lss_probabilities' Error) cannot be raised from the device: every exponent and slot is then -1
// and kept is -1. One block of kLssSumLanes threads; each water-filling round and each step of the
// exponents' search reads the scores once.
void lss_sample_cuda(const TensorView& scores, double budget, int max_exponent, int64_t max_rows,
                     const RandomKey& rng, TensorView exponents, TensorView slots,
                     TensorView slot_rows, TensorView kept, void* stream);

// ------------------------------------------------------------------------------ random words
// words[i] = random_u32(seed, stream, i) of philox.h for i < n (int64 values in [0, 2^32), the form
// the device-generic PyTorch implementation computes with), where stream = (uint32(*stream_hi) << 32)
// | stream_lo: stream_hi is an int64 device scalar (the training step, which stays on the device) or
// null for 0. words: contiguous int64 device vector of n.
void philox_words_cuda(uint64_t seed, uint32_t stream_lo, const TensorView& stream_hi,
                       TensorView words, void* stream);

// ------------------------------------------------------------------------------ the layer
// linear_forward of linear.h on the device, for the LSQ recipes (lsq_luq, hq, hq_bs, hq_lss; the
// others are an Error of kind kNotImplemented): X and W each take one fused Hadamard + LSQ pass,
// the product one FP8 GEMM with s_x s_w and the bias in its epilogue (config.gemm: or one INT8
// product and the scale-and-bias pass, resolve_gemm_engine on the current device). All views are
// device memory; step_x, step_w are device scalars; y, saved_codes, saved_aux as linear.h says,
// and the optional saved_scale (0) and saved_step (a copy of config.device_step's value, or of
// config.step without it). If X~ or W~ holds a non-finite value (or a step is not positive and
// finite), y is NaN throughout: the W pass's last block makes the product's scale NaN, a
// device-side check (no host synchronisation). Four launches: a one-thread prologue (the counters,
// the scale s_x s_w, the saved scalars), the X and W passes, and the product (cuBLASLt's). Equal
// to the CPU's linear_forward bit for bit (tested).
void linear_forward_cuda(const LinearConfig& config, const LinearForwardArgs& args,
                         const CudaAllocator& alloc, void* stream);

// linear_backward of linear.h on the device, for recipes hq_bs (bit split, all 2N rows) and hq_lss
// (bit split + leverage score sampling; the selection by lss_sample_cuda, so the same rows as the
// CPU's); the others are an Error of kind kNotImplemented (hq and lsq_luq need their gradient
// quantizers on the device). hq_bs: the 8-bit gradient q = 16 hi + lo as one INT8 row per token, so
// each gradient is one INT8 product of N rows (the same integers as the two 4-bit products).
// hq_lss: the input gradient on FP8 operands holding INT4 codes (INT8 ones under the INT8 engine,
// config.gemm), the weight gradient's codes times their token's importance weight on INT8 operands
// (see INT8 operands above). Each product is exact; K beyond kMaxKInt8 runs in K-chunks. hq_lss's
// two sampled products are compacted: the kept rows are gathered into ceil(lss_budget * N) rows
// (lss.h's capacity, known on the host), so each costs a product of that many rows instead of 2N.
// grad_x, grad_w, grad_bias and rows_kept equal the CPU's bit for bit, the step gradients within
// one fp32 rounding (fp64 sums in another order). No host synchronisation. grad_scale=row
// (linear.h): the bit split with a row exponent k per token (quantize_bitsplit_q8_cuda,
// quantize_bitsplit_cuda), the input gradient's token rows scaled by 2^-k in its epilogue, 2^(4 -
// k) folded into the tokens' x codes of the weight gradient's INT8 operand and its sum scaled by
// 2^-4: the CPU's integers. hq_lss's kept rows then weigh 2^(4 hi + 4 - k + k_lss), 12 bits of
// shift where two INT8 operands hold 8, so its weight gradient takes two products over the same
// compacted slots, the hi rows' and the lo rows' (the other's slots zero), added as 16 hi + lo.
void linear_backward_cuda(const LinearConfig& config, const LinearBackwardArgs& args,
                          const CudaAllocator& alloc, void* stream);

}  // namespace int4train
