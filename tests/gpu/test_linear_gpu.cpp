// GPU tests of the layer's forward (linear_forward_cuda) against the CPU's linear_forward, bit for
// bit (y, saved codes, saved aux), including the NaN report of non-finite inputs; and a CUDA graph
// capture of the forward (which fails if anything in it synchronises with the host) whose replay
// equals the direct call.
#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "int4train/cuda.h"
#include "int4train/int4.h"
#include "int4train/linear.h"
#include "int4train/quantize.h"

namespace {

using namespace int4train;
using gputest::DevBuf;

std::vector<float> randn(int64_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = nd(rng);
  return v;
}

// Host bytes of values as fp32 or bf16.
std::vector<uint8_t> as_bytes(const std::vector<float>& v, bool bf16) {
  std::vector<uint8_t> b(v.size() * (bf16 ? 2 : 4));
  for (size_t i = 0; i < v.size(); ++i) {
    if (bf16) {
      const uint16_t h = float_to_bf16(v[i]).bits;
      std::memcpy(&b[i * 2], &h, 2);
    } else {
      std::memcpy(&b[i * 4], &v[i], 4);
    }
  }
  return b;
}

struct Problem {
  int64_t n, d, c;
  int32_t block;
  bool in_bf16, out_bf16, bias;
  Recipe recipe;
  bool nonfinite;
  bool sparse_grad = false;  // backward: row scales over four decades, every 4th row zero (LSS)
  double lss_budget = kLssDefaultBudget;
  GemmEngine gemm = GemmEngine::kAuto;
  GradScaleMode grad_scale = GradScaleMode::kTensor;
  // backward: the gradients asked of the device (the CPU computes both): the input's (grad_x,
  // grad_step_x), the weight's (grad_w, grad_step_w) or both.
  enum class Wants { kBoth, kInput, kWeight } wants = Wants::kBoth;
  // backward: W's step as a multiple of LSQ's initial step (below 1: more weights clipped, both
  // sides of the weight gradient's epilogue mask and residual rules).
  float w_step_scale = 1.1f;
  bool nonfinite_w = false;  // forward: an Inf in W (nonfinite: a NaN in x)
};

std::string problem_name(const Problem& p) {
  return std::string(recipe_name(p.recipe)) + "/" + std::to_string(p.n) + "x" +
         std::to_string(p.d) + "x" + std::to_string(p.c) + "/g" + std::to_string(p.block) +
         (p.in_bf16 ? "/bf16_in" : "/fp32_in") + (p.out_bf16 ? "/bf16_out" : "/fp32_out") +
         (p.bias ? "/bias" : "/nobias") + (p.nonfinite ? "/nonfinite" : "") +
         (p.nonfinite_w ? "/nonfinite_w" : "") + (p.sparse_grad ? "/sparse_grad" : "") +
         (p.lss_budget != kLssDefaultBudget ? "/budget" + std::to_string(p.lss_budget).substr(0, 3)
                                            : "") +
         (p.gemm != GemmEngine::kAuto ? std::string("/gemm_") + gemm_engine_name(p.gemm) : "") +
         (p.grad_scale == GradScaleMode::kRow ? "/grad_scale_row" : "") +
         (p.w_step_scale != 1.1f ? "/w_step" + std::to_string(p.w_step_scale).substr(0, 4) : "") +
         (p.wants == Problem::Wants::kInput    ? "/input_grads_only"
          : p.wants == Problem::Wants::kWeight ? "/weight_grads_only"
                                               : "");
}

struct Outputs {
  std::vector<uint8_t> y, codes, aux;
};

void run_forward(const Problem& p, bool graph) {
  auto x = randn(p.n * p.d, 1 + p.n + p.d, 1.0f), w = randn(p.c * p.d, 2 + p.c, 0.05f);
  for (int64_t i = 0; i < p.n; ++i) x[static_cast<size_t>(i * p.d + (p.d > 3 ? 3 : 0))] *= 25.0f;
  // Steps from the finite data (lsq_init_step rejects non-finite input), then the NaN if any.
  float sx = 0.9f * lsq_init_step(make_matrix(x.data(), DType::kFloat32, p.n, p.d));
  float sw = lsq_init_step(make_matrix(w.data(), DType::kFloat32, p.c, p.d));
  if (p.nonfinite) x[x.size() / 2] = NAN;
  if (p.nonfinite_w) w[w.size() / 3] = INFINITY;
  const auto bias = randn(p.c, 3, 0.5f);
  const auto xb = as_bytes(x, p.in_bf16), wb = as_bytes(w, p.in_bf16);
  const auto bb = as_bytes(bias, p.in_bf16);
  const DType idt = p.in_bf16 ? DType::kBFloat16 : DType::kFloat32;
  const DType odt = p.out_bf16 ? DType::kBFloat16 : DType::kFloat32;
  const size_t oesz = p.out_bf16 ? 2 : 4;
  LinearConfig cfg;
  cfg.recipe = p.recipe;
  cfg.hadamard_block = p.block;
  cfg.seed = 77;
  cfg.step = 5;
  cfg.layer = 3;
  cfg.gemm = p.gemm;
  const int64_t cb = p.n * packed_row_bytes(p.d), ab = compact_aux_bytes(p.n, p.d);

  Outputs want{std::vector<uint8_t>(static_cast<size_t>(p.n * p.c) * oesz),
               std::vector<uint8_t>(static_cast<size_t>(cb)),
               std::vector<uint8_t>(static_cast<size_t>(ab))};
  LinearForwardArgs ha;
  ha.x = make_matrix(const_cast<uint8_t*>(xb.data()), idt, p.n, p.d);
  ha.w = make_matrix(const_cast<uint8_t*>(wb.data()), idt, p.c, p.d);
  if (p.bias) ha.bias = make_vector(const_cast<uint8_t*>(bb.data()), idt, p.c);
  ha.step_x = make_scalar(&sx, DType::kFloat32);
  ha.step_w = make_scalar(&sw, DType::kFloat32);
  ha.y = make_matrix(want.y.data(), odt, p.n, p.c);
  ha.saved_codes = make_matrix(want.codes.data(), DType::kInt4Packed, p.n, p.d);
  ha.saved_aux = make_vector(want.aux.data(), DType::kUInt8, ab);
  linear_forward(cfg, ha);

  DevBuf dx = gputest::upload(xb), dw = gputest::upload(wb), dbias = gputest::upload(bb);
  DevBuf dsteps = gputest::upload(std::vector<float>{sx, sw});
  DevBuf dy(want.y.size()), dcodes(std::max<size_t>(1, want.codes.size())),
      daux(std::max<size_t>(1, want.aux.size()));
  dy.poison();
  dcodes.poison();
  daux.poison();
  LinearForwardArgs da;
  da.x = make_matrix(dx.get(), idt, p.n, p.d);
  da.w = make_matrix(dw.get(), idt, p.c, p.d);
  if (p.bias) da.bias = make_vector(dbias.get(), idt, p.c);
  da.step_x = make_scalar(dsteps.as<float>(), DType::kFloat32);
  da.step_w = make_scalar(dsteps.as<float>() + 1, DType::kFloat32);
  da.y = make_matrix(dy.get(), odt, p.n, p.c);
  da.saved_codes = make_matrix(dcodes.get(), DType::kInt4Packed, p.n, p.d);
  da.saved_aux = make_vector(daux.get(), DType::kUInt8, ab);
  // The small outputs the forward's first kernel writes: the scale (0 for the LSQ recipes) and the
  // step. Under a graph the step comes from a device scalar (LinearConfig::device_step) whose high
  // word the random streams ignore and the saved step keeps.
  DevBuf dsmall(16);
  dsmall.poison();
  da.saved_scale = make_scalar(dsmall.get(), DType::kFloat32);
  da.saved_step = make_scalar(dsmall.as<char>() + 8, DType::kInt64);
  const int64_t device_step = cfg.step + (int64_t{3} << 32);
  DevBuf dstep = gputest::upload(std::vector<int64_t>{device_step});
  LinearConfig dcfg = cfg;
  if (graph) dcfg.device_step = dstep.as<int64_t>();
  const CudaAllocator alloc = default_cuda_allocator();
  // Graph: a warm-up outside the capture (cuBLASLt handle and heuristics), then capture, replay
  // twice.
  gputest::run_maybe_captured(
      graph, [&](cudaStream_t s) { linear_forward_cuda(dcfg, da, alloc, s); }, 2,
      [&] {
        dy.poison();
        dsmall.poison();
      });
  const auto y = gputest::download<uint8_t>(dy, want.y.size());
  const auto codes = gputest::download<uint8_t>(dcodes, want.codes.size());
  const auto aux = gputest::download<uint8_t>(daux, want.aux.size());
  int64_t bad_y = 0;
  for (int64_t e = 0; e < p.n * p.c; ++e) {
    float g, wv;
    if (p.out_bf16) {
      uint16_t a, b;
      std::memcpy(&a, &y[static_cast<size_t>(e) * 2], 2);
      std::memcpy(&b, &want.y[static_cast<size_t>(e) * 2], 2);
      g = bf16_to_float(BFloat16{a});
      wv = bf16_to_float(BFloat16{b});
    } else {
      std::memcpy(&g, &y[static_cast<size_t>(e) * 4], 4);
      std::memcpy(&wv, &want.y[static_cast<size_t>(e) * 4], 4);
    }
    const bool same =
        gputest::bits_of(g) == gputest::bits_of(wv) || (std::isnan(g) && std::isnan(wv));
    bad_y += !same;
  }
  GPU_CHECK_MSG(bad_y == 0, bad_y << " of " << p.n * p.c << " y values differ");
  GPU_CHECK_MSG(codes == want.codes, "saved codes differ");
  GPU_CHECK_MSG(aux == want.aux, "saved aux differs");
  const auto small = gputest::download<uint8_t>(dsmall, 16);
  float saved_scale;
  int64_t saved_step;
  std::memcpy(&saved_scale, small.data(), 4);
  std::memcpy(&saved_step, small.data() + 8, 8);
  GPU_CHECK_MSG(gputest::bits_of(saved_scale) == 0u, "saved_scale " << saved_scale << " want 0");
  const int64_t want_step = graph ? device_step : static_cast<int64_t>(cfg.step);
  GPU_CHECK_MSG(saved_step == want_step, "saved_step " << saved_step << " want " << want_step);
}

// ---- backward (hq_bs, hq_lss): the CPU's forward saves the state, then both backwards run from it;
// hq_lss also compares the rows kept (rows_kept).
int64_t count_byte_diff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  int64_t n = 0;
  for (size_t i = 0; i < a.size(); ++i) n += a[i] != b[i];
  return n;
}

