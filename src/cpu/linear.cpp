// int4train core: the quantized linear layer on the CPU, composed from the components (transform,
// quantizers, sampling, integer GEMM). This is the specification every other implementation of the
// layer (PyTorch CUDA path included) is checked against.
#include "int4train/linear.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "int4train/gemm.h"
#include "int4train/hadamard.h"
#include "int4train/int4.h"
#include "int4train/lss.h"
#include "int4train/numeric.h"
#include "int4train/philox.h"
#include "int4train/quantize.h"
#include "parallel.h"

namespace int4train {

const char* recipe_name(Recipe recipe) {
  switch (recipe) {
    case Recipe::kFp: return "fp";
    case Recipe::kInt8: return "int8";
    case Recipe::kLsqLuq: return "lsq_luq";
    case Recipe::kHq: return "hq";
    case Recipe::kHqBs: return "hq_bs";
    case Recipe::kHqLss: return "hq_lss";
  }
  return "unknown";
}

Recipe parse_recipe(const std::string& name) {
  for (int i = 0; i < kNumRecipes; ++i) {
    const Recipe r = static_cast<Recipe>(i);
    if (name == recipe_name(r)) return r;
  }
  throw_error(ErrorKind::kValue, "recipe: unknown recipe '" + name +
                                     "'; expected one of fp, int8, lsq_luq, hq, hq_bs, hq_lss");
}

const char* gemm_engine_name(GemmEngine engine) {
  switch (engine) {
    case GemmEngine::kAuto:
      return "auto";
    case GemmEngine::kFp8:
      return "fp8";
    case GemmEngine::kInt8:
      return "int8";
  }
  return "unknown";
}

void parse_recipe_spec(const std::string& spec, LinearConfig* cfg) {
  const size_t colon = spec.find(':');
  const Recipe recipe = parse_recipe(spec.substr(0, colon));
  double budget = kLssDefaultBudget;
  GemmEngine gemm = GemmEngine::kAuto;
  GradScaleMode grad_scale = GradScaleMode::kTensor;
  bool seen_budget = false, seen_gemm = false, seen_scale = false;
  if (colon != std::string::npos) {
    const std::string options = spec.substr(colon + 1);
    size_t pos = 0;
    while (true) {
      const size_t comma = options.find(',', pos);
      const std::string item = options.substr(pos, comma == std::string::npos ? std::string::npos
                                                                                : comma - pos);
      const size_t eq = item.find('=');
      const std::string key = item.substr(0, eq);
      const std::string value = eq == std::string::npos ? std::string() : item.substr(eq + 1);
      bool* seen = key == "lss_budget"   ? &seen_budget
                   : key == "gemm"       ? &seen_gemm
                   : key == "grad_scale" ? &seen_scale
                                         : nullptr;
      if (seen == nullptr) {
        throw_error(ErrorKind::kValue,
                    "recipe: unknown option '" + key + "' in '" + spec +
                        "'; expected NAME, hq_lss:lss_budget=X, an LSQ recipe with "
                        "gemm=auto|fp8|int8 or hq_bs / hq_lss with grad_scale=tensor|row");
      }
      if (*seen) {
        throw_error(ErrorKind::kValue,
                    "recipe: option '" + key + "' given twice in '" + spec + "'");
      }
      *seen = true;
      if (key == "lss_budget") {
        if (recipe != Recipe::kHqLss) {
          throw_error(ErrorKind::kValue,
                      "recipe: lss_budget applies to hq_lss only, got '" + spec + "'");
        }
        char* end = nullptr;
        budget = value.empty() ? 0.0 : std::strtod(value.c_str(), &end);
        if (value.empty() || end != value.c_str() + value.size()) {
          throw_error(ErrorKind::kValue,
                      "recipe: lss_budget expects a number, got '" + value + "' in '" + spec + "'");
        }
        check_lss_budget(budget);
      } else if (key == "grad_scale") {
        if (recipe != Recipe::kHqBs && recipe != Recipe::kHqLss) {
          throw_error(ErrorKind::kValue,
                      "recipe: grad_scale applies to hq_bs and hq_lss, got '" + spec + "'");
        }
        if (value != "tensor" && value != "row") {
          throw_error(ErrorKind::kValue, "recipe: grad_scale expects tensor or row, got '" + value +
                                             "' in '" + spec + "'");
        }
        grad_scale = value == "row" ? GradScaleMode::kRow : GradScaleMode::kTensor;
      } else {
        bool known = false;
        for (GemmEngine e : {GemmEngine::kAuto, GemmEngine::kFp8, GemmEngine::kInt8}) {
          if (value == gemm_engine_name(e)) {
            gemm = e;
            known = true;
          }
        }
        if (!known) {
          throw_error(ErrorKind::kValue, "recipe: gemm expects auto, fp8 or int8, got '" + value +
                                             "' in '" + spec + "'");
        }
        // auto (the default) is accepted everywhere, as Python's Recipe does.
        if (gemm != GemmEngine::kAuto && !recipe_uses_lsq(recipe)) {
          throw_error(
              ErrorKind::kValue,
              "recipe: gemm applies to the LSQ recipes (lsq_luq, hq, hq_bs, hq_lss), got '" + spec +
                  "'");
        }
      }
      if (comma == std::string::npos) break;
      pos = comma + 1;
    }
  }
  cfg->recipe = recipe;
  cfg->lss_budget = budget;
  cfg->gemm = gemm;
  cfg->grad_scale = grad_scale;
}

bool recipe_uses_lsq(Recipe recipe) {
  return recipe == Recipe::kLsqLuq || recipe_uses_hadamard(recipe);
}
bool recipe_uses_hadamard(Recipe recipe) {
  return recipe == Recipe::kHq || recipe == Recipe::kHqBs || recipe == Recipe::kHqLss;
}

int64_t LinearSavedShapes::bytes() const {
  int64_t b = aux_bytes;
  if (codes_dtype == DType::kInt4Packed) {
    b += codes_rows * packed_row_bytes(codes_cols);
  } else {
    b += codes_rows * codes_cols * static_cast<int64_t>(dtype_size(codes_dtype));
  }
  if (codes_rows > 0 && codes_dtype == DType::kInt8) b += 4;  // the int8 scale
  return b;
}

LinearSavedShapes linear_saved_shapes(Recipe recipe, int64_t n, int64_t d) {
  LinearSavedShapes s;
  switch (recipe) {
    case Recipe::kFp:
      s.codes_dtype = DType::kFloat32;
      s.needs_input = true;
      break;
    case Recipe::kInt8:
      s.codes_dtype = DType::kInt8;
      s.codes_rows = n;
      s.codes_cols = d;
      break;
    default:
      s.codes_dtype = DType::kInt4Packed;
      s.codes_rows = n;
      s.codes_cols = d;
      s.aux_bytes = compact_aux_bytes(n, d);
      break;
  }
  return s;
}

namespace {

// A dense, owned row-major matrix used for intermediates.
template <typename T>
struct Buffer {
  std::vector<T> data;
  int64_t rows = 0, cols = 0;
  Buffer() = default;
  Buffer(int64_t r, int64_t c) : data(static_cast<size_t>(r * c)), rows(r), cols(c) {}
  TensorView view(DType dtype) { return make_matrix(data.data(), dtype, rows, cols); }
};

struct PackedBuffer {
  std::vector<uint8_t> data;
  int64_t rows = 0, cols = 0;
  PackedBuffer() = default;
  PackedBuffer(int64_t r, int64_t c)
      : data(static_cast<size_t>(r * packed_row_bytes(c))), rows(r), cols(c) {}
  TensorView view() { return make_matrix(data.data(), DType::kInt4Packed, rows, cols); }
};

float read_scalar(const TensorView& t, const char* arg) {
  check_scalar(t, arg);
  check_dtype(t, arg, {DType::kFloat32});
  return *t.ptr<float>();
}

void write_scalar(const TensorView& t, float value) {
  if (t.data == nullptr) return;
  check_scalar(t, "grad_step");
  check_dtype(t, "grad_step", {DType::kFloat32});
  *t.ptr<float>() = value;
}

float load(const TensorView& t, int64_t r, int64_t c) {
  const int64_t i = r * t.strides[0] + c;
  return t.dtype == DType::kBFloat16 ? bf16_to_float(t.ptr<const BFloat16>()[i])
                                     : t.ptr<const float>()[i];
}

// fp32 copy of an fp32 / bf16 matrix (row strides honoured).
Buffer<float> to_f32(const TensorView& t) {
  Buffer<float> out(t.rows(), t.cols());
  detail::parallel_for(out.rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      for (int64_t c = 0; c < out.cols; ++c) out.data[r * out.cols + c] = load(t, r, c);
    }
  });
  return out;
}

