"""int4train: training transformers with 4-bit integer matrix multiplications (Xi et al., NeurIPS 2023).

    import int4train
    int4train.convert_(model, recipe="hq_lss")   # nn.Linear -> int4train.Int4Linear, in place
    ...train...
    int4train.unconvert_(model)                  # plain nn.Linear again, trained weights kept

Importing the package loads the C++ extension, which registers the torch.ops.int4train operators
(schemas, CPU kernels, a device-generic kernel for CUDA tensors, autograd, autocast), and the fake
kernels that let torch.compile trace them. docs/pytorch.md describes the API.
"""

import torch  # noqa: F401  (the extension links against the libraries torch loads)

from . import _C  # noqa: F401  (registers torch.ops.int4train.*)
from . import _fake  # noqa: F401  (fake kernels for torch.compile)
from . import ops
from .attention import Int4MultiheadAttention
from .config import RECIPES, Recipe
from .convert import convert_, unconvert_
from .nn import Int4Linear

__version__ = "0.1.0"

__all__ = [
    "Int4Linear",
    "Int4MultiheadAttention",
    "RECIPES",
    "Recipe",
    "convert_",
    "ops",
    "unconvert_",
    "__version__",
]
