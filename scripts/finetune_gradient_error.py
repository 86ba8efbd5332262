"""Per-layer gradient error of every recipe on the textcls fine-tune (docs/accuracy.md).

Fine-tunes all-MiniLM-L6-v2 with the textcls model of the training CLI (mean pooling + linear head) in
fp32 for --steps steps on SpamAssassin, captures every encoder linear layer's input X and output
gradient G on the next batch, and for each layer reports
  - under8: the fraction of G's energy ||G[small]||^2 / ||G||^2 in entries that a per-tensor 8-bit
    grid (step max|G| / 127) rounds to zero, |G| < max|G| / 254: the part of the gradient a uniform
    grid with one scale per tensor resolves worst, since stochastic rounding turns it into noise;
  - max/rms: the dynamic range max|G| / rms(G);
  - the relative error ||est - exact|| / ||exact|| of the input gradient dX = G W and the weight
    gradient dW = G^T X of each recipe's layer (forward quantization included), mean over --draws
    seeds;
  - row: the median over tokens (rows with a non-zero gradient) of the per-token relative error of
    dX, ||est_i - exact_i|| / ||exact_i||: how well a token whose gradient is small is resolved,
    which the whole-matrix error, dominated by the largest rows, does not show.

    python scripts/finetune_gradient_error.py --steps 40 --draws 4
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import int4train
from int4train.train import data as D
from int4train.train.models import EncoderClassifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="spam-assassin", help="JSONL file or built-in name")
    p.add_argument("--model", default=None, help="Hugging Face folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--steps", type=int, default=40, help="fp32 fine-tune steps before the capture")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--recipes", default="int8,lsq_luq,hq,hq_bs,hq_lss,hq_lss:lss_budget=1.5")
    p.add_argument("--draws", type=int, default=4, help="seeds per estimate")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    folder = D.resolve_pretrained(args.model)
    ds = D.load_jsonl_classification(D.resolve_data(args.data, "textcls"))  # its train split
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    labels = torch.from_numpy(ds.train_labels)
    gen = torch.Generator().manual_seed(0)

    def sample():
        idx = torch.randint(0, len(ds.train_texts), (args.batch,), generator=gen).tolist()
        enc = tok([ds.train_texts[i] for i in idx], truncation=True, max_length=args.max_length,
                  padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], labels[idx]

    model = EncoderClassifier(folder, len(ds.classes), dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    for _ in range(args.steps):
        x, m, y = sample()
        loss = F.cross_entropy(model(x, m), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"fp32 fine-tune loss after {args.steps} steps: {loss.item():.3f}")

    modules = dict(model.named_modules())
    names = [n for n, mod in modules.items()
             if isinstance(mod, torch.nn.Linear) and EncoderClassifier.int4_filter(mod, n)]
    captured: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}

    def capture(name):
        def fwd(module, inputs, output):
            captured[name]["x"] = inputs[0].detach().flatten(0, -2).clone()

            def grad(g):
                captured[name]["g"] = g.detach().flatten(0, -2).clone()

            output.register_hook(grad)

        return fwd

    handles = [modules[n].register_forward_hook(capture(n)) for n in names]
    x, m, y = sample()
    F.cross_entropy(model(x, m), y).backward()
    for h in handles:
        h.remove()

    recipes = [int4train.Recipe.of(r) for r in int4train.config.split_specs(args.recipes)]
    print(f"{len(names)} layers, {captured[names[0]]['x'].shape[0]} tokens per layer "
          f"(padding included, its gradient is zero)")
    head = f"{'layer':42s} {'under8':>6s} {'max/rms':>7s}"
    for r in recipes:
        head += f" | {r.spec + ' dX':>12s} {'dW':>6s} {'row':>6s}"
    print(head)
    totals = torch.zeros(len(recipes), 3)
    for name in names:
        X, G = captured[name]["x"], captured[name]["g"]
        lin = modules[name]
        amax = G.abs().max()
        small = G.abs() < amax / 254
        under8 = (G[small].square().sum() / G.square().sum()).item()
        dyn = (amax / G.square().mean().sqrt()).item()
        dx_ref, dw_ref = G @ lin.weight.detach(), G.t() @ X
        line = f"{name.removeprefix('encoder.encoder.'):42s} {under8:6.3f} {dyn:7.0f}"
        live = G.abs().amax(1) > 0
        ref_rows = dx_ref[live].norm(dim=1)
        for k, r in enumerate(recipes):
            ex = ew = er = 0.0
            for seed in range(args.draws):
                layer = int4train.Int4Linear.from_linear(
                    copy.deepcopy(lin), recipe=int4train.Recipe.of(r.spec, seed)).train()
                xx = X.clone().requires_grad_(True)
                layer(xx).backward(G)
                ex += ((xx.grad - dx_ref).norm() / dx_ref.norm()).item() / args.draws
                ew += ((layer.weight.grad - dw_ref).norm() / dw_ref.norm()).item() / args.draws
                row = (xx.grad[live] - dx_ref[live]).norm(dim=1) / ref_rows
                er += row.median().item() / args.draws
            totals[k] += torch.tensor([ex, ew, er]) / len(names)
            line += f" | {ex:12.3f} {ew:6.3f} {er:6.3f}"
        print(line, flush=True)
    line = f"{'mean over layers':42s} {'':6s} {'':7s}"
    for k in range(len(recipes)):
        line += f" | {totals[k, 0]:12.3f} {totals[k, 1]:6.3f} {totals[k, 2]:6.3f}"
    print(line)


if __name__ == "__main__":
    main()
