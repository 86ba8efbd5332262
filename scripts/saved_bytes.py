"""Bytes a linear layer keeps for its backward, Int4Linear against nn.Linear (issue 4), measured: the
tensors autograd saves during one training forward (torch.autograd.graph.saved_tensors_hooks), each
storage counted once, the layer's own parameters left out (they exist anyway), the input counted
(saving it keeps it alive). Two settings: a bf16 model (bf16 weights and inputs: nn.Linear keeps x),
and an fp32 model under bf16 autocast (both layers also keep the bf16 copy of their weight that
autocast made). The ratio is the layer's bytes over nn.Linear's in the same setting. Prints a
Markdown table; runs on CUDA when there is a GPU, else on the CPU (the same tensors are saved).

    python scripts/saved_bytes.py [--recipes hq_bs:dense_fallback=never,hq_lss:dense_fallback=never]
        [--shapes 8192x4096x4096,...] [--device D]

The recipes default to every call quantized: under the small-shape rule (the default,
dense_fallback=auto) a CUDA call below 2^37 multiply-adds (2^38 for hq_lss) is F.linear and keeps
what nn.Linear keeps.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

import int4train
from bench_module import SHAPES, parse_shapes  # issue 4's shapes; scripts/ is on the path


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the storages autograd keeps from one forward of `layer` on x, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(kept.values())


def measure(n: int, d: int, c: int, recipes: list, device: str, autocast: bool) -> list:
    dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if autocast else (
        contextlib.nullcontext())
    out = []
    with ctx:
        lin = nn.Linear(d, c, device=device, dtype=dtype)
        out.append(saved_bytes(lin, x))
        for r in recipes:
            layer = int4train.Int4Linear.from_linear(lin, recipe=r)
            with torch.no_grad():
                layer(x)  # the first batch initialises the layer (nothing is saved without grad)
            out.append(saved_bytes(layer, x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default="hq_bs:dense_fallback=never,hq_lss:dense_fallback=never")
    ap.add_argument("--shapes", default=SHAPES, help="comma list of TOKENSxINxOUT")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    recipes = int4train.config.split_specs(args.recipes)
    shapes = parse_shapes(args.shapes)
    print(f"bytes saved for backward per layer, {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}\n")
    head = "| shape (tokens x in -> out) | setting | nn.Linear |" + "".join(
        f" {r} | ratio |" for r in recipes)
    print(head)
    print("|" + "---|" * (3 + 2 * len(recipes)))
    for n, d, c in shapes:
        for autocast in (False, True):
            b = measure(n, d, c, recipes, args.device, autocast)
            row = f"| {n}x{d}->{c} | {'fp32 + bf16 autocast' if autocast else 'bf16'} | " \
                  f"{b[0] / 2**20:.1f} MiB |"
            for v in b[1:]:
                row += f" {v / 2**20:.1f} MiB | {v / b[0]:.4f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
