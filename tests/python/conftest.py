"""Shared fixtures and helpers of the int4train pytest suite (runs against the installed package)."""

from __future__ import annotations

import os

import pytest
import torch

import int4train  # noqa: F401  (registers torch.ops.int4train)

RECIPES = ("fp", "int8", "lsq_luq", "hq", "hq_bs", "hq_lss")
LSQ_RECIPES = ("lsq_luq", "hq", "hq_bs", "hq_lss")

# The CI machine has 2 cores; more threads only oversubscribe them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# torch.compile's on-disk caches key graphs by their Dynamo graph, in which a C++ op is opaque: a
# rebuilt extension could be served a joint graph traced from the previous build. Tests trace afresh.
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio of approx against reference, in dB (torchao's quantization metric)."""
    ref = reference.detach().double()
    err = approx.detach().double() - ref
    noise = err.pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()


def step_tensor(value: int = 0) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


@pytest.fixture(params=RECIPES)
def recipe(request) -> str:
    return request.param


@pytest.fixture(params=LSQ_RECIPES)
def lsq_recipe(request) -> str:
    return request.param
