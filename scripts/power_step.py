"""A training step under sustained load: time, board power, SM clock and energy per step of
int4train.Int4Linear against nn.Linear (bf16) on a CUDA device, on issue 4's large shapes. Each
layer runs steps back to back for --seconds (as in training), the layers taking turns for --rounds
rounds; the first --settle seconds of each turn are left out (the clocks move to where the power
limit holds them). Power and the SM clock are polled from nvidia-smi (power.draw.instant where the
driver has it, else power.draw) while the steps run. A GPU held at its power limit runs at the
clock that the limit allows, so what a step costs is its energy, and profilers that time one kernel
at a time (ncu, at the boost clock) give shorter times than the same kernels take in training.

    python scripts/power_step.py [--shapes 8192x4096x4096,...] [--recipes hq_bs]
        [--seconds 3] [--settle 1] [--rounds 2] [--iters 10]

Prints, per shape, a Markdown table: ms per step (median of the turns), mean power (W), mean SM
clock (MHz) and the polls they average, energy per step (mJ = W x ms), and nn.Linear's time and
energy over the layer's (above 1: faster, less energy than bf16).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import threading
import time

import torch
from torch import nn

import int4train
from bench_module import parse_shapes, train_step  # scripts/ is on the path

SHAPES = "8192x4096x4096,8192x4096x16384,8192x16384x4096"


class Poller(threading.Thread):
    """Polls (host time, power W, SM clock MHz) from nvidia-smi for one GPU until stopped."""

    def __init__(self, gpu: str, period_s: float) -> None:
        super().__init__(daemon=True)
        self.gpu, self.period = gpu, period_s
        self.samples: list = []
        self.field = "power.draw.instant" if self._query("power.draw.instant") else "power.draw"
        if self._query(self.field) is None:
            raise SystemExit(f"power_step.py: nvidia-smi -i {gpu} gave no {self.field} reading")
        self._stop_event = threading.Event()

    def _query(self, power_field: str):
        """(W, MHz), or None where nvidia-smi gives no number (a failed call, "[N/A]")."""
        answer = smi(self.gpu, f"{power_field},clocks.sm", "nounits")
        try:
            power, clock = (float(v) for v in answer.split(","))
        except ValueError:
            return None
        return power, clock

    def run(self) -> None:
        while not self._stop_event.is_set():
            t = time.time()
            reading = self._query(self.field)
            if reading is not None:
                self.samples.append(((t + time.time()) / 2, *reading))
            self._stop_event.wait(self.period)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def window_means(samples: list, t0: float, t1: float) -> tuple:
    """(mean power, mean clock, count) of the (time, power, clock) samples in [t0, t1]; NaNs and
    0 where none falls there."""
    inside = [(p, c) for t, p, c in samples if t0 <= t <= t1]
    if not inside:
        return float("nan"), float("nan"), 0
    return (statistics.fmean(p for p, _ in inside), statistics.fmean(c for _, c in inside),
            len(inside))


def smi(gpu: str, fields: str, units: str = "") -> str:
    """nvidia-smi's CSV answer for `fields` of one GPU (`units`: "nounits" to drop them); "" where
    nvidia-smi fails or is missing."""
    fmt = "csv,noheader" + (f",{units}" if units else "")
    try:
        return subprocess.run(["nvidia-smi", "-i", gpu, f"--query-gpu={fields}", f"--format={fmt}"],
                              capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def turn(step, poller: Poller, seconds: float, settle: float, iters: int) -> tuple:
    """Steps back to back for `seconds`; (ms per step, W, MHz, samples) after the first `settle`."""
    t_start = time.time()
    events = []
    while time.time() - t_start < seconds:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            step()
        b.record()
        b.synchronize()  # the burst's end on the host clock, to match the polls against
        events.append((time.time(), a, b))
    kept = [(a, b) for t, a, b in events if t - t_start >= settle]
    if not kept:
        raise SystemExit(f"power_step.py: no burst ended after --settle {settle} s within "
                         f"--seconds {seconds} s; give more seconds or fewer --iters")
    ms = statistics.median(a.elapsed_time(b) / iters for a, b in kept)
    power, clock, n = window_means(poller.samples, t_start + settle, time.time())
    return ms, power, clock, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma list of TOKENSxINxOUT")
    ap.add_argument("--recipes", default="hq_bs", help="comma list of recipe specs")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of one layer's turn")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds of each turn left out of the means")
    ap.add_argument("--rounds", type=int, default=2, help="turns per layer")
    ap.add_argument("--iters", type=int, default=10, help="steps per timed burst")
    ap.add_argument("--period", type=float, default=0.05, help="seconds between two polls")
    args = ap.parse_args()
    for name in ("seconds", "period"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 <= args.settle < args.seconds:
        ap.error(f"--settle must be in [0, --seconds), got {args.settle}")
    for name in ("rounds", "iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        raise SystemExit("power_step.py: needs a CUDA device")
    recipes = [int4train.Recipe.of(r) for r in int4train.config.split_specs(args.recipes)]
    index = torch.cuda.current_device()
    gpu = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
    if not smi(gpu, "name"):  # a driver that does not take the UUID: the index, as CUDA numbers it
        gpu = str(index)
    poller = Poller(gpu, args.period)
    print(f"device: {torch.cuda.get_device_name()} ({smi(gpu, 'power.limit,clocks.max.sm')}: "
          f"power limit, max SM clock), torch {torch.__version__}, int4train "
          f"{int4train.__version__}; {args.rounds} turns of {args.seconds:g} s per layer, the "
          f"first {args.settle:g} s of each left out; power from nvidia-smi {poller.field}")
    poller.start()
    try:
        for n, d, c in shapes:
            torch.manual_seed(0)
            lin = nn.Linear(d, c, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
            layers = [("nn.Linear bf16", lin)] + [
                (r.label, int4train.Int4Linear.from_linear(lin, recipe=r)) for r in recipes]
            steps = [functools.partial(train_step, layer, x, gy) for _, layer in layers]
            for step in steps:
                for _ in range(3):
                    step()
            torch.cuda.synchronize()
            results = [[] for _ in layers]
            for _ in range(args.rounds):
                for i, step in enumerate(steps):
                    results[i].append(turn(step, poller, args.seconds, args.settle, args.iters))
            print(f"\n{n}x{d}->{c}\n")
            print("| layer | ms/step | W | SM MHz | polls | mJ/step | speed vs bf16 | "
                  "energy vs bf16 |")
            print("|---|---|---|---|---|---|---|---|")
            rows = []
            for (label, _), res in zip(layers, results):
                ms = statistics.median(r[0] for r in res)
                watts = statistics.median(r[1] for r in res)
                mhz = statistics.median(r[2] for r in res)
                polls = sum(r[3] for r in res)
                rows.append((label, ms, watts, mhz, polls, ms * watts))
            base_ms, base_mj = rows[0][1], rows[0][5]
            for label, ms, watts, mhz, polls, mj in rows:
                print(f"| {label} | {ms:.3f} | {watts:.0f} | {mhz:.0f} | {polls} | {mj:.0f} | "
                      f"{base_ms / ms:.2f}x | {base_mj / mj:.2f}x |", flush=True)
            del layers, steps, lin, x, gy
            torch.cuda.empty_cache()
    finally:
        poller.stop()


if __name__ == "__main__":
    main()
