"""The three tasks of the training CLI (lm, textcls, imagecls): presets, data preparation, batches,
loss and evaluation, and the one training loop they share, in which int4train.convert_ swaps the
model's transformer-block linear layers for Int4Linear layers of the chosen recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .models import GPT, EncoderClassifier, ViT
from .presets import PRESETS

# ------------------------------------------------------------------------------------- presets


def preset_config(task: str, preset: str) -> dict[str, Any]:
    return dict(PRESETS[task][preset])


# ----------------------------------------------------------------------------------- utilities


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    # Linear warm-up, then a cosine decay to a tenth of the peak.
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def param_groups(model: nn.Module, lr: float, weight_decay: float, step_lr_scale: float) -> list:
    """AdamW groups: matrices (weight decay), vectors and norms (none), and int4train's LSQ step sizes
    (`*.input_step`, `*.weight_step`: no decay, lr * step_lr_scale, since Adam moves every parameter
    by about lr per update, large next to a step size of ~0.01)."""
    decay, no_decay, steps = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(("input_step", "weight_step")):
            steps.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    if steps:
        groups.append({"params": steps, "weight_decay": 0.0, "lr": lr * step_lr_scale})
    return groups


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The processes training one model together (torchrun): this one's rank and their number.
    Every rank draws the same global batch and trains on its own contiguous share of it, so the
    global batch, the data order and the steps do not depend on the number of processes."""

    rank: int = 0
    world: int = 1

    @property
    def group(self):
        """The data-parallel process group (None for a single process)."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        return dist.group.WORLD

    def share(self, batch):
        """This rank's rows of a global batch (a tensor or a list) of a multiple of `world` rows."""
        if self.world == 1:
            return batch
        n = len(batch)
        if n % self.world:
            raise D.DataError(
                f"a batch of {n} rows does not split over {self.world} processes: use a batch size "
                f"that is a multiple of {self.world}"
            )
        k = n // self.world
        return batch[self.rank * k : (self.rank + 1) * k]


SINGLE = Ranks()


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------- tasks


class Task:
    """One task: prepare() loads the data once per invocation; the rest is called per run."""

    name = ""
    throughput_unit = ""  # what one training step processes, e.g. "tok/s"

    def __init__(self, cfg: dict[str, Any], args) -> None:
        self.cfg = cfg
        self.args = args

    def prepare(self) -> dict[str, Any]:
        raise NotImplementedError

    def n_train(self) -> int:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batches(self, generator: torch.Generator, device: torch.device, ranks: Ranks = SINGLE):
        """An endless iterator of training batches: this rank's share of each global batch."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        raise NotImplementedError

    def items(self, batch) -> int:
        """Units of throughput in one batch (tokens or samples)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device: torch.device, amp: bool) -> dict[str, float]:
        raise NotImplementedError

    primary_metric = ""


