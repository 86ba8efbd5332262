"""int4train.Int4Linear: a drop-in for nn.Linear (shapes, parameters, dtypes, bad inputs), its
first-batch initialisation and saved state, and checkpoint round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import int4train
from int4train import Int4Linear, Recipe

from conftest import LSQ_RECIPES, RECIPES, snr_db


def make_layer(recipe, d=32, c=16, bias=True, seed=0):
    torch.manual_seed(seed)
    return Int4Linear.from_linear(nn.Linear(d, c, bias=bias), recipe=recipe, layer_id=3)


def test_same_parameters_as_linear(recipe):
    lin = nn.Linear(12, 5)
    layer = Int4Linear.from_linear(lin, recipe=recipe)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.shape == (5, 12) and layer.in_features == 12 and layer.out_features == 5
    names = {n for n, _ in layer.named_parameters()}
    if recipe in LSQ_RECIPES:
        assert names == {"weight", "bias", "input_step", "weight_step"}
        # One-element vectors, not 0-dim tensors: FSDP's fully_shard takes no 0-dim parameter.
        assert layer.input_step.dtype == torch.float32 and layer.input_step.shape == (1,)
    else:
        assert names == {"weight", "bias"}
    assert set(layer.state_dict()) == names | {"hadamard_block", "initialized", "step"}
    fresh = Int4Linear(12, 5, bias=False, recipe=recipe)
    assert fresh.bias is None and fresh.weight.shape == (5, 12)
    assert "recipe=" + recipe in repr(fresh)


def test_fp_recipe_equals_linear():
    lin = nn.Linear(24, 7)
    layer = Int4Linear.from_linear(copy.deepcopy(lin), recipe="fp")
    x = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), lin(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, lin.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad, rtol=1e-5, atol=1e-5)


def test_quantized_forward_and_backward_track_fp(recipe):
    # One layer on a smooth input: each recipe's output and gradients against the exact product.
    layer = make_layer(recipe, d=64, c=48)
    ref = copy.deepcopy(layer).to_linear()
    x = torch.randn(256, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = layer(x), ref(xr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    # Forward: a per-tensor 4-bit grid with the LSQ initial step s = 2 E|x| / sqrt(7) on Gaussian data
    # has noise s^2 / 12 per operand, about 15 dB each, so ~12 dB for the product of two quantized
    # operands: require 9. Backward: the 4-bit weight codes plus each recipe's gradient quantizer
    # (8-bit bit split > plain 4-bit > LUQ > bit split sampled down to N of 2N rows).
    fwd_min = {"fp": 100, "int8": 30, "lsq_luq": 9, "hq": 9, "hq_bs": 9, "hq_lss": 9}[recipe]
    bwd_min = {"fp": 100, "int8": 28, "lsq_luq": 6, "hq": 7, "hq_bs": 12, "hq_lss": 3}[recipe]
    assert snr_db(yr, y) > fwd_min
    assert snr_db(xr.grad, x.grad) > bwd_min
    assert snr_db(ref.weight.grad, layer.weight.grad) > bwd_min
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    if recipe in LSQ_RECIPES:
        assert layer.input_step.grad is not None and torch.isfinite(layer.input_step.grad)
        assert layer.weight_step.grad is not None and torch.isfinite(layer.weight_step.grad)


def test_first_forward_initialises(lsq_recipe):
    layer = make_layer(lsq_recipe, d=64)
    assert not bool(layer.initialized) and float(layer.input_step.detach()) == 1.0
    x = torch.randn(10, 64) * 0.1
    x[:, 5] += 30.0  # an outlier channel
    layer.eval()
    with torch.no_grad():
        layer(x[:0])  # an empty batch teaches nothing: still uninitialised
        assert not bool(layer.initialized)
        layer(x)
    assert bool(layer.initialized)
    block = int(layer.hadamard_block)
    if lsq_recipe == "lsq_luq":
        assert block == 1
    else:
        expect, _ = int4train.ops.select_hadamard_block(x, layer.weight.detach())
        assert block == expect and block > 1
    xt = torch.ops.int4train.hadamard_transform(x, block)
    wt = torch.ops.int4train.hadamard_transform(layer.weight.detach(), block)
    # The default step_init="mse": the steps that minimise the 4-bit error of the transformed operands.
    sx, sw = torch.ops.int4train.lsq_mse_step(xt), torch.ops.int4train.lsq_mse_step(wt)
    assert torch.equal(layer.input_step.detach(), sx.reshape(1))
    assert torch.equal(layer.weight_step.detach(), sw.reshape(1))
    assert not torch.equal(sx, torch.ops.int4train.lsq_init_step(xt))
    # Later batches never re-initialise.
    with torch.no_grad():
        layer(x * 100)
    assert torch.equal(layer.input_step.detach(), sx.reshape(1))

    # step_init="mean_abs": LSQ's 2 mean|x~| / sqrt(7), same block.
    ma = Int4Linear.from_linear(nn.Linear(*layer.weight.shape[::-1]), Recipe(lsq_recipe, step_init="mean_abs"))
    with torch.no_grad():
        ma.weight.copy_(layer.weight)
        ma.eval()(x)
    assert int(ma.hadamard_block) == block
    assert torch.equal(ma.input_step.detach(), torch.ops.int4train.lsq_init_step(xt).reshape(1))
    assert torch.equal(ma.weight_step.detach(), torch.ops.int4train.lsq_init_step(wt).reshape(1))


def test_lsq_mse_step_op():
    torch.manual_seed(1)
    x = torch.randn(300, 64) * 0.3
    s = torch.ops.int4train.lsq_mse_step(x)
    assert s.dtype == torch.float32 and s.dim() == 0
    err = lambda step: (step * (x / step).round().clamp(-8, 7) - x).pow(2).sum()  # noqa: E731
    m0 = torch.ops.int4train.lsq_init_step(x)
    assert err(s) < err(m0) and err(s) <= err(s * 1.01) and err(s) <= err(s * 0.99)
    # (..., D) inputs are matrices of their rows; bf16 works; the same op for every layout.
    assert torch.equal(torch.ops.int4train.lsq_mse_step(x.reshape(3, 100, 64)), s)
    assert torch.equal(torch.ops.int4train.lsq_mse_step(x.t().contiguous().t()), s)
    assert torch.equal(torch.ops.int4train.lsq_mse_step(x.bfloat16()),
                       torch.ops.int4train.lsq_mse_step(x.bfloat16().float()))
    assert float(torch.ops.int4train.lsq_mse_step(torch.zeros(4, 4))) == 1.0
    assert float(torch.ops.int4train.lsq_mse_step(torch.empty(5, 0))) == 1.0
    assert float(torch.ops.int4train.lsq_init_step(torch.empty(5, 0))) == 1.0
    with pytest.raises(ValueError, match="x: expected finite"):
        torch.ops.int4train.lsq_mse_step(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="x: "):
        torch.ops.int4train.lsq_mse_step(torch.ones(2, 2, dtype=torch.float64))
    # Large inputs: the core's sample of whole rows at a stride (quantize.h kLsqMseSample), gathered
    # before the search.
    big = torch.randn(2200, 1000)
    big[:, 7] *= 50.0
    assert torch.equal(torch.ops.int4train.lsq_mse_step(big), torch.ops.int4train.lsq_mse_step(big[::3]))
    big[1, 1] = float("inf")  # outside the sample, still an error
    with pytest.raises(ValueError, match="x: expected finite values.*1 non-finite"):
        torch.ops.int4train.lsq_mse_step(big)


def test_step_counter_counts_training_forwards(recipe):
    layer = make_layer(recipe)
    x = torch.randn(4, 32)
    layer(x)
    layer(x)
    assert int(layer.step) == 2
    layer.eval()
    layer(x)
    assert int(layer.step) == 2


def test_leading_dims_and_noncontiguous(recipe):
    layer = make_layer(recipe).eval()
    x = torch.randn(3, 4, 32)
    layer(x)  # initialise
    y = layer(x)
    assert y.shape == (3, 4, 16)
    assert torch.equal(y.reshape(12, 16), layer(x.reshape(12, 32)))
    xt = torch.randn(32, 6).t()  # non-contiguous
    assert not xt.is_contiguous()
    assert torch.equal(layer(xt), layer(xt.contiguous()))


def test_empty_batch(recipe):
    layer = make_layer(recipe)
    x = torch.randn(0, 5, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(layer.weight.grad) == 0 and torch.count_nonzero(layer.bias.grad) == 0


def test_bad_inputs():
    layer = make_layer("hq_lss")
    with pytest.raises(ValueError, match="in_features=32"):
        layer(torch.randn(4, 31))
    with pytest.raises(ValueError):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="float16"):
        layer(torch.randn(4, 32).half())
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(4, 32).double())
    with pytest.raises(TypeError):
        layer(torch.randn(4, 32).bfloat16())  # bf16 input, fp32 weight: nn.Linear refuses too
    with pytest.raises(TypeError):
        layer(torch.randint(0, 3, (4, 32)))
    with pytest.raises(ValueError):
        Recipe("int4")
    with pytest.raises(ValueError):
        Recipe("hq", max_hadamard_block=3)


def test_bf16_model(recipe):
    layer = make_layer(recipe).to(torch.bfloat16)
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.bfloat16
    if recipe in LSQ_RECIPES:
        assert layer.input_step.grad is not None


def test_cpu_autocast_bf16(recipe):
    layer = make_layer(recipe)
    ref = copy.deepcopy(layer)
    x = torch.randn(16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        lin_y = nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == lin_y.dtype == torch.bfloat16  # like nn.Linear under autocast
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    y32 = ref(x.detach())
    assert snr_db(y32, y.float()) > 20 if recipe in ("fp", "int8") else snr_db(y32, y.float()) > 10
    # fp16 autocast: the layer computes in fp32.
    with torch.autocast("cpu", dtype=torch.float16):
        assert layer(x).dtype == torch.float32


def saved_for_backward(fn) -> list:
    """The tensors autograd keeps from fn() for the backward."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fn()
    return kept


