"""The torch.ops.int4train operators: opcheck (schema, fake kernels, autograd registration, AOT
dispatch) on every op, gradcheck where the math is deterministic, and the binding's conversions
checked against plain PyTorch references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from conftest import LSQ_RECIPES, RECIPES, step_tensor

ops = torch.ops.int4train
torch.manual_seed(0)


def sylvester(g: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < g:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(g)


def block_diag_hadamard(d: int, g: int) -> torch.Tensor:
    return torch.block_diag(*[sylvester(g)] * (d // g))


def lsq_steps(x, w, block):
    sx = ops.lsq_init_step(ops.hadamard_transform(x.detach(), block))
    sw = ops.lsq_init_step(ops.hadamard_transform(w.detach(), block))
    return sx, sw


def linear_args(recipe, n, d, c, dtype=torch.float32, bias=True, requires_grad=False, lead=()):
    x = torch.randn(*lead, n, d, dtype=dtype)
    w = torch.randn(c, d, dtype=dtype) / math.sqrt(d)
    b = torch.randn(c, dtype=dtype) if bias else None
    block = 8 if recipe in ("hq", "hq_bs", "hq_lss") and d % 8 == 0 else 1
    sx = sw = None
    if recipe in LSQ_RECIPES:
        sx, sw = lsq_steps(x.reshape(-1, d), w, block)
    if requires_grad:
        for t in (x, w, b, sx, sw):
            if t is not None:
                t.requires_grad_(True)
    return [x, w, b, sx, sw, recipe, block, 1234, step_tensor(3), 7]


# ------------------------------------------------------------------------------------ opcheck

SHAPES = [(5, 32, 12), (1, 8, 3), (17, 64, 33)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_opcheck_linear_forward_backward(recipe):
    for n, d, c in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            args = linear_args(recipe, n, d, c, dtype)
            opcheck(ops.linear_forward.default, tuple(args))
            y, codes, aux, scale, saved_step = ops.linear_forward(*args)
            gy = torch.randn_like(y)
            x, w = args[0], args[1]
            for mask in ([True] * 5, [True, False, True, False, True]):
                bargs = (gy, x if recipe == "fp" else None, codes, aux, scale, w, args[3], args[4],
                         recipe, args[6], 99, step_tensor(5), 2, mask)
                opcheck(ops.linear_backward.default, bargs)


@pytest.mark.parametrize("recipe", RECIPES)
def test_opcheck_linear(recipe):
    for lead, bias in (((), True), ((2,), False)):
        args = linear_args(recipe, 6, 16, 10, requires_grad=True, lead=lead, bias=bias)
        opcheck(ops.linear.default, tuple(args))
    args = linear_args(recipe, 6, 16, 10, requires_grad=False, lead=(3,))
    opcheck(ops.linear.default, tuple(args))


def test_opcheck_components():
    x = torch.randn(7, 32)
    w = torch.randn(9, 32)
    for block in (1, 2, 32):
        opcheck(ops.hadamard_transform.default, (x, block))
        opcheck(ops.hadamard_transform.default, (torch.randn(2, 3, 32, requires_grad=True), block))
    opcheck(ops.hadamard_transform.default, (x.bfloat16(), 4))
    opcheck(ops.select_hadamard_block.default, (x, w, 256))
    opcheck(ops.select_hadamard_block.default, (x, w, 4))
    opcheck(ops.lsq_init_step.default, (x,))
    step = ops.lsq_init_step(x)
    for packed in (False, True):
        opcheck(ops.lsq_quantize.default, (x, step, packed))
        opcheck(ops.lsq_quantize.default, (torch.randn(5, 7), step, packed))
        opcheck(ops.quantize_bitsplit.default, (x, 1, 2, packed))
        opcheck(ops.quantize_bitsplit.default, (torch.randn(3, 5).bfloat16(), 1, 2, packed))
    codes = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    opcheck(ops.pack_int4.default, (codes,))
    opcheck(ops.unpack_int4.default, (ops.pack_int4(codes), 7))
    opcheck(ops.gemm_s32.default, (codes, torch.randint(-128, 128, (4, 7), dtype=torch.int8)))
    opcheck(ops.gemm_s32.default, (ops.pack_int4(codes), ops.pack_int4(codes[:3])))
    opcheck(ops.lss_probabilities.default, (torch.rand(11), 5.0))


# ------------------------------------------------------------------------------------ gradcheck


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_fp_linear():
    # The fp recipe is the plain product in fp32: check x, weight and bias gradients numerically
    # (in fp32, with a step large enough that rounding stays far below the tolerance).
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True)

    def f(x, w, b):
        return ops.linear(x, w, b, None, None, "fp", 1, 0, step_tensor(), 0)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("recipe", RECIPES)
def test_gradcheck_bias_every_recipe(recipe):
    # y depends on the bias exactly linearly in every recipe (the epilogue adds it in fp32).
    x, w, b, sx, sw, *rest = linear_args(recipe, 4, 16, 6)
    b.requires_grad_(True)

    def f(b):
        return ops.linear(x, w, b, sx, sw, *rest)

    assert torch.autograd.gradcheck(f, (b,), eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("block", [1, 4, 16])
def test_gradcheck_hadamard(block):
    x = torch.randn(3, 16, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.hadamard_transform(x, block), (x,), eps=1e-2,
                                    atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------ conversions


@pytest.mark.parametrize("block", [1, 2, 8, 64])
def test_hadamard_matches_matrix(block):
    x = torch.randn(4, 3, 64)
    ref = (x.double().reshape(-1, 64) @ block_diag_hadamard(64, block)).reshape(4, 3, 64)
    torch.testing.assert_close(ops.hadamard_transform(x, block).double(), ref, rtol=1e-5, atol=1e-5)
    # Non-contiguous input: same values as its contiguous copy, bit for bit.
    xt = torch.randn(64, 5).t()
    assert torch.equal(ops.hadamard_transform(xt, block), ops.hadamard_transform(xt.contiguous(), block))
    # Its own inverse.
    torch.testing.assert_close(ops.hadamard_transform(ops.hadamard_transform(x, block), block), x,
                               rtol=1e-5, atol=1e-5)


def test_hadamard_bf16_and_empty():
    x = torch.randn(5, 32)
    y = ops.hadamard_transform(x.bfloat16(), 32)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ops.hadamard_transform(x.bfloat16().float(), 32),
                               rtol=1e-2, atol=1e-2)
    assert ops.hadamard_transform(torch.empty(0, 32), 8).shape == (0, 32)
    with pytest.raises(ValueError):
        ops.hadamard_transform(torch.empty(0, 12), 8)


def test_pack_unpack_layout():
    codes = torch.randint(-8, 8, (6, 9), dtype=torch.int8)
    packed = ops.pack_int4(codes)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    nib = (codes.to(torch.int32) & 0xF)
    nib = torch.cat([nib, torch.zeros(6, 1, dtype=torch.int32)], 1)  # odd K: the pad nibble is 0
    expect = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)  # element 2j low, 2j+1 high
    assert torch.equal(packed, expect)
    assert torch.equal(ops.unpack_int4(packed, 9), codes)
    with pytest.raises(ValueError):
        ops.pack_int4(torch.tensor([[8]], dtype=torch.int8))  # out of the INT4 range
    with pytest.raises(TypeError):
        ops.pack_int4(torch.zeros(2, 2))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 5, 7), (17, 9, 130)])
def test_gemm_s32_exact(m, n, k):
    a = torch.randint(-8, 8, (m, k), dtype=torch.int8)
    b = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    ref = (a.long() @ b.long().t()).int()
    assert torch.equal(ops.gemm_s32(a, b), ref)
    assert torch.equal(ops.gemm_s32(ops.pack_int4(a), ops.pack_int4(b)), ref)
    a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    assert torch.equal(ops.gemm_s32(a8, b), (a8.long() @ b.long().t()).int())
    with pytest.raises(ValueError):
        ops.gemm_s32(a, torch.zeros(n, k + 1, dtype=torch.int8))
    with pytest.raises(TypeError):
        ops.gemm_s32(a, ops.pack_int4(b))


def test_lsq_quantize_and_init_step():
    x = torch.randn(13, 24) * 3
    x[0, 0] = 1e4  # clipped
    step = ops.lsq_init_step(x)
    assert step.dtype == torch.float32 and step.dim() == 0
    ref_step = 2 * x.double().abs().mean() / math.sqrt(7)
    torch.testing.assert_close(step.double(), ref_step, rtol=1e-6, atol=0)
    codes, nonfinite = ops.lsq_quantize(x, step)
    inv = torch.tensor(1.0, dtype=torch.float32) / step  # one fp32 reciprocal (numeric.h)
    ref = torch.clamp(torch.round(x * inv), -8, 7).to(torch.int8)  # torch.round: half to even
    assert torch.equal(codes, ref) and int(nonfinite) == 0
    packed, _ = ops.lsq_quantize(x, step, True)
    assert torch.equal(ops.unpack_int4(packed, 24), ref)
    x[1, 1] = float("nan")
    assert int(ops.lsq_quantize(x, step)[1]) == 1
    with pytest.raises(ValueError):
        ops.lsq_quantize(x, torch.tensor(-1.0))
    with pytest.raises(TypeError):
        ops.lsq_quantize(x, torch.tensor(1.0, dtype=torch.float64))


def test_bitsplit_reconstruction_and_unbiasedness():
    g = torch.randn(8, 10)
    hi, lo, scale = ops.quantize_bitsplit(g, 5, 77)
    assert hi.dtype == torch.int8 and hi.abs().max() <= 7 and lo.min() >= -8 and lo.max() <= 7
    q = 16 * hi.int() + lo.int()
    assert q.abs().max() <= 119
    torch.testing.assert_close(scale, g.abs().max() / 119, rtol=1e-6, atol=0)
    # One stochastic rounding step from the exact value, never more.
    assert ((g - scale * q).abs() <= scale * (1 + 1e-5)).all()
    # Same key, same bits; another stream, other bits.
    assert torch.equal(ops.quantize_bitsplit(g, 5, 77)[0], hi)
    assert not torch.equal(ops.quantize_bitsplit(g, 5, 78)[1], lo)
    # Unbiased: the mean over independent streams converges to g like 1/sqrt(draws).
    errs = []
    for draws in (64, 1024):
        acc = torch.zeros_like(g, dtype=torch.float64)
        for s in range(draws):
            h, l, sc = ops.quantize_bitsplit(g, 5, 1000 + s)
            acc += sc.double() * (16 * h.double() + l.double())
        errs.append(((acc / draws - g.double()).abs().max() / scale).item())
    # A uniform rounding error has std <= 1/2 per draw: the mean of 1024 draws stays well within it.
    assert errs[1] < 4 * 0.5 / math.sqrt(1024)
    assert errs[1] < errs[0]


def test_lss_probabilities():
    scores = torch.tensor([0.0, 1.0, 2.0, 100.0, 3.0, 0.5])
    p = ops.lss_probabilities(scores, 3.0)
    assert p.dtype == torch.float32 and p.shape == scores.shape
    torch.testing.assert_close(p.sum(), torch.tensor(3.0), rtol=1e-6, atol=1e-6)
    assert p[0] == 0 and p[3] == 1 and (p <= 1).all() and (p >= 0).all()
    # Unsaturated rows share one kappa: p proportional to the score.
    torch.testing.assert_close(p[[1, 2, 4, 5]] / scores[[1, 2, 4, 5]],
                               torch.full((4,), (p[1] / scores[1]).item()), rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        ops.lss_probabilities(torch.tensor([1.0, -1.0]), 1.0)


def test_select_hadamard_block():
    torch.manual_seed(1)
    x = torch.randn(64, 64)
    x[:, 3] *= 50  # an outlier channel: a transform spreads it, so some block > 1 must win
    w = torch.randn(32, 64)
    block, errors = ops.select_hadamard_block(x, w)
    assert block.dtype == torch.int64 and errors.shape == (7,)  # 1, 2, ..., 64 divide 64
    best = int(torch.argmin(errors))
    assert int(block) == 2**best and int(block) > 1
    block4, errors4 = ops.select_hadamard_block(x, w, 4)
    assert errors4.shape == (3,) and int(block4) <= 4
    _, errors_odd = ops.select_hadamard_block(torch.randn(4, 24), torch.randn(3, 24))
    assert errors_odd.shape == (4,)  # 1, 2, 4, 8 divide 24


# ------------------------------------------------------------------------------------ the layer ops


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_forward_saved_state(recipe):
    n, d, c = 9, 24, 5
    args = linear_args(recipe, n, d, c)
    y, codes, aux, scale, saved_step = ops.linear_forward(*args)
    assert y.shape == (n, c) and y.dtype == torch.float32
    assert saved_step.dtype == torch.int64 and int(saved_step) == int(args[8])
    if recipe == "fp":
        assert codes.shape == (0, 0) and aux.numel() == 0
    elif recipe == "int8":
        assert codes.dtype == torch.int8 and codes.shape == (n, d) and float(scale) > 0
    else:
        assert codes.dtype == torch.uint8 and codes.shape == (n, (d + 1) // 2)
        assert aux.shape == ((n * d + 7) // 8,)
        # The saved codes are the LSQ codes of the transformed input.
        x, block, sx = args[0], args[6], args[3]
        ref, _ = ops.lsq_quantize(ops.hadamard_transform(x, block), sx, True)
        assert torch.equal(codes, ref)
    ref_y = args[0] @ args[1].t() + args[2]
    assert torch.nn.functional.cosine_similarity(y.flatten(), ref_y.flatten(), 0) > 0.9


def test_linear_fp_matches_torch():
    x, w, b = torch.randn(7, 33), torch.randn(6, 33), torch.randn(6)
    y = ops.linear(x, w, b, None, None, "fp", 1, 0, step_tensor(), 0)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_backward_stats_and_determinism():
    args = linear_args("hq_lss", 32, 16, 8)
    y, codes, aux, scale, saved_step = ops.linear_forward(*args)
    gy = torch.randn_like(y)
    bargs = (gy, None, codes, aux, scale, args[1], args[3], args[4], "hq_lss", args[6], 1, step_tensor(4),
             3, [True] * 5)
    out1 = ops.linear_backward(*bargs)
    out2 = ops.linear_backward(*bargs)
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
    stats = out1[5]
    assert stats.dtype == torch.int64 and 0 < stats[0] <= 64 and 0 < stats[1] <= 64
    # Another step: other random bits.
    bargs2 = bargs[:11] + (step_tensor(5),) + bargs[12:]
    assert not torch.equal(ops.linear_backward(*bargs2)[0], out1[0])


@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_empty_batch(recipe):
    args = linear_args(recipe, 0, 16, 4, requires_grad=True)
    y = ops.linear(*args)
    assert y.shape == (0, 4)
    y.sum().backward()
    x, w, b = args[:3]
    assert x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    if recipe in LSQ_RECIPES:
        assert float(args[3].grad) == 0 and float(args[4].grad) == 0


def test_linear_errors():
    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    s = step_tensor()
    with pytest.raises(ValueError, match=r"\[3, 7\]"):
        ops.linear(torch.randn(3, 7), w, b, None, None, "fp", 1, 0, s, 0)
    with pytest.raises(ValueError):
        ops.linear(x, w, torch.randn(5), None, None, "fp", 1, 0, s, 0)
    with pytest.raises(ValueError, match="recipe"):
        ops.linear(x, w, b, None, None, "int3", 1, 0, s, 0)
    with pytest.raises(TypeError):
        ops.linear(x.double(), w.double(), b.double(), None, None, "fp", 1, 0, s, 0)
    with pytest.raises(TypeError):
        ops.linear(x.half(), w.half(), b.half(), None, None, "fp", 1, 0, s, 0)
    with pytest.raises(TypeError):
        ops.linear(x, w.bfloat16(), b, None, None, "fp", 1, 0, s, 0)
    with pytest.raises(ValueError, match="input_step"):
        ops.linear(x, w, b, None, None, "hq", 1, 0, s, 0)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="hadamard_block"):
        ops.linear(x, w, b, one, one, "hq", 3, 0, s, 0)
    with pytest.raises(ValueError, match="hadamard_block"):
        ops.linear(x, w, b, one, one, "hq", 16, 0, s, 0)
    with pytest.raises(ValueError, match="hadamard_block"):
        ops.linear(x, w, b, one, one, "lsq_luq", 2, 0, s, 0)
    with pytest.raises(ValueError, match="2-D"):
        ops.linear_forward(torch.randn(2, 3, 8), w, b, None, None, "fp", 1, 0, s, 0)


STEP_PARAMS = (2.0, -3.0, -0.37, 1e-40, -1e-40, 0.0, -0.0, math.inf, -math.inf, math.nan)


def step_reference(p, g):
    """The steps' autograd composition the layer once ran: clamp_min(abs(p)) and its gradient."""
    q = p.detach().clone().requires_grad_(True)
    s = q.to(torch.float32).reshape(()).abs().clamp_min(torch.finfo(torch.float32).tiny)
    s.backward(g)
    return s.detach(), q.grad


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lsq_step_ops_match_autograd_composition(dtype):
    # _lsq_steps / _lsq_step_grads (what Int4Linear's autograd calls) equal clamp_min(abs(p)) and
    # its autograd gradient bit for bit, signed zeros and NaN included.
    for a in STEP_PARAMS:
        for b in STEP_PARAMS[:3]:
            pa, pb = torch.tensor(a, dtype=dtype), torch.tensor([b], dtype=dtype)  # 0-dim and (1,)
            ga, gb = torch.tensor(1.5), torch.tensor(-0.3)
            sa, sb = ops._lsq_steps(pa, pb)
            ra, rga = step_reference(pa, ga)
            rb, rgb = step_reference(pb, gb)
            assert same_bits(sa, ra) and same_bits(sb, rb), (a, b)
            grad_a, grad_b = ops._lsq_step_grads(pa, pb, ga, gb)
            assert same_bits(grad_a, rga) and same_bits(grad_b, rgb), (a, b, grad_a, rga)
            none_a, only_b = ops._lsq_step_grads(pa, pb, torch.empty(0), gb)
            assert none_a.numel() == 0 and same_bits(only_b, rgb)