class LMTask(Task):
    name = "lm"
    throughput_unit = "tok/s"
    primary_metric = "val_loss"

    def prepare(self) -> dict[str, Any]:
        c = self.cfg
        self.path = D.resolve_data(self.args.data, "lm")
        self.data = D.load_text(
            self.path,
            level=c["level"],
            val_fraction=c["val_fraction"],
            limit_train=c["limit_train"],
            limit_test=c["limit_test"],
            context=c["context"],
        )
        self.train_t = torch.from_numpy(self.data.train)
        self.val_t = torch.from_numpy(self.data.val)
        return {
            "data": str(self.path),
            "level": c["level"],
            "vocab_size": self.data.vocab_size,
            "train_tokens": len(self.data.train),
            "val_tokens": len(self.data.val),
        }

    def n_train(self) -> int:
        # One "epoch" = as many windows as cover the training text once.
        return max(1, len(self.data.train) // self.cfg["context"])

    def build_model(self) -> nn.Module:
        c = self.cfg
        return GPT(
            self.data.vocab_size,
            c["context"],
            c["layers"],
            c["d_model"],
            c["heads"],
            dropout=c["dropout"],
        )

    def batches(self, generator, device, ranks=SINGLE):
        c = self.cfg
        t, n = c["context"], len(self.train_t)
        offsets = torch.arange(t + 1)
        while True:
            starts = torch.randint(0, n - t, (c["batch_size"],), generator=generator)
            win = self.train_t[ranks.share(starts)[:, None] + offsets]
            yield win[:, :-1].to(device), win[:, 1:].to(device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def items(self, batch) -> int:
        return batch[0].numel()

    @torch.no_grad()
    def evaluate(self, model, device, amp):
        # Mean next-token loss over non-overlapping context windows covering the validation split
        # (each window predicts its tokens from the ones before it inside the window).
        t = self.cfg["context"]
        val = self.val_t
        n_win = (len(val) - 1) // t
        starts = torch.arange(n_win) * t
        total, count = 0.0, 0
        for i in range(0, n_win, 64):
            s = starts[i : i + 64]
            win = val[s[:, None] + torch.arange(t + 1)].to(device)
            with _autocast(device, amp):
                logits = model(win[:, :-1])
            total += F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                win[:, 1:].reshape(-1),
                reduction="sum",
            ).item()
            count += win[:, 1:].numel()
        val_loss = total / count
        key = "bits_per_char" if self.cfg["level"] == "char" else "bits_per_byte"
        return {"val_loss": val_loss, key: val_loss / math.log(2), "val_tokens_evaluated": count}


class TextClsTask(Task):
    name = "textcls"
    throughput_unit = "samples/s"
    primary_metric = "accuracy"

    def prepare(self) -> dict[str, Any]:
        c, a = self.cfg, self.args
        self.model_dir = D.resolve_pretrained(a.model)
        self.path = D.resolve_data(a.data, "textcls")
        self.data = D.load_jsonl_classification(
            self.path,
            text_field=a.text_field,
            label_field=a.label_field,
            split_field=a.split_field,
            train_value=a.train_value,
            test_value=a.test_value,
            test_fraction=a.test_fraction,
            split_seed=a.split_seed,
            limit_train=c["limit_train"],
            limit_test=c["limit_test"],
        )
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        enc = lambda texts: tok(texts, truncation=True, max_length=c["max_length"])["input_ids"]
        self.train_ids = enc(self.data.train_texts)
        self.test_ids = enc(self.data.test_texts)
        self.train_y = torch.from_numpy(self.data.train_labels)
        self.test_y = torch.from_numpy(self.data.test_labels)
        return {
            "data": str(self.path),
            "model": str(self.model_dir),
            "classes": self.data.classes,
            "train_samples": len(self.train_ids),
            "test_samples": len(self.test_ids),
        }

    def n_train(self) -> int:
        return len(self.train_ids)

    def build_model(self) -> nn.Module:
        return EncoderClassifier(
            self.model_dir, len(self.data.classes), dropout=self.cfg["dropout"]
        )

    def _collate(self, ids: list[list[int]], device):
        width = max(len(s) for s in ids)
        x = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, s in enumerate(ids):
            x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return x.to(device), mask.to(device)

    def batches(self, generator, device, ranks=SINGLE):
        bs = min(self.cfg["batch_size"], len(self.train_ids))
        while True:  # shuffled epochs; the last incomplete batch of an epoch is dropped
            order = torch.randperm(len(self.train_ids), generator=generator).tolist()
            for i in range(0, len(order) - bs + 1, bs):
                idx = ranks.share(order[i : i + bs])
                x, m = self._collate([self.train_ids[j] for j in idx], device)
                yield x, m, self.train_y[idx].to(device)

    def loss(self, model, batch):
        x, m, y = batch
        return F.cross_entropy(model(x, m).float(), y)

    def items(self, batch) -> int:
        return batch[0].shape[0]

    @torch.no_grad()
    def evaluate(self, model, device, amp):
        correct = 0
        for i in range(0, len(self.test_ids), 64):
            x, m = self._collate(self.test_ids[i : i + 64], device)
            with _autocast(device, amp):
                pred = model(x, m).argmax(-1).cpu()
            correct += int((pred == self.test_y[i : i + 64]).sum())
        return {"accuracy": correct / len(self.test_ids), "test_samples": len(self.test_ids)}


class ImageClsTask(Task):
    name = "imagecls"
    throughput_unit = "samples/s"
    primary_metric = "accuracy"

    def prepare(self) -> dict[str, Any]:
        c, a = self.cfg, self.args
        self.path = D.resolve_data(a.data, "imagecls")
        self.data = D.load_images(
            self.path,
            test_fraction=a.test_fraction,
            split_seed=a.split_seed,
            limit_train=c["limit_train"],
            limit_test=c["limit_test"],
        )
        self.train_x = torch.from_numpy(self.data.train_x)
        self.train_y = torch.from_numpy(self.data.train_y)
        self.test_x = torch.from_numpy(self.data.test_x)
        self.test_y = torch.from_numpy(self.data.test_y)
        _, ch, h, w = self.data.train_x.shape
        if h % c["patch"] or w % c["patch"]:
            raise D.DataError(f"--patch {c['patch']} does not divide the image size {h}x{w}")
        return {
            "data": str(self.path),
            "image_shape": [ch, h, w],
            "num_classes": self.data.num_classes,
            "train_samples": len(self.train_x),
            "test_samples": len(self.test_x),
        }

    def n_train(self) -> int:
        return len(self.train_x)

    def build_model(self) -> nn.Module:
        c = self.cfg
        _, ch, h, w = self.data.train_x.shape
        return ViT(
            (h, w),
            ch,
            self.data.num_classes,
            c["patch"],
            c["layers"],
            c["d_model"],
            c["heads"],
            dropout=c["dropout"],
        )

    def batches(self, generator, device, ranks=SINGLE):
        bs = min(self.cfg["batch_size"], len(self.train_x))
        x_all, y_all = self.train_x.to(device), self.train_y.to(device)
        while True:  # shuffled epochs; the last incomplete batch of an epoch is dropped
            order = torch.randperm(len(x_all), generator=generator).to(device)
            for i in range(0, len(order) - bs + 1, bs):
                idx = ranks.share(order[i : i + bs])
                yield x_all[idx], y_all[idx]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y)

    def items(self, batch) -> int:
        return batch[0].shape[0]

    @torch.no_grad()
    def evaluate(self, model, device, amp):
        correct = 0
        for i in range(0, len(self.test_x), 256):
            with _autocast(device, amp):
                pred = model(self.test_x[i : i + 256].to(device)).argmax(-1).cpu()
            correct += int((pred == self.test_y[i : i + 256]).sum())
        return {"accuracy": correct / len(self.test_x), "test_samples": len(self.test_x)}


