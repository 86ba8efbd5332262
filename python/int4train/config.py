"""int4train recipes: one config object naming how a layer's three matrix products are quantized.

The names are those of the C++ core (include/int4train/linear.h) and of the paper's ablation table:
fp, int8, lsq_luq, hq, hq_bs, hq_lss (the paper's method, the default).
"""

from __future__ import annotations

import dataclasses
from typing import Union

from . import _C

RECIPES = ("fp", "int8", "lsq_luq", "hq", "hq_bs", "hq_lss")
_LSQ_RECIPES = ("lsq_luq", "hq", "hq_bs", "hq_lss")
_HADAMARD_RECIPES = ("hq", "hq_bs", "hq_lss")
MAX_HADAMARD_BLOCK = 256  # int4train::kMaxHadamardBlock
MIN_LSS_BUDGET = 0.125  # int4train::kLssMinBudget
MAX_LSS_BUDGET = 2.0  # int4train::kLssMaxBudget
STEP_INITS = ("mean_abs", "mse")
GEMMS = ("auto", "fp8", "int8")  # int4train::GemmEngine (include/int4train/linear.h)
# The small-shape rule's measured thresholds by recipe name, int4train::dense_fallback_macs
# (include/int4train/linear.h): 2^38 multiply-adds for hq_lss, 2^37 for the others.
DENSE_FALLBACK_MACS = {name: float(macs) for name, macs in _C.DENSE_FALLBACK_MACS.items()}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How Int4Linear computes its forward and backward products.

    name: "fp" (no quantization, the core's fp32 products), "int8" (per-tensor absmax INT8 forward,
        stochastic INT8 gradient), "lsq_luq" (LSQ 4-bit forward, LUQ 4-bit logarithmic gradient),
        "hq" (Hadamard + LSQ forward, stochastic 4-bit gradient), "hq_bs" (Hadamard + LSQ forward,
        bit-split gradient) or "hq_lss" (bit split + leverage score sampling: the paper's method).
    seed: keys every random stream (stochastic rounding, sampling) with the training step and the
        layer id, so the same seed reproduces a run bit for bit on the CPU and the GPU. 0 <= seed < 2**63.
    max_hadamard_block: the largest Hadamard block the first-batch search may choose (hq recipes),
        a power of two <= 256.
    lss_budget: hq_lss only: how many of the 2N bit-split rows of a gradient leverage score sampling
        keeps, in units of N, in [0.125, 2]: the water-filling budget, and the most rows a sampled
        product has (ceil(lss_budget * N)). 1.0 is the paper's method (each sampled backward product
        costs one N-row product); 2.0 keeps every non-zero row (hq_bs's gradients).
        Larger budgets cost more rows and lose less where gradients are not row-sparse
        (docs/accuracy.md: a language model, whose every token carries loss).
    step_init: how the first batch sets the LSQ steps (LSQ recipes): "mse" (the default), the step
        minimising the 4-bit reconstruction error of x~ on a fixed grid (ops.lsq_mse_step;
        include/int4train/quantize.h), or "mean_abs", LSQ's 2 mean|x~| / sqrt(7), about 1.5x larger
        on Hadamard-rotated data (docs/accuracy.md, "LSQ steps").
    dense_fallback: the small-shape rule (include/int4train/linear.h; docs/cuda.md, "The
        small-shape rule"): "auto" (the default: on a CUDA device, a call whose tokens x
        in_features x out_features is below DENSE_FALLBACK_MACS[name], 2^38 (about 2.7e11)
        multiply-adds for hq_lss and 2^37 for the others, runs as the plain F.linear in the
        input's dtype, where an H200 measured the quantized layer below 0.9x of bf16: e.g.
        BERT-base's MLP up to 58,254 tokens a call with hq_bs, 16384 x 1024 -> 4096; with hq_lss
        also 8192 x 4096 -> 4096),
        "never" (every call runs the recipe: what a study of the method's accuracy wants, and what
        the training CLI always uses), or a number of multiply-adds, the threshold itself. A call
        that falls back is not quantized, saves no memory, gives its LSQ steps no gradient and
        does not advance the layer's `step`. The CPU never falls back.
    gemm: LSQ recipes on CUDA: which 8-bit tensor cores carry the 4-bit products (include/int4train/
        linear.h, GemmEngine): "auto" (the default: FP8 on GPUs with FP8 tensor cores, compute
        capability 8.9 or newer such as the L40, RTX 40xx, H100 and H200; INT8 on the A100, A10 and
        RTX 30xx), "fp8" (an error on a GPU of compute capability 8.0-8.8, which has the kernels
        but no FP8) or "int8". The integers, and so the results, are the same bit for bit with
        either; the CPU ignores it, and so do GPUs older than compute capability 8.0, which run the
        device-generic ATen path (exact, slower) whatever gemm says.
    grad_scale: hq_bs and hq_lss: the bit-split gradient's scale: "tensor" (the default, the
        paper's one scale per tensor, max|G| / 119) or "row" (refined per token by a power of two
        up to 2^-4, so a token whose gradient is far below the tensor's largest keeps up to 4 more
        bits; include/int4train/linear.h). The products stay exact and unbiased. On the fine-tune
        and the language model it brings hq_lss and hq_bs closer to fp (docs/accuracy.md,
        "Per-row gradient scales"). On CUDA both run it on the kernels: hq_bs within 4% of its
        default step on an H200, hq_lss at 11-23% over it (its weight gradient takes two products;
        bench/results/gpu-h200-2026-11-29-stop23.md). With lss_budget=1.25 as well, hq_lss meets
        the accuracy targets of docs/accuracy.md on all three tasks ("Row scales with B = 1.25").
    """

    name: str = "hq_lss"
    seed: int = 0
    max_hadamard_block: int = MAX_HADAMARD_BLOCK
    lss_budget: float = 1.0
    step_init: str = "mse"
    dense_fallback: Union[str, float] = "auto"
    gemm: str = "auto"
    grad_scale: str = "tensor"

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}; expected one of {', '.join(RECIPES)}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        b = self.max_hadamard_block
        if not isinstance(b, int) or b < 1 or b > MAX_HADAMARD_BLOCK or b & (b - 1):
            raise ValueError(
                f"max_hadamard_block must be a power of two in [1, {MAX_HADAMARD_BLOCK}], got {b!r}"
            )
        lb = self.lss_budget
        if isinstance(lb, bool) or not isinstance(lb, (int, float)) or not MIN_LSS_BUDGET <= lb <= MAX_LSS_BUDGET:
            raise ValueError(
                f"lss_budget must be a number in [{MIN_LSS_BUDGET:g}, {MAX_LSS_BUDGET:g}] (rows kept per token), got {lb!r}"
            )
        object.__setattr__(self, "lss_budget", float(lb))
        if self.step_init not in STEP_INITS:
            raise ValueError(f"step_init must be one of {', '.join(STEP_INITS)}, got {self.step_init!r}")
        if self.step_init != "mse" and self.name not in _LSQ_RECIPES:
            raise ValueError(f"step_init applies to the LSQ recipes ({', '.join(_LSQ_RECIPES)}), "
                             f"got recipe {self.name!r}")
        if self.lss_budget != 1.0 and self.name != "hq_lss":
            raise ValueError(f"lss_budget applies to hq_lss only, got recipe {self.name!r}")
        df = self.dense_fallback
        if isinstance(df, str):
            if df not in ("never", "auto"):
                raise ValueError(f"dense_fallback must be \"never\", \"auto\" or a number of "
                                 f"multiply-adds >= 0, got {df!r}")
        elif isinstance(df, bool) or not isinstance(df, (int, float)) or not df >= 0 or df == float("inf"):
            raise ValueError(f"dense_fallback must be \"never\", \"auto\" or a finite number of "
                             f"multiply-adds >= 0, got {df!r}")
        else:
            object.__setattr__(self, "dense_fallback", float(df))
        if self.grad_scale not in ("tensor", "row"):
            raise ValueError(f"grad_scale must be \"tensor\" or \"row\", got {self.grad_scale!r}")
        if self.grad_scale != "tensor" and self.name not in ("hq_bs", "hq_lss"):
            raise ValueError(f"grad_scale applies to hq_bs and hq_lss, got recipe {self.name!r}")
        if self.gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {', '.join(GEMMS)}, got {self.gemm!r}")
        if self.gemm != "auto" and self.name not in _LSQ_RECIPES:
            raise ValueError(f"gemm applies to the LSQ recipes ({', '.join(_LSQ_RECIPES)}), "
                             f"got recipe {self.name!r}")

    @property
    def spec(self) -> str:
        """The recipe as the ops take it (`str recipe`): the name, with the non-default options after a
        colon, e.g. "hq_lss", "hq_lss:lss_budget=1.5" or "hq_bs:gemm=int8" (include/int4train/linear.h,
        parse_recipe_spec)."""
        options = []
        if self.lss_budget != 1.0:
            options.append(f"lss_budget={self.lss_budget!r}")
        if self.gemm != "auto":
            options.append(f"gemm={self.gemm}")
        if self.grad_scale != "tensor":
            options.append(f"grad_scale={self.grad_scale}")
        return self.name + (":" + ",".join(options) if options else "")

    @property
    def label(self) -> str:
        """`spec` plus the options that change training but not the op's arithmetic (they act in
        Int4Linear), e.g. "hq_bs:max_hadamard_block=1", "hq_lss:step_init=mean_abs" or
        "hq_bs:dense_fallback=never": what results record as `recipe_spec`, so that such runs stay
        apart from the default's. Recipe.of reads it back."""
        return self._label(with_rule=True)

    @property
    def method_label(self) -> str:
        """`label` without the small-shape rule: what the recipe's quantized calls compute, and so
        the whole training when no call falls back (dense_fallback="never"). The training CLI, which
        runs every recipe that way, records it as `recipe_spec`."""
        return self._label(with_rule=False)

    def _label(self, with_rule: bool) -> str:
        extra = []
        if self.max_hadamard_block != MAX_HADAMARD_BLOCK and self.name in _HADAMARD_RECIPES:
            extra.append(f"max_hadamard_block={self.max_hadamard_block}")
        if self.step_init != "mse" and self.uses_lsq:
            extra.append(f"step_init={self.step_init}")
        if with_rule and self.dense_fallback != "auto":
            df = self.dense_fallback
            extra.append(f"dense_fallback={df if isinstance(df, str) else repr(df)}")
        if not extra:
            return self.spec
        sep = "," if ":" in self.spec else ":"
        return self.spec + sep + ",".join(extra)

    @property
    def dense_below_macs(self) -> float:
        """The small-shape rule's threshold in multiply-adds per call (0: never fall back)."""
        if self.dense_fallback == "never":
            return 0.0
        if self.dense_fallback == "auto":
            return DENSE_FALLBACK_MACS[self.name]
        return float(self.dense_fallback)

    @property
    def uses_lsq(self) -> bool:
        """True for the recipes with learned step sizes (LSQ 4-bit forward)."""
        return self.name in _LSQ_RECIPES

    @property
    def uses_hadamard(self) -> bool:
        """True for the recipes that choose a Hadamard block on the first batch."""
        return self.name in _HADAMARD_RECIPES

    @classmethod
    def of(cls, recipe: Union["Recipe", str], seed: int | None = None) -> "Recipe":
        """A Recipe from a Recipe, a name, a spec ("hq_lss:lss_budget=1.5", the inverse of `spec`) or a
        label ("hq_bs:max_hadamard_block=1,step_init=mean_abs", the inverse of `label`); `seed`, when
        given, replaces the recipe's seed."""
        if isinstance(recipe, str):
            name, colon, opts = recipe.partition(":")
            options: dict = {}
            for item in opts.split(",") if colon else []:
                key, _, value = item.partition("=")
                kind = {"lss_budget": float, "max_hadamard_block": int, "step_init": str,
                        "dense_fallback": _fallback_value, "gemm": str,
                        "grad_scale": str}.get(key)
                if kind is None:
                    raise ValueError(f"recipe: unknown option {key!r} in {recipe!r}; expected NAME, "
                                     "hq_lss:lss_budget=X, an hq recipe with max_hadamard_block=G, "
                                     "an LSQ recipe with step_init=mse|mean_abs or gemm=auto|fp8|int8, "
                                     "hq_bs / hq_lss with grad_scale=tensor|row, "
                                     "or dense_fallback=never|auto|MACS")
                if key in options:
                    raise ValueError(f"recipe: option {key!r} given twice in {recipe!r}")
                try:
                    options[key] = kind(value)
                except ValueError:
                    expected = {float: "a number", int: "an integer"}.get(kind, "never, auto or a number")
                    raise ValueError(f"recipe: {key} expects {expected}, "
                                     f"got {value!r} in {recipe!r}") from None
            if "step_init" in options and name not in _LSQ_RECIPES:
                raise ValueError(f"recipe: step_init applies to the LSQ recipes, got {recipe!r}")
            if "max_hadamard_block" in options and name not in _HADAMARD_RECIPES:
                raise ValueError(f"recipe: max_hadamard_block applies to the hq recipes, got {recipe!r}")
            r = cls(name=name, **options)
        elif isinstance(recipe, Recipe):
            r = recipe
        else:
            raise TypeError(f"recipe must be a Recipe or one of {RECIPES}, got {type(recipe).__name__}")
        return r if seed is None else dataclasses.replace(r, seed=seed)


def split_specs(value: str) -> list[str]:
    """A comma-separated list of recipes or specs as a list of specs, where a spec's further options
    continue it after a comma: "fp,hq_lss:grad_scale=row,lss_budget=1.25" is ["fp",
    "hq_lss:grad_scale=row,lss_budget=1.25"] (an item with "=" but no ":" belongs to the spec before
    it). Empty items are dropped; an option that follows no spec is a ValueError."""
    items: list[str] = []
    for v in (v.strip() for v in value.split(",")):
        if not v:
            continue
        if "=" in v and ":" not in v:
            if not items or ":" not in items[-1]:
                raise ValueError(f"recipes: option {v!r} follows no recipe spec (NAME:OPTION=VALUE) "
                                 f"in {value!r}")
            items[-1] += "," + v
        else:
            items.append(v)
    return items


def _fallback_value(value: str) -> Union[str, float]:
    """A dense_fallback option's value as written in a label: "never", "auto" or a number."""
    return value if value in ("never", "auto") else float(value)


RecipeLike = Union[Recipe, str]