void run_backward(const Problem& p, bool graph) {
  auto x = randn(p.n * p.d, 11 + p.n, 1.0f), w = randn(p.c * p.d, 12 + p.c, 0.05f);
  auto gy = randn(p.n * p.c, 13 + p.d, 1e-3f);
  if (p.sparse_grad) {
    std::mt19937_64 rng(77 + p.n);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (int64_t i = 0; i < p.n; ++i) {
      const float scale = i % 4 == 0 ? 0.0f : std::pow(10.0f, -4.0f * u(rng));
      for (int64_t j = 0; j < p.c; ++j) gy[static_cast<size_t>(i * p.c + j)] *= scale;
    }
  }
  float sx = 0.9f * lsq_init_step(make_matrix(x.data(), DType::kFloat32, p.n, p.d));
  float sw = p.w_step_scale * lsq_init_step(make_matrix(w.data(), DType::kFloat32, p.c, p.d));
  const DType idt = p.in_bf16 ? DType::kBFloat16 : DType::kFloat32;
  const DType odt = p.out_bf16 ? DType::kBFloat16 : DType::kFloat32;
  const size_t oesz = p.out_bf16 ? 2 : 4;
  const auto xb = as_bytes(x, p.in_bf16), wb = as_bytes(w, p.in_bf16), gb = as_bytes(gy, p.in_bf16);
  LinearConfig cfg;
  cfg.recipe = p.recipe;
  cfg.hadamard_block = p.block;
  cfg.seed = 99;
  cfg.step = 2;
  cfg.layer = 1;
  cfg.lss_budget = p.lss_budget;
  cfg.gemm = p.gemm;
  cfg.grad_scale = p.grad_scale;
  const int64_t cb = p.n * packed_row_bytes(p.d), ab = compact_aux_bytes(p.n, p.d);
  std::vector<uint8_t> codes(static_cast<size_t>(cb)), aux(static_cast<size_t>(ab));
  std::vector<float> y(static_cast<size_t>(p.n * p.c));
  LinearForwardArgs fa;
  fa.x = make_matrix(const_cast<uint8_t*>(xb.data()), idt, p.n, p.d);
  fa.w = make_matrix(const_cast<uint8_t*>(wb.data()), idt, p.c, p.d);
  fa.step_x = make_scalar(&sx, DType::kFloat32);
  fa.step_w = make_scalar(&sw, DType::kFloat32);
  fa.y = make_matrix(y.data(), DType::kFloat32, p.n, p.c);
  fa.saved_codes = make_matrix(codes.data(), DType::kInt4Packed, p.n, p.d);
  fa.saved_aux = make_vector(aux.data(), DType::kUInt8, ab);
  linear_forward(cfg, fa);

  std::vector<uint8_t> want_gx(static_cast<size_t>(p.n * p.d) * oesz),
      want_gw(static_cast<size_t>(p.c * p.d) * oesz), want_gb(static_cast<size_t>(p.c) * oesz);
  float want_gsx = 0, want_gsw = 0;
  LinearBackwardArgs ba;
  ba.grad_y = make_matrix(const_cast<uint8_t*>(gb.data()), idt, p.n, p.c);
  ba.saved_codes = fa.saved_codes;
  ba.saved_aux = fa.saved_aux;
  ba.w = fa.w;
  ba.step_x = fa.step_x;
  ba.step_w = fa.step_w;
  ba.grad_x = make_matrix(want_gx.data(), odt, p.n, p.d);
  ba.grad_w = make_matrix(want_gw.data(), odt, p.c, p.d);
  if (p.bias) ba.grad_bias = make_vector(want_gb.data(), odt, p.c);
  ba.grad_step_x = make_scalar(&want_gsx, DType::kFloat32);
  ba.grad_step_w = make_scalar(&want_gsw, DType::kFloat32);
  std::vector<int64_t> want_kept(2, -7);
  ba.rows_kept = make_vector(want_kept.data(), DType::kInt64, 2);
  linear_backward(cfg, ba);

  DevBuf dgy = gputest::upload(gb), dw = gputest::upload(wb), dcodes = gputest::upload(codes),
         daux = gputest::upload(aux), dsteps = gputest::upload(std::vector<float>{sx, sw});
  DevBuf dgx(want_gx.size()), dgw(want_gw.size()), dgb(std::max<size_t>(1, want_gb.size())), dgs(8),
      dkept(2 * sizeof(int64_t));
  dkept.poison();
  dgx.poison();
  dgw.poison();
  dgb.poison();
  dgs.poison();
  LinearBackwardArgs da;
  da.grad_y = make_matrix(dgy.get(), idt, p.n, p.c);
  da.saved_codes = make_matrix(dcodes.get(), DType::kInt4Packed, p.n, p.d);
  da.saved_aux = make_vector(daux.get(), DType::kUInt8, ab);
  da.w = make_matrix(dw.get(), idt, p.c, p.d);
  da.step_x = make_scalar(dsteps.as<float>(), DType::kFloat32);
  da.step_w = make_scalar(dsteps.as<float>() + 1, DType::kFloat32);
  const bool want_x = p.wants != Problem::Wants::kWeight,
             want_w = p.wants != Problem::Wants::kInput;
  if (want_x) {
    da.grad_x = make_matrix(dgx.get(), odt, p.n, p.d);
    da.grad_step_x = make_scalar(dgs.as<float>(), DType::kFloat32);
  }
  if (want_w) {
    da.grad_w = make_matrix(dgw.get(), odt, p.c, p.d);
    da.grad_step_w = make_scalar(dgs.as<float>() + 1, DType::kFloat32);
  }
  if (p.bias) da.grad_bias = make_vector(dgb.get(), odt, p.c);
  da.rows_kept = make_vector(dkept.get(), DType::kInt64, 2);
  const CudaAllocator alloc = default_cuda_allocator();
  gputest::run_maybe_captured(
      graph, [&](cudaStream_t s) { linear_backward_cuda(cfg, da, alloc, s); }, 1,
      [&] {
        dgx.poison();
        dgw.poison();
        dkept.poison();
      });
  const auto gx = gputest::download<uint8_t>(dgx, want_gx.size());
  const auto gw = gputest::download<uint8_t>(dgw, want_gw.size());
  if (want_x) {
    GPU_CHECK_MSG(count_byte_diff(gx, want_gx) == 0, count_byte_diff(gx, want_gx)
                                                         << " grad_x bytes differ");
  }
  if (want_w) {
    GPU_CHECK_MSG(count_byte_diff(gw, want_gw) == 0, count_byte_diff(gw, want_gw)
                                                         << " grad_w bytes differ");
  }
  if (p.bias) {
    const auto gbias = gputest::download<uint8_t>(dgb, want_gb.size());
    GPU_CHECK_MSG(count_byte_diff(gbias, want_gb) == 0, "grad_bias differs");
  }
  // rows_kept: a gradient not asked for samples nothing (0).
  const auto kept = gputest::download<int64_t>(dkept, 2);
  const int64_t kept_x = want_x ? want_kept[0] : 0, kept_w = want_w ? want_kept[1] : 0;
  GPU_CHECK_MSG(kept[0] == kept_x && kept[1] == kept_w,
                "rows_kept " << kept[0] << ", " << kept[1] << " want " << kept_x << ", " << kept_w);
  if (p.recipe == Recipe::kHqLss) {  // sampling happened: the counts are not 0 or all 2N rows
    GPU_CHECK_MSG(want_kept[0] > 0 && want_kept[0] < 2 * p.n && want_kept[1] > 0 &&
                      want_kept[1] < 2 * p.n,
                  "rows kept " << want_kept[0] << ", " << want_kept[1] << " of " << 2 * p.n);
  }
  const auto gs = gputest::download<float>(dgs, 2);
  // fp64 sums of the same terms in another order: at most one fp32 rounding apart.
  GPU_CHECK_MSG(!want_x || gputest::ulp_distance(gs[0], want_gsx) <= 1,
                "grad_step_x " << gs[0] << " want " << want_gsx);
  GPU_CHECK_MSG(!want_w || gputest::ulp_distance(gs[1], want_gsw) <= 1,
                "grad_step_w " << gs[1] << " want " << want_gsw);
}