TASKS = {"lm": LMTask, "textcls": TextClsTask, "imagecls": ImageClsTask}


# ---------------------------------------------------------------------------------- the loop


def _mean_over_ranks(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    total = value.float().clone()
    dist.all_reduce(total)
    return total / ranks.world


def resolve_steps(task: Task) -> int:
    c = task.cfg
    if c.get("steps"):
        return int(c["steps"])
    per_epoch = max(1, task.n_train() // c["batch_size"])
    return max(1, math.ceil(c["epochs"] * per_epoch))


def final_loss(curve: list[float]) -> float:
    """The final training loss: the mean of the last tenth of the steps (at least 1, at most 50)."""
    k = max(1, min(50, len(curve) // 10))
    return float(np.mean(curve[-k:]))


def train_one(
    task: Task,
    recipe: "str | int4train.Recipe",
    seed: int,
    device: torch.device,
    amp: bool,
    step_lr_scale: float,
    progress: bool,
    log_every: int = 10,
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """Trains a fresh model of `task` under `recipe` (a name or an int4train.Recipe) and evaluates it;
    returns the run's metrics. With several ranks (torchrun), each process calls this with its own
    `ranks` and device: the model is wrapped in DistributedDataParallel and its Int4Linear layers get
    the process group (one first-batch calibration, independent random streams per rank). Every
    call of every layer is quantized (dense_fallback "never", whatever `recipe` says): the runs
    measure the method, and the tasks' layers are far below the small-shape rule's size."""
    import int4train

    recipe = dataclasses.replace(int4train.Recipe.of(recipe, seed), dense_fallback="never")
    t0 = time.perf_counter()
    seed_everything(seed)
    model = task.build_model()
    # The one place where the recipe enters: every nn.Linear the model's filter names (those in the
    # transformer blocks) becomes an int4train.Int4Linear; embeddings and the head stay as they are.
    int4train.convert_(
        model, recipe=recipe, filter_fn=model.int4_filter, seed=seed, process_group=ranks.group
    )
    converted = [n for n, m in model.named_modules() if isinstance(m, int4train.Int4Linear)]
    model.to(device).train()
    net = model
    if ranks.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
        )
    c = task.cfg
    steps = resolve_steps(task)
    opt = torch.optim.AdamW(
        param_groups(model, c["lr"], c["weight_decay"], step_lr_scale),
        betas=(0.9, 0.95) if task.name == "lm" else (0.9, 0.999),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(c["warmup"], steps), steps))
    gen = torch.Generator().manual_seed(seed)
    batches = task.batches(gen, device, ranks)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        desc=f"{task.name} {recipe.spec}",
        unit="step",
        disable=not progress or ranks.rank != 0,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    curve: list[float] = []
    items, train_time, first_step = 0, 0.0, 0.0
    for step in range(steps):
        ts = time.perf_counter()
        batch = next(batches)
        with _autocast(device, amp):
            loss = task.loss(net, batch)
        # The global batch's loss (the mean of the ranks' equal shares), the same on every rank, so
        # that they stop together.
        value = _mean_over_ranks(loss.detach(), ranks).item()
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"{recipe.spec}: the training loss is {value} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so that train_time is the device's time too
        train_time += time.perf_counter() - ts
        if step == 0:  # the first-batch calibration (Hadamard blocks, LSQ steps) happens here
            first_step = train_time
        items += task.items(batch) * ranks.world
        curve.append(value)
        bar.update(1)
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix_str(
                f"loss {value:.4f} {items / train_time:,.0f} {task.throughput_unit}"
            )
    bar.close()
    model.eval()
    te = time.perf_counter()
    metrics = task.evaluate(model, device, amp)
    eval_time = time.perf_counter() - te
    return {
        "task": task.name,
        "recipe": recipe.name,
        "recipe_spec": recipe.method_label,  # dense_fallback is "never" (above)
        "seed": seed,
        "steps": steps,
        "metrics": metrics,
        "primary_metric": task.primary_metric,
        "final_train_loss": final_loss(curve),
        "loss_curve": curve,
        "throughput": items / train_time if train_time > 0 else float("nan"),
        "throughput_unit": task.throughput_unit,
        "train_time_s": train_time,
        "first_step_s": first_step,
        "eval_time_s": eval_time,
        "wall_time_s": time.perf_counter() - t0,
        "parameters": sum(p.numel() for p in model.parameters()),
        "int4_layers": converted,
        "processes": ranks.world,
        # The block each layer's first-batch search chose (hq recipes; 1 = no transform).
        "hadamard_blocks": {
            n: int(m.hadamard_block.item())
            for n, m in model.named_modules()
            if isinstance(m, int4train.Int4Linear) and m.recipe.uses_hadamard
        },
    }