// out (fp32 or bf16, strided) = src (dense fp32).
void store(const float* src, TensorView out) {
  const int64_t rows = out.rows(), cols = out.cols();
  detail::parallel_for(rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* s = src + r * cols;
      if (out.dtype == DType::kBFloat16) {
        BFloat16* d = out.ptr<BFloat16>() + r * out.strides[0];
        for (int64_t c = 0; c < cols; ++c) d[c] = float_to_bf16(s[c]);
      } else {
        float* d = out.ptr<float>() + r * out.strides[0];
        std::memcpy(d, s, static_cast<size_t>(cols) * sizeof(float));
      }
    }
  });
}

void fill_nan(TensorView out) {
  Buffer<float> nan(out.rows(), out.cols());
  std::fill(nan.data.begin(), nan.data.end(), std::numeric_limits<float>::quiet_NaN());
  store(nan.data.data(), out);
}

RandomKey key(const LinearConfig& cfg, RandomPurpose purpose) {
  return RandomKey{cfg.seed, make_stream(cfg.step, cfg.layer, purpose)};
}

// x B_g in fp32 (a plain fp32 copy for g == 1).
Buffer<float> rotate(const TensorView& x, int32_t block) {
  Buffer<float> out(x.rows(), x.cols());
  hadamard_transform(x, out.view(DType::kFloat32), block);
  return out;
}

