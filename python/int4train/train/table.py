"""The recipe comparison table of docs/accuracy.md: many runs of ``python -m int4train.train``, one
process per (task, recipe, seed), several at once on one machine, then mean ± std per cell.

    # run: every recipe of two tasks, three seeds, 8 processes at a time, stop launching after 500 s
    python -m int4train.train.table run --out runs/table --tasks lm,imagecls --seeds 0,1,2 \\
        --jobs 8 --deadline 500 --task-args "imagecls=--data /path/to/fashion-mnist"

    # summarize: the markdown table (stdout or --md) and one loss-curve plot per task
    python -m int4train.train.table summarize runs/table --plots docs/accuracy

Each run writes its own ``metrics.json`` under ``OUT/TASK/RECIPE-sSEED``; ``summarize`` reads every
``metrics.json`` below the folders it is given, so the runs of several machines or calls combine. A
run that did not finish (deadline, error) has no metrics and is counted as missing, never guessed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .plotting import ema
from .presets import PRESETS

TASKS = ("lm", "textcls", "imagecls")
RECIPES = ("fp", "int8", "lsq_luq", "hq", "hq_bs", "hq_lss")


def _list(value: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise SystemExit(f"error: {what}: expected a comma-separated list, got {value!r}")
    if allowed is not None:
        for v in items:
            if v not in allowed:
                raise SystemExit(f"error: {what}: unknown {v!r}; expected some of {', '.join(allowed)}")
    return items


def _recipe_list(value: str) -> list[str]:
    """--recipes's items (config.split_specs: a spec's further options continue it after a comma)."""
    from ..config import split_specs

    try:
        items = split_specs(value)
    except ValueError as e:
        raise SystemExit(f"error: --recipes: {e}") from None
    if not items:
        raise SystemExit(f"error: --recipes: expected a comma-separated list, got {value!r}")
    return items


def _task_args(values: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        task, sep, rest = v.partition("=")
        if not sep or task not in TASKS:
            raise SystemExit(f"error: --task-args: expected TASK=ARGS with TASK in {TASKS}, got {v!r}")
        out[task] = out.get(task, []) + shlex.split(rest)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m int4train.train.table", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the training CLI for every (task, recipe, seed)")
    r.add_argument("--out", required=True, help="results folder (OUT/TASK/RECIPE-sSEED/metrics.json)")
    r.add_argument("--tasks", default="lm,textcls,imagecls", help="comma list of tasks")
    r.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help="comma list of recipes; variants as specs, e.g. hq_lss:lss_budget=1.5 or "
        "hq_lss:grad_scale=row,lss_budget=1.25 (an item with = but no : continues the spec before it)",
    )
    r.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    r.add_argument("--preset", default="full", choices=["tiny", "full"])
    r.add_argument("--jobs", type=int, default=1, help="processes at once (default 1)")
    r.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after which no run is started and running ones are stopped (default: none)",
    )
    r.add_argument(
        "--task-args",
        action="append",
        default=[],
        help='extra CLI flags of one task, "TASK=FLAGS" (repeatable), e.g. "lm=--steps 400"',
    )
    r.add_argument(
        "--gpus",
        default="auto",
        help="GPUs to spread the runs over, each run pinned to one by CUDA_VISIBLE_DEVICES: a comma list "
        "of ids, 'none', or 'auto' (default: the ids in CUDA_VISIBLE_DEVICES, else every GPU torch sees)",
    )
    r.add_argument("--python", default=sys.executable, help="interpreter that runs the CLI")
    s = sub.add_parser("summarize", help="mean ± std per (task, recipe) and loss-curve plots")
    s.add_argument("folders", nargs="+", help="folders searched for metrics.json, or JSON files of runs")
    s.add_argument("--md", default=None, help="write the markdown table here (default: stdout)")
    s.add_argument("--plots", default=None, help="folder for TASK.png loss-curve plots")
    s.add_argument(
        "--json",
        default=None,
        help="collect the runs into this file ({\"runs\": [...]}: metrics, configuration, command, loss "
        "curve of each), which summarize reads back",
    )
    return p


# ------------------------------------------------------------------------------------------ run


def gpu_ids(spec: str) -> list[str]:
    """The GPU ids of --gpus: explicit ids, none, or those visible to this process (auto)."""
    if spec == "none":
        return []
    if spec != "auto":
        ids = _list(spec, None, "--gpus")
        if not all(i.isdigit() for i in ids):
            raise SystemExit(f"error: --gpus: expected 'auto', 'none' or comma-separated ids, got {spec!r}")
        return ids
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def _recipe_flags(spec: str) -> tuple[str, list[str], str]:
    """(recipe name, extra CLI flags, run-folder name) of a --recipes item: a name or a spec."""
    from ..config import MAX_HADAMARD_BLOCK, Recipe

    try:
        r = Recipe.of(spec)
    except ValueError as e:
        raise SystemExit(f"error: --recipes: {spec!r}: {e}") from None
    if "dense_fallback=" in spec and r.dense_fallback != "never":
        raise SystemExit(f"error: --recipes: {spec!r}: dense_fallback is not an option of the "
                         "training CLI, which quantizes every call (the rule is a speed rule of "
                         "Int4Linear on CUDA, not a recipe to compare)")
    flags, folder = [], r.name
    if r.lss_budget != 1.0:
        flags += ["--lss-budget", repr(r.lss_budget)]
        folder += f"@lss_budget{r.lss_budget!r}"
    if r.uses_hadamard and r.max_hadamard_block != MAX_HADAMARD_BLOCK:
        flags += ["--max-hadamard-block", str(r.max_hadamard_block)]
        folder += f"@max_hadamard_block{r.max_hadamard_block}"
    if r.uses_lsq and r.step_init != "mse":
        flags += ["--step-init", r.step_init]
        folder += f"@step_init{r.step_init}"
    if r.gemm != "auto":
        flags += ["--gemm", r.gemm]
        folder += f"@gemm{r.gemm}"
    if r.grad_scale != "tensor":
        flags += ["--grad-scale", r.grad_scale]
        folder += f"@grad_scale{r.grad_scale}"
    return r.name, flags, folder


def run_all(args: argparse.Namespace) -> int:
    tasks = _list(args.tasks, TASKS, "--tasks")
    recipes = _recipe_list(args.recipes)
    variants = {r: _recipe_flags(r) for r in recipes}
    folders: dict[str, str] = {}
    for r, (_, _, folder) in variants.items():
        if folder in folders:
            raise SystemExit(f"error: --recipes: {folders[folder]!r} and {r!r} are the same recipe")
        folders[folder] = r
    try:
        seeds = [int(s) for s in _list(args.seeds, None, "--seeds")]
    except ValueError:
        raise SystemExit(f"error: --seeds: expected integers, got {args.seeds!r}") from None
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs: expected a positive integer, got {args.jobs}")
    extra = _task_args(args.task_args)
    out = Path(args.out)
    # Seeds outermost: an interrupted table has whole seeds of every cell rather than all seeds of a few.
    jobs = [(t, r, s) for s in seeds for t in tasks for r in recipes]
    # A run whose metrics.json exists is done, so an interrupted table goes on where it stopped, unless
    # it ran with other settings (a run from before a default changed: its row label differs).
    from ..config import Recipe

    done, stale = [], []
    label = {r: Recipe.of(r).label for r in recipes}  # a fresh run's, with the preset's settings
    for j in jobs:
        path = out / j[0] / f"{variants[j[1]][2]}-s{j[2]}" / "metrics.json"
        if path.exists():
            runs = load_runs([str(path)])
            fresh = "--step-lr-scale" in extra.get(j[0], [])  # then the label carries the scale
            ok = runs and all(_spec(r) == label[j[1]] or fresh for r in runs)
            (done if ok else stale).append(j)
    jobs = [j for j in jobs if j not in done]
    if done:
        print(f"table: {len(done)} runs already done in {out}", flush=True)
    if stale:
        print(f"table: {len(stale)} runs in {out} ran with other settings (e.g. {stale[0][1]} of "
              f"{stale[0][0]}, seed {stale[0][2]}): running them again", flush=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    gpus = gpu_ids(args.gpus)
    if len(gpus) > 1:
        print(f"table: spreading runs over GPUs {','.join(gpus)}", flush=True)
    t0 = time.monotonic()
    pending, running, finished = list(jobs), [], []
    while pending or running:
        late = args.deadline is not None and time.monotonic() - t0 > args.deadline
        while pending and len(running) < args.jobs and not late:
            task, recipe, seed = pending.pop(0)
            name, flags, folder = variants[recipe]
            run_dir = out / task / f"{folder}-s{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cmd = [args.python, "-m", "int4train.train", "--task", task, "--recipe", name, *flags,
                   "--seed", str(seed), "--preset", args.preset, "--no-progress",
                   "--threads", str(threads), "--out", str(run_dir)] + extra.get(task, [])
            log = open(run_dir / "log.txt", "w")
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            env = None
            gpu = None
            if len(gpus) > 1:
                # The GPU with the fewest runs of ours on it (ties: the first listed).
                load = {g: 0 for g in gpus}
                for item in running:
                    load[item[4]] += 1
                gpu = min(gpus, key=lambda g: load[g])
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
                log.write(f"# CUDA_VISIBLE_DEVICES={gpu}\n")
                log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((proc, log, (task, recipe, seed), time.monotonic(), gpu))
        for item in list(running):
            proc, log, key, started, _ = item
            if proc.poll() is None and late:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
                finished.append((key, status, time.monotonic() - started))
                print(f"[{time.monotonic() - t0:6.0f} s] {key[0]} {key[1]} seed {key[2]}: {status} "
                      f"({time.monotonic() - started:.0f} s)", flush=True)
        if late and not running:
            break
        time.sleep(0.5)
    skipped = len(pending)
    bad = sum(1 for _, st, _ in finished if st != "ok")
    print(f"table: {len(finished) - bad} runs finished, {bad} failed or stopped, {skipped} not started "
          f"({time.monotonic() - t0:.0f} s)")
    return 0 if bad == 0 and skipped == 0 else 1


# ------------------------------------------------------------------------------------ summarize


def load_runs(folders: list[str]) -> list[dict[str, Any]]:
    """The runs below `folders`; a run found in several files (the same record collected into two
    tables) counts once."""
    runs, seen = [], set()
    for folder in folders:
        # A folder is searched for metrics.json files; a file ({"runs": [...]}, e.g. a table's runs
        # collected into one file) is read as it is.
        paths = [Path(folder)] if Path(folder).is_file() else sorted(Path(folder).rglob("metrics.json"))
        for path in paths:
            with open(path) as f:
                for r in json.load(f)["runs"]:
                    key = json.dumps({k: r.get(k) for k in RUN_KEYS}, sort_keys=True)
                    if key in seen:
                        continue
                    seen.add(key)
                    r["_path"] = str(path)
                    runs.append(r)
    return runs


# What --json keeps of a run (the rest, e.g. the per-layer list and the data description, stays in
# the run's own metrics.json).
RUN_KEYS = ("task", "recipe", "recipe_spec", "seed", "preset", "steps", "metrics", "final_train_loss",
            "loss_curve", "train_time_s", "wall_time_s", "device", "amp", "threads", "config",
            "torch_version", "int4train_version", "command")


def write_runs(runs: list[dict[str, Any]], path: Path) -> None:
    kept = [{k: r[k] for k in RUN_KEYS if k in r} for r in runs]
    kept.sort(key=lambda r: (r["task"], _spec_order(_spec(r)), r["seed"]))
    path.write_text(json.dumps({"runs": kept}) + "\n")


def _metric(run: dict[str, Any]) -> float:
    m = run["metrics"]
    return m["val_loss"] if run["task"] == "lm" else 100.0 * m["accuracy"]


def _spec(run: dict[str, Any]) -> str:
    """A run's row label: its recipe label, and for the LSQ recipes the steps' learning-rate factor
    when it is not the task preset's (" step_lr_scale=0.01"). Runs recorded before recipe_spec carried
    max_hadamard_block keep it in their configuration; runs recorded before step_init existed used
    "mean_abs", the default then."""
    from ..config import Recipe

    spec = run.get("recipe_spec", run["recipe"])
    cfg = run.get("config") or {}
    r = Recipe.of(spec)
    if cfg.get("max_hadamard_block") is not None:
        r = dataclasses.replace(r, max_hadamard_block=cfg["max_hadamard_block"])
    if not r.uses_lsq:
        return r.label
    r = dataclasses.replace(r, step_init=cfg.get("step_init") or "mean_abs")
    scale = cfg.get("step_lr_scale")
    preset = PRESETS.get(run["task"], {}).get(run.get("preset", ""), {}).get("step_lr_scale")
    if scale is None or preset is None or scale == preset:
        return r.label
    return f"{r.label} step_lr_scale={scale!r}"



def _spec_order(spec: str) -> tuple[int, str]:
    name = spec.split(":", 1)[0].split(" ", 1)[0]
    return (RECIPES.index(name) if name in RECIPES else len(RECIPES), spec)


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def _cells(runs: list[dict[str, Any]], task: str) -> dict[str, list[dict[str, Any]]]:
    """The runs of `task` by row: the recipe spec (variants such as hq_lss:lss_budget=1.5 get rows of
    their own), and when the runs of the task differ in length, the spec with its step count, so that
    runs of different lengths are never averaged together."""
    mine = [r for r in runs if r["task"] == task]
    several = len({r["steps"] for r in mine}) > 1
    cells: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in mine:
        cells[f"{_spec(r)} @{r['steps']} steps" if several else _spec(r)].append(r)
    return cells


def summarize(runs: list[dict[str, Any]]) -> str:
    lines = []
    for task in TASKS:
        cells = _cells(runs, task)
        recipes = sorted(cells, key=_spec_order)
        if not recipes:
            continue
        any_run = cells[recipes[0]][0]
        steps = ", ".join(str(n) for n in sorted({r["steps"] for rs in cells.values() for r in rs}))
        metric = "validation loss (nats/char)" if task == "lm" else "test accuracy (%)"
        lines.append(f"### {task}: {metric}, mean ± std over seeds\n")
        lines.append(f"device: {any_run['device']} · preset {any_run['preset']} · "
                     f"{steps} steps · torch {any_run['torch_version']}\n")
        head = "| recipe | " + ("val loss" if task == "lm" else "accuracy") + " | vs fp | seeds | s/step |"
        lines += [head, "|---|---|---|---|---|"]
        for rc in recipes:
            rs = sorted(cells[rc], key=lambda r: r["seed"])
            mean, std = mean_std([_metric(r) for r in rs])
            # The fp row of the same length is the reference.
            fp_rows = [r for rr in cells.values() for r in rr
                       if _spec(r) == "fp" and r["steps"] == rs[0]["steps"]]
            fp = mean_std([_metric(r) for r in fp_rows])[0] if fp_rows else None
            if fp is None or _spec(rs[0]) == "fp":
                gap = "—"
            elif task == "lm":
                gap = f"{100.0 * (mean - fp) / fp:+.2f}%"
            else:
                gap = f"{mean - fp:+.2f} pt"
            per_step = sum(r["train_time_s"] / r["steps"] for r in rs) / len(rs)
            std_s = "n/a" if math.isnan(std) else f"{std:.{4 if task == 'lm' else 2}f}"
            val = f"{mean:.4f} ± {std_s}" if task == "lm" else f"{mean:.2f} ± {std_s}"
            seeds = ",".join(str(r["seed"]) for r in rs)
            lines.append(f"| {rc} | {val} | {gap} | {seeds} | {per_step:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot_tasks(runs: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({r["task"] for r in runs}):
        recipes = _cells(runs, task)
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        for i, rc in enumerate(sorted(recipes, key=_spec_order)):
            curves = [r["loss_curve"] for r in recipes[rc]]
            length = min(len(c) for c in curves)
            mean = [sum(c[j] for c in curves) / len(curves) for j in range(length)]
            beta = min(0.98, 1.0 - 1.0 / max(2.0, length / 50.0))
            ax.plot(range(1, length + 1), ema(mean, beta), color=f"C{i}", linewidth=1.6,
                    label=f"{rc} ({len(curves)} seeds)")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (mean over seeds, smoothed)")
        ax.set_title(f"{task}: training loss per recipe")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = folder / f"{task}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "run":
        return run_all(args)
    runs = load_runs(args.folders)
    if not runs:
        print(f"error: no metrics.json with runs below {', '.join(args.folders)}", file=sys.stderr)
        return 2
    text = summarize(runs)
    if args.md:
        Path(args.md).write_text(text + "\n")
    else:
        print(text)
    if args.plots:
        for p in plot_tasks(runs, Path(args.plots)):
            print(f"wrote {p}")
    if args.json:
        write_runs(runs, Path(args.json))
        print(f"wrote {args.json} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
