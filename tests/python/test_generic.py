"""The device-generic ATen implementation (csrc/generic.cpp, what CUDA tensors run until dedicated
kernels exist), called on CPU tensors through the _generic_* debug ops and compared with the core:
bit for bit wherever the core's result does not depend on a summation order (codes, aux bits, Philox
draws, sampled rows, integer products and their scaled epilogues), to fp32 rounding elsewhere (fp32
products of the fp and lsq_luq recipes; the fp64 sums of the step and bias gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from conftest import LSQ_RECIPES, RECIPES, step_tensor

ops = torch.ops.int4train


def layer_args(recipe, n, d, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    x[:, 1] *= 20  # an outlier channel: clipping, and a transform that matters
    w = (torch.randn(c, d, generator=g) / math.sqrt(d)).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    block = 1
    sx = sw = None
    if recipe in LSQ_RECIPES:
        if recipe != "lsq_luq":
            block = int(ops.select_hadamard_block(x, w)[0])
        sx = ops.lsq_init_step(ops.hadamard_transform(x, block))
        sw = ops.lsq_init_step(ops.hadamard_transform(w, block))
    return [x, w, b, sx, sw, recipe, block, 2**40 + 17, step_tensor(2**32 + 5), 3]


SHAPES = [(1, 8, 1), (7, 24, 5), (33, 64, 17)]
EXACT_FORWARD = ("int8", "lsq_luq", "hq", "hq_bs", "hq_lss")
# Gradients formed by an exact integer product and one scaling: bit for bit.
EXACT_BACKWARD = ("int8", "hq", "hq_bs", "hq_lss")


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_generic_linear_matches_core(recipe, dtype):
    for n, d, c in SHAPES:
        args = layer_args(recipe, n, d, c, dtype)
        core = ops.linear_forward(*args)
        gen = ops._generic_linear_forward(*args)
        for name, a, b in zip(("y", "codes", "aux", "scale", "saved_step"), core, gen):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if name == "y" and recipe not in EXACT_FORWARD:
                torch.testing.assert_close(b, a)
            else:
                assert torch.equal(a, b), (name, recipe, n, d, c)
        y, codes, aux, scale, saved = core
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
        bargs = (gy, args[0] if recipe == "fp" else None, codes, aux, scale, args[1], args[3],
                 args[4], recipe, args[6], args[7], saved, args[9], [True] * 5)
        core_g = ops.linear_backward(*bargs)
        gen_g = ops._generic_linear_backward(*bargs)
        names = ("grad_x", "grad_w", "grad_bias", "grad_input_step", "grad_weight_step", "stats")
        for name, a, b in zip(names, core_g, gen_g):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            exact = name == "stats" or (name in ("grad_x", "grad_w") and recipe in EXACT_BACKWARD)
            if exact:
                assert torch.equal(a, b), (name, recipe, n, d, c)
            else:
                tol = 1e-2 if dtype == torch.bfloat16 and name != "grad_input_step" else 1e-5
                torch.testing.assert_close(b, a, rtol=tol, atol=tol * max(1.0, a.abs().max().item()))
        if recipe == "hq_lss" and n > 1:
            assert 0 < int(gen_g[5][0]) < 2 * n + 1


@pytest.mark.parametrize("recipe", ["hq_bs", "hq_lss", "hq_lss:lss_budget=1.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_generic_row_grad_scale_matches_core(recipe, dtype):
    # grad_scale=row (on CUDA devices without the kernels, compute capability below 8.0, the PyTorch
    # ops run it on the generic path): the same bits as the core,
    # on gradients whose token rows span every row exponent 0..4 (and all-zero rows), with
    # non-finite gradients too.
    spec = recipe + ("," if ":" in recipe else ":") + "grad_scale=row"
    name = recipe.split(":")[0]
    for n, d, c in SHAPES + [(40, 32, 24)]:
        args = layer_args(name, n, d, c, dtype)
        y, codes, aux, scale, saved = ops.linear_forward(*args)
        g = torch.Generator().manual_seed(n + c)
        gy = torch.randn(y.shape, generator=g) * (2.0 ** -torch.arange(n).remainder(7)).unsqueeze(1)
        if n > 3:
            gy[3] = 0
        for bad in (None, float("inf"), float("nan")):
            gb = gy.clone()
            if bad is not None:
                gb[0, 0] = bad
            bargs = (gb.to(dtype), None, codes, aux, scale, args[1], args[3], args[4], spec,
                     args[6], args[7], saved, args[9], [True] * 5)
            core_g = ops.linear_backward(*bargs)
            gen_g = ops._generic_linear_backward(*bargs)
            for k, (a, b) in enumerate(zip(core_g, gen_g)):
                assert a.dtype == b.dtype and a.shape == b.shape
                if k in (0, 1, 5):  # grad_x, grad_w, stats: exact
                    assert torch.equal(a.isnan(), b.isnan()), (k, spec, n, bad)
                    assert torch.equal(a.nan_to_num(), b.nan_to_num()), (k, spec, n, bad)
            if bad is None:
                tensor_g = ops.linear_backward(*bargs[:8], recipe, *bargs[9:])
                assert not torch.equal(core_g[0], tensor_g[0]) or n == 1


def test_generic_masks_and_empty():
    args = layer_args("hq_lss", 9, 16, 4, torch.float32)
    y, codes, aux, scale, saved = ops.linear_forward(*args)
    gy = torch.randn_like(y)
    for mask in ([True, False, False, True, False], [False, True, True, False, True]):
        bargs = (gy, None, codes, aux, scale, args[1], args[3], args[4], "hq_lss", args[6],
                 args[7], saved, args[9], mask)
        for a, b in zip(ops.linear_backward(*bargs), ops._generic_linear_backward(*bargs)):
            assert a.shape == b.shape and torch.equal(a, b)
    empty = layer_args("hq", 0, 16, 4, torch.float32)
    empty[3], empty[4], empty[6] = torch.tensor(1.0), torch.tensor(1.0), 4
    for a, b in zip(ops.linear_forward(*empty), ops._generic_linear_forward(*empty)):
        assert a.shape == b.shape and torch.equal(a, b)


def test_generic_components_match_core():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, generator=g)
    for block in (1, 2, 8):
        for dt in (torch.float32, torch.bfloat16):
            assert torch.equal(ops._generic_hadamard_transform(x.to(dt), block),
                               ops.hadamard_transform(x.to(dt), block))
    assert torch.equal(ops._generic_lsq_init_step(x), ops.lsq_init_step(x))
    assert float(ops._generic_lsq_init_step(torch.zeros(3, 4))) == 1.0
    step = ops.lsq_init_step(x) * 0.7
    x[0, 0] = float("nan")
    x[0, 1] = float("inf")
    for packed in (False, True):
        for a, b in zip(ops.lsq_quantize(x, step, packed), ops._generic_lsq_quantize(x, step, packed)):
            assert torch.equal(a, b)
        for seed, stream in ((0, 0), (2**62 + 3, -(2**40)), (7, 2**33 + 9)):
            gx = torch.randn(5, 13, generator=g)
            for a, b in zip(ops.quantize_bitsplit(gx, seed, stream, packed),
                            ops._generic_quantize_bitsplit(gx, seed, stream, packed)):
                assert torch.equal(a, b)
    codes = torch.randint(-8, 8, (4, 9), dtype=torch.int8, generator=g)
    assert torch.equal(ops._generic_pack_int4(codes), ops.pack_int4(codes))
    assert torch.equal(ops._generic_unpack_int4(ops.pack_int4(codes), 9), codes)
    b8 = torch.randint(-128, 128, (3, 9), dtype=torch.int8, generator=g)
    assert torch.equal(ops._generic_gemm_s32(codes, b8), ops.gemm_s32(codes, b8))
    pc = ops.pack_int4(codes)
    assert torch.equal(ops._generic_gemm_s32(pc, pc[:2]), ops.gemm_s32(pc, pc[:2]))
    with pytest.raises(ValueError):
        ops._generic_pack_int4(torch.tensor([[9]], dtype=torch.int8))


def test_generic_errors_match_core():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    one, s = torch.tensor(1.0), step_tensor()
    for fn in (ops.linear_forward, ops._generic_linear_forward):
        with pytest.raises(ValueError, match="hadamard_block"):
            fn(x, w, None, one, one, "hq", 3, 0, s, 0)
        with pytest.raises(ValueError, match="recipe"):
            fn(x, w, None, one, one, "hq4", 1, 0, s, 0)
        with pytest.raises(TypeError):
            fn(x.half(), w.half(), None, None, None, "fp", 1, 0, s, 0)
        with pytest.raises(ValueError):
            fn(x, w, None, -one, one, "hq", 1, 0, s, 0)


def test_opcheck_generic_ops():
    args = layer_args("hq_lss", 6, 16, 5, torch.float32)
    opcheck(ops._generic_linear_forward.default, tuple(args))
    y, codes, aux, scale, saved = ops.linear_forward(*args)
    bargs = (torch.randn_like(y), None, codes, aux, scale, args[1], args[3], args[4], "hq_lss",
             args[6], args[7], saved, args[9], [True] * 5)
    opcheck(ops._generic_linear_backward.default, bargs)
    x = torch.randn(4, 8)
    opcheck(ops._generic_hadamard_transform.default, (x, 4))
    opcheck(ops._generic_lsq_init_step.default, (x,))
    opcheck(ops._generic_lsq_quantize.default, (x, torch.tensor(0.5), True))
    opcheck(ops._generic_quantize_bitsplit.default, (x, 1, 2, False))
    codes8 = torch.randint(-8, 8, (3, 5), dtype=torch.int8)
    opcheck(ops._generic_pack_int4.default, (codes8,))
    opcheck(ops._generic_unpack_int4.default, (ops.pack_int4(codes8), 5))
    opcheck(ops._generic_gemm_s32.default, (codes8, codes8))


@pytest.mark.parametrize("budget", [0.5, 1.5, 2.0])
def test_lss_budget_generic_matches_core_and_two_is_bit_split(budget):
    # The recipe spec "hq_lss:lss_budget=B" through the core and the generic path: the same sampled
    # rows and gradients bit for bit; B = 2 keeps every non-zero row, which is hq_bs's gradients.
    n, d, c = 48, 64, 24
    spec = f"hq_lss:lss_budget={budget!r}"
    args = layer_args("hq_lss", n, d, c, torch.float32)
    args[5] = spec
    y, codes, aux, scale, saved = ops.linear_forward(*args)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))

    def backward(op, recipe):
        return op(gy, None, codes, aux, scale, args[1], args[3], args[4], recipe, args[6], args[7],
                  saved, args[9], [True] * 5)

    core = backward(ops.linear_backward, spec)
    gen = backward(ops._generic_linear_backward, spec)
    for i in (0, 1, 5):
        assert torch.equal(core[i], gen[i]), i
    kept_in = int(core[5][0])
    assert 0 < kept_in <= 2 * n
    if budget == 2.0:
        bs = backward(ops.linear_backward, "hq_bs")
        for i in range(5):
            assert torch.equal(core[i], bs[i]), i
    else:
        # Fewer rows than a larger budget keeps, on average; the exact count is random.
        assert kept_in < 2 * n


def test_lss_budget_spec_errors():
    args = layer_args("hq_lss", 8, 16, 4, torch.float32)
    for bad, words in [("hq_lss:lss_budget=3", "lss_budget"), ("hq_bs:lss_budget=1.5", "hq_lss only"),
                       ("hq_lss:budget=1", "unknown option"), ("hq_lss:lss_budget=x", "expects a number"),
                       ("hq_lss:gemm=fp16", "gemm expects auto, fp8 or int8"),
                       ("hq_lss:gemm=int8,gemm=int8", "given twice")]:
        args[5] = bad
        with pytest.raises(ValueError, match=words):
            ops.linear_forward(*args)
        with pytest.raises(ValueError, match=words):
            ops._generic_linear_forward(*args)