def test_autocast_keeps_no_cast_weight(recipe):
    # Under autocast the layer computes with the bf16 cast of its fp32 weight, as nn.Linear does,
    # but keeps the weight itself for the backward (nn.Linear keeps the cast copy): outputs and
    # gradients equal, bit for bit, those of the same layer given the bf16 operands outright.
    n, d, c = 24, 32, 48
    layer = make_layer(recipe, d, c)
    x = torch.randn(n, d, requires_grad=True)
    with torch.no_grad():
        layer(x)  # initialise
    step = int(layer.step)
    out = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = saved_for_backward(lambda: out.append(layer(x)))
    out[0].float().square().sum().backward()
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    extra = [t for t in kept if t.untyped_storage().data_ptr() not in params]
    assert not any(t.shape == layer.weight.shape for t in extra)  # no copy of the weight
    if recipe in LSQ_RECIPES:  # the packed codes, the aux bits and scalars
        assert sum(t.numel() * t.element_size() for t in extra) <= n * d * 5 // 8 + 64

    ref = copy.deepcopy(layer)
    ref.step.fill_(step)
    wb = ref.weight.detach().to(torch.bfloat16).requires_grad_(True)
    bb = ref.bias.detach().to(torch.bfloat16).requires_grad_(True)
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    y = torch.ops.int4train.linear(xb, wb, bb, ref.input_step, ref.weight_step, ref.recipe.spec,
                                   ref._block, ref.recipe.seed, ref.step, ref.layer_id)
    y.float().square().sum().backward()
    assert torch.equal(layer.weight.grad, wb.grad.float())
    assert torch.equal(layer.bias.grad, bb.grad.float())
    assert torch.equal(x.grad, xb.grad.float())
    if recipe in LSQ_RECIPES:
        assert torch.equal(layer.input_step.grad, ref.input_step.grad)
        assert torch.equal(layer.weight_step.grad, ref.weight_step.grad)


