// int4train PyTorch binding: the op schemas (TORCH_LIBRARY(int4train), defined once here, callable
// as torch.ops.int4train.* from Python and through the dispatcher from C++) and their CPU kernels.
// Each kernel checks shapes, converts at::Tensor to core views, calls the core and returns.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>

#include "convert.h"
#include "int4train/gemm.h"
#include "int4train/hadamard.h"
#include "int4train/int4.h"
#include "int4train/linear.h"
#include "int4train/lss.h"
#include "int4train/quantize.h"
#include "ops_internal.h"

namespace int4train::pt::detail {

using at::Tensor;

// ---------------------------------------------------------------- shared helpers (ops_internal.h)

uint32_t step_value(const Tensor& step) {
  TORCH_CHECK_VALUE(step.numel() == 1, "int4train: step must hold one integer (the training step), ",
                    "got shape ", step.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(step.scalar_type()) && !at::isComplexType(step.scalar_type()),
                   "int4train: step must be an integer tensor, got ", step.scalar_type());
  // The random streams take the low 32 bits of the step (philox.h).
  return static_cast<uint32_t>(static_cast<uint64_t>(step.item<int64_t>()));
}

LinearConfig config_from(c10::string_view spec) {
  return call_core([&] {
    LinearConfig config;
    parse_recipe_spec(std::string(spec), &config);
    return config;
  });
}

Recipe recipe_from(c10::string_view spec) { return config_from(spec).recipe; }

Tensor as_matrix(const Tensor& x, const char* arg) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "int4train: ", arg, " must have at least one dimension, got a ",
                    "scalar");
  const int64_t cols = x.size(-1);
  int64_t rows = 1;  // the product of the leading dimensions (reshape cannot infer it when cols = 0)
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  return x.contiguous().reshape({rows, cols});
}

void check_linear_shapes(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                         const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ",
                    "shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == weight.size(1), op, ": x has shape ", x.sizes(),
                    " but weight has shape ", weight.sizes(), ": the last dimension of x must be ",
                    "in_features = ", weight.size(1));
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": bias must have shape [", weight.size(0), "] (out_features), got ",
                      bias->sizes());
  }
}

Tensor fp32_scalar(const std::optional<Tensor>& t, const char* arg, const char* op) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), op, ": ", arg,
                    " (the LSQ step) is required by this recipe");
  TORCH_CHECK_VALUE(t->numel() == 1, op, ": ", arg, " must be a scalar, got shape ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ",
                   t->scalar_type());
  return t->dim() == 0 ? *t : t->reshape({});  // one element: contiguous either way
}

LinearTensors allocate_linear_outputs(Recipe recipe, int64_t n, int64_t d, int64_t c,
                                      at::ScalarType y_dtype, const at::TensorOptions& device,
                                      bool zero_unwritten) {
  const LinearSavedShapes s = call_core([&] { return linear_saved_shapes(recipe, n, d); });
  LinearTensors out;
  out.y = at::empty({n, c}, device.dtype(y_dtype));
  if (s.codes_rows == 0 && s.codes_cols == 0) {
    out.codes = at::empty({0, 0}, device.dtype(at::kByte));
  } else if (s.codes_dtype == DType::kInt4Packed) {
    out.codes = at::empty({s.codes_rows, packed_row_bytes(s.codes_cols)}, device.dtype(at::kByte));
  } else {
    TORCH_CHECK(s.codes_dtype == DType::kInt8, "int4train: unexpected saved codes dtype ",
                dtype_name(s.codes_dtype));
    out.codes = at::empty({s.codes_rows, s.codes_cols}, device.dtype(at::kChar));
  }
  out.aux = zero_unwritten ? at::zeros({s.aux_bytes}, device.dtype(at::kByte))
                           : at::empty({s.aux_bytes}, device.dtype(at::kByte));
  out.scale = zero_unwritten ? at::zeros({}, device.dtype(at::kFloat))
                             : at::empty({}, device.dtype(at::kFloat));
  return out;
}

Tensor saved_step_of(const Tensor& step) {
  const Tensor s = step.to(at::kLong);
  return (s.dim() == 0 ? s : s.reshape({})).clone(at::MemoryFormat::Contiguous);
}

