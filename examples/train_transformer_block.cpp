// int4train LibTorch example: a small causal transformer (one pre-norm block) whose linear layers are
// int4train::pt::Int4Linear, trained as a character-level language model, with a checkpoint saved and
// reloaded at the end. Shows that LibTorch programs get the quantized layers and their gradients.
//
//   train_transformer_block [--recipe hq_lss] [--steps 300] [--text file.txt] [--device cpu|cuda]
//
// Without --text it learns a synthetic language whose next character is a fixed function of the
// current one plus noise, so the loss must fall from ln(vocab) towards the noise entropy.
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "int4train/torch/int4_linear.h"

namespace {

using int4train::pt::Int4Linear;
using int4train::pt::Int4LinearOptions;

struct Config {
  std::string recipe = "hq_lss";
  int64_t steps = 300;
  std::string text;
  std::string device = torch::cuda::is_available() ? "cuda" : "cpu";
  int64_t d_model = 64, heads = 4, hidden = 256, context = 32, batch = 32;
};

// Causal self-attention and a GELU MLP, pre-norm, every projection an Int4Linear. The layers are
// far below the small-shape rule's size (int4train/linear.h), which on a GPU would run them as
// plain products; this example is about 4-bit training, so it turns the rule off.
struct BlockImpl : torch::nn::Module {
  BlockImpl(const Config& c, int64_t* next_layer) : heads(c.heads) {
    auto lin = [&](int64_t in, int64_t out) {
      return Int4Linear(
          Int4LinearOptions(in, out).recipe(c.recipe).layer((*next_layer)++).dense_below_macs(0.0));
    };
    ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
    qkv = register_module("qkv", lin(c.d_model, 3 * c.d_model));
    proj = register_module("proj", lin(c.d_model, c.d_model));
    ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
    fc1 = register_module("fc1", lin(c.d_model, c.hidden));
    fc2 = register_module("fc2", lin(c.hidden, c.d_model));
  }

  torch::Tensor forward(torch::Tensor x) {  // x: (B, T, D)
    const int64_t b = x.size(0), t = x.size(1), d = x.size(2);
    auto qkv_out = qkv->forward(ln1->forward(x)).view({b, t, 3, heads, d / heads});
    auto q = qkv_out.select(2, 0).transpose(1, 2);  // (B, H, T, D/H)
    auto k = qkv_out.select(2, 1).transpose(1, 2);
    auto v = qkv_out.select(2, 2).transpose(1, 2);
    auto att = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                /*is_causal=*/true);
    x = x + proj->forward(att.transpose(1, 2).reshape({b, t, d}));
    return x + fc2->forward(torch::gelu(fc1->forward(ln2->forward(x))));
  }

  int64_t heads;
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  Int4Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Block);

// Embeddings, one block, a final norm and an (unquantized) output layer, as in the paper.
struct ModelImpl : torch::nn::Module {
  ModelImpl(const Config& c, int64_t vocab) {
    int64_t layer = 0;
    tok = register_module("tok", torch::nn::Embedding(vocab, c.d_model));
    pos = register_module("pos", torch::nn::Embedding(c.context, c.d_model));
    block = register_module("block", Block(c, &layer));
    ln = register_module("ln", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.d_model})));
    head = register_module("head", torch::nn::Linear(c.d_model, vocab));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto positions = torch::arange(ids.size(1), ids.options());
    return head->forward(ln->forward(block->forward(tok->forward(ids) + pos->forward(positions))));
  }
  torch::nn::Embedding tok{nullptr}, pos{nullptr};
  Block block{nullptr};
  torch::nn::LayerNorm ln{nullptr};
  torch::nn::Linear head{nullptr};
};
TORCH_MODULE(Model);

// Token ids of the training text: bytes of --text, or a synthetic sequence.
torch::Tensor load_tokens(const Config& c, int64_t* vocab) {
  if (!c.text.empty()) {
    std::ifstream in(c.text, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + c.text);
    std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    *vocab = 256;
    std::vector<int64_t> ids(s.begin(), s.end());
    for (auto& v : ids) v &= 0xFF;
    return torch::tensor(ids, torch::kLong);
  }
  // x_{t+1} = (5 x_t + 3) mod 48 with probability 0.9, else uniform: entropy ~0.9 nats at best.
  *vocab = 48;
  torch::manual_seed(1);
  const int64_t n = 200000;
  auto noise = torch::rand({n});
  auto random = torch::randint(0, *vocab, {n}, torch::kLong);
  std::vector<int64_t> ids(n);
  ids[0] = 0;
  auto nz = noise.accessor<float, 1>();
  auto rnd = random.accessor<int64_t, 1>();
  for (int64_t i = 1; i < n; ++i) ids[i] = nz[i] < 0.9f ? (5 * ids[i - 1] + 3) % *vocab : rnd[i];
  return torch::tensor(ids, torch::kLong);
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--recipe") {
      c.recipe = value();
    } else if (a == "--steps") {
      c.steps = std::stoll(value());
    } else if (a == "--text") {
      c.text = value();
    } else if (a == "--device") {
      c.device = value();
    } else {
      throw std::runtime_error("unknown argument " + a +
                               " (use --recipe, --steps, --text, --device)");
    }
  }
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Config c = parse(argc, argv);
    const torch::Device device(c.device);
    int64_t vocab = 0;
    const torch::Tensor tokens = load_tokens(c, &vocab);
    torch::manual_seed(0);
    Model model(c, vocab);
    model->to(device);
    torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(3e-3));
    std::cout << "recipe " << c.recipe << ", device " << c.device << ", vocab " << vocab << ", "
              << tokens.numel() << " tokens\n";

    auto batch = [&]() {
      auto starts = torch::randint(0, tokens.numel() - c.context - 1, {c.batch}, torch::kLong);
      auto offsets = torch::arange(c.context + 1, torch::kLong);
      auto idx = starts.unsqueeze(1) + offsets.unsqueeze(0);
      auto seq = tokens.index({idx}).to(device);
      return std::make_pair(seq.narrow(1, 0, c.context), seq.narrow(1, 1, c.context));
    };
    double first = 0.0, recent = 0.0;
    for (int64_t step = 1; step <= c.steps; ++step) {
      auto [x, y] = batch();
      auto logits = model->forward(x);
      auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, vocab}), y.reshape(-1));
      opt.zero_grad();
      loss.backward();
      opt.step();
      const double l = loss.item<double>();
      if (step == 1) first = l;
      recent = step == 1 ? l : 0.9 * recent + 0.1 * l;
      if (step == 1 || step % 50 == 0 || step == c.steps) {
        std::cout << "step " << step << "  loss " << l << "  (smoothed " << recent << ")\n";
      }
    }

    // Checkpoint round trip: the steps, Hadamard blocks and step counters come back exactly.
    std::stringstream ckpt;
    torch::save(model, ckpt);
    Model reloaded(c, vocab);
    torch::load(reloaded, ckpt);
    reloaded->to(device);
    model->eval();
    reloaded->eval();
    auto [x, y] = batch();
    const bool same = torch::equal(model->forward(x), reloaded->forward(x));
    std::cout << "initial loss " << first << " (ln vocab = " << std::log(double(vocab))
              << "), final smoothed loss " << recent << "; checkpoint reproduces the forward: "
              << (same ? "yes" : "NO") << "\n";
    return same && recent < first ? EXIT_SUCCESS : EXIT_FAILURE;
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return EXIT_FAILURE;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return EXIT_FAILURE;
  }
}