// int8 codes (rows x cols) -> transposed packed INT4 (cols x rows).
PackedBuffer pack_transposed(const Buffer<int8_t>& codes) {
  Buffer<int8_t> t(codes.cols, codes.rows);
  transpose(make_matrix(const_cast<int8_t*>(codes.data.data()), DType::kInt8, codes.rows, codes.cols),
            t.view(DType::kInt8));
  PackedBuffer p(t.rows, t.cols);
  pack_int4(t.view(DType::kInt8), p.view());
  return p;
}

PackedBuffer pack(const Buffer<int8_t>& codes) {
  PackedBuffer p(codes.rows, codes.cols);
  pack_int4(make_matrix(const_cast<int8_t*>(codes.data.data()), DType::kInt8, codes.rows, codes.cols),
            p.view());
  return p;
}

Buffer<int8_t> transposed(const Buffer<int8_t>& codes) {
  Buffer<int8_t> t(codes.cols, codes.rows);
  transpose(make_matrix(const_cast<int8_t*>(codes.data.data()), DType::kInt8, codes.rows, codes.cols),
            t.view(DType::kInt8));
  return t;
}

Buffer<float> transposed(const Buffer<float>& m) {
  Buffer<float> t(m.cols, m.rows);
  transpose(make_matrix(const_cast<float*>(m.data.data()), DType::kFloat32, m.rows, m.cols),
            t.view(DType::kFloat32));
  return t;
}

// Gathers the listed rows of int8 codes (rows x cols) into a packed matrix, optionally transposed
// (cols x count), the layout the weight-gradient product needs (K = selected tokens).
PackedBuffer gather_rows_packed(const std::vector<const int8_t*>& rows, int64_t cols,
                                bool transpose_out) {
  const int64_t count = static_cast<int64_t>(rows.size());
  Buffer<int8_t> g(count, cols);
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(g.data.data() + i * cols, rows[static_cast<size_t>(i)], static_cast<size_t>(cols));
  }
  return transpose_out ? pack_transposed(g) : pack(g);
}

void check_common(const LinearConfig& cfg, const TensorView& x_like, const TensorView& w,
                  const char* x_name) {
  check_lss_budget(cfg.lss_budget);
  check_matrix(w, "w");
  check_dtype(w, "w", {DType::kFloat32, DType::kBFloat16});
  const int64_t d = w.shape[1];
  if (recipe_uses_hadamard(cfg.recipe)) {
    if (!is_valid_hadamard_block(cfg.hadamard_block) || (d > 0 && d % cfg.hadamard_block != 0)) {
      throw_error(ErrorKind::kValue,
                  "hadamard_block: expected a power of two <= " + std::to_string(kMaxHadamardBlock) +
                      " dividing in_features = " + std::to_string(d) + ", got " +
                      std::to_string(cfg.hadamard_block));
    }
  } else if (cfg.hadamard_block != 1) {
    throw_error(ErrorKind::kValue, std::string("hadamard_block: recipe ") + recipe_name(cfg.recipe) +
                                       " uses no Hadamard transform, expected 1, got " +
                                       std::to_string(cfg.hadamard_block));
  }
  (void)x_like;
  (void)x_name;
}

}  // namespace

void check_lss_budget(double lss_budget) {
  if (!(lss_budget >= kLssMinBudget && lss_budget <= kLssMaxBudget)) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%g", lss_budget);
    throw_error(ErrorKind::kValue,
                "lss_budget: expected a number in [0.125, 2] (rows kept per token), got " +
                    std::string(buf));
  }
}

// ------------------------------------------------------------------------------------------ forward