// hq_lss's device limits, checked on the host before anything runs (views over a small buffer:
// nothing is read): 2N rows beyond int32, rows of grad_y or of the saved codes too long for exact
// int32 row sums. Each is an Error naming the argument.
void test_lss_limits() {
  DevBuf buf(4096);
  LinearConfig cfg;
  cfg.recipe = Recipe::kHqLss;
  cfg.hadamard_block = 16;
  auto expect = [&](int64_t n, int64_t c, int64_t d, const char* arg) {
    LinearBackwardArgs a;
    a.grad_y = make_matrix(buf.get(), DType::kFloat32, n, c);
    a.w = make_matrix(buf.get(), DType::kFloat32, c, d);
    a.saved_codes = make_matrix(buf.get(), DType::kInt4Packed, n, d);
    a.saved_aux = make_vector(buf.get(), DType::kUInt8, compact_aux_bytes(n, d));
    a.step_x = make_scalar(buf.get(), DType::kFloat32);
    a.step_w = make_scalar(buf.get(), DType::kFloat32);
    a.grad_w = make_matrix(buf.get(), DType::kFloat32, c, d);
    try {
      linear_backward_cuda(cfg, a, default_cuda_allocator(), nullptr);
    } catch (const Error& e) {
      GPU_CHECK_MSG(std::string(e.what()).find(std::string(arg) + ":") == 0,
                    "error '" << e.what() << "' does not name " << arg);
      return;
    }
    GPU_CHECK_MSG(false, "no Error for hq_lss limits on " << arg);
  };
  const int64_t row_max = (int64_t{1} << 31) / 64 - 1;
  expect(int64_t{1} << 30, 16, 16, "grad_y");
  expect(4, row_max + 1, 16, "grad_y");
  expect(4, 16, row_max + 1, "saved_codes");
}

