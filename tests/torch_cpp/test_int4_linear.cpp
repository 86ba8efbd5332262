// GoogleTest suite of int4train for LibTorch: the Int4Linear module (drop-in shapes, first-batch
// initialisation, C++ autograd against FP by SNR, serialization round trip, bad inputs) and the ops'
// C++ entry points, for every recipe.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cctype>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "int4train/linear.h"
#include "int4train/torch/int4_linear.h"
#include "int4train/torch/ops.h"

namespace {

using int4train::pt::Int4Linear;
using int4train::pt::Int4LinearOptions;

const std::vector<std::string> kRecipes = {"fp", "int8", "lsq_luq", "hq", "hq_bs", "hq_lss"};

bool is_lsq(const std::string& r) { return r != "fp" && r != "int8"; }

double snr_db(const torch::Tensor& ref, const torch::Tensor& approx) {
  const auto r = ref.detach().to(torch::kDouble);
  const double noise = (approx.detach().to(torch::kDouble) - r).pow(2).sum().item<double>();
  const double signal = r.pow(2).sum().item<double>();
  return noise == 0.0 ? INFINITY : 10.0 * std::log10(signal / noise);
}

Int4Linear make_layer(const std::string& recipe, int64_t in = 64, int64_t out = 48) {
  torch::manual_seed(0);
  return Int4Linear(Int4LinearOptions(in, out).recipe(recipe).layer(2).seed(5));
}

class Int4LinearTest : public ::testing::TestWithParam<std::string> {};

TEST_P(Int4LinearTest, DropInShapes) {
  Int4Linear layer = make_layer(GetParam(), 32, 16);
  EXPECT_EQ(layer->weight.sizes(), torch::IntArrayRef({16, 32}));
  EXPECT_EQ(layer->bias.sizes(), torch::IntArrayRef({16}));
  const auto params = layer->named_parameters();
  EXPECT_EQ(params.contains("input_step"), is_lsq(GetParam()));
  if (is_lsq(GetParam())) {  // the Python module's shape (FSDP takes no 0-dim parameter)
    EXPECT_EQ(layer->input_step.sizes(), torch::IntArrayRef({1}));
    EXPECT_EQ(layer->weight_step.sizes(), torch::IntArrayRef({1}));
  }
  const auto buffers = layer->named_buffers();
  EXPECT_TRUE(buffers.contains("hadamard_block") && buffers.contains("initialized") &&
              buffers.contains("step"));
  const auto y = layer->forward(torch::randn({3, 5, 32}));
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({3, 5, 16}));
  EXPECT_TRUE(torch::isfinite(y).all().item<bool>());
  EXPECT_EQ(layer->step.item<int64_t>(), 1);
  layer->eval();
  layer->forward(torch::randn({2, 32}));
  EXPECT_EQ(layer->step.item<int64_t>(), 1);
}

TEST_P(Int4LinearTest, ForwardAndBackwardTrackFp) {
  const std::string recipe = GetParam();
  Int4Linear layer = make_layer(recipe);
  auto x = torch::randn({256, 64}, torch::requires_grad());
  auto xr = x.detach().clone().requires_grad_(true);
  auto w = layer->weight.detach().clone().requires_grad_(true);
  auto b = layer->bias.detach().clone().requires_grad_(true);
  auto y = layer->forward(x);
  auto yr = torch::nn::functional::linear(xr, w, b);
  auto g = torch::randn_like(y);
  y.backward(g);
  yr.backward(g);
  // As in tests/python/test_module.py: ~12 dB is the 4-bit forward's expected SNR on Gaussian data
  // (two operands, each with LSQ-initial-step noise s^2 / 12); the gradients add their quantizer.
  const double fwd_min = recipe == "fp" ? 100 : recipe == "int8" ? 30 : 9;
  const std::string name = recipe.substr(0, recipe.find(':'));  // a spec's recipe name
  const double bwd_min = name == "fp"       ? 100
                         : name == "int8"   ? 28
                         : name == "hq_bs"  ? 12
                         : name == "hq"     ? 7
                         : name == "hq_lss" ? 3
                                            : 6;
  EXPECT_GT(snr_db(yr, y), fwd_min);
  EXPECT_GT(snr_db(xr.grad(), x.grad()), bwd_min);
  EXPECT_GT(snr_db(w.grad(), layer->weight.grad()), bwd_min);
  EXPECT_TRUE(torch::allclose(layer->bias.grad(), b.grad(), 1e-5, 1e-5));
  if (is_lsq(recipe)) {
    ASSERT_TRUE(layer->input_step.grad().defined());
    EXPECT_TRUE(torch::isfinite(layer->input_step.grad()).item<bool>());
    EXPECT_TRUE(torch::isfinite(layer->weight_step.grad()).item<bool>());
  }
}

