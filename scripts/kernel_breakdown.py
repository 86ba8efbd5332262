"""Where one training step's GPU time goes, kernel by kernel: ncu on the kernel benchmark's
--profile-step (a warm-up forward and backward of one layer, then the measured ones; the C++ API, no
PyTorch), each kernel timed alone, for each shape; one markdown table of the measured step's kernels
in launch order (µs, and with --instructions executed warp instructions), then the three products'
share and the rest's.

    python3 scripts/kernel_breakdown.py [--bench build-gpu/bench_gpu/int4train_gpu_bench]
        [--recipe hq_bs] [--shapes 8192x4096x4096,8192x16384x4096,8192x4096x16384]
        [--instructions] [--from-csv SHAPE=FILE ...]

--from-csv formats the CSV that `ncu --csv --print-units base` printed for a shape (the same run by
hand, or kept from an earlier call) instead of running ncu. Kernels are timed serialised, with the
clocks left as they are (`--clock-control none`), so the sum is a little above a step's time in a
benchmark; the products are cuBLASLt's kernels (names with nvjet, gemm, xmma or cutlass, outside
int4train's namespace).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys

TIME = "gpu__time_duration.sum"
INSTR = "smsp__inst_executed.sum"
PRODUCT_MARKS = ("nvjet", "gemm", "xmma", "cutlass")


def is_product_name(name: str) -> bool:
    """Whether a kernel is one of cuBLASLt's products (by its name)."""
    low = name.lower()
    return "int4train" not in low and any(m in low for m in PRODUCT_MARKS)


class Kernel:
    """One launch: its name as ncu prints it and its metrics by name."""

    def __init__(self, name: str):
        self.name = name
        self.metrics: dict[str, float] = {}

    @property
    def is_product(self) -> bool:
        return is_product_name(self.name)


def parse_ncu_csv(text: str) -> list[Kernel]:
    """The kernels of ncu's --csv output in launch order (one row per kernel and metric)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if not lines:
        raise ValueError("no CSV rows in ncu's output (did the benchmark run under ncu?)")
    kernels: dict[str, Kernel] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        missing = {"ID", "Kernel Name", "Metric Name", "Metric Value"} - row.keys()
        if missing:
            raise ValueError(f"ncu CSV without the columns {sorted(missing)}")
        k = kernels.setdefault(row["ID"], Kernel(row["Kernel Name"]))
        k.metrics[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    return list(kernels.values())


def measured_step(kernels: list[Kernel]) -> list[Kernel]:
    """The second of the two steps --profile-step runs (the first is the warm-up)."""
    if len(kernels) % 2:
        raise ValueError(f"expected the launches of two identical steps, got {len(kernels)} "
                         "kernels")
    half = len(kernels) // 2
    first, second = kernels[:half], kernels[half:]
    if [k.name for k in first] != [k.name for k in second]:
        raise ValueError("the warm-up step and the measured step launched different kernels")
    return second


def short_name(name: str) -> str:
    """A kernel's name without namespaces, return type and arguments (cuBLASLt's as they are)."""
    if is_product_name(name):
        return name.split("(")[0][:60]
    name = re.sub(r"(\bint4train|\bcuda_detail|<unnamed>|\(anonymous namespace\))::", "", name)
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(int\)|\(bool\)", "", name)
    depth, out = 0, []
    for ch in name:  # drop the argument list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            break
        out.append(ch)
    return "".join(out).strip()


def format_table(steps: dict[str, list[Kernel]], instructions: bool) -> str:
    """One table, a row per kernel of the measured step and a column per shape; the shapes must have
    launched the same kernels (else a table each)."""
    shapes = list(steps)
    names = [[short_name(k.name) for k in steps[s]] for s in shapes]
    if any(n != names[0] for n in names[1:]):
        return "\n\n".join(format_table({s: steps[s]}, instructions) for s in shapes)

    def cell(k: Kernel) -> str:
        t = f"{k.metrics[TIME] / 1e3:.1f}"
        return f"{t} ({k.metrics[INSTR] / 1e6:.2f} M)" if instructions else t

    head = "| kernel, in launch order | " + " | ".join(shapes) + " |"
    rows = [head, "|---|" + "---|" * len(shapes)]
    for i, name in enumerate(names[0]):
        rows.append(f"| `{name}` | " + " | ".join(cell(steps[s][i]) for s in shapes) + " |")
    total = [sum(k.metrics[TIME] for k in steps[s]) / 1e3 for s in shapes]
    prod = [sum(k.metrics[TIME] for k in steps[s] if k.is_product) / 1e3 for s in shapes]
    rows.append("| all (µs) | " + " | ".join(f"{t:.0f}" for t in total) + " |")
    rows.append("| the products | " + " | ".join(
        f"{p:.0f} ({100 * p / t:.0f}%)" for p, t in zip(prod, total)) + " |")
    rows.append("| everything else | " + " | ".join(
        f"{t - p:.0f} ({100 * (t - p) / t:.0f}%)" for p, t in zip(prod, total)) + " |")
    return "\n".join(rows)


def parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shapes: expected TOKENSxINxOUT with positive integers, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def run_ncu(bench: str, shape: tuple[int, int, int], recipe: str, instructions: bool) -> str:
    metrics = TIME + (f",{INSTR}" if instructions else "")
    cmd = ["ncu", "--clock-control", "none", "--csv", "--print-units", "base", "--metrics", metrics,
           "-c", "400", bench, "--profile-step", *map(str, shape), recipe]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kernel_breakdown.py: {' '.join(cmd)} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="build-gpu/bench_gpu/int4train_gpu_bench")
    ap.add_argument("--recipe", default="hq_bs")
    ap.add_argument("--shapes", default="8192x4096x4096,8192x16384x4096,8192x4096x16384")
    ap.add_argument("--instructions", action="store_true", help="also count warp instructions")
    ap.add_argument("--from-csv", nargs="+", metavar="SHAPE=FILE",
                    help="format these ncu CSV outputs instead of running ncu")
    args = ap.parse_args(argv)
    steps: dict[str, list[Kernel]] = {}
    try:
        if args.from_csv:
            for item in args.from_csv:
                shape, sep, path = item.partition("=")
                if not sep:
                    raise ValueError(f"--from-csv: expected SHAPE=FILE, got {item!r}")
                with open(path, encoding="utf-8") as f:
                    steps[shape] = measured_step(parse_ncu_csv(f.read()))
        else:
            for text in args.shapes.split(","):
                shape = parse_shape(text)
                steps[text] = measured_step(
                    parse_ncu_csv(run_ncu(args.bench, shape, args.recipe, args.instructions)))
        if args.instructions and any(INSTR not in k.metrics for ks in steps.values() for k in ks):
            raise ValueError(f"--instructions: the CSV has no {INSTR} (ncu --metrics ...,{INSTR})")
    except (OSError, ValueError) as e:
        raise SystemExit(f"kernel_breakdown.py: {e}") from e
    what = "ncu's CSV" if args.from_csv else f"one {args.recipe} step"
    print(f"{what}, tokens x in x out per column; each kernel timed alone by ncu")
    print(format_table(steps, args.instructions))


if __name__ == "__main__":
    main(sys.argv[1:])