TensorView codes_view(const Tensor& codes, int64_t d, const char* arg) {
  if (codes.scalar_type() == at::kByte) return to_packed_view(codes, d, arg);
  return to_view(codes.contiguous(), arg);
}

}  // namespace int4train::pt::detail

namespace int4train::pt {
namespace {

using at::Tensor;
using namespace detail;

// ---------------------------------------------------------------- component ops

Tensor hadamard_transform_cpu(const Tensor& x, int64_t block) {
  const Tensor x2 = as_matrix(x, "x");
  Tensor out = at::empty_like(x2);
  if (x2.numel() == 0) {
    // Nothing to transform; the block is still checked so that bad arguments never pass silently.
    TORCH_CHECK_VALUE(is_valid_hadamard_block(static_cast<int32_t>(block)) && x2.size(1) % block == 0,
                      "int4train.hadamard_transform: block must be a power of two in [1, ",
                      kMaxHadamardBlock, "] dividing the last dimension ", x2.size(1), ", got ",
                      block);
    return out.reshape(x.sizes());
  }
  call_core([&] {
    hadamard_transform(to_view(x2, "x"), to_view(out, "out"), static_cast<int32_t>(block));
  });
  return out.reshape(x.sizes());
}

std::tuple<Tensor, Tensor> select_hadamard_block_cpu(const Tensor& x, const Tensor& w,
                                                     int64_t max_block) {
  const Tensor x2 = as_matrix(x, "x");
  const Tensor w2 = as_matrix(w, "w");
  const HadamardChoice choice = call_core([&] {
    return select_hadamard_block(to_view(x2, "x"), to_view(w2, "w"),
                                 static_cast<int32_t>(max_block));
  });
  Tensor errors = at::empty({static_cast<int64_t>(choice.errors.size())}, at::kDouble);
  for (size_t i = 0; i < choice.errors.size(); ++i) {
    errors.data_ptr<double>()[i] = choice.errors[i];
  }
  return {at::scalar_tensor(static_cast<int64_t>(choice.block), at::kLong), errors};
}

Tensor lsq_init_step_cpu(const Tensor& x) {
  const Tensor x2 = as_matrix(x, "x");
  const float s = call_core([&] { return lsq_init_step(to_view(x2, "x")); });
  return at::scalar_tensor(s, at::kFloat);
}

// Any device: the core's sample of x (quantize.h, kLsqMseSample) gathered where x lives, then the
// search on the host, so that every device gets the CPU's step bit for bit. Once per layer.
Tensor lsq_mse_step_any(const Tensor& x) {
  const Tensor x2 = as_matrix(x, "x");
  const int64_t rows = x2.size(0), cols = x2.size(1);
  Tensor sample = x2;
  const int64_t stride = lsq_mse_sample_stride(rows, cols);
  if (stride > 1) {
    // The core sees the sample only: the finiteness of the rest is checked where x lives.
    const int64_t bad = at::logical_not(at::isfinite(x2)).sum().item<int64_t>();
    TORCH_CHECK_VALUE(bad == 0, "x: expected finite values to initialise the LSQ step, found ", bad,
                      " non-finite");
    sample = x2.slice(0, 0, rows, stride);
  }
  sample = sample.to(at::kCPU).contiguous();
  const float s = call_core([&] { return lsq_mse_step(to_view(sample, "x")); });
  return at::scalar_tensor(s, x.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor> lsq_quantize_cpu(const Tensor& x, const Tensor& step, bool packed) {
  const Tensor x2 = as_matrix(x, "x");
  const Tensor s = fp32_scalar(step, "step", "int4train.lsq_quantize");
  const int64_t rows = x2.size(0), cols = x2.size(1);
  std::vector<int64_t> out_shape = x.sizes().vec();
  Tensor codes;
  TensorView codes_v;
  if (packed) {
    codes = at::empty({rows, packed_row_bytes(cols)}, at::kByte);
    codes_v = to_packed_view(codes, cols, "codes");
    out_shape.back() = packed_row_bytes(cols);
  } else {
    codes = at::empty({rows, cols}, at::kChar);
    codes_v = to_view(codes, "codes");
  }
  const int64_t nonfinite =
      call_core([&] { return lsq_quantize(to_view(x2, "x"), to_view(s, "step"), codes_v); });
  return {codes.reshape(out_shape), at::scalar_tensor(nonfinite, at::kLong)};
}

std::tuple<Tensor, Tensor, Tensor> quantize_bitsplit_cpu(const Tensor& g, int64_t seed,
                                                         int64_t stream, bool packed) {
  const Tensor g2 = as_matrix(g, "g");
  const int64_t rows = g2.size(0), cols = g2.size(1);
  std::vector<int64_t> out_shape = g.sizes().vec();
  Tensor hi, lo;
  TensorView hi_v, lo_v;
  if (packed) {
    hi = at::empty({rows, packed_row_bytes(cols)}, at::kByte);
    lo = at::empty({rows, packed_row_bytes(cols)}, at::kByte);
    hi_v = to_packed_view(hi, cols, "hi");
    lo_v = to_packed_view(lo, cols, "lo");
    out_shape.back() = packed_row_bytes(cols);
  } else {
    hi = at::empty({rows, cols}, at::kChar);
    lo = at::empty({rows, cols}, at::kChar);
    hi_v = to_view(hi, "hi");
    lo_v = to_view(lo, "lo");
  }
  Tensor scale = at::zeros({}, at::kFloat);
  const RandomKey key{static_cast<uint64_t>(seed), static_cast<uint64_t>(stream)};
  call_core([&] { quantize_bitsplit(to_view(g2, "g"), key, hi_v, lo_v, to_view(scale, "scale")); });
  return {hi.reshape(out_shape), lo.reshape(out_shape), scale};
}

Tensor pack_int4_cpu(const Tensor& codes) {
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kChar, "int4train.pack_int4: codes must be int8, got ",
                   codes.scalar_type());
  const Tensor c2 = as_matrix(codes, "codes");
  Tensor packed = at::empty({c2.size(0), packed_row_bytes(c2.size(1))}, at::kByte);
  call_core([&] { pack_int4(to_view(c2, "codes"), to_packed_view(packed, c2.size(1), "packed")); });
  std::vector<int64_t> shape = codes.sizes().vec();
  shape.back() = packed.size(1);
  return packed.reshape(shape);
}

Tensor unpack_int4_cpu(const Tensor& packed, int64_t cols) {
  TORCH_CHECK_VALUE(cols >= 0, "int4train.unpack_int4: cols must be >= 0, got ", cols);
  TORCH_CHECK_VALUE(packed.dim() >= 1 && packed.size(-1) == packed_row_bytes(cols),
                    "int4train.unpack_int4: packed must have last dimension ",
                    packed_row_bytes(cols), " for cols = ", cols, ", got shape ", packed.sizes());
  const Tensor p2 = as_matrix(packed, "packed");
  Tensor codes = at::empty({p2.size(0), cols}, at::kChar);
  call_core([&] { unpack_int4(to_packed_view(p2, cols, "packed"), to_view(codes, "codes")); });
  std::vector<int64_t> shape = packed.sizes().vec();
  shape.back() = cols;
  return codes.reshape(shape);
}

// uint8 operands are packed INT4 rows; their K counts 2 codes a byte (an odd K's zero padding nibble
// multiplies to zero, so K = 2 * bytes gives the same exact product).
Tensor gemm_s32_cpu(const Tensor& a, const Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, "int4train.gemm_s32: a and b must be 2-D, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type() &&
                       (a.scalar_type() == at::kChar || a.scalar_type() == at::kByte),
                   "int4train.gemm_s32: a and b must both be int8 codes or both uint8 packed int4, ",
                   "got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "int4train.gemm_s32: a is ", a.sizes(), " and b is ",
                    b.sizes(), ": their reduction dimensions (last) differ");
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  Tensor c = at::empty({a.size(0), b.size(0)}, at::kInt);
  call_core([&] {
    if (a.scalar_type() == at::kByte) {
      const int64_t k = 2 * a.size(1);
      gemm_s32(to_packed_view(ac, k, "a"), to_packed_view(bc, k, "b"), to_view(c, "c"));
    } else {
      gemm_s32(to_view(ac, "a"), to_view(bc, "b"), to_view(c, "c"));
    }
  });
  return c;
}

Tensor lss_probabilities_cpu(const Tensor& scores, double budget) {
  TORCH_CHECK_VALUE(scores.dim() == 1, "int4train.lss_probabilities: scores must be 1-D, got shape ",
                    scores.sizes());
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat,
                   "int4train.lss_probabilities: scores must be float32, got ", scores.scalar_type());
  const Tensor s = scores.contiguous();
  Tensor probs = at::empty_like(s);
  call_core([&] { lss_probabilities(to_view(s, "scores"), budget, to_view(probs, "probs")); });
  return probs;
}

// ---------------------------------------------------------------- the linear layer

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_forward_cpu(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& input_step, const std::optional<Tensor>& weight_step,
    c10::string_view recipe_name, int64_t hadamard_block, int64_t seed, const Tensor& step,
    int64_t layer) {
  constexpr const char* op = "int4train.linear_forward";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (N, in_features), got shape ", x.sizes());
  check_linear_shapes(x, weight, bias, op);
  LinearConfig config = config_from(recipe_name);
  const Recipe recipe = config.recipe;
  const int64_t n = x.size(0), d = x.size(1), c = weight.size(0);
  config.hadamard_block = static_cast<int32_t>(hadamard_block);
  config.seed = static_cast<uint64_t>(seed);
  config.step = step_value(step);
  config.layer = static_cast<uint32_t>(layer);
  LinearTensors out = allocate_linear_outputs(recipe, n, d, c, x.scalar_type(), x.options());

  Tensor sx, sw;
  if (recipe_uses_lsq(recipe)) {
    sx = fp32_scalar(input_step, "input_step", op);
    sw = fp32_scalar(weight_step, "weight_step", op);
  }
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  const std::optional<Tensor> bc =
      bias.has_value() && bias->defined() ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  if (n == 0 || d == 0 || c == 0) {
    // No product to form: y = bias (or zeros), and nothing worth saving. Still checks the dtypes.
    TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
                     ": x must be float32 or bfloat16, got ", x.scalar_type());
    out.y.zero_();
    if (bc.has_value()) out.y.add_(*bc);
    out.codes.zero_();
    return {out.y, out.codes, out.aux, out.scale, saved_step_of(step)};
  }
  LinearForwardArgs args;
  args.x = to_view(xc, "x");
  args.w = to_view(wc, "weight");
  args.bias = to_view_or_null(bc, "bias");
  if (sx.defined()) {
    args.step_x = to_view(sx, "input_step");
    args.step_w = to_view(sw, "weight_step");
  }
  args.y = to_view(out.y, "y");
  if (out.codes.numel() > 0) args.saved_codes = codes_view(out.codes, d, "saved_codes");
  if (out.aux.numel() > 0) args.saved_aux = to_view(out.aux, "saved_aux");
  args.saved_scale = to_view(out.scale, "saved_scale");
  call_core([&] { linear_forward(config, args); });
  return {out.y, out.codes, out.aux, out.scale, saved_step_of(step)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_backward_cpu(
    const Tensor& grad_y, const std::optional<Tensor>& x, const Tensor& codes, const Tensor& aux,
    const Tensor& scale, const Tensor& weight, const std::optional<Tensor>& input_step,
    const std::optional<Tensor>& weight_step, c10::string_view recipe_name, int64_t hadamard_block,
    int64_t seed, const Tensor& step, int64_t layer, std::array<bool, 5> output_mask) {
  constexpr const char* op = "int4train.linear_backward";
  TORCH_CHECK_VALUE(grad_y.dim() == 2, op, ": grad_y must be 2-D (N, out_features), got shape ",
                    grad_y.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) == grad_y.size(1), op,
                    ": grad_y has shape ", grad_y.sizes(), " but weight has shape ", weight.sizes());
  LinearConfig config = config_from(recipe_name);
  const Recipe recipe = config.recipe;
  const int64_t n = grad_y.size(0), c = weight.size(0), d = weight.size(1);
  config.hadamard_block = static_cast<int32_t>(hadamard_block);
  config.seed = static_cast<uint64_t>(seed);
  config.step = step_value(step);
  config.layer = static_cast<uint32_t>(layer);

  LinearGradTensors g = allocate_linear_grads(n, d, c, grad_y.scalar_type(), weight.scalar_type(),
                                              grad_y.options(), output_mask);
  Tensor sx, sw;
  if (recipe_uses_lsq(recipe)) {
    sx = fp32_scalar(input_step, "input_step", op);
    sw = fp32_scalar(weight_step, "weight_step", op);
  }
  if (n == 0 || d == 0 || c == 0) {
    if (g.grad_x.numel() > 0) g.grad_x.zero_();
    if (g.grad_w.numel() > 0) g.grad_w.zero_();
    if (output_mask[2]) g.grad_bias.copy_(grad_y.sum(0));
    if (output_mask[3]) g.grad_input_step.zero_();
    if (output_mask[4]) g.grad_weight_step.zero_();
    return {g.grad_x, g.grad_w, g.grad_bias, g.grad_input_step, g.grad_weight_step, g.stats};
  }
  const Tensor gc = grad_y.contiguous(), wc = weight.contiguous();
  Tensor xc;
  LinearBackwardArgs args;
  args.grad_y = to_view(gc, "grad_y");
  if (recipe == Recipe::kFp) {
    TORCH_CHECK_VALUE(x.has_value() && x->defined(), op, ": the fp recipe needs x (the forward input)");
    TORCH_CHECK_VALUE(x->dim() == 2 && x->size(0) == n && x->size(1) == d, op, ": x must have shape [",
                      n, ", ", d, "], got ", x->sizes());
    xc = x->contiguous();
    args.x = to_view(xc, "x");
  } else {
    if (codes.numel() > 0) args.saved_codes = codes_view(codes, d, "codes");
    if (aux.numel() > 0) args.saved_aux = to_view(aux.contiguous(), "aux");
    args.saved_scale = to_view(scale.contiguous(), "scale");
  }
  args.w = to_view(wc, "weight");
  if (sx.defined()) {
    args.step_x = to_view(sx, "input_step");
    args.step_w = to_view(sw, "weight_step");
  }
  if (output_mask[0]) args.grad_x = to_view(g.grad_x, "grad_x");
  if (output_mask[1]) args.grad_w = to_view(g.grad_w, "grad_weight");
  if (output_mask[2]) args.grad_bias = to_view(g.grad_bias, "grad_bias");
  if (output_mask[3] && sx.defined()) args.grad_step_x = to_view(g.grad_input_step, "grad_input_step");
  if (output_mask[4] && sw.defined()) {
    args.grad_step_w = to_view(g.grad_weight_step, "grad_weight_step");
  }
  if (!sx.defined()) {
    if (output_mask[3]) g.grad_input_step.zero_();
    if (output_mask[4]) g.grad_weight_step.zero_();
  }
  LinearBackwardStats stats;
  call_core([&] { linear_backward(config, args, &stats); });
  g.stats.data_ptr<int64_t>()[0] = stats.input_rows_kept;
  g.stats.data_ptr<int64_t>()[1] = stats.weight_rows_kept;
  return {g.grad_x, g.grad_w, g.grad_bias, g.grad_input_step, g.grad_weight_step, g.stats};
}

}  // namespace