void linear_forward(const LinearConfig& cfg, const LinearForwardArgs& a) {
  // Shapes first, so that a mismatch is reported as such rather than as a block-size error.
  check_matrix(a.x, "x");
  check_dtype(a.x, "x", {DType::kFloat32, DType::kBFloat16});
  check_matrix(a.w, "w");
  const int64_t n = a.x.shape[0], d = a.x.shape[1], c = a.w.shape[0];
  if (a.w.shape[1] != d) {
    throw_error(ErrorKind::kValue, "w: expected " + std::to_string(d) +
                                       " columns (in_features of x), got " +
                                       std::to_string(a.w.shape[1]));
  }
  check_common(cfg, a.x, a.w, "x");
  check_shape(a.y, "y", n, c);
  check_dtype(a.y, "y", {DType::kFloat32, DType::kBFloat16});
  if (a.bias.data != nullptr) {
    check_vector(a.bias, "bias", c);
    check_dtype(a.bias, "bias", {DType::kFloat32, DType::kBFloat16});
  }
  if (a.saved_step.data != nullptr) {
    throw_error(ErrorKind::kValue,
                "saved_step: linear_forward_cuda's output (the device step); the CPU's step is "
                "LinearConfig::step, expected no saved_step");
  }
  // The int8 recipe's scale (required there); the others write 0 where it is given.
  if (cfg.recipe == Recipe::kInt8 || a.saved_scale.data != nullptr) {
    check_scalar(a.saved_scale, "saved_scale");
    check_dtype(a.saved_scale, "saved_scale", {DType::kFloat32});
    if (cfg.recipe != Recipe::kInt8) *a.saved_scale.ptr<float>() = 0.0f;
  }
  const LinearSavedShapes saved = linear_saved_shapes(cfg.recipe, n, d);
  if (saved.codes_rows > 0 || cfg.recipe != Recipe::kFp) {
    if (cfg.recipe != Recipe::kFp) {
      check_shape(a.saved_codes, "saved_codes", saved.codes_rows, saved.codes_cols);
      check_dtype(a.saved_codes, "saved_codes", {saved.codes_dtype});
    }
  }

  Epilogue ep;
  ep.bias = a.bias;

  if (cfg.recipe == Recipe::kFp) {
    Buffer<float> x32 = to_f32(a.x), w32 = to_f32(a.w), y(n, c);
    gemm_f32(x32.view(DType::kFloat32), w32.view(DType::kFloat32), 1.0f, false,
             y.view(DType::kFloat32));
    if (a.bias.data != nullptr) {
      for (int64_t j = 0; j < c; ++j) {
        const float b = load(a.bias.dtype == DType::kBFloat16
                                 ? make_matrix(a.bias.data, DType::kBFloat16, 1, c)
                                 : make_matrix(a.bias.data, DType::kFloat32, 1, c),
                             0, j);
        for (int64_t i = 0; i < n; ++i) y.data[i * c + j] += b;
      }
    }
    store(y.data.data(), a.y);
    return;
  }

  if (cfg.recipe == Recipe::kInt8) {
    Buffer<int8_t> wq(c, d);
    float sw = 0.0f;
    quantize_absmax(a.x, 127, a.saved_codes, a.saved_scale);
    quantize_absmax(a.w, 127, wq.view(DType::kInt8), make_scalar(&sw, DType::kFloat32));
    ep.alpha = *a.saved_scale.ptr<float>() * sw;
    gemm_scaled(a.saved_codes, wq.view(DType::kInt8), ep, a.y);
    return;
  }

  // LSQ recipes: X~ = X B_g, W~ = W B_g quantized with the learned steps, one INT4 product.
  const float sx = read_scalar(a.step_x, "step_x");
  const float sw = read_scalar(a.step_w, "step_w");
  check_vector(a.saved_aux, "saved_aux", saved.aux_bytes);
  check_dtype(a.saved_aux, "saved_aux", {DType::kUInt8});
  const int32_t g = cfg.hadamard_block;
  Buffer<float> xt = rotate(a.x, g), wt = rotate(a.w, g);
  const int64_t bad_x = lsq_quantize_compact(xt.view(DType::kFloat32), a.step_x,
                                             key(cfg, RandomPurpose::kLsqAux), a.saved_codes,
                                             a.saved_aux);
  PackedBuffer wq(c, d);
  const int64_t bad_w = lsq_quantize(wt.view(DType::kFloat32), a.step_w, wq.view());
  if (bad_x > 0 || bad_w > 0) {
    fill_nan(a.y);
    return;
  }
  ep.alpha = sx * sw;
  gemm_scaled(a.saved_codes, wq.view(), ep, a.y);
}

// ----------------------------------------------------------------------------------------- backward

namespace {

// Column sums of grad_y into grad_bias, in fp64 in linear.h's order (blocks of kBiasGradBlockRows).
void bias_gradient(const TensorView& gy, TensorView grad_bias) {
  const int64_t n = gy.rows(), c = gy.cols();
  check_vector(grad_bias, "grad_bias", c);
  check_dtype(grad_bias, "grad_bias", {DType::kFloat32, DType::kBFloat16});
  std::vector<float> sums(static_cast<size_t>(c));
  detail::parallel_for(c, 256, [&](int64_t b, int64_t e) {
    const size_t w = static_cast<size_t>(e - b);
    std::vector<double> acc(w, 0.0), block(w);
    for (int64_t i0 = 0; i0 < n; i0 += kBiasGradBlockRows) {
      std::fill(block.begin(), block.end(), 0.0);
      const int64_t i1 = std::min(n, i0 + kBiasGradBlockRows);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = b; j < e; ++j) block[static_cast<size_t>(j - b)] += load(gy, i, j);
      }
      for (size_t k = 0; k < w; ++k) acc[k] += block[k];
    }
    for (int64_t j = b; j < e; ++j) sums[static_cast<size_t>(j)] = static_cast<float>(acc[j - b]);
  });
  store(sums.data(), make_matrix(grad_bias.data, grad_bias.dtype, 1, c));
}

