"""int4train.Int4Linear: a drop-in nn.Linear whose forward, input-gradient and weight-gradient products
run on 4-bit integers (or any recipe of int4train.Recipe), through the C++ op torch.ops.int4train.linear
(whose autograd lives in C++). Same weight/bias parameters and shapes as nn.Linear.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from .config import Recipe, RecipeLike

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_SEED_MASK = (1 << 63) - 1
_RANK_SEED_MULTIPLIER = 0x9E3779B97F4A7C15  # odd: rank -> rank * multiplier is one-to-one


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread: a module's forward there
    is activation checkpointing's recomputation. (torch.compile traces forwards only: False there.)"""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def rank_seed(seed: int, rank: int) -> int:
    """The seed a data-parallel rank's layers key their random streams with: `seed` on rank 0, and
    seed XOR (rank * 0x9E3779B97F4A7C15 mod 2^63) on the others, so that ranks draw independent
    stochastic roundings and samples (their average keeps the 1/ranks variance of independent
    estimates) while rank 0 reproduces a one-process run of the same seed."""
    if rank < 0:
        raise ValueError(f"rank_seed: rank must be >= 0, got {rank}")
    return (seed ^ (rank * _RANK_SEED_MULTIPLIER)) & _SEED_MASK


class _GroupRef:
    """A layer's data-parallel process group (or none) and this process's rank in it. Shared, not
    copied, by copy.deepcopy; dropped by pickling (a process group does not outlive its process)."""

    __slots__ = ("group", "rank", "size")

    def __init__(self, group) -> None:
        self.group = group
        if group is None:
            self.rank, self.size = 0, 1
        else:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "Int4Linear: process_group was given but torch.distributed is not initialised; "
                    "call torch.distributed.init_process_group first"
                )
            self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
            if self.rank < 0:
                raise ValueError("Int4Linear: this process is not a member of process_group")

    def __deepcopy__(self, memo) -> "_GroupRef":
        return self

    def __reduce__(self):
        return (_GroupRef, (None,))


def _warn_if_unsynchronized(group: _GroupRef) -> None:
    if group.group is None and dist.is_available() and dist.is_initialized() and (
        dist.get_world_size() > 1
    ):
        warnings.warn(
            f"Int4Linear: torch.distributed runs {dist.get_world_size()} processes but this layer "
            "has no process_group, so each process initialises its LSQ steps and Hadamard block "
            "from its own first batch and draws the same random numbers as the others. Under data "
            "parallelism (DDP, FSDP) pass the data-parallel group: int4train.convert_(model, ..., "
            "process_group=torch.distributed.group.WORLD) or Int4Linear(..., process_group=...).",
            stacklevel=4,
        )


