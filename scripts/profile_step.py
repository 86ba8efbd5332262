"""Where one training step of a layer spends the host's time on a CUDA device: Int4Linear (any recipes)
beside nn.Linear at one shape, bf16. For each layer: the wall time per step (steps back to back, as in
training), the GPU's kernel time per step, the runtime calls per step (kernel launches, memsets,
allocations, synchronisations) and the operators with the most host time (torch.profiler, self CPU
time per step). Where the wall time is well above the kernel time, the step is host-bound and the
operator list says what to cut.

    python scripts/profile_step.py [--shape 4096,768,3072]
        [--recipes hq_bs:dense_fallback=never,hq_lss:dense_fallback=never,hq_bs] [--top 12]
        [--kernels N] [--pieces]

--kernels N also lists each layer's N kernels with the most GPU time per step (where a large
shape's step spends its time beyond the kernels that scripts/kernel_breakdown.py times).
--pieces also times the pieces of the first recipe's step on the host alone (perf_counter around
calls run back to back, no profiler; at a small shape the GPU keeps up, so this is the host's
time): the module's forward, the linear op with and without its autograd node, each op the node
calls, and two of PyTorch's calls (an allocation, a one-launch in-place add) for scale.
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
    ap.add_argument("--pieces", action="store_true",
                    help="also time the pieces of the first recipe's step on the host")
    args = ap.parse_args()
    if args.kernels < 0:
        ap.error(f"--kernels must be 0 or more, got {args.kernels}")
    specs = int4train.config.split_specs(args.recipes)
    if args.pieces and not (specs and int4train.Recipe.of(specs[0]).uses_lsq):
        ap.error(f"--pieces times the first recipe's LSQ ops: expected an LSQ recipe (lsq_luq, hq, "
                 f"hq_bs, hq_lss) first in --recipes, got {args.recipes!r}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py: needs a CUDA device")
    n, d, c = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    lin = nn.Linear(d, c, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    layers = [("nn.Linear", lin)] + [
        (r, int4train.Int4Linear.from_linear(lin, recipe=r))
        for r in specs]

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
    if args.pieces:
        host_pieces(layers[1][1], lin, x, gy, args.steps)
    print("\n| layer | wall us/step | kernel us/step | launches/step |")
    print("|---|---|---|---|")
    for name, wall, gpu, launches in summary:
        print(f"| {name} | {wall:.1f} | {gpu:.1f} | {launches:.1f} |")


def host_us(fn, calls: int) -> float:
    """The host's microseconds per call of fn, calls run back to back after a warm-up (the GPU is
    synchronised before and after, not between)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / calls * 1e6


def host_pieces(layer: nn.Module, lin: nn.Module, x: torch.Tensor, gy: torch.Tensor,
                steps: int) -> None:
    """The host's time for each piece of an Int4Linear step (see --pieces)."""
    ops = torch.ops.int4train
    calls = max(steps, 200)
    spec, block = layer.recipe.spec, layer._block
    seed = int4train.nn.rank_seed(layer.recipe.seed, layer._rank)
    w, b = layer.weight.detach(), layer.bias.detach()
    xs = x.detach()
    ps = (layer.input_step, layer.weight_step)
    sx, sw = ops._lsq_steps(*(p.detach() for p in ps))
    fwd = ops.linear_forward(xs, w, b, sx, sw, spec, block, seed, layer.step, 0)
    _, codes, aux, scale, saved = fwd
    mask = [True] * 5
    bwd = ops.linear_backward(gy, None, codes, aux, scale, w, sx, sw, spec, block, seed, saved, 0,
                              mask)
    tiny = torch.zeros(1, device=x.device)
    rows = []

    def row(name: str, fn) -> None:
        rows.append((name, host_us(fn, calls)))

    row("nn.Linear step", lambda: train_step(lin, x, gy))
    row("Int4Linear step", lambda: train_step(layer, x, gy))
    row("Int4Linear forward (x requires grad)", lambda: layer(x))
    with torch.no_grad():
        row("Int4Linear forward (no_grad)", lambda: layer(xs))
    row("nn.Linear forward (x requires grad)", lambda: lin(x))
    args = (layer.weight, layer.bias, ps[0], ps[1], spec, block, seed, layer.step, 0)
    row("int4train.linear, autograd (x requires grad)", lambda: ops.linear(x, *args))
    with torch.no_grad():
        row("int4train.linear, no_grad", lambda: ops.linear(xs, *args))
    row("_lsq_steps", lambda: ops._lsq_steps(sx, sw))
    row("linear_forward", lambda: ops.linear_forward(xs, w, b, sx, sw, spec, block, seed,
                                                     layer.step, 0))
    row("linear_backward", lambda: ops.linear_backward(gy, None, codes, aux, scale, w, sx, sw,
                                                       spec, block, seed, saved, 0, mask))
    row("_lsq_step_grads", lambda: ops._lsq_step_grads(sx, sw, bwd[3], bwd[4]))
    row("step counter add_", lambda: layer.step.add_(0))
    row("torch.empty (256 floats)", lambda: torch.empty(256, device=x.device))
    row("tiny.add_(1) (one launch)", lambda: tiny.add_(1))
    print(f"\n## host time per call ({calls} calls back to back; Int4Linear recipe "
          f"{layer.recipe.label})")
    print("| piece | host us/call |")
    print("|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
