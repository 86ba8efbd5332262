#!/usr/bin/env python3
"""The SASS instruction mix of the CUDA kernels, on a machine without a GPU.

Compiles a CUDA source of src/cuda/ for one architecture (nvcc -cubin, the library's flags), or takes
a cubin or an executable, disassembles it (cuobjdump -sass) and prints, for each kernel whose
mangled or demangled name contains --kernel: its static instruction count and opcode histogram, and
each loop (a branch back to a lower address) with its body's size and histogram. A grid-stride
kernel's body is where its time goes, so a change's effect on the instructions a chunk takes can be
read here before a GPU call (static counts: every path of the body, taken or not; ncu's
smsp__inst_executed gives the dynamic ones).

cuobjdump comes with the CUDA toolkit; where the toolkit lacks it (the CPU machine's has nvcc but no
cuobjdump), the copy that Triton bundles (triton/backends/nvidia/bin, installed with torch) works.

Usage: scripts/sass_mix.py src/cuda/hadamard_lsq.cu --kernel hadamard_lsq_kernel --top 20
       scripts/sass_mix.py build-gpu/bench_gpu/int4train_gpu_bench --kernel dw_epilogue --loops
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "/*0a40*/   @!P1 LOP3.LUT R34, R27, UR14, R0, 0x96, !PT ;" -> address, predicate, opcode, operands
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_FUNC = re.compile(r"Function : (\S+)")


@dataclass
class Instr:
    address: int
    opcode: str  # with its modifiers, e.g. IMAD.WIDE.U32
    predicate: str
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Kernel:
    name: str
    instrs: list[Instr] = field(default_factory=list)

    def histogram(self, lo: int = 0, hi: int | None = None) -> collections.Counter:
        return collections.Counter(
            i.base for i in self.instrs if i.address >= lo and (hi is None or i.address < hi))

    def loops(self) -> list[tuple[int, int]]:
        """(first, last) addresses of each loop: a branch back to a lower address (not the
        branch to itself that pads the code after the last EXIT)."""
        out = []
        for i in self.instrs:
            if i.base != "BRA":
                continue
            target = branch_target(i.operands)
            if target is not None and target < i.address:
                out.append((target, i.address))
        return out


def branch_target(operands: str) -> int | None:
    """The immediate target of a branch (its last operand, 0x...), or None (an indirect one)."""
    last = operands.replace(",", " ").split()
    return int(last[-1], 16) if last and last[-1].startswith("0x") else None


def parse_sass(text: str) -> list[Kernel]:
    """cuobjdump -sass output as kernels and their instructions, in address order."""
    kernels: list[Kernel] = []
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            kernels.append(Kernel(m.group(1)))
            continue
        m = _INSTR.match(line)
        if m and kernels:
            kernels[-1].instrs.append(
                Instr(int(m.group(1), 16), m.group(3), (m.group(2) or "").strip(),
                      m.group(4).strip()))
    return kernels


def find_cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(str(Path(os.environ[env]) / "bin" / "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    try:
        import triton  # noqa: F401  (only to find its bundled tools)
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" /
                              "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit("sass_mix.py: no cuobjdump found (looked in PATH, $CUDA_HOME/bin, "
                     "/usr/local/cuda/bin and triton/backends/nvidia/bin); install the CUDA "
                     "toolkit's cuobjdump or torch's triton")


def compile_cubin(source: Path, arch: str, out: Path) -> None:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cmd = [nvcc, "-DINT4TRAIN_WITH_CUDA=1", f"-I{ROOT / 'include'}", f"-I{ROOT / 'src' / 'core'}",
           f"-I{ROOT / 'src' / 'cpu'}", "-O3", "-DNDEBUG", "-std=c++17", f"-arch={arch}",
           "--expt-relaxed-constexpr", "-cubin", str(source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sass_mix.py: {' '.join(cmd)} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = done.stdout.splitlines()
    return out if done.returncode == 0 and len(out) == len(names) else names


def format_histogram(h: collections.Counter, top: int) -> str:
    return ", ".join(f"{op} {n}" for op, n in h.most_common(top))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="a .cu source (compiled with nvcc -cubin), a .cubin or a binary")
    ap.add_argument("--kernel", default="", help="kernels whose name contains this (default: all)")
    ap.add_argument("--arch", default="sm_90a", help="nvcc -arch for a .cu source (default sm_90a)")
    ap.add_argument("--top", type=int, default=25, help="opcodes listed per histogram (default 25)")
    ap.add_argument("--loops", action="store_true", help="also each loop body's size and histogram")
    args = ap.parse_args(argv)
    if args.top < 1:
        raise SystemExit(f"sass_mix.py: --top must be a positive integer, got {args.top}")
    path = Path(args.input)
    if not path.is_file():
        raise SystemExit(f"sass_mix.py: input: no such file: {path}")
    with tempfile.TemporaryDirectory() as tmp:
        target = path
        if path.suffix == ".cu":
            target = Path(tmp) / (path.stem + ".cubin")
            compile_cubin(path, args.arch, target)
        done = subprocess.run([find_cuobjdump(), "-sass", str(target)], capture_output=True,
                              text=True)
    if done.returncode != 0:
        raise SystemExit(f"sass_mix.py: cuobjdump -sass {target} failed ({done.returncode}):\n"
                         f"{done.stderr[-2000:]}")
    kernels = parse_sass(done.stdout)
    names = demangle([k.name for k in kernels])
    shown = [(k, n) for k, n in zip(kernels, names) if args.kernel in k.name or args.kernel in n]
    if not shown:
        raise SystemExit(f"sass_mix.py: --kernel: no kernel of {len(kernels)} in {path} contains "
                         f"{args.kernel!r}")
    for k, name in shown:
        print(f"{name}\n  {len(k.instrs)} instructions: {format_histogram(k.histogram(), args.top)}")
        if args.loops:
            for lo, hi in k.loops():
                h = k.histogram(lo, hi + 1)
                print(f"  loop {lo:#x}..{hi:#x}: {sum(h.values())} instructions: "
                      f"{format_histogram(h, args.top)}")


if __name__ == "__main__":
    sys.exit(main())