class _Weights:
    """A weight and bias as Int4Linear.from_linear takes them, for sources that are no nn.Linear
    (a transformers Conv1D's transposed weight, nn.MultiheadAttention's packed projection)."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter]) -> None:
        self.weight = weight
        self.bias = bias


class Int4Linear(nn.Module):
    """y = x W^T + b with quantized products; inputs (..., in_features).

    State (state_dict keys):
      weight (out_features, in_features), bias (out_features): parameters, as nn.Linear.
      input_step, weight_step: fp32 parameters of shape (1,), the LSQ step sizes (LSQ recipes only: lsq_luq,
        hq, hq_bs, hq_lss), trained by the optimizer with the rest of the model.
      hadamard_block (int64), initialized (bool), step (int64): persistent buffers. `step` counts
        training forwards that ran the recipe (not those the small-shape rule, Recipe.dense_fallback,
        sent to F.linear); it keys the random streams with the recipe's seed and the layer id. A
        forward that runs inside a backward pass is activation checkpointing's recomputation
        (torch.utils.checkpoint, reentrant or not; Hugging Face's gradient checkpointing): it takes
        the key of the forward it repeats (step - 1) and does not count, so a checkpointed run
        gives the plain run's results bit for bit (a layer called more than once inside one
        checkpointed region is the exception: its recomputations all take the last call's key).
    The first forward on a non-empty batch initialises the steps (lsq_mse_step, or lsq_init_step with
    the recipe's step_init="mean_abs", of the Hadamard-transformed x and W) and chooses the Hadamard block (select_hadamard_block; hq recipes, lsq_luq
    uses 1) unless the layer is already initialised, e.g. by load_state_dict: a loaded checkpoint is
    never re-initialised.

    process_group: under data parallelism (DDP), the group of the model's replicas: the first-batch
    initialisation is agreed on by the group and each rank draws its own random numbers (see
    Int4Linear.process_group; docs/pytorch.md, "Data parallelism").

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
        process_group=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.recipe = Recipe.of(recipe)
        self.layer_id = int(layer_id)
        self.process_group = process_group
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
            # Shape (1,), not (): FSDP's fully_shard takes no 0-dim parameter.
            self.input_step = nn.Parameter(torch.ones(1, device=device, dtype=torch.float32))
            self.weight_step = nn.Parameter(torch.ones(1, device=device, dtype=torch.float32))
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
        cls,
        linear: nn.Linear,
        recipe: RecipeLike = "hq_lss",
        layer_id: int = 0,
        process_group=None,
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
        out.process_group = process_group
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
        # Checkpoints saved while the steps were 0-dim tensors (until 2026-11-28) load too.
        for name in ("input_step", "weight_step"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.dim() == 0:
                state_dict[prefix + name] = t.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_host_state()

    def _sync_host_state(self) -> None:
        self._initialized = bool(self.initialized.item())
        self._block = int(self.hadamard_block.item())

    # ------------------------------------------------------------------ data parallelism

    _group = _GroupRef(None)  # class defaults: layers pickled before process_group existed
    _rank = 0

    @property
    def process_group(self):
        """The data-parallel group whose processes hold replicas of this layer (None: no group).

        With a group, the first-batch initialisation is agreed on by the group (the lowest rank whose
        batch is non-empty calibrates every rank, so the replicas start equal, as DDP requires) and
        each rank keys its random streams with rank_seed(recipe.seed, rank). Every rank of the group
        must run the layer's first forward (an empty batch is fine)."""
        return self._group.group

    @process_group.setter
    def process_group(self, group) -> None:
        self._group = _GroupRef(group)
        self._rank = self._group.rank

    @torch.compiler.disable
    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        if bool(self.initialized.item()):
            # Set since the host copy was taken (buffers written directly, e.g. broadcast by a
            # data-parallel wrapper from rank 0): adopt it, never re-initialise.
            self._sync_host_state()
            return
        x2 = x.detach().reshape(-1, self.in_features)
        group = self._group
        if group.size > 1:
            state = self._agree(x2, group)
        else:
            _warn_if_unsynchronized(group)
            state = self._calibrate(x2) if x2.shape[0] > 0 else None
        if state is None:
            return  # nothing to learn from: initialise on the first non-empty batch
        block, input_step, weight_step = state
        if self.recipe.uses_lsq:
            self.input_step.copy_(input_step)
            self.weight_step.copy_(weight_step)
            self.hadamard_block.fill_(block)
        self.initialized.fill_(True)
        self._sync_host_state()

    def _calibrate(self, x2: torch.Tensor):
        """(Hadamard block, input step, weight step) from this batch: the block search and the steps
        of the transformed x and W (LSQ recipes; the others have nothing to calibrate)."""
        one = torch.ones((), dtype=torch.float32, device=x2.device)
        if not self.recipe.uses_lsq:
            return 1, one, one
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
        return block, init(xt), init(wt)

    def _agree(self, x2: torch.Tensor, group: _GroupRef):
        """Every rank's calibration (rows of [has batch, block, input step, weight step], summed
        over the group: one all_reduce, fp64, exact for the int block and the fp32 steps); the
        lowest rank with a batch wins. None when no rank had one."""
        table = torch.zeros((group.size, 4), dtype=torch.float64, device=x2.device)
        if x2.shape[0] > 0:
            block, xs, ws = self._calibrate(x2)
            table[group.rank, 0] = 1.0
            table[group.rank, 1] = float(block)
            table[group.rank, 2] = xs.to(torch.float64)
            table[group.rank, 3] = ws.to(torch.float64)
        dist.all_reduce(table, group=group.group)
        ranks = torch.nonzero(table[:, 0] > 0).flatten().tolist()
        if not ranks:
            return None
        row = table[ranks[0]]
        return int(row[1].item()), row[2].to(torch.float32), row[3].to(torch.float32)

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
        recompute = self.training and _in_backward()
        y = self._quantized(x, self.step - 1 if recompute else self.step)
        if self.training and not recompute:
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

    def _quantized(self, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return torch.ops.int4train.linear(
            x,
            self.weight,
            self.bias,
            self.input_step,
            self.weight_step,
            self.recipe.spec,
            self._block,
            rank_seed(self.recipe.seed, self._rank),
            step,
            self.layer_id,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, recipe={self.recipe.spec}, layer_id={self.layer_id}"
            + f", dense_fallback={self.recipe.dense_fallback}"
            + (f", hadamard_block={self._block}" if self.recipe.uses_hadamard else "")
        )
