"""Hugging Face transformer models built from config (a BERT-style encoder, GPT-2 with its Conv1D
layers, ViT) converted with int4train: forward and backward against FP by signal-to-noise ratio,
checkpoint round trips, and unconvert_ back to the original model class."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import int4train
from int4train import Int4Linear

from conftest import RECIPES, snr_db

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def bert():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 num_labels=10, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


def inputs_for(name, batch=8, seq=16):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2 * batch, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, 120, (batch, seq), generator=g)}


def output_of(name, out):
    return out.logits if name in ("gpt2", "vit") else out.last_hidden_state


MODELS = {"bert": bert, "gpt2": gpt2, "vit": vit}
# The converted layers of each model: every nn.Linear, and GPT-2's Conv1D layers.
N_LAYERS = {"bert": 2 * 6 + 1, "gpt2": 2 * 4 + 1, "vit": 2 * 6 + 1}


def forward_backward(name, model, inputs):
    """The model's output and its parameter gradients (by name) for a fixed random loss."""
    out = output_of(name, model(**inputs))
    g = torch.Generator().manual_seed(2)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()
             if p.grad is not None and not n.endswith("_step")}
    return out.detach(), grads


def conv1d_weights(model):
    """Names of the GPT-2 Conv1D weights: a converted one holds its weight transposed (out, in)."""
    return {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def flat_grads(grads, order, transposed=frozenset()):
    """The gradients concatenated in the order of `order`, the `transposed` ones transposed back."""
    return torch.cat([(grads[n].t() if n in transposed else grads[n]).flatten() for n in order])


# Minimum SNR (dB) against FP of the model's output (FWD) and of all its parameter gradients
# concatenated (BWD). One 4-bit layer is ~12 dB (tests/python/test_module.py); BERT's
# last_hidden_state is dominated by the residual stream, so it stays far above that, while GPT-2's
# and ViT's logits come out of a final quantized layer fed by a noisy trunk. Gradients: bit split
# (8-bit) > plain 4-bit > LUQ > bit split sampled down to half its rows (a single draw; its
# unbiasedness is tested in test_module.py). The thresholds sit 2-4 dB under the values measured
# over five seeds; broken products give 0 dB or less.
FWD_MIN = {
    "bert": {"fp": 100, "int8": 50, "lsq_luq": 30, "hq": 30, "hq_bs": 30, "hq_lss": 30},
    "gpt2": {"fp": 100, "int8": 28, "lsq_luq": 7, "hq": 7, "hq_bs": 7, "hq_lss": 7},
    "vit": {"fp": 100, "int8": 25, "lsq_luq": 3, "hq": 3, "hq_bs": 3, "hq_lss": 3},
}
BWD_MIN = {
    "bert": {"fp": 100, "int8": 50, "lsq_luq": 25, "hq": 25, "hq_bs": 30, "hq_lss": 22},
    "gpt2": {"fp": 100, "int8": 25, "lsq_luq": 4, "hq": 4, "hq_bs": 8, "hq_lss": 1},
    "vit": {"fp": 100, "int8": 20, "lsq_luq": 2, "hq": 2, "hq_bs": 6, "hq_lss": 1},
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_converted_model_tracks_fp(name, recipe):
    torch.manual_seed(0)
    ref = MODELS[name]()
    model = copy.deepcopy(ref)
    int4train.convert_(model, recipe=recipe)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == N_LAYERS[name]
    inputs = inputs_for(name)
    y_ref, grads_ref = forward_backward(name, ref, inputs)
    y, grads = forward_backward(name, model, inputs)
    assert set(grads) == set(grads_ref)
    g_ref = flat_grads(grads_ref, grads_ref)
    g = flat_grads(grads, grads_ref, conv1d_weights(ref))
    assert snr_db(y_ref, y) > FWD_MIN[name][recipe], snr_db(y_ref, y)
    assert snr_db(g_ref, g) > BWD_MIN[name][recipe], snr_db(g_ref, g)
    if recipe not in ("fp", "int8"):
        # Every layer on the loss's path (BERT's pooler is not) trains its step sizes.
        trained = [m for m in layers if m.weight.grad is not None]
        assert len(trained) >= len(layers) - 1
        assert all(m.input_step.grad is not None and m.weight_step.grad is not None
                   for m in trained)


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_round_trip(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    int4train.convert_(model, recipe="hq_lss")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = inputs_for(name)
    for _ in range(2):
        opt.zero_grad()
        output_of(name, model(**inputs)).square().mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # another initialisation, overwritten by the checkpoint
    fresh = MODELS[name]()
    int4train.convert_(fresh, recipe="hq_lss")
    fresh.load_state_dict(torch.load(buf), strict=True)
    model.eval()
    fresh.eval()
    other = inputs_for(name, batch=3, seq=9)  # new statistics: a re-initialisation would show
    if name == "vit":
        other = {"pixel_values": other["pixel_values"] * 3}
    with torch.no_grad():
        assert torch.equal(output_of(name, model(**other)), output_of(name, fresh(**other)))
    blocks = [int(m.hadamard_block) for m in fresh.modules() if isinstance(m, Int4Linear)]
    assert blocks == [int(m.hadamard_block) for m in model.modules() if isinstance(m, Int4Linear)]


@pytest.mark.parametrize("name", list(MODELS))
def test_unconvert_loads_into_original_class(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    int4train.convert_(model, recipe="hq")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    inputs = inputs_for(name)
    output_of(name, model(**inputs)).square().mean().backward()
    opt.step()
    int4train.unconvert_(model)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    original = MODELS[name]()
    original.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    original.eval()
    with torch.no_grad():
        torch.testing.assert_close(output_of(name, original(**inputs)), output_of(name, model(**inputs)))
    if name == "gpt2":
        assert original.lm_head.weight is original.transformer.wte.weight


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_matches_plain(reentrant):
    # Hugging Face's gradient checkpointing recomputes each block's forward inside the backward;
    # Int4Linear gives the recomputation the key of the forward it repeats and does not count it, so
    # two training steps with checkpointing give the plain run's gradients and step counters bit for
    # bit.
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = int4train.convert_(gpt2(), "hq_lss", seed=4)
        model.train()
        if ckpt:
            # activation_checkpointing_enable in newer transformers, gradient_checkpointing_enable
            # before (the same switch).
            kwargs = {"use_reentrant": reentrant}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        calls = []
        for m in model.modules():
            if isinstance(m, Int4Linear):
                m.register_forward_pre_hook(lambda *_: calls.append(1))
        for _ in range(2):
            model.zero_grad()
            out = model(**inputs_for("gpt2"))
            out.logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        steps = [int(m.step) for m in model.modules() if isinstance(m, Int4Linear)]
        results.append((grads, steps, len(calls)))
    (plain, plain_steps, plain_calls), (ckpt, ckpt_steps, ckpt_calls) = results
    assert ckpt_calls > plain_calls  # the blocks' forwards did run again
    assert ckpt_steps == plain_steps == [2] * len(plain_steps)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name
