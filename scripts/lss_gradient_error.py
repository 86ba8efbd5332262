"""Per-layer gradient error of the bit-split recipes on a real language model (docs/accuracy.md).

Trains the tiny character-level GPT of `python -m int4train.train --task lm --preset tiny` in fp32 for
--steps steps on Moby Dick, captures every block linear layer's input X and output gradient G on the
next batch, and for each layer reports
  - hi != 0: the fraction of tokens whose bit-split hi row is not all zero (|G| >= max|G| * 8/119
    somewhere in the row). Leverage score sampling assumes few such rows (row-sparse gradients);
  - nz/N: the non-zero rows of the 2N bit-split rows, in units of N (LSS keeps lss_budget * N of them);
  - p hi, p lo: the mean water-filled keep probability (input-gradient scores, budget N) of the non-zero
    hi rows and of the non-zero lo rows (bit split with round-to-nearest for this statistic);
  - the relative error ||est - exact|| / ||exact|| of the input gradient dX = G W and the weight
    gradient dW = G^T X, mean over --draws seeds, for hq_bs and for hq_lss at each --budgets value,
    once per --grad-scales value (the bit split's scale: tensor, row).

With --estimators it instead reports, per layer, the sampling error alone of the input gradient at
budget N (sqrt(sum (1/p_i - 1) ||R_i W||^2) / ||G W||, independent draws, the bit split's rows R as
hq_lss forms them) for three choices of p: the water-filled probabilities of scores ||R_i|| as they
are, the same rounded to powers of two (k <= 4, one threshold fitted to keep sum p <= N, as
lss_round_pow2 does), and an oracle water-filled on ||R_i W|| itself (the variance-optimal scores,
which cost the product to know): how much the rounding costs and how much better scores could give.

    python scripts/lss_gradient_error.py --steps 300 --budgets 1,1.5
    python scripts/lss_gradient_error.py --steps 300 --budgets 1 --grad-scales tensor,row
    python scripts/lss_gradient_error.py --steps 300 --estimators
"""

from __future__ import annotations

import argparse
import copy
import gzip
from pathlib import Path

import torch
import torch.nn.functional as F

