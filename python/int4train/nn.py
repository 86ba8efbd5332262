"""int4train.Int4Linear: a drop-in nn.Linear whose forward, input-gradient and weight-gradient products
run on 4-bit integers (or any recipe of int4train.Recipe), through the C++ op torch.ops.int4train.linear
(whose autograd lives in C++). Same weight/bias parameters and shapes as nn.Linear.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .config import Recipe, RecipeLike

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


class Int4Linear(nn.Module):
    """y = x W^T + b with quantized products; inputs (..., in_features).

    State (state_dict keys):
      weight (out_features, in_features), bias (out_features): parameters, as nn.Linear.
      input_step, weight_step: fp32 0-dim parameters, the LSQ step sizes (LSQ recipes only: lsq_luq,
        hq, hq_bs, hq_lss), trained by the optimizer with the rest of the model.
      hadamard_block (int64), initialized (bool), step (int64): persistent buffers. `step` counts
        training forwards that ran the recipe (not those the small-shape rule, Recipe.dense_fallback,
        sent to F.linear); it keys the random streams with the recipe's seed and the layer id.
    The first forward on a non-empty batch initialises the steps (lsq_mse_step, or lsq_init_step with
    the recipe's step_init="mean_abs", of the Hadamard-transformed x and W) and chooses the Hadamard block (select_hadamard_block; hq recipes, lsq_luq
    uses 1) unless the layer is already initialised, e.g. by load_state_dict: a loaded checkpoint is
    never re-initialised.

    Dtypes: float32 and bfloat16 (x, weight and bias of one dtype, as nn.Linear requires). Under
    torch.autocast the layer computes with bf16 operands for bf16 autocast and fp32 for fp16
    autocast; float16 or float64 tensors outside autocast raise TypeError (the core computes in fp32
    or bf16 only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        recipe: RecipeLike = "hq_lss",
        layer_id: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.recipe = Recipe.of(recipe)
        self.layer_id = int(layer_id)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._make_state(device)
        self.reset_parameters()

    def _make_state(self, device) -> None:
        if self.recipe.uses_lsq:
            self.input_step = nn.Parameter(torch.ones((), device=device, dtype=torch.float32))
            self.weight_step = nn.Parameter(torch.ones((), device=device, dtype=torch.float32))
        else:
            self.register_parameter("input_step", None)
            self.register_parameter("weight_step", None)
        self.register_buffer("hadamard_block", torch.ones((), device=device, dtype=torch.int64))
        self.register_buffer("initialized", torch.zeros((), device=device, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), device=device, dtype=torch.int64))
        # Host copies of the two buffers the forward branches on, so that torch.compile guards on
        # Python values instead of reading tensors (kept in sync by _load_from_state_dict).
        self._initialized = False
        self._block = 1

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation (the layer then re-initialises its steps on the next batch)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, recipe: RecipeLike = "hq_lss", layer_id: int = 0
    ) -> "Int4Linear":
        """An Int4Linear holding `linear`'s own weight and bias Parameters (shared, not copied)."""
        weight = linear.weight
        if weight.dim() != 2:
            raise ValueError(f"from_linear: weight must be 2-D, got shape {tuple(weight.shape)}")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.out_features, out.in_features = weight.shape
        out.recipe = Recipe.of(recipe)
        out.layer_id = int(layer_id)
        out.weight = weight
        out.bias = linear.bias
        out._make_state(weight.device)
        return out

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding this layer's weight and bias Parameters."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = self.weight
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    # ------------------------------------------------------------------ state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_host_state()

    def _sync_host_state(self) -> None:
        self._initialized = bool(self.initialized.item())
        self._block = int(self.hadamard_block.item())

    @torch.compiler.disable
    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return  # nothing to learn from: initialise on the first non-empty batch
        if self.recipe.uses_lsq:
            w = self.weight.detach()
            if x2.dtype != w.dtype:
                x2 = x2.to(w.dtype)
            block = 1
            if self.recipe.uses_hadamard:
                block_t, _ = torch.ops.int4train.select_hadamard_block(
                    x2, w, self.recipe.max_hadamard_block
                )
                block = int(block_t)
            xt = torch.ops.int4train.hadamard_transform(x2, block)
            wt = torch.ops.int4train.hadamard_transform(w, block)
            init = (torch.ops.int4train.lsq_mse_step if self.recipe.step_init == "mse"
                    else torch.ops.int4train.lsq_init_step)
            self.input_step.copy_(init(xt))
            self.weight_step.copy_(init(wt))
            self.hadamard_block.fill_(block)
        self.initialized.fill_(True)
        self._sync_host_state()

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _SUPPORTED_DTYPES and not (
            torch.is_autocast_enabled(x.device.type) and x.is_floating_point()
            and x.dtype != torch.float64
        ):
            raise TypeError(
                f"Int4Linear supports float32 and bfloat16 inputs (any float dtype under autocast), "
                f"got {x.dtype}; cast the model and inputs, or run under torch.autocast"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int4Linear: input of shape {tuple(x.shape)} does not match in_features="
                f"{self.in_features} (weight shape {tuple(self.weight.shape)})"
            )
        if not self._initialized:
            self._initialize(x)
        if x.is_cuda and self._below_dense_threshold(x):
            # The small-shape rule (Recipe.dense_fallback): nothing quantized, no random numbers
            # drawn, so `step` (which keys them) does not advance.
            return F.linear(x, self.weight, self.bias)
        y = self._quantized(x)
        if self.training:
            with torch.no_grad():
                self.step.add_(1)
        return y

    def _below_dense_threshold(self, x: torch.Tensor) -> bool:
        """linear.h's below_dense_threshold for this call: tokens x in x out (in fp64, as there) below
        the recipe's dense_below_macs."""
        threshold = self.recipe.dense_below_macs
        if threshold <= 0:
            return False
        tokens = x.numel() // self.in_features if self.in_features > 0 else 0
        return float(tokens) * float(self.in_features) * float(self.out_features) < threshold

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.int4train.linear(
            x,
            self.weight,
            self.bias,
            self.input_step,
            self.weight_step,
            self.recipe.spec,
            self._block,
            self.recipe.seed,
            self.step,
            self.layer_id,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, recipe={self.recipe.spec}, layer_id={self.layer_id}"
            + (f", dense_fallback={self.recipe.dense_fallback}"
               if self.recipe.dense_fallback != "never" else "")
            + (f", hadamard_block={self._block}" if self.recipe.uses_hadamard else "")
        )
