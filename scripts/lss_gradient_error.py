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
which cost the product to know): how much the rounding costs and how much better scores could give;
and a fourth, water-filled on a 32-column random sign sketch of ||R_i W|| (docs/accuracy.md,
"Sketched scores").
Once per --grad-scales value: "row" forms the rows with per-row scales (quantize_bitsplit_rows'
formula, k_i <= --row-cap, 4 as the library; in fp64 here, the stochastic rounding from torch's
generator, not the core's Philox bits) and also reports the fraction of tokens at the cap and the
bit split's own error ||(R_hi + R_lo - G) W|| / ||G W|| (no sampling).

    python scripts/lss_gradient_error.py --steps 300 --budgets 1,1.5
    python scripts/lss_gradient_error.py --steps 300 --budgets 1 --grad-scales tensor,row
    python scripts/lss_gradient_error.py --steps 300 --estimators
    python scripts/lss_gradient_error.py --steps 300 --estimators --grad-scales tensor,row --row-cap 4
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
    p.add_argument("--row-cap", type=int, default=4,
                   help="--estimators with grad_scale row: the largest row exponent k_i")
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
        print(f"{'layer':16s} {'scale':7s} {'at cap':>6s} {'split':>6s} | {'water-filled':>12s} "
              f"{'powers of 2':>11s} {'oracle':>6s} {'sketch':>6s}")
        for name in linears:
            for gs in args.grad_scales.split(","):
                estimator_errors(name, captured[name]["g"], modules[name].weight.detach(), gs,
                                 args.row_cap)
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


def row_split(g: torch.Tensor, cap: int) -> tuple[torch.Tensor, float]:
    """The 2N rows R with per-row scales s 2^-k_i (quantize_bitsplit_rows' formula in fp64) and the
    fraction of tokens whose k_i is the cap."""
    g = g.double()
    amax = g.abs().max()
    rmax = g.abs().amax(1)
    k = torch.zeros(g.shape[0], dtype=torch.float64)
    if 0 < amax < float("inf"):
        for _ in range(cap):  # the largest k <= cap with rmax 2^k <= amax
            k = torch.where(rmax * 2.0 ** (k + 1) <= amax, k + 1, k)
    f = (2.0 ** -k)[:, None]
    s = amax / 119
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(g.shape, generator=gen, dtype=torch.float64)
    q = torch.floor(g / (s * f) + u).clamp(-119, 119)
    hi = torch.floor((q + 8) / 16)
    lo = q - 16 * hi
    return torch.cat([16 * s * f * hi, s * f * lo]), (k == cap).double().mean().item()


def estimator_errors(name: str, g: torch.Tensor, w: torch.Tensor, grad_scale: str = "tensor",
                     row_cap: int = 4) -> None:
    n = g.shape[0]
    at_cap = 0.0
    if grad_scale == "row":
        rows, at_cap = row_split(g, row_cap)
    else:
        hi, lo, s = int4train.ops.quantize_bitsplit(g, 0, 0)  # the recipe's bit split
        rows = torch.cat([16 * s * hi.double(), s * lo.double()])  # the 2N rows R
    rw2 = (rows @ w.double()).pow(2).sum(1)
    exact = (g.double() @ w.double()).norm().item()
    split = ((rows[:n] + rows[n:] - g.double()) @ w.double()).norm().item() / exact
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
    # A 32-column random sign sketch of W (P = W S rounded to 16 levels of its largest entry), the
    # scores sqrt(||R_i P||^2 + ||R_i||^2 sum(P^2) / (4 C)): what commit 1451692 tried as
    # hq_lss:lss_scores=sketch (docs/accuracy.md, "Sketched scores").
    signs = torch.randint(0, 2, (w.shape[1], 32), generator=torch.Generator().manual_seed(7))
    sk = w.double() @ (1.0 - 2.0 * signs.double())
    sk = torch.round(sk * 16 / sk.abs().max())
    s2 = (rows @ sk).pow(2).sum(1) + rows.pow(2).sum(1) * sk.pow(2).sum() / (4 * sk.shape[0])
    sketch = torch.ops.int4train.lss_probabilities(s2.sqrt().float(), float(n)).double()
    label = grad_scale if grad_scale != "row" else f"row k<={row_cap}"
    print(f"{name:16s} {label:7s} {at_cap:6.3f} {split:6.3f} | {error(p):12.3f} "
          f"{error(rounded(lo)):11.3f} {error(oracle):6.3f} {error(sketch):6.3f}")


if __name__ == "__main__":
    main()