// resolve_gemm_engine on this device, and cuda_compute_capability's device check.
void test_gemm_engine() {
  int dev = 0, count = 0;
  CUDA_OK(cudaGetDevice(&dev));
  CUDA_OK(cudaGetDeviceCount(&count));
  const int cc = cuda_compute_capability(dev);
  std::printf("    device %d: compute capability %d.%d\n", dev, cc / 10, cc % 10);
  GPU_CHECK(cc >= kMinCapabilityKernels);
  const bool fp8 = cc >= kMinCapabilityFp8;
  GPU_CHECK(resolve_gemm_engine(GemmEngine::kAuto, dev) ==
            (fp8 ? GemmEngine::kFp8 : GemmEngine::kInt8));
  GPU_CHECK(resolve_gemm_engine(GemmEngine::kInt8, dev) == GemmEngine::kInt8);
  bool threw = false;
  try {
    GPU_CHECK(resolve_gemm_engine(GemmEngine::kFp8, dev) == GemmEngine::kFp8);
  } catch (const Error& e) {
    threw = std::string(e.what()).find("gemm:") == 0;
  }
  GPU_CHECK_MSG(threw == !fp8,
                "gemm=fp8 must be an Error naming gemm exactly where FP8 is missing");
  for (int bad : {-1, count}) {
    threw = false;
    try {
      cuda_compute_capability(bad);
    } catch (const Error& e) {
      threw = std::string(e.what()).find("device:") == 0;
    }
    GPU_CHECK_MSG(threw, "device " << bad << " must be an Error naming device");
  }
}