import int4train
from int4train.train.models import GPT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data" / "moby-dick.txt.gz"))
    p.add_argument("--steps", type=int, default=300, help="fp32 training steps before the capture")
    p.add_argument("--budgets", default="1,1.5", help="comma list of hq_lss lss_budget values")
    p.add_argument("--draws", type=int, default=8, help="seeds per estimate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grad-scales", default="tensor",
                   help="comma list of the bit split's grad_scale (tensor, row): each recipe once per value")
    p.add_argument("--estimators", action="store_true",
                   help="the input gradient's sampling error under three choices of p (see above)")
    args = p.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    text = gzip.open(args.data, "rt", encoding="utf-8").read()
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    data = torch.tensor([vocab[c] for c in text], dtype=torch.long)
    ctx, batch = 128, 32  # the tiny preset's
    gen = torch.Generator().manual_seed(0)

    def sample():
        i = torch.randint(0, len(data) - ctx - 1, (batch,), generator=gen)
        return (torch.stack([data[j : j + ctx] for j in i]),
                torch.stack([data[j + 1 : j + ctx + 1] for j in i]))

    model = GPT(len(vocab), ctx, layers=2, d_model=128, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(args.steps):
        x, y = sample()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"fp32 training loss after {args.steps} steps: {loss.item():.3f}")

    captured: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name):
        def fwd(module, inputs, output):
            captured[name] = {"x": inputs[0].detach().reshape(-1, inputs[0].shape[-1]).clone()}

            def grad(g):
                captured[name]["g"] = g.detach().reshape(-1, g.shape[-1]).clone()

            output.register_hook(grad)

        return fwd

    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and n.startswith("blocks")]
    handles = [modules[n].register_forward_hook(hook(n)) for n in linears]
    x, y = sample()
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    for h in handles:
        h.remove()

    if args.estimators:
        for name in linears:
            estimator_errors(name, captured[name]["g"], modules[name].weight.detach())
        return
    recipes = []
    for gs in args.grad_scales.split(","):
        tag = "" if gs == "tensor" else f" {gs}"
        recipes += [(f"hq_bs{tag}", int4train.Recipe("hq_bs", grad_scale=gs))] + [
            (f"lss {b:g}{tag}", int4train.Recipe("hq_lss", lss_budget=b, grad_scale=gs))
            for b in budgets
        ]
    head = f"{'layer':16s} {'hi!=0':>6s} {'nz/N':>5s} {'p hi':>5s} {'p lo':>5s}"
    for label, _ in recipes:
        head += f" | {label + ' dX':>11s} {label + ' dW':>11s}"
    print(head)
    for name in linears:
        X, G = captured[name]["x"], captured[name]["g"]
        lin = modules[name]
        q = (G / (G.abs().max() / 119)).round()
        hi_rows = (q.abs() >= 8).any(1).float().mean().item()
        lo_rows = (q.abs() >= 1).any(1).float().mean().item()
        hi = torch.floor((q + 8) / 16)
        lo = q - 16 * hi
        scores = torch.cat([16 * hi.norm(dim=1), lo.norm(dim=1)]).float()
        probs = torch.ops.int4train.lss_probabilities(scores, float(G.shape[0]))
        n = G.shape[0]
        p_hi = probs[:n][scores[:n] > 0].mean().item()
        p_lo = probs[n:][scores[n:] > 0].mean().item()
        dx_ref, dw_ref = G @ lin.weight.detach(), G.t() @ X
        line = f"{name:16s} {hi_rows:6.2f} {hi_rows + lo_rows:5.2f} {p_hi:5.2f} {p_lo:5.2f}"
        for _, recipe in recipes:
            ex = ew = 0.0
            for seed in range(args.draws):
                layer = int4train.Int4Linear.from_linear(
                    copy.deepcopy(lin), recipe=int4train.Recipe.of(recipe, seed)
                ).train()
                xx = X.clone().requires_grad_(True)
                layer(xx).backward(G)
                ex += ((xx.grad - dx_ref).norm() / dx_ref.norm()).item() / args.draws
                ew += ((layer.weight.grad - dw_ref).norm() / dw_ref.norm()).item() / args.draws
            line += f" | {ex:11.3f} {ew:11.3f}"
        print(line)


def estimator_errors(name: str, g: torch.Tensor, w: torch.Tensor) -> None:
    n = g.shape[0]
    hi, lo, s = int4train.ops.quantize_bitsplit(g, 0, 0)  # the recipe's bit split
    rows = torch.cat([16 * s * hi.double(), s * lo.double()])  # the 2N rows R
    rw2 = (rows @ w.double()).pow(2).sum(1)
    exact = (g.double() @ w.double()).norm().item()
    nz = rw2 > 0

    def error(p: torch.Tensor) -> float:
        return ((1 / p[nz] - 1) * rw2[nz]).sum().sqrt().item() / exact

    p = torch.ops.int4train.lss_probabilities(rows.norm(dim=1).float(), float(n)).double()

    def rounded(tau: float) -> torch.Tensor:
        return 2.0 ** -torch.floor(torch.log2(1 / (p * tau))).clamp(0, 4)

    lo, hi_t = 1e-3, 4.0  # the largest threshold whose rounded probabilities sum to at most N
    for _ in range(60):
        mid = (lo * hi_t) ** 0.5
        lo, hi_t = (mid, hi_t) if rounded(mid)[nz].sum() <= n else (lo, mid)
    oracle = torch.ops.int4train.lss_probabilities(rw2.sqrt().float(), float(n)).double()
    print(f"{name:16s} water-filled {error(p):.3f}  powers of two {error(rounded(lo)):.3f}  "
          f"oracle {error(oracle):.3f}")


if __name__ == "__main__":
    main()