def test_state_dict_round_trip_reproduces_forward(recipe):
    layer = make_layer(recipe)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    x = torch.randn(16, 32)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = Int4Linear(32, 16, recipe=recipe, layer_id=3)
    fresh.load_state_dict(torch.load(buf))
    assert fresh._initialized and fresh._block == int(layer.hadamard_block)
    assert int(fresh.step) == 3
    layer.eval()
    fresh.eval()
    x2 = torch.randn(5, 32) * 7  # other statistics: a re-initialisation would change the output
    assert torch.equal(layer(x2), fresh(x2))
    # Training continues identically: same step counter, same random streams.
    layer.train()
    fresh.train()
    xg = x2.clone().requires_grad_(True)
    xf = x2.clone().requires_grad_(True)
    layer(xg).sum().backward()
    fresh(xf).sum().backward()
    assert torch.equal(xg.grad, xf.grad)


def test_loads_checkpoints_with_0dim_steps(lsq_recipe):
    # Checkpoints saved while the steps were 0-dim tensors load into the (1,)-shaped parameters.
    layer = make_layer(lsq_recipe)
    x = torch.randn(16, 32)
    layer(x)
    old = {k: (v.reshape(()) if k.endswith("_step") and k != "step" else v)
           for k, v in layer.state_dict().items()}
    assert old["input_step"].dim() == 0
    fresh = Int4Linear(32, 16, recipe=lsq_recipe, layer_id=3)
    fresh.load_state_dict(old)
    assert fresh.input_step.shape == (1,) and torch.equal(fresh.input_step, layer.input_step)
    assert torch.equal(fresh.eval()(x), layer.eval()(x))


