"""convert_ / unconvert_ on plain PyTorch models: which modules are swapped, layer ids, shared and
tied parameters, strict reloading after unconvert_, and a tiny model that learns under every recipe."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import int4train
from int4train import Int4Linear

from conftest import RECIPES


class Block(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d=32, classes=8):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, classes, bias=False)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int4Linear))]


def test_convert_swaps_every_linear_in_order(recipe):
    model = Net()
    params = {n: p for n, p in model.named_parameters()}
    int4train.convert_(model, recipe=recipe)
    layers = linears(model)
    assert [n for n, _ in layers] == ["inp", "blocks.0.up", "blocks.0.down", "blocks.1.up",
                                      "blocks.1.down", "head"]
    assert all(isinstance(m, Int4Linear) and m.recipe.name == recipe for _, m in layers)
    assert [m.layer_id for _, m in layers] == list(range(6))
    # The original Parameters are kept (an optimizer built before still holds them).
    for n, p in model.named_parameters():
        if n in params:
            assert p is params[n]
    assert isinstance(model.blocks[0].norm, nn.LayerNorm)
    y = model(torch.randn(3, 16))
    assert y.shape == (3, 8)


def test_filter_fn_and_recipe_object():
    model = Net()
    int4train.convert_(model, recipe=int4train.Recipe("hq", seed=11),
                       filter_fn=lambda m, name: name.startswith("blocks"))
    assert isinstance(model.inp, nn.Linear) and not isinstance(model.inp, Int4Linear)
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, Int4Linear)
    ups = [m for _, m in linears(model) if isinstance(m, Int4Linear)]
    assert len(ups) == 4 and all(m.recipe.seed == 11 for m in ups)
    # A second call converts the rest and continues the layer ids.
    int4train.convert_(model, recipe="hq")
    assert sorted(m.layer_id for _, m in linears(model)) == list(range(6))


def test_shared_module_and_tied_weights():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module used twice
    int4train.convert_(model, recipe="hq_lss")
    assert isinstance(model[0], Int4Linear) and model[0] is model[2]
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied, as a language model's output layer
    tied = nn.ModuleDict({"emb": emb, "head": head})
    int4train.convert_(tied, recipe="hq_lss")
    assert tied["head"].weight is tied["emb"].weight


def test_unconvert_loads_strict_into_original(recipe):
    torch.manual_seed(0)
    model = Net()
    int4train.convert_(model, recipe=recipe)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 16)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "step" not in n}
    int4train.unconvert_(model)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert all(type(m) is nn.Linear for _, m in linears(model))
    original = Net()
    original.load_state_dict(model.state_dict(), strict=True)
    for n, p in original.named_parameters():
        assert torch.equal(p, trained[n])
    torch.testing.assert_close(original(x), model(x))


def test_lazy_linear_needs_a_forward_first():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"0 \(LazyLinear\) has not been initialised"):
        int4train.convert_(model, recipe="hq_bs")
    assert type(model[2]) is nn.Linear  # nothing converted
    model(torch.randn(2, 5))
    int4train.convert_(model, recipe="hq_bs")
    assert isinstance(model[0], Int4Linear) and model[0].in_features == 5
    assert model(torch.randn(2, 5)).shape == (2, 4)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.* is deprecated:FutureWarning")
def test_computed_weights_are_refused():
    # A parametrized weight (weight_norm, spectral_norm, torch.nn.utils.parametrize) is recomputed
    # from other parameters at each use: an Int4Linear would have frozen its present value,
    # silently.
    from torch.nn.utils import parametrizations

    for wrap in (parametrizations.weight_norm, torch.nn.utils.weight_norm):
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), wrap(nn.Linear(8, 4)))
        with pytest.raises(ValueError, match="the weight of 2 is computed, not a Parameter"):
            int4train.convert_(model, recipe="hq_bs")
        assert type(model[0]) is nn.Linear  # nothing converted
    with pytest.raises(ValueError, match="the weight of the model is computed"):
        int4train.convert_(parametrizations.weight_norm(nn.Linear(8, 4)), recipe="hq_bs")


def test_hooks_move_with_the_layer():
    # Forward (pre-)hooks, with and without kwargs, and backward hooks attached to a linear layer
    # are registered on its Int4Linear, and back on the nn.Linear by unconvert_.
    seen = []
    model = Net()
    model.inp.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    model.inp.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(("post", type(m).__name__)), with_kwargs=True
    )
    model.head.register_full_backward_hook(lambda m, gi, go: seen.append(("bwd", type(m).__name__)))
    int4train.convert_(model, recipe="hq_bs")
    model(torch.randn(4, 16)).sum().backward()
    assert seen == [("pre", "Int4Linear"), ("post", "Int4Linear"), ("bwd", "Int4Linear")]
    int4train.unconvert_(model)
    seen.clear()
    model(torch.randn(4, 16)).sum().backward()
    assert seen == [("pre", "Linear"), ("post", "Linear"), ("bwd", "Linear")]


def test_linear_subclass_with_its_own_forward_warns():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = nn.Sequential(nn.Linear(8, 8), Scaled(8, 4))
    with pytest.warns(UserWarning, match=r"1 \(Scaled\): subclass\(es\) of nn.Linear"):
        int4train.convert_(model, recipe="hq_bs")
    assert isinstance(model[1], Int4Linear)


def test_convert_a_bare_linear():
    lin = nn.Linear(4, 3)
    layer = int4train.convert_(lin, recipe="fp")
    assert isinstance(layer, Int4Linear) and layer.weight is lin.weight
    back = int4train.unconvert_(layer)
    assert type(back) is nn.Linear and back.weight is lin.weight


def test_transformer_encoder_converts_attention_whole():
    # nn.MultiheadAttention never calls its out_proj (F.multi_head_attention_forward reads the
    # weights), so a swap of out_proj alone would never run: convert_ replaces the attention module
    # by an Int4MultiheadAttention (q, k, v and out projections as Int4Linear), ids in module order;
    # every converted layer runs (counters advance, step sizes get gradients: nothing unused for
    # DDP), and unconvert_ gives back a model whose state loads strictly into the plain one.
    torch.manual_seed(0)

    def encoder():
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    model = encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int4train.convert_(model, recipe="hq_bs")
    converted = [n for n, m in model.named_modules() if isinstance(m, Int4Linear)]
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "linear1", "linear2")
    assert converted == [f"layers.{i}.{n}" for i in range(2) for n in names]
    assert [model.get_submodule(n).layer_id for n in converted] == list(range(12))
    assert all(isinstance(layer.self_attn, int4train.Int4MultiheadAttention)
               for layer in model.layers)
    model(torch.randn(3, 5, 32)).square().sum().backward()
    for n in converted:
        layer = model.get_submodule(n)
        assert int(layer.step) == 1 and layer.input_step.grad is not None, n
    int4train.unconvert_(model)
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in model.layers)
    assert not any(isinstance(m, (Int4Linear, int4train.Int4MultiheadAttention))
                   for m in model.modules())
    encoder().load_state_dict(model.state_dict(), strict=True)


def test_unsupported_attention_is_left_with_a_warning():
    # kdim != embed_dim (or bias_k / add_zero_attn): left as it is, out_proj included (converting it
    # alone would leave an Int4Linear that never runs), with a warning naming the module.
    model = nn.ModuleDict(
        {"attn": nn.MultiheadAttention(16, 2, kdim=8, vdim=8), "fc": nn.Linear(16, 4)}
    )
    with pytest.warns(UserWarning, match=r"left in full precision \(attn\)"):
        int4train.convert_(model, recipe="hq_bs")
    assert type(model["attn"]) is nn.MultiheadAttention
    assert type(model["attn"].out_proj) is not Int4Linear and isinstance(model["fc"], Int4Linear)
    # out_proj selected without its attention module: left too, named.
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 2)})
    with pytest.warns(UserWarning, match=r"\(attn.out_proj\)"):
        int4train.convert_(model, recipe="hq_bs", filter_fn=lambda m, n: n == "attn.out_proj")
    assert type(model["attn"].out_proj) is not Int4Linear


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
def test_int4_attention_computes_what_multihead_attention_does(batch_first, need_weights, cross,
                                                                masks):
    # With the fp recipe the projections are exact, so Int4MultiheadAttention must give
    # nn.MultiheadAttention's outputs and attention weights: layouts, masks (padding, causal bool,
    # float), self- and cross-attention, averaged or per-head weights, an unbatched input.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    ours = int4train.convert_(copy.deepcopy(mha), recipe="fp")
    assert isinstance(ours, int4train.Int4MultiheadAttention)
    n, tgt, src = 3, 5, (7 if cross else 5)

    def seq(length):
        return torch.randn(n, length, 32) if batch_first else torch.randn(length, n, 32)

    q = seq(tgt)
    kv = seq(src) if cross else q
    kw = {}
    if masks:
        pad = torch.zeros(n, src, dtype=torch.float if cross else torch.bool)
        pad[1, -2:] = float("-inf") if cross else True
        causal = torch.triu(torch.ones(tgt, src, dtype=torch.bool), 1)
        kw = dict(key_padding_mask=pad, attn_mask=torch.randn(tgt, src) if cross else causal)
    for average in (True, False) if need_weights else (True,):
        want, want_w = mha(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **kw)
        got, got_w = ours(q, kv, kv, need_weights=need_weights, average_attn_weights=average, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if need_weights:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
        else:
            assert got_w is None and want_w is None
    if batch_first and not cross:  # one sequence, no batch dimension
        x = torch.randn(tgt, 32)
        torch.testing.assert_close(ours(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)
    back = int4train.unconvert_(ours)
    assert type(back) is nn.MultiheadAttention
    for (name, a), b in zip(mha.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_int4_attention_built_directly():
    # Int4MultiheadAttention(embed_dim, num_heads, ...) initialises as nn.MultiheadAttention does
    # (same draws from the generator), with its four layers' ids from layer_id on.
    torch.manual_seed(3)
    ours = int4train.Int4MultiheadAttention(32, 4, batch_first=True, recipe="fp", layer_id=5)
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    layers = (ours.q_proj, ours.k_proj, ours.v_proj, ours.out_proj)
    assert [m.layer_id for m in layers] == [5, 6, 7, 8]
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(ours(x, x, x)[0], mha(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_encoder_fast_path_keeps_converted_layers(monkeypatch):
    # In eval mode without gradients nn.TransformerEncoderLayer runs a fused kernel on the raw
    # weights (and nn.TransformerEncoder a nested-tensor version of it for padded batches), which
    # skipped the converted linear layers: evaluation ran the full-precision model. Converted blocks
    # stay on the module path, so every Int4Linear runs, padded or not; unconvert_ undoes the guard.
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True),
        num_layers=2,
    )
    assert model.use_nested_tensor  # PyTorch's default: the nested fast path is on
    int4train.convert_(model, recipe="hq_bs")
    int4train.convert_(model, recipe="hq_bs")  # a second call adds no second guard
    assert [len(layer._forward_pre_hooks) for layer in model.layers] == [1, 1]
    x = torch.randn(3, 6, 32)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    model(x)  # initialise
    model.eval()
    calls = []
    quantized = Int4Linear._quantized
    monkeypatch.setattr(
        Int4Linear, "_quantized", lambda self, *a: calls.append(1) or quantized(self, *a)
    )
    with torch.no_grad():
        for mask in (None, pad):
            calls.clear()
            assert model(x, src_key_padding_mask=mask).shape == x.shape
            assert len(calls) == 12, mask  # 2 blocks x (q, k, v, out, linear1, linear2)
    int4train.unconvert_(model)
    assert model.use_nested_tensor
    assert [len(layer._forward_pre_hooks) for layer in model.layers] == [0, 0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_tiny_model_learns(recipe):
    # A teacher-student regression: every recipe must cut the loss well below where it started.
    torch.manual_seed(0)
    teacher = Net()
    x = torch.randn(256, 16)
    with torch.no_grad():
        target = teacher(x)
    model = Net()
    int4train.convert_(model, recipe=recipe)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses))  # no NaN
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (recipe, first, last)