// The backward products of the LSQ recipes in the Hadamard domain: dX^ (N x D) and dW^ (C x D), fp32.
struct DomainGrads {
  Buffer<float> dx, dw;
  bool want_dx = false, want_dw = false;
};

// d X^ = s_g s_w (Qg Qw), d W^ = s_g s_x (Qg^T Qx) on INT4 codes (recipe hq).
void products_plain4(const LinearConfig& cfg, const TensorView& gy, const Buffer<int8_t>& qw,
                     const TensorView& qx_packed, float sx, float sw, DomainGrads& out) {
  const int64_t n = gy.rows(), c = gy.cols(), d = qw.cols;
  Buffer<int8_t> qg(n, c);
  float sg = 0.0f;
  quantize_stochastic(gy, 7, key(cfg, RandomPurpose::kGradRound), qg.view(DType::kInt8),
                      make_scalar(&sg, DType::kFloat32));
  if (out.want_dx) {
    PackedBuffer a = pack(qg), b = pack_transposed(qw);  // A: N x C, B: D x C
    Epilogue ep;
    ep.alpha = sg * sw;
    gemm_scaled(a.view(), b.view(), ep, out.dx.view(DType::kFloat32));
  }
  if (out.want_dw) {
    PackedBuffer a = pack_transposed(qg);  // C x N
    PackedBuffer b(d, n);                  // Qx^T: D x N
    transpose_int4(qx_packed, b.view());
    Epilogue ep;
    ep.alpha = sg * sx;
    gemm_scaled(a.view(), b.view(), ep, out.dw.view(DType::kFloat32));
  }
}

// LUQ gradient (lsq_luq): fp32 products of the dequantized 4-bit logarithmic gradient with the
// dequantized forward codes.
void products_luq(const LinearConfig& cfg, const TensorView& gy, const Buffer<int8_t>& qw,
                  const TensorView& qx_packed, float sx, float sw, DomainGrads& out) {
  const int64_t n = gy.rows(), c = gy.cols(), d = qw.cols;
  Buffer<int8_t> codes(n, c);
  float alpha = 0.0f;
  quantize_luq(gy, key(cfg, RandomPurpose::kGradRound), codes.view(DType::kInt8),
               make_scalar(&alpha, DType::kFloat32));
  Buffer<float> gl(n, c);
  dequantize_luq(codes.view(DType::kInt8), make_scalar(&alpha, DType::kFloat32),
                 gl.view(DType::kFloat32));
  if (out.want_dx) {
    Buffer<float> what_t(d, c);  // (s_w Qw)^T
    Buffer<int8_t> qwt = transposed(qw);
    for (size_t i = 0; i < what_t.data.size(); ++i) what_t.data[i] = sw * qwt.data[i];
    gemm_f32(gl.view(DType::kFloat32), what_t.view(DType::kFloat32), 1.0f, false,
             out.dx.view(DType::kFloat32));
  }
  if (out.want_dw) {
    Buffer<float> glt = transposed(gl);  // C x N
    Buffer<int8_t> qx(n, d);
    unpack_int4(qx_packed, qx.view(DType::kInt8));
    Buffer<int8_t> qxt = transposed(qx);  // D x N
    Buffer<float> xhat_t(d, n);
    for (size_t i = 0; i < xhat_t.data.size(); ++i) xhat_t.data[i] = sx * qxt.data[i];
    gemm_f32(glt.view(DType::kFloat32), xhat_t.view(DType::kFloat32), 1.0f, false,
             out.dw.view(DType::kFloat32));
  }
}