def _expected_gradients(recipe, x, w, g, block, sx, sw):
    """E[grad_x], E[grad_w] of a stochastic backward given the forward's codes, in fp64: the exact
    output gradient times the dequantized codes, through the LSQ straight-through mask (or, for
    int8, the absmax INT8 codes) and back through the Hadamard transform."""
    ops = torch.ops.int4train
    g64 = g.double()
    if recipe == "int8":
        def absmax8(t):
            scale = t.abs().max() / 127
            inv = torch.tensor(1.0) / scale
            return scale.double() * torch.clamp(torch.round(t * inv), -127, 127).double()
        return g64 @ absmax8(w), g64.t() @ absmax8(x)
    xt, wt = ops.hadamard_transform(x, block), ops.hadamard_transform(w, block)
    qx, _ = ops.lsq_quantize(xt, sx)
    qw, _ = ops.lsq_quantize(wt, sw)
    def mask(t, s):
        v = t * (torch.tensor(1.0) / s)
        return ((v >= -8) & (v <= 7)).double()
    dx = mask(xt, sx) * (g64 @ (sw.double() * qw.double()))
    dw = mask(wt, sw) * (g64.t() @ (sx.double() * qx.double()))
    h = block_diag_hadamard_matrix(x.shape[1], block)
    return dx @ h, dw @ h