TEST_P(Int4LinearTest, SerializationRoundTripReproducesForward) {
  const std::string recipe = GetParam();
  Int4Linear layer = make_layer(recipe, 32, 16);
  torch::optim::SGD opt(layer->parameters(), 0.01);
  const auto x = torch::randn({16, 32});
  for (int i = 0; i < 3; ++i) {
    opt.zero_grad();
    layer->forward(x).pow(2).mean().backward();
    opt.step();
  }
  std::stringstream stream;
  torch::save(layer, stream);
  torch::manual_seed(99);
  Int4Linear fresh(Int4LinearOptions(32, 16).recipe(recipe).layer(2).seed(5));
  torch::load(fresh, stream);
  EXPECT_TRUE(fresh->is_initialized());
  EXPECT_EQ(fresh->block_size(), layer->block_size());
  EXPECT_EQ(fresh->step.item<int64_t>(), 3);
  layer->eval();
  fresh->eval();
  const auto x2 = torch::randn({5, 32}) * 7;  // new statistics: a re-initialisation would show
  EXPECT_TRUE(torch::equal(layer->forward(x2), fresh->forward(x2)));
  if (!is_lsq(recipe)) return;
  // A checkpoint from before the steps became (1,) vectors (0-dim steps) loads and computes the
  // same.
  {
    torch::NoGradGuard no_grad;
    layer->input_step.set_data(layer->input_step.reshape({}).clone());
    layer->weight_step.set_data(layer->weight_step.reshape({}).clone());
  }
  std::stringstream old_stream;
  torch::save(layer, old_stream);
  Int4Linear from_old(Int4LinearOptions(32, 16).recipe(recipe).layer(2).seed(5));
  torch::load(from_old, old_stream);
  from_old->eval();
  EXPECT_TRUE(torch::equal(layer->forward(x2), from_old->forward(x2)));
  EXPECT_EQ(from_old->input_step.numel(), 1);
}