// Bit split (hq_bs) and bit split + LSS (hq_lss). Rows 0..N-1 are the hi rows (weight 16), rows
// N..2N-1 the lo rows (weight 1); a kept row i carries the power-of-two importance weight 2^k_i.
void products_bitsplit(const LinearConfig& cfg, bool sample, const TensorView& gy,
                       const Buffer<int8_t>& qw, const TensorView& qx_packed, float sx, float sw,
                       DomainGrads& out, LinearBackwardStats* stats) {
  const int64_t n = gy.rows(), c = gy.cols(), d = qw.cols;
  Buffer<int8_t> hi(n, c), lo(n, c);
  float sg = 0.0f;
  // grad_scale=row: token i's rows carry 2^-k_i (k_i <= kGradRowMaxExponent); every exponent below
  // is offset by row_shift = kGradRowMaxExponent so that it stays >= 0, and the sums are scaled by
  // 2^-row_shift at the end (exact: a power of two).
  const bool by_row = cfg.grad_scale == GradScaleMode::kRow;
  const int row_shift = by_row ? kGradRowMaxExponent : 0;
  std::vector<int8_t> row_exp(static_cast<size_t>(n), 0);
  if (by_row) {
    quantize_bitsplit_rows(gy, kGradRowMaxExponent, key(cfg, RandomPurpose::kGradRound),
                           hi.view(DType::kInt8), lo.view(DType::kInt8),
                           make_scalar(&sg, DType::kFloat32),
                           make_vector(row_exp.data(), DType::kInt8, n));
  } else {
    quantize_bitsplit(gy, key(cfg, RandomPurpose::kGradRound), hi.view(DType::kInt8),
                      lo.view(DType::kInt8), make_scalar(&sg, DType::kFloat32));
  }
  auto row_ptr = [&](int64_t i) -> const int8_t* {
    return i < n ? hi.data.data() + i * c : lo.data.data() + (i - n) * c;
  };
  // The x16 of the hi rows and the token's row exponent.
  auto base_exp = [&](int64_t i) {
    return (i < n ? 4 : 0) + row_shift - row_exp[static_cast<size_t>(i % n)];
  };
  auto row_factor = [&](int64_t i) { return std::ldexp(1.0f, -row_exp[static_cast<size_t>(i)]); };

  // Row scores ||R_i|| up to the common factor s_g.
  std::vector<float> hi_norm(static_cast<size_t>(n)), lo_norm(static_cast<size_t>(n));
  if (sample && n > 0) {
    row_norms(hi.view(DType::kInt8), make_vector(hi_norm.data(), DType::kFloat32, n));
    row_norms(lo.view(DType::kInt8), make_vector(lo_norm.data(), DType::kFloat32, n));
  }
  // Selection: kept row ids and their exponents e (weight 2^e, the x16 included).
  auto select = [&](const std::vector<float>& scores, RandomPurpose purpose,
                    std::vector<int64_t>& rows, std::vector<int>& exps) {
    const int64_t m = 2 * n;
    rows.clear();
    exps.clear();
    if (!sample) {
      for (int64_t i = 0; i < m; ++i) {
        rows.push_back(i);
        exps.push_back(base_exp(i));
      }
      return;
    }
    std::vector<float> probs(static_cast<size_t>(m));
    std::vector<int8_t> k(static_cast<size_t>(m));
    const double budget = cfg.lss_budget * static_cast<double>(n);
    const int64_t capacity = lss_capacity(budget, m);
    std::vector<int32_t> slots(static_cast<size_t>(capacity));
    lss_probabilities(make_vector(const_cast<float*>(scores.data()), DType::kFloat32, m), budget,
                      make_vector(probs.data(), DType::kFloat32, m));
    lss_round_pow2(make_vector(probs.data(), DType::kFloat32, m), kLssMaxExponent, capacity,
                   make_vector(k.data(), DType::kInt8, m));
    lss_select(make_vector(k.data(), DType::kInt8, m), kLssMaxExponent, key(cfg, purpose),
               make_vector(slots.data(), DType::kInt32, capacity));
    for (const int32_t i : slots) {
      if (i < 0) continue;
      rows.push_back(i);
      exps.push_back(base_exp(i) + k[static_cast<size_t>(i)]);
    }
  };

  std::vector<int64_t> rows;
  std::vector<int> exps;
  if (out.want_dx) {
    std::vector<float> scores(static_cast<size_t>(2 * n));
    for (int64_t i = 0; i < n; ++i) {
      scores[static_cast<size_t>(i)] = 16.0f * hi_norm[static_cast<size_t>(i)] * row_factor(i);
      scores[static_cast<size_t>(n + i)] = lo_norm[static_cast<size_t>(i)] * row_factor(i);
    }
    select(scores, RandomPurpose::kSampleInput, rows, exps);
    if (stats) stats->input_rows_kept = sample ? static_cast<int64_t>(rows.size()) : 0;
    // One INT4 product over the kept rows (M = kept, N = D, K = C), then each token row is the exact
    // int64 sum of its (at most two) kept rows times 2^e.
    std::vector<const int8_t*> ptrs;
    for (int64_t i : rows) ptrs.push_back(row_ptr(i));
    const int64_t m = static_cast<int64_t>(rows.size());
    PackedBuffer a = gather_rows_packed(ptrs, c, false);
    PackedBuffer b = pack_transposed(qw);  // D x C
    Buffer<int32_t> p(m, d);
    if (m > 0) gemm_s32(a.view(), b.view(), p.view(DType::kInt32));
    std::vector<int64_t> acc(static_cast<size_t>(n * d), 0);
    for (int64_t j = 0; j < m; ++j) {
      const int64_t token = rows[static_cast<size_t>(j)] % n;
      const int e = exps[static_cast<size_t>(j)];
      for (int64_t col = 0; col < d; ++col) {
        acc[static_cast<size_t>(token * d + col)] += static_cast<int64_t>(p.data[j * d + col]) << e;
      }
    }
    const double scale = static_cast<double>(sg) * static_cast<double>(sw);
    for (size_t i = 0; i < acc.size(); ++i) {
      out.dx.data[i] =
          static_cast<float>(scale * std::ldexp(static_cast<double>(acc[i]), -row_shift));
    }
  }
  if (out.want_dw) {
    std::vector<float> xnorm(static_cast<size_t>(n));
    if (sample && n > 0) {
      row_norms(qx_packed, make_vector(xnorm.data(), DType::kFloat32, n));
    }
    std::vector<float> scores(static_cast<size_t>(2 * n));
    for (int64_t i = 0; i < n; ++i) {
      scores[static_cast<size_t>(i)] =
          16.0f * hi_norm[static_cast<size_t>(i)] * xnorm[i] * row_factor(i);
      scores[static_cast<size_t>(n + i)] =
          lo_norm[static_cast<size_t>(i)] * xnorm[i] * row_factor(i);
    }
    select(scores, RandomPurpose::kSampleWeight, rows, exps);
    if (stats) stats->weight_rows_kept = sample ? static_cast<int64_t>(rows.size()) : 0;
    Buffer<int8_t> qx(n, d);
    unpack_int4(qx_packed, qx.view(DType::kInt8));
    // Group kept rows by exponent: one INT4 product per group (K = the group's tokens), summed in
    // int64 with weight 2^e, so the reduction over tokens stays exact.
    std::vector<int64_t> acc(static_cast<size_t>(c * d), 0);
    std::vector<int> distinct(exps);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    for (int e : distinct) {
      std::vector<const int8_t*> gp, xp;
      for (size_t j = 0; j < rows.size(); ++j) {
        if (exps[j] != e) continue;
        gp.push_back(row_ptr(rows[j]));
        xp.push_back(qx.data.data() + (rows[j] % n) * d);
      }
      PackedBuffer a = gather_rows_packed(gp, c, true);  // C x K
      PackedBuffer b = gather_rows_packed(xp, d, true);  // D x K
      Buffer<int32_t> p(c, d);
      gemm_s32(a.view(), b.view(), p.view(DType::kInt32));
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += static_cast<int64_t>(p.data[i]) << e;
    }
    const double scale = static_cast<double>(sg) * static_cast<double>(sx);
    for (size_t i = 0; i < acc.size(); ++i) {
      out.dw.data[i] =
          static_cast<float>(scale * std::ldexp(static_cast<double>(acc[i]), -row_shift));
    }
  }
}