def test_lsq_step_ops_reject_bad_parameters():
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="input_step"):
        ops._lsq_steps(torch.ones(2), one)
    with pytest.raises(TypeError, match="weight_step"):
        ops._lsq_steps(one, torch.tensor(1))
    with pytest.raises(ValueError, match="step gradients"):
        ops._lsq_step_grads(one, one, torch.ones(2), one)
    opcheck(ops._lsq_steps.default, (one, torch.tensor([-0.5]).bfloat16()))
    opcheck(ops._lsq_step_grads.default, (one, -one, torch.tensor(2.0), torch.empty(0)))


def test_linear_uses_step_magnitude():
    # An optimizer step may carry a learned step size across zero: the layer quantizes with |s|
    # (the gradient mirrors), never with a non-positive step.
    args = linear_args("hq", 6, 16, 5, requires_grad=True)
    neg = list(args)
    neg[3] = (-args[3].detach()).requires_grad_(True)
    y, y_neg = ops.linear(*args), ops.linear(*neg)
    assert torch.equal(y, y_neg)
    y.sum().backward()
    y_neg.sum().backward()
    assert torch.equal(neg[3].grad, -args[3].grad)
    zero = list(args)
    zero[4] = torch.zeros(())
    assert torch.isfinite(ops.linear(*zero)).all()
