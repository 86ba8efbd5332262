"""Python wrappers of the torch.ops.int4train operators (the schemas and kernels live in C++).

Conventions: packed INT4 codes are uint8 tensors (..., ceil(K/2)), low nibble first; seeds and random
streams are ints reinterpreted as the core's uint64; `step` is an integer scalar tensor (the training
step) and `layer` the layer id of the random streams. Bad arguments raise ValueError / TypeError.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

_ops = torch.ops.int4train


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    input_step: Optional[Tensor] = None,
    weight_step: Optional[Tensor] = None,
    recipe: str = "hq_lss",
    hadamard_block: int = 1,
    seed: int = 0,
    step: Optional[Tensor] = None,
    layer: int = 0,
) -> Tensor:
    """Differentiable quantized y = x weight^T + bias; x (..., D). The LSQ recipes need both steps."""
    if step is None:
        step = torch.zeros((), dtype=torch.int64)
    return _ops.linear(x, weight, bias, input_step, weight_step, recipe, hadamard_block, seed, step,
                       layer)


def linear_forward(x, weight, bias, input_step, weight_step, recipe, hadamard_block, seed, step,
                   layer) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward alone on x (N, D): (y, codes, aux, scale, saved_step), what the backward needs
    (pass saved_step as the backward's step)."""
    return _ops.linear_forward(x, weight, bias, input_step, weight_step, recipe, hadamard_block,
                               seed, step, layer)


def linear_backward(grad_y, x, codes, aux, scale, weight, input_step, weight_step, recipe,
                    hadamard_block, seed, step, layer,
                    output_mask: Sequence[bool] = (True,) * 5) -> Tuple[Tensor, ...]:
    """The backward alone: (grad_x, grad_weight, grad_bias, grad_input_step, grad_weight_step,
    stats); unselected outputs are empty; stats = rows kept by the two samplings (hq_lss)."""
    return _ops.linear_backward(grad_y, x, codes, aux, scale, weight, input_step, weight_step,
                                recipe, hadamard_block, seed, step, layer, list(output_mask))


def hadamard_transform(x: Tensor, block: int) -> Tensor:
    """x (..., D) times blockdiag(H_block, ...): differentiable, its own inverse."""
    return _ops.hadamard_transform(x, block)


def select_hadamard_block(x: Tensor, w: Tensor, max_block: int = 256) -> Tuple[int, Tensor]:
    """The block a layer picks on this first batch, and the errors of the candidates 1, 2, 4, ..."""
    block, errors = _ops.select_hadamard_block(x, w, max_block)
    return int(block), errors


def lsq_init_step(x: Tensor) -> Tensor:
    """The LSQ first-batch step 2 mean|x| / sqrt(7) (fp32 0-dim)."""
    return _ops.lsq_init_step(x)


def lsq_mse_step(x: Tensor) -> Tensor:
    """The first-batch step that minimises x's 4-bit reconstruction error over a fixed grid around
    2 mean|x| / sqrt(7) (fp32 0-dim; the same bits on every device; `step_init="mse"`)."""
    return _ops.lsq_mse_step(x)


def lsq_quantize(x: Tensor, step: Tensor, packed: bool = False) -> Tuple[Tensor, Tensor]:
    """LSQ INT4 codes of x (int8, or packed uint8) and the count of non-finite inputs."""
    return _ops.lsq_quantize(x, step, packed)


def quantize_bitsplit(g: Tensor, seed: int, stream: int, packed: bool = False):
    """Unbiased bit split of g: (hi, lo, scale), g ~ scale (16 hi + lo)."""
    return _ops.quantize_bitsplit(g, seed, stream, packed)


def pack_int4(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7] (..., K) -> uint8 (..., ceil(K/2)), low nibble first."""
    return _ops.pack_int4(codes)


def unpack_int4(packed: Tensor, cols: int) -> Tensor:
    """uint8 (..., ceil(cols/2)) -> int8 codes (..., cols)."""
    return _ops.unpack_int4(packed, cols)


def gemm_s32(a: Tensor, b: Tensor) -> Tensor:
    """Exact int32 a b^T of int8 codes or packed INT4 (uint8) rows; a (M, K), b (N, K)."""
    return _ops.gemm_s32(a, b)


def lss_probabilities(scores: Tensor, budget: float) -> Tensor:
    """Water-filled keep probabilities min(1, kappa score) summing to budget (fp32)."""
    return _ops.lss_probabilities(scores, budget)


def make_stream(step: int, layer: int, purpose: int) -> int:
    """The core's random stream id step << 32 | layer << 8 | purpose, as a signed int64 value."""
    s = ((step & 0xFFFFFFFF) << 32) | ((layer & 0xFFFFFF) << 8) | (purpose & 0xFF)
    return s - (1 << 64) if s >= 1 << 63 else s