// The backward of every recipe; linear_backward below adds the rows_kept output.
void backward_impl(const LinearConfig& cfg, const LinearBackwardArgs& a,
                   LinearBackwardStats* stats) {
  check_common(cfg, a.grad_y, a.w, "grad_y");
  check_matrix(a.grad_y, "grad_y");
  check_dtype(a.grad_y, "grad_y", {DType::kFloat32, DType::kBFloat16});
  const int64_t n = a.grad_y.shape[0], c = a.grad_y.shape[1], d = a.w.shape[1];
  if (a.w.shape[0] != c) {
    throw_error(ErrorKind::kValue, "w: expected " + std::to_string(c) +
                                       " rows (out_features of grad_y), got " +
                                       std::to_string(a.w.shape[0]));
  }
  const bool want_dx = a.grad_x.data != nullptr;
  const bool want_dw = a.grad_w.data != nullptr;
  if (want_dx) {
    check_shape(a.grad_x, "grad_x", n, d);
    check_dtype(a.grad_x, "grad_x", {DType::kFloat32, DType::kBFloat16});
  }
  if (want_dw) {
    check_shape(a.grad_w, "grad_w", c, d);
    check_dtype(a.grad_w, "grad_w", {DType::kFloat32, DType::kBFloat16});
  }
  if (a.grad_bias.data != nullptr) bias_gradient(a.grad_y, a.grad_bias);

  if (cfg.recipe == Recipe::kFp) {
    write_scalar(a.grad_step_x, 0.0f);
    write_scalar(a.grad_step_w, 0.0f);
    Buffer<float> g32 = to_f32(a.grad_y);
    if (want_dx) {
      Buffer<float> wt = transposed(to_f32(a.w)), dx(n, d);  // D x C
      gemm_f32(g32.view(DType::kFloat32), wt.view(DType::kFloat32), 1.0f, false,
               dx.view(DType::kFloat32));
      store(dx.data.data(), a.grad_x);
    }
    if (want_dw) {
      check_shape(a.x, "x", n, d);
      check_dtype(a.x, "x", {DType::kFloat32, DType::kBFloat16});
      Buffer<float> gt = transposed(g32), xt = transposed(to_f32(a.x)), dw(c, d);
      gemm_f32(gt.view(DType::kFloat32), xt.view(DType::kFloat32), 1.0f, false,
               dw.view(DType::kFloat32));
      store(dw.data.data(), a.grad_w);
    }
    return;
  }

  const LinearSavedShapes saved = linear_saved_shapes(cfg.recipe, n, d);
  check_shape(a.saved_codes, "saved_codes", saved.codes_rows, saved.codes_cols);
  check_dtype(a.saved_codes, "saved_codes", {saved.codes_dtype});

  if (cfg.recipe == Recipe::kInt8) {
    write_scalar(a.grad_step_x, 0.0f);
    write_scalar(a.grad_step_w, 0.0f);
    const float sx = read_scalar(a.saved_scale, "saved_scale");
    Buffer<int8_t> qg(n, c), qw(c, d);
    float sg = 0.0f, sw = 0.0f;
    quantize_stochastic(a.grad_y, 127, key(cfg, RandomPurpose::kGradRound), qg.view(DType::kInt8),
                        make_scalar(&sg, DType::kFloat32));
    quantize_absmax(a.w, 127, qw.view(DType::kInt8), make_scalar(&sw, DType::kFloat32));
    if (want_dx) {
      Buffer<int8_t> qwt = transposed(qw);  // D x C
      Epilogue ep;
      ep.alpha = sg * sw;
      gemm_scaled(qg.view(DType::kInt8), qwt.view(DType::kInt8), ep, a.grad_x);
    }
    if (want_dw) {
      Buffer<int8_t> qgt = transposed(qg);  // C x N
      Buffer<int8_t> qx(n, d);
      std::memcpy(qx.data.data(), a.saved_codes.data, static_cast<size_t>(n * d));
      Buffer<int8_t> qxt = transposed(qx);  // D x N
      Epilogue ep;
      ep.alpha = sg * sx;
      gemm_scaled(qgt.view(DType::kInt8), qxt.view(DType::kInt8), ep, a.grad_w);
    }
    return;
  }

  // LSQ recipes.
  const float sx = read_scalar(a.step_x, "step_x");
  const float sw = read_scalar(a.step_w, "step_w");
  check_vector(a.saved_aux, "saved_aux", saved.aux_bytes);
  check_dtype(a.saved_aux, "saved_aux", {DType::kUInt8});
  const int32_t g = cfg.hadamard_block;
  // The weight is a parameter, unchanged since the forward: recompute W~, its codes, exact mask and
  // residual rather than saving them.
  Buffer<float> wt = rotate(a.w, g);
  Buffer<int8_t> qw(c, d);
  lsq_quantize(wt.view(DType::kFloat32), a.step_w, qw.view(DType::kInt8));

  DomainGrads grads;
  grads.want_dx = want_dx || a.grad_step_x.data != nullptr;
  grads.want_dw = want_dw || a.grad_step_w.data != nullptr;
  if (grads.want_dx) grads.dx = Buffer<float>(n, d);
  if (grads.want_dw) grads.dw = Buffer<float>(c, d);
  switch (cfg.recipe) {
    case Recipe::kLsqLuq:
      products_luq(cfg, a.grad_y, qw, a.saved_codes, sx, sw, grads);
      break;
    case Recipe::kHq:
      products_plain4(cfg, a.grad_y, qw, a.saved_codes, sx, sw, grads);
      break;
    case Recipe::kHqBs:
      products_bitsplit(cfg, false, a.grad_y, qw, a.saved_codes, sx, sw, grads, stats);
      break;
    default:
      products_bitsplit(cfg, true, a.grad_y, qw, a.saved_codes, sx, sw, grads, stats);
      break;
  }

  if (grads.want_dx) {
    Buffer<float> dxt(n, d);
    lsq_backward_compact(a.saved_codes, a.saved_aux, grads.dx.view(DType::kFloat32),
                         dxt.view(DType::kFloat32), a.grad_step_x);
    if (want_dx) hadamard_transform(dxt.view(DType::kFloat32), a.grad_x, g);
  }
  if (grads.want_dw) {
    Buffer<float> dwt(c, d);
    lsq_backward(wt.view(DType::kFloat32), a.step_w, grads.dw.view(DType::kFloat32),
                 dwt.view(DType::kFloat32), a.grad_step_w);
    if (want_dw) hadamard_transform(dwt.view(DType::kFloat32), a.grad_w, g);
  }
}

}  // namespace

void linear_backward(const LinearConfig& cfg, const LinearBackwardArgs& a,
                     LinearBackwardStats* stats) {
  if (stats) *stats = LinearBackwardStats{};
  if (a.rows_kept.data != nullptr) {
    check_dtype(a.rows_kept, "rows_kept", {DType::kInt64});
    check_vector(a.rows_kept, "rows_kept", 2);
  }
  LinearBackwardStats local;
  backward_impl(cfg, a, &local);
  if (stats) *stats = local;
  if (a.rows_kept.data != nullptr) {
    a.rows_kept.ptr<int64_t>()[0] = local.input_rows_kept;
    a.rows_kept.ptr<int64_t>()[1] = local.weight_rows_kept;  // contiguous (check_vector)
  }
}

}  // namespace int4train