def block_diag_hadamard_matrix(d, g):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < g:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / g**0.5] * (d // g))


@pytest.mark.parametrize("recipe", ["int8", "lsq_luq", "hq", "hq_bs", "hq_lss"])
def test_stochastic_gradients_are_unbiased(recipe):
    # The mean of the backward over many random streams (steps) converges to its expectation given
    # the forward codes, with an error shrinking like 1/sqrt(draws).
    torch.manual_seed(3)
    n, d, c = 24, 32, 12
    x = torch.randn(n, d)
    x[:, 2] *= 8  # an outlier channel, so that clipping and the transform both matter
    w = torch.randn(c, d) / d**0.5
    g = torch.randn(n, c) * torch.rand(n, 1) ** 3  # rows of very different norms, as LSS assumes
    layer = Int4Linear.from_linear(nn.Linear(d, c), recipe=recipe)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer(x)  # initialise the steps and block on this batch
    block = int(layer.hadamard_block)
    sx = layer.input_step.detach() if layer.input_step is not None else None
    sw = layer.weight_step.detach() if layer.weight_step is not None else None
    ex, ew = _expected_gradients(recipe, x, w, g, block, sx, sw)
    sum_x = torch.zeros(n, d, dtype=torch.float64)
    sum_w = torch.zeros(c, d, dtype=torch.float64)
    single, errors = [], {}
    draws = 400
    for k in range(1, draws + 1):
        xi = x.clone().requires_grad_(True)
        wi = w.clone().requires_grad_(True)
        y = torch.ops.int4train.linear(xi, wi, None, sx, sw, recipe, block, 9, torch.tensor(k), 1)
        y.backward(g)
        sum_x += xi.grad.double()
        sum_w += wi.grad.double()
        single.append((xi.grad.double() - ex).norm() / ex.norm())
        if k in (25, draws):
            errors[k] = ((sum_x / k - ex).norm() / ex.norm(), (sum_w / k - ew).norm() / ew.norm())
    per_draw = torch.stack(single).mean()
    ex_err, ew_err = errors[draws]
    assert ex_err < 3 * per_draw / draws**0.5, (ex_err, per_draw)
    assert ex_err < errors[25][0] and ew_err < errors[25][1]
    assert ew_err < 0.1


def test_lss_budget_recipe():
    # Validation, the spec string the ops take, and the layer: budget 2 gives hq_bs's gradients.
    assert Recipe("hq_lss").spec == "hq_lss"
    r = Recipe("hq_lss", seed=3, lss_budget=1.5)
    assert r.spec == "hq_lss:lss_budget=1.5" and r.lss_budget == 1.5
    assert Recipe("hq_lss", lss_budget=2).lss_budget == 2.0
    assert Recipe("hq_lss", lss_budget=0.125).lss_budget == 0.125
    for bad in (0, 0.1, -1, 2.5, float("nan"), "1", True):
        with pytest.raises(ValueError, match="lss_budget"):
            Recipe("hq_lss", lss_budget=bad)
    with pytest.raises(ValueError, match="hq_lss only"):
        Recipe("hq_bs", lss_budget=1.5)
    # Recipe.of reads a spec back: the inverse of .spec, with the same checks.
    assert Recipe.of(r.spec, seed=3) == r
    assert Recipe.of("hq_bs") == Recipe("hq_bs")
    for bad, words in [("hq_bs:lss_budget=1.5", "hq_lss only"), ("hq_lss:budget=1", "unknown option"),
                       ("hq_lss:lss_budget=x", "expects a number"), ("hq_lss:lss_budget=9", "lss_budget"), ("hq_lss:", "unknown option")]:
        with pytest.raises(ValueError, match=words):
            Recipe.of(bad)
    # A list of specs (the scripts' and the table's --recipes): a spec's further options continue it.
    from int4train.config import split_specs

    assert split_specs(" fp, hq_lss:grad_scale=row,lss_budget=1.25,hq_bs,,hq_bs:gemm=int8") == [
        "fp", "hq_lss:grad_scale=row,lss_budget=1.25", "hq_bs", "hq_bs:gemm=int8"]
    assert Recipe.of(split_specs("hq_lss:grad_scale=row,lss_budget=1.25")[0]) == Recipe(
        "hq_lss", grad_scale="row", lss_budget=1.25)
    for bad in ("lss_budget=1.5", "hq_lss,lss_budget=1.5"):
        with pytest.raises(ValueError, match="follows no recipe spec"):
            split_specs(bad)
    # The label adds what acts in Int4Linear (max_hadamard_block) to the spec the ops take.
    nb = Recipe("hq_lss", lss_budget=1.5, max_hadamard_block=1)
    assert nb.spec == "hq_lss:lss_budget=1.5" and nb.label == "hq_lss:lss_budget=1.5,max_hadamard_block=1"
    assert Recipe.of(nb.label) == nb and Recipe("hq_bs", max_hadamard_block=1).label == "hq_bs:max_hadamard_block=1"
    assert Recipe("hq_bs").label == "hq_bs" and Recipe("lsq_luq").label == "lsq_luq"
    # step_init (LSQ recipes; default "mse") is a label option too.
    mi = Recipe("hq_lss", lss_budget=1.5, max_hadamard_block=1, step_init="mean_abs")
    assert mi.spec == "hq_lss:lss_budget=1.5"
    assert mi.label == "hq_lss:lss_budget=1.5,max_hadamard_block=1,step_init=mean_abs"
    assert Recipe.of(mi.label) == mi
    assert Recipe.of("lsq_luq:step_init=mean_abs") == Recipe("lsq_luq", step_init="mean_abs")
    assert Recipe("hq_bs", step_init="mse").label == "hq_bs" and Recipe("hq_bs").step_init == "mse"
    with pytest.raises(ValueError, match="applies to the LSQ recipes"):
        Recipe("int8", step_init="mean_abs")
    for bad, words in [("fp:step_init=mse", "applies to the LSQ recipes"),
                       ("hq_bs:step_init=max", "step_init must be one of mean_abs, mse")]:
        with pytest.raises(ValueError, match=words):
            Recipe.of(bad)
    for bad, words in [("lsq_luq:max_hadamard_block=1", "applies to the hq recipes"),
                       ("hq_bs:max_hadamard_block=1.5", "expects an integer"),
                       ("hq_bs:max_hadamard_block=48", "power of two")]:
        with pytest.raises(ValueError, match=words):
            Recipe.of(bad)
    torch.manual_seed(0)
    x = torch.randn(40, 32)
    gy = torch.randn(40, 16)
    grads = {}
    for name, rec in [("bs", Recipe("hq_bs", seed=4)), ("all", Recipe("hq_lss", seed=4, lss_budget=2.0)),
                      ("half", Recipe("hq_lss", seed=4, lss_budget=0.5))]:
        torch.manual_seed(1)
        layer = Int4Linear(32, 16, recipe=rec)
        xx = x.clone().requires_grad_(True)
        layer(xx).backward(gy)
        grads[name] = (xx.grad, layer.weight.grad, layer.input_step.grad, layer.weight_step.grad)
        assert ("lss_budget" in repr(layer)) == (rec.lss_budget != 1.0)
    for a, b in zip(grads["bs"], grads["all"]):
        assert torch.equal(a, b)
    assert not torch.equal(grads["bs"][0], grads["half"][0])


def test_gemm_recipe():
    # The products' engine on CUDA: validation, the spec (the ops parse it), the label and Recipe.of;
    # on the CPU any engine gives the same bits (tests/python/test_cuda.py checks the GPU's).
    assert Recipe("hq_bs").gemm == "auto" and Recipe("hq_bs").spec == "hq_bs"
    r = Recipe("hq_bs", gemm="int8")
    assert r.spec == "hq_bs:gemm=int8" and r.label == "hq_bs:gemm=int8"
    assert Recipe.of(r.spec) == r
    both = Recipe("hq_lss", lss_budget=1.5, gemm="fp8", step_init="mean_abs")
    assert both.spec == "hq_lss:lss_budget=1.5,gemm=fp8"
    assert both.label == "hq_lss:lss_budget=1.5,gemm=fp8,step_init=mean_abs"
    assert Recipe.of(both.label) == both
    for bad in ("fp16", "INT8", "", None):
        with pytest.raises(ValueError, match="gemm must be one of auto, fp8, int8"):
            Recipe("hq_bs", gemm=bad)
    for name in ("fp", "int8"):
        with pytest.raises(ValueError, match="gemm applies to the LSQ recipes"):
            Recipe(name, gemm="int8")
    with pytest.raises(ValueError, match="given twice"):
        Recipe.of("hq_bs:gemm=int8,gemm=fp8")
    assert Recipe.of("fp:gemm=auto") == Recipe("fp")  # the default is accepted everywhere
    torch.manual_seed(0)
    x = torch.randn(6, 32, requires_grad=True)
    outs = []
    for gemm in ("auto", "fp8", "int8"):
        layer = Int4Linear(32, 16, recipe=Recipe("hq_lss", seed=3, gemm=gemm))
        torch.manual_seed(1)
        layer.reset_parameters()
        xx = x.detach().clone().requires_grad_()
        y = layer(xx)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xx.grad, layer.weight.grad, layer.input_step.grad))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_grad_scale_recipe():
    # The bit split's scale: validation, the spec (the ops parse it), the label and Recipe.of; on the
    # CPU both scales train, and the row scale changes the gradients (core tests: the rule, exactness
    # and unbiasedness; tests/python/test_generic.py: the generic path's bits).
    assert Recipe("hq_lss").grad_scale == "tensor" and Recipe("hq_lss").spec == "hq_lss"
    r = Recipe("hq_lss", lss_budget=1.5, grad_scale="row")
    assert r.spec == "hq_lss:lss_budget=1.5,grad_scale=row" and Recipe.of(r.spec) == r
    assert Recipe.of("hq_bs:grad_scale=row").grad_scale == "row"
    for bad in ("rows", "", None, "TENSOR"):
        with pytest.raises(ValueError, match="grad_scale must be"):
            Recipe("hq_bs", grad_scale=bad)
    for name in ("fp", "int8", "lsq_luq", "hq"):
        with pytest.raises(ValueError, match="grad_scale applies to hq_bs and hq_lss"):
            Recipe(name, grad_scale="row")
    with pytest.raises(ValueError, match="given twice"):
        Recipe.of("hq_bs:grad_scale=row,grad_scale=row")
    torch.manual_seed(0)
    x = torch.randn(24, 32)
    x[::5] *= 0.01  # tokens with small gradients
    grads = {}
    for scale in ("tensor", "row"):
        layer = Int4Linear(32, 16, recipe=Recipe("hq_bs", seed=3, grad_scale=scale))
        torch.manual_seed(1)
        layer.reset_parameters()
        xx = x.clone().requires_grad_()
        y = layer(xx)
        (y * torch.linspace(0.01, 1, 24).unsqueeze(1)).sum().backward()
        grads[scale] = (xx.grad, layer.weight.grad)
        assert all(torch.isfinite(g).all() for g in grads[scale])
    assert not torch.equal(grads["tensor"][0], grads["row"][0])


