"""What a PyTorch user sees: one training step (forward + backward) of int4train.Int4Linear against
nn.Linear on a CUDA device, bf16 weights and inputs, on the layer shapes of issue 4: the recipes
with every call quantized (dense_fallback=never) beside the default (the small-shape rule,
dense_fallback=auto, which runs a call below 2^37 multiply-adds, 2^38 for hq_lss, as F.linear).
Steps run back to back as in training (no synchronisation between them), `--iters` steps between
two CUDA events; the layers of a shape take turns for `--rounds` rounds, the rounds' orders the
rows of a Williams design (within the rounds each layer runs right after every other layer
equally often: the layer that ran before changes a step's time; the last layer of a round before
the next round's first is not balanced), so that a drift of the machine's speed and the
neighbours hit all layers alike; each time is the median per step over the rounds. Where the GPU
work is short (BERT-base's shape) this measures the host's cost of launching a step (Python,
autograd, the op's dispatch), as training does; such host-bound times move by 10-30% between
runs. With --graphs every layer's step (nn.Linear's too) is captured once in a CUDA graph and
replayed, which takes the host out: what torch.cuda.graphs /
torch.compile(mode="reduce-overhead") give a host-bound model. The ratio is nn.Linear's time over
the layer's, so above 1 is faster than bf16. With --autocast the weights and inputs are fp32 and
each forward runs under bf16 autocast (nn.Linear's too; the casts are part of the step). Prints a
Markdown table.

    python scripts/bench_module.py [--iters 20]
        [--recipes hq_bs:dense_fallback=never,hq_lss:dense_fallback=never,hq_bs]
        [--shapes 8192x4096x4096,...] [--graphs] [--autocast]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch import nn

import int4train
from kernel_breakdown import parse_shape  # TOKENSxINxOUT (scripts/ is on the path)

SHAPES = "8192x4096x4096,8192x4096x16384,8192x16384x4096,16384x1024x4096,4096x768x3072"


def parse_shapes(value: str) -> list:
    """"TOKENSxINxOUT,..." as (tokens, in, out) triples (kernel_breakdown.py's parse_shape); a bad
    item ends the program naming it."""
    try:
        return [parse_shape(item.strip()) for item in value.split(",")]
    except ValueError as e:
        raise SystemExit(f"{sys.argv[0]}: {e}") from None


def clear_grads(layer: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def forward_backward(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, amp: bool) -> None:
    """The forward (under bf16 autocast with `amp`, its own autocast region per step, as in
    training: autocast's cast of a weight lives one forward) and the backward of gy."""
    if amp:
        # Without its cache, autocast casts a weight at each use (a CUDA graph capture needs that).
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = layer(x)
    else:
        y = layer(x)
    y.backward(gy)


def train_step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, amp: bool = False) -> None:
    """One training step as the benchmarks time it: gradients unset, forward, backward of gy."""
    clear_grads(layer, x)
    forward_backward(layer, x, gy, amp)


def williams_orders(n: int) -> list:
    """The rows of a Williams design for n layers: orders in which every layer comes right after
    every other layer equally often (once per row pair for odd n, once per n rows for even n), and
    equally often in each place. Row 0 is 0, 1, n-1, 2, n-2, ...; row i adds i mod n; odd n adds the
    reversed rows."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(v + i) % n for v in first] for i in range(n)]
    return rows + [row[::-1] for row in rows] if n % 2 else rows


def step_times_ms(layers: list, x: torch.Tensor, gy: torch.Tensor, iters: int, rounds: int,
                  graphs: bool, amp: bool = False) -> list:
    """Median time per training step of each layer, the layers taking turns round by round."""
    def step(layer: nn.Module) -> None:
        train_step(layer, x, gy, amp)

    def graphed(layer: nn.Module):
        # Warm-up steps on a side stream (the layer initialises there), then one step captured with
        # the gradients unset: each replay writes them anew, as the eager step does.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(layer)
        torch.cuda.current_stream().wait_stream(side)
        clear_grads(layer, x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward_backward(layer, x, gy, amp)
        return graph.replay

    steps = [graphed(layer) if graphs else (lambda layer=layer: step(layer)) for layer in layers]
    for run in steps:
        for _ in range(3):
            run()
    torch.cuda.synchronize()
    times = [[] for _ in layers]
    # A layer's time depends on the layer before it (on an H200 the steps right after nn.Linear's
    # bf16 steps ran 7-8% slower; the same GPU work in another place ran faster), so the rounds
    # follow a Williams design: every layer after every other equally often over whole designs.
    orders = williams_orders(len(steps))
    for r in range(rounds):
        for i in orders[r % len(orders)]:
            run = steps[i]
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                run()
            b.record()
            b.synchronize()
            times[i].append(a.elapsed_time(b) / iters)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=12,
                    help="rounds per shape; a multiple of the design's rows (the layers' count, "
                         "twice that when odd) balances the neighbours exactly")
    ap.add_argument("--recipes",
                    default="hq_bs:dense_fallback=never,hq_lss:dense_fallback=never,hq_bs")
    ap.add_argument("--shapes", default=SHAPES,
                    help="comma list of TOKENSxINxOUT (default: issue 4's five shapes)")
    ap.add_argument("--graphs", action="store_true",
                    help="replay each layer's step from a CUDA graph (no host cost)")
    ap.add_argument("--autocast", action="store_true",
                    help="fp32 weights and inputs, each forward under bf16 autocast (nn.Linear too)")
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        raise SystemExit("bench_module.py: needs a CUDA device")
    recipes = [int4train.Recipe.of(r) for r in int4train.config.split_specs(args.recipes)]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"int4train {int4train.__version__}; per step (forward + backward), median of "
          f"{args.rounds} rounds of {args.iters} back-to-back steps, the layers taking turns"
          + ("; every step replayed from a CUDA graph" if args.graphs else "")
          + ("; fp32 weights and inputs under bf16 autocast" if args.autocast else ""))
    base_label = "nn.Linear, autocast" if args.autocast else "nn.Linear bf16"
    head = f"| tokens x in -> out | {base_label} | " + " | ".join(r.label for r in recipes) + " |"
    print(head)
    print("|" + "---|" * (2 + len(recipes)))
    for n, d, c in shapes:
        torch.manual_seed(0)
        dtype = torch.float32 if args.autocast else torch.bfloat16
        lin = nn.Linear(d, c, device="cuda", dtype=dtype)
        x = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
        gy = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
        layers = [int4train.Int4Linear.from_linear(lin, recipe=r) for r in recipes]
        base, *rest = step_times_ms([lin] + layers, x, gy, args.iters, args.rounds, args.graphs,
                                    args.autocast)
        cells = [f"{t:.3f} ms ({base / t:.2f}x)" for t in rest]
        del layers
        print(f"| {n}x{d}->{c} | {base:.3f} ms | " + " | ".join(cells) + " |", flush=True)
        del lin, x, gy
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
