"""Where one training step of a layer spends the host's time on a CUDA device: Int4Linear (any recipes)
beside nn.Linear at one shape, bf16. For each layer: the wall time per step (steps back to back, as in
training), the GPU's kernel time per step, the runtime calls per step (kernel launches, memsets,
allocations, synchronisations) and the operators with the most host time (torch.profiler, self CPU
time per step). Where the wall time is well above the kernel time, the step is host-bound and the
operator list says what to cut.

    python scripts/profile_step.py [--shape 4096,768,3072]
        [--recipes hq_bs:dense_fallback=never,hq_lss:dense_fallback=never,hq_bs] [--top 12]
        [--kernels N]

--kernels N also lists each layer's N kernels with the most GPU time per step (where a large
shape's step spends its time beyond the kernels that scripts/kernel_breakdown.py times).
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import int4train
from bench_module import train_step  # the step bench_module.py times (scripts/ is on the path)

RUNTIME_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                 "cudaMemsetAsync", "cudaMemcpyAsync", "cudaMalloc", "cudaFree",
                 "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096,768,3072", help="tokens,in,out")
    ap.add_argument("--recipes",
                    default="hq_bs:dense_fallback=never,hq_lss:dense_fallback=never,hq_bs")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--kernels", type=int, default=0, metavar="N",
                    help="also list the N kernels with the most GPU time per step")
    args = ap.parse_args()
    if args.kernels < 0:
        ap.error(f"--kernels must be 0 or more, got {args.kernels}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py: needs a CUDA device")
    n, d, c = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    lin = nn.Linear(d, c, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    layers = [("nn.Linear", lin)] + [
        (r, int4train.Int4Linear.from_linear(lin, recipe=r))
        for r in int4train.config.split_specs(args.recipes)]

    def step(layer: nn.Module) -> None:
        train_step(layer, x, gy)

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; shape {n}x{d}->{c} "
          f"bf16; {args.steps} steps per measurement")
    summary = []
    for name, layer in layers:
        for _ in range(5):
            step(layer)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step(layer)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) / args.steps * 1e6
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step(layer)
            torch.cuda.synchronize()
        events = prof.key_averages()
        per = 1.0 / args.steps
        gpu_us = sum(e.self_device_time_total for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA) * per
        calls = collections.Counter()
        for e in events:
            if e.key in RUNTIME_CALLS:
                calls[e.key] += e.count
        summary.append((name, wall_us, gpu_us, sum(calls[k] for k in RUNTIME_CALLS[:4]) * per))
        print(f"\n## {name}: wall {wall_us:.1f} us/step, kernels {gpu_us:.1f} us/step")
        print("runtime calls per step: " + ", ".join(
            f"{k} {v * per:.1f}" for k, v in sorted(calls.items())))
        cpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.self_cpu_time_total, reverse=True)
        print("| operator | calls/step | self host us/step |")
        print("|---|---|---|")
        for e in cpu[:args.top]:
            print(f"| {e.key} | {e.count * per:.1f} | {e.self_cpu_time_total * per:.1f} |")
        if args.kernels > 0:
            gpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda e: e.self_device_time_total, reverse=True)
            print("\n| kernel | launches/step | GPU us/step |")
            print("|---|---|---|")
            for e in gpu[:args.kernels]:
                print(f"| `{e.key[:100]}` | {e.count * per:.1f} | "
                      f"{e.self_device_time_total * per:.1f} |")
    print("\n| layer | wall us/step | kernel us/step | launches/step |")
    print("|---|---|---|---|")
    for name, wall, gpu, launches in summary:
        print(f"| {name} | {wall:.1f} | {gpu:.1f} | {launches:.1f} |")


if __name__ == "__main__":
    main()
