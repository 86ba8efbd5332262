"""One rank of the data-parallel tests (test_distributed.py): run as

    python ddp_worker.py RANK WORLD INIT_FILE OUT_FILE DEVICE BACKEND

Each rank records what the test compares across ranks into OUT_FILE (torch.save of a dict):
  - "unsynced": steps and block of a converted model after a first batch that differs per rank,
    without a process group, and whether Int4Linear warned about it;
  - "synced": the same with process_group = WORLD;
  - "reference": rank 0 only: the same model initialised in this process alone on rank 0's batch;
  - "empty_first": steps and block when rank 0's first batch is empty;
  - "grads", "grads_single": weight gradients of one backward on the same batch on every rank
    (process group set, no DDP), and rank 0's from a model without a group;
  - "ddp": every parameter and buffer after three AdamW steps of a DDP-wrapped model on per-rank
    batches;
  - "fsdp": the same with FSDP's fully_shard instead of DDP, the layers initialised (one eval
    forward on the first batch) before sharding (None with gloo on CUDA tensors).
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import int4train

# Every call quantized: the worker's layers are far below the small-shape rule's size, which on
# a GPU would run them as plain products (Recipe.dense_fallback).
RECIPE = int4train.Recipe("hq_lss", dense_fallback="never")


def model_on(device: str) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).to(device)


def batch(rank: int, rows: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    # Ranks' batches differ in scale, so that their calibrations differ clearly.
    return (torch.randn(rows, 64, generator=g) * (1.0 + rank)).to(device)


def layer_state(model: nn.Module) -> list:
    return [
        (m.input_step.detach().cpu().clone(), m.weight_step.detach().cpu().clone(),
         int(m.hadamard_block), bool(m.initialized))
        for m in model.modules() if isinstance(m, int4train.Int4Linear)
    ]


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    init_file, out_file, device_kind, backend = sys.argv[3:7]
    device = f"cuda:{rank % torch.cuda.device_count()}" if device_kind == "cuda" else "cpu"
    if device_kind == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.group.WORLD
    out: dict = {}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = int4train.convert_(model_on(device), RECIPE)
        m(batch(rank, 32, device))
    out["unsynced"] = layer_state(m)
    out["warned"] = any("process_group" in str(w.message) for w in caught)

    m = int4train.convert_(model_on(device), RECIPE, process_group=group)
    m(batch(rank, 32, device))
    out["synced"] = layer_state(m)
    if rank == 0:
        single = int4train.convert_(model_on(device), RECIPE)
        single(batch(0, 32, device))
        out["reference"] = layer_state(single)

    m = int4train.convert_(model_on(device), RECIPE, process_group=group)
    m(batch(rank, 0 if rank == 0 else 32, device))
    out["empty_first"] = layer_state(m)

    # Independent random streams per rank: one backward on the same batch everywhere.
    x = batch(0, 32, device)
    m = int4train.convert_(model_on(device), RECIPE, process_group=group)
    m(x).square().sum().backward()
    out["grads"] = [p.grad.detach().cpu().clone() for p in m.parameters()]
    if rank == 0:
        single = int4train.convert_(model_on(device), RECIPE)
        single(x).square().sum().backward()
        out["grads_single"] = [p.grad.detach().cpu().clone() for p in single.parameters()]

    # DDP training on per-rank batches: the replicas must stay equal bit for bit.
    m = int4train.convert_(model_on(device), RECIPE, process_group=group)
    ddp = nn.parallel.DistributedDataParallel(
        m, device_ids=[torch.device(device)] if device_kind == "cuda" else None
    )
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        ddp(batch(rank + 10 * step, 48, device)).square().mean().backward()
        opt.step()
    out["ddp"] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

    # FSDP (fully_shard): the layers initialise before sharding (FSDP would drop a write to the
    # steps made inside its forward); an eval forward does not advance the step counters. Not with
    # gloo on CUDA tensors (FSDP's reduce-scatter there is NCCL's).
    out["fsdp"] = None
    if device_kind == "cuda" and backend != "nccl":
        return finish(out, out_file)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The mesh of this run's device type: fully_shard's default mesh is CUDA's wherever CUDA exists.
    mesh = init_device_mesh(device_kind, (world,))

    m = int4train.convert_(model_on(device), RECIPE, process_group=group)
    with torch.no_grad():
        m.eval()(batch(rank, 48, device))
    m.train()
    for layer in m:
        if isinstance(layer, int4train.Int4Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for step in range(3):
        opt.zero_grad()
        m(batch(rank + 10 * step, 48, device)).square().mean().backward()
        opt.step()
    out["fsdp"] = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
        for k, v in m.state_dict().items()
    }

    finish(out, out_file)


def finish(out: dict, out_file: str) -> None:
    torch.save(out, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