TEST_P(Int4LinearTest, LearnsATeacher) {
  torch::manual_seed(0);
  const auto x = torch::randn({256, 32});
  const auto target = torch::matmul(x, torch::randn({32, 8})) / std::sqrt(32.0);
  Int4Linear layer(Int4LinearOptions(32, 8).recipe(GetParam()));
  torch::optim::Adam opt(layer->parameters(), 1e-2);
  double first = 0, last = 0;
  for (int i = 0; i < 80; ++i) {
    opt.zero_grad();
    auto loss = (layer->forward(x) - target).pow(2).mean();
    loss.backward();
    opt.step();
    if (i == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  EXPECT_LT(last, 0.5 * first);
}

TEST_P(Int4LinearTest, EmptyBatchGivesZeroGradients) {
  Int4Linear layer = make_layer(GetParam(), 32, 16);
  auto x = torch::randn({0, 32}, torch::requires_grad());
  auto y = layer->forward(x);
  EXPECT_EQ(y.sizes(), torch::IntArrayRef({0, 16}));
  y.sum().backward();
  EXPECT_EQ(layer->weight.grad().count_nonzero().item<int64_t>(), 0);
  EXPECT_EQ(layer->bias.grad().count_nonzero().item<int64_t>(), 0);
  EXPECT_FALSE(layer->is_initialized());  // an empty batch teaches nothing
}

INSTANTIATE_TEST_SUITE_P(Recipes, Int4LinearTest, ::testing::ValuesIn(kRecipes),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });
// Recipe specs with options reach the module through the same string (parse_recipe_spec).
INSTANTIATE_TEST_SUITE_P(Specs, Int4LinearTest,
                         ::testing::Values("hq_bs:grad_scale=row", "hq_lss:grad_scale=row",
                                           "hq_lss:lss_budget=1.5"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

TEST(Int4Linear, FpRecipeEqualsLinear) {
  torch::nn::Linear lin(24, 7);
  Int4Linear layer = int4train::pt::int4_linear_from(lin, "fp");
  const auto x = torch::randn({4, 24});
  EXPECT_TRUE(torch::allclose(layer->forward(x), lin->forward(x), 1e-5, 1e-5));
  EXPECT_EQ(layer->weight.data_ptr(), lin->weight.data_ptr());  // shared storage
}

TEST(Int4Linear, FromLinearTakesEveryOption) {
  torch::nn::Linear lin(64, 16);
  const auto options = Int4LinearOptions(64, 16)
                           .recipe("hq_bs")
                           .seed(3)
                           .layer(4)
                           .max_hadamard_block(1)
                           .step_init("mean_abs");
  Int4Linear layer = int4train::pt::int4_linear_from(lin, options);
  EXPECT_EQ(layer->weight.data_ptr(), lin->weight.data_ptr());
  EXPECT_EQ(layer->options.seed(), 3);
  EXPECT_EQ(layer->options.layer(), 4);
  torch::NoGradGuard no_grad;
  const auto x = torch::randn({32, 64});
  layer->eval();
  layer->forward(x);
  EXPECT_EQ(layer->block_size(), 1);  // max_hadamard_block 1: no transform
  EXPECT_TRUE(
      torch::equal(layer->input_step, int4train::pt::lsq_init_step(x).reshape({1})));  // mean_abs
  EXPECT_THROW(int4train::pt::int4_linear_from(lin, Int4LinearOptions(63, 16)), c10::ValueError);
  EXPECT_THROW(int4train::pt::int4_linear_from(lin, Int4LinearOptions(64, 16).bias(false)),
               c10::ValueError);
}

TEST(Int4Linear, FirstBatchInitialisesStepsAndBlock) {
  Int4Linear layer = make_layer("hq_lss");
  auto x = torch::randn({32, 64}) * 0.1;
  x.select(1, 3) += 30.0;  // an outlier channel: some Hadamard block > 1 must win
  layer->eval();
  torch::NoGradGuard no_grad;
  layer->forward(x);
  ASSERT_TRUE(layer->is_initialized());
  const int64_t block = layer->block_size();
  const auto [expect, errors] = int4train::pt::select_hadamard_block(x, layer->weight);
  EXPECT_EQ(block, expect.item<int64_t>());
  EXPECT_GT(block, 1);
  // The default step_init "mse": the error-minimising steps of the transformed operands.
  const auto xt = int4train::pt::hadamard_transform(x, block);
  const auto wt = int4train::pt::hadamard_transform(layer->weight, block);
  const auto sx = int4train::pt::lsq_mse_step(xt);
  EXPECT_TRUE(torch::equal(layer->input_step, sx.reshape({1})));
  EXPECT_TRUE(torch::equal(layer->weight_step, int4train::pt::lsq_mse_step(wt).reshape({1})));
  EXPECT_FALSE(torch::equal(sx, int4train::pt::lsq_init_step(xt)));
  layer->forward(x * 100);  // never re-initialised
  EXPECT_TRUE(torch::equal(layer->input_step, sx.reshape({1})));
  // step_init "mean_abs": LSQ's 2 mean|x~| / sqrt(7).
  Int4Linear mean_abs(Int4LinearOptions(64, 48).recipe("hq_lss").step_init("mean_abs"));
  mean_abs->weight.copy_(layer->weight);
  mean_abs->eval();
  mean_abs->forward(x);
  EXPECT_TRUE(torch::equal(mean_abs->input_step, int4train::pt::lsq_init_step(xt).reshape({1})));
  EXPECT_TRUE(torch::equal(mean_abs->weight_step, int4train::pt::lsq_init_step(wt).reshape({1})));
  EXPECT_THROW(Int4Linear(Int4LinearOptions(4, 4).step_init("max")), c10::ValueError);
  EXPECT_THROW(Int4Linear(Int4LinearOptions(4, 4).recipe("fp").step_init("mean_abs")), c10::ValueError);
}

TEST(Int4Linear, DenseFallbackOnlyOnCuda) {
  // The small-shape rule (int4train/linear.h), on by default: a CPU layer never falls back,
  // whatever the threshold; a negative threshold is a ValueError.
  EXPECT_TRUE(int4train::below_dense_threshold(4, 8, 16, 513.0));
  EXPECT_FALSE(int4train::below_dense_threshold(4, 8, 16, 512.0));
  EXPECT_EQ(int4train::dense_fallback_macs(int4train::Recipe::kHqBs), std::ldexp(1.0, 37));
  EXPECT_EQ(int4train::dense_fallback_macs(int4train::Recipe::kHqLss), std::ldexp(1.0, 38));
  EXPECT_FALSE(Int4LinearOptions(4, 4).dense_below_macs().has_value());
  EXPECT_EQ(Int4Linear(Int4LinearOptions(4, 4).recipe("hq_bs"))->dense_below_macs(),
            std::ldexp(1.0, 37));
  EXPECT_EQ(Int4Linear(Int4LinearOptions(4, 4))->dense_below_macs(), std::ldexp(1.0, 38));
  EXPECT_EQ(Int4Linear(Int4LinearOptions(4, 4).dense_below_macs(5.0))->dense_below_macs(), 5.0);
  torch::nn::Linear lin(32, 16);
  Int4Linear plain = int4train::pt::int4_linear_from(
      lin, Int4LinearOptions(32, 16).recipe("hq_bs").dense_below_macs(0.0));
  Int4Linear rule = int4train::pt::int4_linear_from(
      lin, Int4LinearOptions(32, 16).recipe("hq_bs").dense_below_macs(1e30));
  const auto x = torch::randn({6, 32});
  EXPECT_TRUE(torch::equal(plain->forward(x), rule->forward(x)));
  EXPECT_EQ(rule->step.item<int64_t>(), plain->step.item<int64_t>());
  std::ostringstream printed;
  plain->pretty_print(printed);
  EXPECT_NE(printed.str().find("dense_below_macs=0"), std::string::npos) << printed.str();
  EXPECT_THROW(Int4Linear(Int4LinearOptions(4, 4).dense_below_macs(-1.0)), c10::ValueError);
}

TEST(Int4Linear, HostCopiesFollowLoadsAndWrites) {
  // forward reads `initialized` and `hadamard_block` on the host only after they change: a load
  // into an initialised layer, and an in-place write, must both show.
  torch::NoGradGuard no_grad;
  auto x = torch::randn({32, 64}) * 0.1;
  x.select(1, 3) += 30.0;  // an outlier channel: a Hadamard block > 1 wins
  Int4Linear a(Int4LinearOptions(64, 48).recipe("hq_lss"));
  a->eval();
  a->forward(x);
  const int64_t block = a->block_size();
  ASSERT_GT(block, 1);
  Int4Linear b(Int4LinearOptions(64, 48).recipe("hq_lss").max_hadamard_block(1));
  b->eval();
  b->forward(torch::randn({32, 64}));
  ASSERT_TRUE(b->is_initialized());
  ASSERT_EQ(b->block_size(), 1);
  std::stringstream stream;
  torch::save(a, stream);
  torch::load(b, stream);
  EXPECT_EQ(b->block_size(), block);
  EXPECT_TRUE(torch::equal(a->forward(x), b->forward(x)));
  b->hadamard_block.fill_(2);
  EXPECT_EQ(b->block_size(), 2);
  Int4Linear c(Int4LinearOptions(64, 48).recipe("hq_lss"));
  EXPECT_FALSE(c->is_initialized());
  c->initialized.fill_(true);
  EXPECT_TRUE(c->is_initialized());
}

TEST(Int4Linear, BadInputsThrow) {
  Int4Linear layer = make_layer("hq", 32, 16);
  EXPECT_THROW(layer->forward(torch::randn({4, 31})), c10::ValueError);
  EXPECT_THROW(layer->forward(torch::randn({4, 32}, torch::kHalf)), c10::TypeError);
  EXPECT_THROW(layer->forward(torch::randn({4, 32}, torch::kDouble)), c10::TypeError);
  EXPECT_THROW(Int4Linear(Int4LinearOptions(4, 4).recipe("int3")), c10::ValueError);
  const auto x = torch::randn({3, 8}), w = torch::randn({4, 8});
  const auto step = torch::zeros({}, torch::kLong);
  EXPECT_THROW(int4train::pt::linear(x, w, {}, {}, {}, "hq", 1, 0, step, 0), c10::ValueError);
  const auto one = torch::ones({});
  EXPECT_THROW(int4train::pt::linear(x, w, {}, one, one, "hq", 3, 0, step, 0), c10::ValueError);
}

TEST(Int4Linear, GradientsFlowThroughTheCppAutograd) {
  // The differentiable op directly: fp recipe gradients equal the exact ones.
  auto x = torch::randn({5, 12}, torch::requires_grad());
  auto w = torch::randn({3, 12}, torch::requires_grad());
  const auto step = torch::zeros({}, torch::kLong);
  auto y = int4train::pt::linear(x, w, {}, {}, {}, "fp", 1, 0, step, 0);
  y.sum().backward();
  EXPECT_TRUE(torch::allclose(x.grad(), w.sum(0).expand({5, 12}), 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(w.grad(), x.detach().sum(0).expand({3, 12}), 1e-5, 1e-5));
}

TEST(Ops, PackedGemmIsExact) {
  const auto a = torch::randint(-8, 8, {7, 33}, torch::kChar);
  const auto b = torch::randint(-8, 8, {5, 33}, torch::kChar);
  const auto ref = torch::matmul(a.to(torch::kLong), b.to(torch::kLong).t()).to(torch::kInt);
  EXPECT_TRUE(torch::equal(int4train::pt::gemm_s32(a, b), ref));
  const auto pa = int4train::pt::pack_int4(a), pb = int4train::pt::pack_int4(b);
  EXPECT_EQ(pa.sizes(), torch::IntArrayRef({7, 17}));
  EXPECT_TRUE(torch::equal(int4train::pt::gemm_s32(pa, pb), ref));
  EXPECT_TRUE(torch::equal(int4train::pt::unpack_int4(pa, 33), a));
}

}  // namespace