def test_dense_fallback_recipe():
    # The small-shape rule, on by default: validation, the label (not the spec: the ops never see
    # it), the method label without it, and the CPU, which never falls back
    # (tests/python/test_cuda.py checks the CUDA branch).
    from int4train.config import DENSE_FALLBACK_MACS, RECIPES
    assert DENSE_FALLBACK_MACS == {r: 2.0**38 if r == "hq_lss" else 2.0**37 for r in RECIPES}
    assert Recipe("hq_lss").dense_below_macs == 2.0**38 and Recipe("fp").dense_below_macs == 2.0**37
    auto = Recipe("hq_bs")
    assert auto.dense_fallback == "auto" and auto.dense_below_macs == 2.0**37
    assert auto == Recipe("hq_bs", dense_fallback="auto") == Recipe.of("hq_bs")
    assert auto.spec == auto.label == auto.method_label == "hq_bs"
    never = Recipe("hq_bs", dense_fallback="never")
    assert never.dense_below_macs == 0.0
    assert never.spec == never.method_label == "hq_bs"
    assert never.label == "hq_bs:dense_fallback=never" and Recipe.of(never.label) == never
    num = Recipe("hq_lss", lss_budget=1.5, step_init="mean_abs", dense_fallback=5e9)
    assert num.label == "hq_lss:lss_budget=1.5,step_init=mean_abs,dense_fallback=5000000000.0"
    assert num.method_label == "hq_lss:lss_budget=1.5,step_init=mean_abs"
    assert Recipe.of(num.label) == num and num.dense_below_macs == 5e9
    assert Recipe("fp", dense_fallback=0).dense_below_macs == 0.0
    for bad in ("always", -1, float("nan"), float("inf"), True, None):
        with pytest.raises(ValueError, match="dense_fallback"):
            Recipe("hq_bs", dense_fallback=bad)
    with pytest.raises(ValueError, match="dense_fallback expects never, auto or a number"):
        Recipe.of("hq_bs:dense_fallback=big")
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    outs = []
    for rec in (Recipe("hq_bs", seed=2, dense_fallback="never"),
                Recipe("hq_bs", seed=2, dense_fallback=1e30)):
        torch.manual_seed(1)
        layer = Int4Linear(32, 16, recipe=rec)
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        y.sum().backward()
        outs.append((y, xx.grad, layer.input_step.grad))
        assert f"dense_fallback={rec.dense_fallback}" in repr(layer)
        assert layer.step.item() == 1
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("recipe", LSQ_RECIPES)
def test_activation_checkpointing_matches_plain(recipe):
    # torch.utils.checkpoint (reentrant or not) recomputes the forward inside the backward: the
    # recomputation takes the original forward's random key and does not advance `step`, so the
    # gradients (the step sizes' included) and the counters equal a plain run's, bit for bit.
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(3))
    results = {}
    for mode in ("plain", "reentrant", "non_reentrant"):
        torch.manual_seed(0)
        model = nn.Sequential(Int4Linear(32, 48, recipe=Recipe(recipe, seed=5), layer_id=0), nn.GELU(),
                              Int4Linear(48, 16, recipe=Recipe(recipe, seed=5), layer_id=1))
        calls = []
        model[0].register_forward_pre_hook(lambda *_: calls.append(1))
        for _ in range(3):
            model.zero_grad()
            xx = x.clone().requires_grad_()
            y = model(xx) if mode == "plain" else checkpoint(model, xx, use_reentrant=mode == "reentrant")
            y.pow(2).mean().backward()
        results[mode] = ([p.grad.clone() for p in model.parameters()], xx.grad.clone(),
                         [int(m.step) for m in model if isinstance(m, Int4Linear)])
        assert len(calls) == (3 if mode == "plain" else 6), mode  # recomputed in each backward
    for mode in ("reentrant", "non_reentrant"):
        assert results[mode][2] == results["plain"][2] == [3, 3], mode
        assert torch.equal(results[mode][1], results["plain"][1]), mode
        for a, b in zip(results[mode][0], results["plain"][0]):
            assert torch.equal(a, b), mode