namespace detail {

LinearGradTensors allocate_linear_grads(int64_t n, int64_t d, int64_t c, at::ScalarType grad_dtype,
                                        at::ScalarType weight_dtype,
                                        const at::TensorOptions& device, std::array<bool, 5> mask,
                                        bool zero_stats) {
  LinearGradTensors g;
  auto pick = [&](bool keep, at::IntArrayRef shape, at::ScalarType dtype) {
    return keep ? at::empty(shape, device.dtype(dtype)) : at::empty({0}, device.dtype(dtype));
  };
  g.grad_x = pick(mask[0], {n, d}, grad_dtype);
  g.grad_w = pick(mask[1], {c, d}, weight_dtype);
  g.grad_bias = pick(mask[2], {c}, grad_dtype);
  g.grad_input_step = pick(mask[3], {}, at::kFloat);
  g.grad_weight_step = pick(mask[4], {}, at::kFloat);
  g.stats = zero_stats ? at::zeros({2}, device.dtype(at::kLong))
                       : at::empty({2}, device.dtype(at::kLong));
  return g;
}

}  // namespace detail

TORCH_LIBRARY(int4train, m) {
  // Fake (meta) kernels for torch.compile live in this Python module.
  m.set_python_module("int4train._fake");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("hadamard_transform(Tensor x, int block) -> Tensor", tags);
  m.def("select_hadamard_block(Tensor x, Tensor w, int max_block=256) -> (Tensor block, Tensor errors)",
        tags);
  m.def("lsq_init_step(Tensor x) -> Tensor", tags);
  m.def("lsq_mse_step(Tensor x) -> Tensor", tags);
  m.def("lsq_quantize(Tensor x, Tensor step, bool packed=False) -> (Tensor codes, Tensor nonfinite)",
        tags);
  m.def(
      "quantize_bitsplit(Tensor g, int seed, int stream, bool packed=False) -> "
      "(Tensor hi, Tensor lo, Tensor scale)",
      tags);
  m.def("pack_int4(Tensor codes) -> Tensor", tags);
  m.def("unpack_int4(Tensor packed, int cols) -> Tensor", tags);
  m.def("gemm_s32(Tensor a, Tensor b) -> Tensor", tags);
  m.def("lss_probabilities(Tensor scores, float budget) -> Tensor", tags);
  m.def(
      "linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? input_step, "
      "Tensor? weight_step, str recipe, int hadamard_block, int seed, Tensor step, int layer) -> "
      "(Tensor y, Tensor codes, Tensor aux, Tensor scale, Tensor saved_step)",
      tags);
  m.def(
      "linear_backward(Tensor grad_y, Tensor? x, Tensor codes, Tensor aux, Tensor scale, "
      "Tensor weight, Tensor? input_step, Tensor? weight_step, str recipe, int hadamard_block, "
      "int seed, Tensor step, int layer, bool[5] output_mask) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_input_step, Tensor grad_weight_step, "
      "Tensor stats)",
      tags);
  // The LSQ steps from their parameters and the gradients back (quantize.h lsq_step_of_param,
  // lsq_step_param_grad), called by the layer's autograd below it (autograd.cpp).
  m.def("_lsq_steps(Tensor input_step, Tensor weight_step) -> (Tensor, Tensor)", tags);
  m.def(
      "_lsq_step_grads(Tensor input_step, Tensor weight_step, Tensor grad_input_step, "
      "Tensor grad_weight_step) -> (Tensor, Tensor)",
      tags);
  // The differentiable layer (autograd and autocast kernels in autograd.cpp). x: (..., in_features).
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias, Tensor? input_step, Tensor? weight_step, "
      "str recipe, int hadamard_block, int seed, Tensor step, int layer) -> Tensor",
      tags);
}

TORCH_LIBRARY_IMPL(int4train, CPU, m) {
  m.impl("hadamard_transform", &hadamard_transform_cpu);
  m.impl("select_hadamard_block", &select_hadamard_block_cpu);
  m.impl("lsq_init_step", &lsq_init_step_cpu);
  m.impl("lsq_quantize", &lsq_quantize_cpu);
  m.impl("quantize_bitsplit", &quantize_bitsplit_cpu);
  m.impl("pack_int4", &pack_int4_cpu);
  m.impl("unpack_int4", &unpack_int4_cpu);
  m.impl("gemm_s32", &gemm_s32_cpu);
  m.impl("lss_probabilities", &lss_probabilities_cpu);
  m.impl("linear_forward", &linear_forward_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

TORCH_LIBRARY_IMPL(int4train, CompositeExplicitAutograd, m) {
  m.impl("lsq_mse_step", &lsq_mse_step_any);
}

}  // namespace int4train::pt
