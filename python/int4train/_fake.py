"""Fake (meta) kernels of the torch.ops.int4train operators, for torch.compile and FakeTensor tracing.

The schemas and real kernels are registered in C++ (csrc/ops.cpp); these functions only say what
each op returns (shapes, dtypes, devices), mirroring the C++ allocation rules (csrc/ops_internal.h)
and the core's int4train::linear_saved_shapes. opcheck compares them with the real kernels.
"""

from __future__ import annotations

import torch
from torch.library import register_fake

from .config import RECIPES

_LSQ = ("lsq_luq", "hq", "hq_bs", "hq_lss")


def packed_row_bytes(cols):
    """Bytes of one packed INT4 row of `cols` codes (int4train/int4.h)."""
    return (cols + 1) // 2


def compact_aux_bytes(rows, cols):
    """Bytes of the LSQ auxiliary bits, one per element (int4train/quantize.h)."""
    return (rows * cols + 7) // 8


def saved_shapes(spec: str, n, d):
    """(codes shape, codes dtype, aux bytes) that linear_forward saves: linear_saved_shapes. `spec` is a
    recipe name or spec ("hq_lss:lss_budget=1.5"); its options do not change what is saved."""
    recipe = spec.split(":", 1)[0]
    if recipe not in RECIPES:
        raise ValueError(f"recipe: unknown recipe '{recipe}'; expected one of {', '.join(RECIPES)}")
    if recipe == "fp":
        return (0, 0), torch.uint8, 0
    if recipe == "int8":
        return (n, d), torch.int8, 0
    return (n, packed_row_bytes(d)), torch.uint8, compact_aux_bytes(n, d)


def _codes_like(x, packed: bool):
    shape = list(x.shape)
    if packed:
        shape[-1] = packed_row_bytes(shape[-1])
        return x.new_empty(shape, dtype=torch.uint8)
    return x.new_empty(shape, dtype=torch.int8)


@register_fake("int4train::hadamard_transform")
def _hadamard_transform(x, block):
    return x.new_empty(x.shape)


@register_fake("int4train::select_hadamard_block")
def _select_hadamard_block(x, w, max_block=256):
    d = x.shape[-1]
    count, g = 0, 1
    while g <= max_block and d % g == 0:
        count, g = count + 1, 2 * g
    return x.new_empty((), dtype=torch.int64), x.new_empty((count,), dtype=torch.float64)


@register_fake("int4train::lsq_init_step")
def _lsq_init_step(x):
    return x.new_empty((), dtype=torch.float32)


@register_fake("int4train::lsq_mse_step")
def _lsq_mse_step(x):
    return x.new_empty((), dtype=torch.float32)


@register_fake("int4train::lsq_quantize")
def _lsq_quantize(x, step, packed=False):
    return _codes_like(x, packed), x.new_empty((), dtype=torch.int64)


@register_fake("int4train::quantize_bitsplit")
def _quantize_bitsplit(g, seed, stream, packed=False):
    return _codes_like(g, packed), _codes_like(g, packed), g.new_empty((), dtype=torch.float32)


@register_fake("int4train::pack_int4")
def _pack_int4(codes):
    return _codes_like(codes, True)


@register_fake("int4train::unpack_int4")
def _unpack_int4(packed, cols):
    shape = list(packed.shape)
    shape[-1] = cols
    return packed.new_empty(shape, dtype=torch.int8)


@register_fake("int4train::gemm_s32")
def _gemm_s32(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@register_fake("int4train::lss_probabilities")
def _lss_probabilities(scores, budget):
    return scores.new_empty(scores.shape)


def _linear_forward(x, weight, bias, input_step, weight_step, recipe, hadamard_block, seed, step,
                    layer):
    n, d = x.shape
    c = weight.shape[0]
    codes_shape, codes_dtype, aux_bytes = saved_shapes(recipe, n, d)
    return (
        x.new_empty((n, c)),
        x.new_empty(codes_shape, dtype=codes_dtype),
        x.new_empty((aux_bytes,), dtype=torch.uint8),
        x.new_empty((), dtype=torch.float32),
        step.new_empty((), dtype=torch.int64),
    )


def _linear_backward(grad_y, x, codes, aux, scale, weight, input_step, weight_step, recipe,
                     hadamard_block, seed, step, layer, output_mask):
    n, c = grad_y.shape
    d = weight.shape[1]

    def pick(keep, shape, dtype):
        return grad_y.new_empty(shape if keep else (0,), dtype=dtype)

    return (
        pick(output_mask[0], (n, d), grad_y.dtype),
        pick(output_mask[1], (c, d), weight.dtype),
        pick(output_mask[2], (c,), grad_y.dtype),
        pick(output_mask[3], (), torch.float32),
        pick(output_mask[4], (), torch.float32),
        grad_y.new_empty((2,), dtype=torch.int64),
    )


register_fake("int4train::linear_forward")(_linear_forward)
register_fake("int4train::linear_backward")(_linear_backward)


@register_fake("int4train::_lsq_steps")
def _lsq_steps(input_step, weight_step):
    return (input_step.new_empty((), dtype=torch.float32),
            weight_step.new_empty((), dtype=torch.float32))


@register_fake("int4train::_lsq_step_grads")
def _lsq_step_grads(input_step, weight_step, grad_input_step, grad_weight_step):
    def grad(p, g):
        return p.new_empty(p.shape if g.numel() > 0 else (0,))
    return grad(input_step, grad_input_step), grad(weight_step, grad_weight_step)


@register_fake("int4train::linear")
def _linear(x, weight, bias, input_step, weight_step, recipe, hadamard_block, seed, step, layer):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# The debug ops of the device-generic implementation (csrc/generic.cpp) share the schemas.
for _name, _fn in (
    ("hadamard_transform", _hadamard_transform),
    ("lsq_init_step", _lsq_init_step),
    ("lsq_quantize", _lsq_quantize),
    ("quantize_bitsplit", _quantize_bitsplit),
    ("pack_int4", _pack_int4),
    ("unpack_int4", _unpack_int4),
    ("gemm_s32", _gemm_s32),
    ("linear_forward", _linear_forward),
    ("linear_backward", _linear_backward),
):
    register_fake(f"int4train::_generic_{_name}")(_fn)