const bool registered = [] {
  using gputest::add_case;
  const Problem problems[] = {
      {8, 64, 16, 16, false, false, true, Recipe::kHqLss, false},
      {33, 256, 40, 256, false, false, true, Recipe::kHqLss, false},
      {33, 256, 40, 256, true, true, true, Recipe::kHqLss, false},
      {64, 768, 3072 / 8, 64, true, true, true, Recipe::kHq, false},
      {17, 100, 9, 4, false, true, false, Recipe::kHqBs, false},
      {5, 37, 3, 1, false, false, true, Recipe::kLsqLuq, false},
      {256, 1024, 512, 128, true, false, true, Recipe::kHqLss, false},
      {16, 128, 32, 32, false, false, true, Recipe::kHqLss, true},
  };
  for (const Problem& p : problems) {
    add_case("linear_forward/" + problem_name(p), false, [=] { run_forward(p, false); });
  }
  // A non-finite W (counted by the W pass itself, whose last block then makes the product's scale
  // NaN), bf16 and fp32 out; and both at once, in a graph.
  for (Problem p : {problems[2], problems[6]}) {
    p.nonfinite_w = true;
    add_case("linear_forward/" + problem_name(p), false, [=] { run_forward(p, false); });
  }
  {
    Problem p = problems[6];
    p.nonfinite = p.nonfinite_w = true;
    add_case("linear_forward_graph/" + problem_name(p), false, [=] { run_forward(p, true); });
  }
  // The INT8 engine (the products of devices without FP8) on the same problems: the same bits.
  for (Problem p : problems) {
    p.gemm = GemmEngine::kInt8;
    add_case("linear_forward/" + problem_name(p), false, [=] { run_forward(p, false); });
  }
  add_case("linear_forward_graph/" + problem_name(problems[2]), false,
           [=] { run_forward(problems[2], true); });
  add_case("linear_forward_graph/" + problem_name(problems[6]), false,
           [=] { run_forward(problems[6], true); });
  const Problem backward[] = {
      {16, 64, 32, 16, false, false, true, Recipe::kHqBs, false},
      {33, 256, 40, 256, false, false, true, Recipe::kHqBs, false},
      {33, 256, 40, 256, true, true, true, Recipe::kHqBs, false},
      {64, 768, 384, 64, true, false, true, Recipe::kHqBs, false},
      {17, 100, 9, 4, false, true, false, Recipe::kHqBs, false},
      {256, 1024, 512, 128, true, true, true, Recipe::kHqBs, false},
      // Rows of 24 (a multiple of 8 but not of 16: the fused epilogues with odd 8-column tails) and
      // 200 tokens (the bias gradient's second row block is short).
      {200, 24, 40, 8, true, false, true, Recipe::kHqBs, false},
  };
  for (const Problem& p : backward) {
    add_case("linear_backward/" + problem_name(p), false, [=] { run_backward(p, false); });
  }
  // hq_bs's INT8 products past the INT8 bound (kMaxKInt8) run in K-chunks: more tokens (the weight
  // gradient's K) and more output features (the input gradient's K) than one product may sum.
  for (const Problem& p :
       {Problem{kMaxKInt8 + 48, 64, 32, 16, true, false, true, Recipe::kHqBs, false},
        Problem{16, 64, kMaxKInt8 + 48, 16, true, true, true, Recipe::kHqBs, false}}) {
    add_case("linear_backward/" + problem_name(p), true, [=] { run_backward(p, false); });
  }
  add_case("linear_backward_graph/" + problem_name(backward[3]), false,
           [=] { run_backward(backward[3], true); });
  // Many weights clipped: W's step at a quarter of LSQ's initial one (2 mean|w| / sqrt(7), 0.60
  // standard deviations of Gaussian weights), so |W~ / s| > 7 beyond 1.06 standard deviations,
  // about 29% of the weights, and the weight gradient's epilogue applies its mask and clipped
  // residuals to many elements of every lane; both recipes, both input types, blocks 256, 64, 128.
  for (const Recipe r : {Recipe::kHqBs, Recipe::kHqLss}) {
    for (Problem p : {backward[1], backward[3], backward[5]}) {
      p.recipe = r;
      p.w_step_scale = 0.25f;
      add_case("linear_backward/" + problem_name(p), false, [=] { run_backward(p, false); });
    }
  }
  // One side's gradients only (a frozen weight; a first layer): the weight gradient's epilogue
  // writes the input gradient's operand of W's codes when both are asked, the W pass otherwise.
  // Both recipes; output features 40 (a partial 16-row tile of W, and 48 - 40 zero columns of the
  // transposed operand) and 512; and a weight with more rows than the epilogue's tile grid takes
  // (65,535 tiles of 16: the W pass and the tile-less epilogue; the input gradient's product in
  // K-chunks).
  for (const Recipe r : {Recipe::kHqBs, Recipe::kHqLss}) {
    for (const Problem::Wants wants : {Problem::Wants::kInput, Problem::Wants::kWeight}) {
      for (Problem p : {backward[1], backward[5]}) {
        p.recipe = r;
        p.wants = wants;
        add_case("linear_backward/" + problem_name(p), false, [=] { run_backward(p, false); });
      }
    }
  }
  {
    Problem tall{16, 8, 65535 * 32 + 40, 8, false, false, true, Recipe::kHqBs, false};
    add_case("linear_backward/" + problem_name(tall), true, [=] { run_backward(tall, false); });
  }

  // hq_lss: the same shapes, the selection on the device; a row-sparse gradient (zero rows, tiny
  // rows whose p is raised to the cap 1/16); another budget; and more tokens than one INT8 product
  // may sum (kMaxKInt8), so the weight gradient runs in two K-chunks.
  std::vector<Problem> lss(std::begin(backward), std::end(backward));
  for (Problem& p : lss) p.recipe = Recipe::kHqLss;
  Problem sparse = lss[3];
  sparse.sparse_grad = true;
  lss.push_back(sparse);
  Problem budget = lss[1];
  budget.lss_budget = 1.5;
  lss.push_back(budget);
  budget.lss_budget = kLssMinBudget;  // the capacity binds hardest: most rows at p' = 1/16
  lss.push_back(budget);
  Problem chunked{kMaxKInt8 + 48, 64, 32, 16, true, false, true, Recipe::kHqLss, false};
  lss.push_back(chunked);
  for (const Problem& p : lss) {
    add_case("linear_backward/" + problem_name(p), p.n > 4096, [=] { run_backward(p, false); });
  }
  // hq_lss's compacted input-gradient product on the INT8 engine (its only product that changes).
  for (Problem p : lss) {
    if (p.n > 4096) continue;
    p.gemm = GemmEngine::kInt8;
    add_case("linear_backward/" + problem_name(p), false, [=] { run_backward(p, false); });
  }
  // grad_scale=row (hq_bs): the row exponents, the epilogues' 2^-k and the weight gradient's fold
  // into the x codes against the CPU core, on every hq_bs shape with row scales over four decades
  // and zero rows (every exponent 0..4), the K-chunked products, and under a CUDA graph.
  std::vector<Problem> rows(std::begin(backward), std::end(backward));
  rows.push_back(Problem{kMaxKInt8 + 48, 64, 32, 16, true, false, true, Recipe::kHqBs, false});
  rows.push_back(Problem{16, 64, kMaxKInt8 + 48, 16, true, true, true, Recipe::kHqBs, false});
  for (Problem& p : rows) {
    p.grad_scale = GradScaleMode::kRow;
    p.sparse_grad = true;
  }
  for (const Problem& p : rows) {
    add_case("linear_backward/" + problem_name(p), p.n > 4096 || p.c > 4096,
             [=] { run_backward(p, false); });
  }
  rows[0].sparse_grad = false;  // a gradient without small rows: every exponent 0 or near it
  add_case("linear_backward/" + problem_name(rows[0]), false,
           [=] { run_backward(rows[0], false); });
  add_case("linear_backward_graph/" + problem_name(rows[3]), false,
           [=] { run_backward(rows[3], true); });
  // grad_scale=row (hq_lss): the scores' 2^-k, the input gradient's slots with the row exponents
  // and the weight gradient's two products (hi rows, lo rows) over the same slots, on every hq_lss
  // problem (the budgets, the K-chunked weight gradient) with row scales over four decades, on the
  // INT8 engine, without small rows, and under a CUDA graph.
  std::vector<Problem> lss_rows;
  for (Problem p : lss) {
    if (p.sparse_grad) continue;  // lss[3]'s sparse copy: below, every problem is sparse
    p.grad_scale = GradScaleMode::kRow;
    p.sparse_grad = true;
    lss_rows.push_back(p);
  }
  for (const Problem& p : lss_rows) {
    add_case("linear_backward/" + problem_name(p), p.n > 4096, [=] { run_backward(p, false); });
    if (p.n > 4096) continue;
    Problem q = p;
    q.gemm = GemmEngine::kInt8;
    add_case("linear_backward/" + problem_name(q), false, [=] { run_backward(q, false); });
  }
  lss_rows[1].sparse_grad = false;
  add_case("linear_backward/" + problem_name(lss_rows[1]), false,
           [=] { run_backward(lss_rows[1], false); });
  add_case("linear_backward_graph/" + problem_name(lss_rows[3]), false,
           [=] { run_backward(lss_rows[3], true); });
  add_case("gemm_engine/resolve", false, test_gemm_engine);
  add_case("linear_backward_errors/lss_limits", false, test_lss_limits);
  add_case("linear_backward_graph/" + problem_name(lss[3]), false,
           [=] { run_backward(lss[3], true); });
  return true;
}();

}  // namespace
