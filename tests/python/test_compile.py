"""torch.compile of converted models: the ops trace through their fake kernels (no graph breaks once
the layers are initialised) and the compiled forward and backward match eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import int4train
from int4train import Int4Linear

from conftest import RECIPES


class MLP(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def initialised(recipe, seed=0):
    torch.manual_seed(seed)
    model = MLP()
    int4train.convert_(model, recipe=recipe)
    model(torch.randn(8, 32))  # the eager first batch: steps and Hadamard blocks
    return model


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_compile_forward_backward_match_eager(recipe, amp):
    # aot_eager against eager, bit for bit, over two steps (the step counters advance together); with
    # amp under bf16 autocast, where the layer casts its fp32 weight inside its autograd function.
    torch._dynamo.reset()
    eager = initialised(recipe)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(4, 5, 32)
    for _ in range(2):
        xe = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            ye, yc = eager(xe), compiled(xc)
        assert ye.dtype == (torch.bfloat16 if amp else torch.float32) and torch.equal(ye, yc)
        ye.float().square().sum().backward()
        yc.float().square().sum().backward()
        assert torch.equal(xe.grad, xc.grad)
        for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled_model.named_parameters()):
            assert pe.grad.dtype == pe.dtype and torch.equal(pe.grad, pc.grad), n
    assert int(compiled_model.up.step) == int(eager.up.step) == 3


def test_inductor_matches_eager():
    torch._dynamo.reset()
    eager = initialised("hq_lss")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x = torch.randn(6, 32)
    xe = x.clone().requires_grad_(True)
    xc = x.clone().requires_grad_(True)
    ye, yc = eager(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-6)
    ye.sum().backward()
    yc.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_model.up.input_step.grad, eager.up.input_step.grad,
                               rtol=1e-5, atol=1e-7)


def test_compile_initialises_on_first_call():
    # An uninitialised model may be compiled directly: the first-batch initialisation runs eagerly
    # (one graph break), after which the compiled model is the eager one.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    int4train.convert_(model, recipe="hq")
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 32)
    assert torch.equal(compiled(x), ref(x))
    assert model.up._initialized and torch.equal(model.up.input_step, ref.up.input_step)
    assert torch.equal(compiled(x * 2), ref(x * 2))


def test_compile_dynamic_batch():
    torch._dynamo.reset()
    eager = initialised("hq_lss")
    compiled_model = copy.deepcopy(eager).eval()
    eager.eval()
    compiled = torch.compile(compiled_model, backend="aot_eager", dynamic=True)
    for n in (3, 7, 12):
        x = torch.randn(n, 32)
        assert torch.equal(compiled(x), eager(x))


def test_compile_hf_bert():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch._dynamo.reset()
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    int4train.convert_(model, recipe="hq_lss")
    ids = torch.randint(0, 100, (2, 12))
    model(input_ids=ids)  # initialise eagerly
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    ye = model(input_ids=ids).last_hidden_state
    yc = compiled(input_ids=ids).last_hidden_state
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    ye.sum().backward()
    yc.sum().backward()
    ge = model.encoder.layer[0].attention.self.query.weight.grad
    gc = compiled_model.encoder.layer[0].attention.self.query.weight.grad
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


def test_compile_converted_transformer_encoder_layer():
    # nn.TransformerEncoderLayer with its attention as Int4MultiheadAttention and the fast-path
    # guard's hook: one graph (fullgraph), forward and backward equal to eager bit for bit.
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    int4train.convert_(eager, recipe="hq_bs")
    eager(torch.randn(2, 5, 32))  # initialise
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 32)
    ye, yc = eager(x), compiled(x)
    assert torch.equal(ye, yc)
    ye.square().sum().backward()
    yc.square().sum().backward()
    for (n, a), b in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad), n
