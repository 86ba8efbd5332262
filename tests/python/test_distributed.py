"""Data parallelism: Int4Linear replicas under torch.distributed (two processes, ddp_worker.py).

On the CPU with the gloo backend (CI); test_cuda.py runs the same worker on CUDA tensors."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import int4train
from int4train.nn import rank_seed

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_ranks(tmp_path: Path, device: str, backend: str, world: int = 2) -> list:
    """Runs ddp_worker.py as `world` processes and returns each rank's record."""
    init = tmp_path / "init"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(world), str(init), str(outs[r]), device,
             backend],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(o) for o in outs]


def check_ranks(records: list) -> None:
    r0, r1 = records
    # Without a group each rank calibrates on its own batch (different scales: different steps)
    # and the layer says so.
    assert r0["warned"] and r1["warned"]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(r0["unsynced"], r1["unsynced"]))
    # With the group: one calibration, rank 0's, equal to a one-process run on rank 0's batch.
    for a, b, ref in zip(r0["synced"], r1["synced"], r0["reference"]):
        for x, y, z in zip(a, b, ref):
            assert (torch.equal(x, y) and torch.equal(x, z)) if torch.is_tensor(x) else x == y == z
    # Rank 0's first batch empty: rank 1's calibration everywhere, every layer initialised.
    for a, b in zip(r0["empty_first"], r1["empty_first"]):
        assert a[3] and b[3]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(r0["empty_first"][0][0], r0["synced"][0][0])
    # Random streams: rank 0 draws a one-process run's numbers, rank 1 others (the same batch
    # gives different stochastic gradients of the quantized layers' weights).
    for g0, g_single in zip(r0["grads"], r0["grads_single"]):
        assert torch.equal(g0, g_single)
    assert not torch.equal(r0["grads"][0], r1["grads"][0])
    # DDP on per-rank batches: replicas equal bit for bit after three optimizer steps.
    assert r0["ddp"].keys() == r1["ddp"].keys()
    for k in r0["ddp"]:
        assert torch.equal(r0["ddp"][k], r1["ddp"][k]), k
    assert int(r0["ddp"]["0.step"]) == 3
    # FSDP, layers initialised before sharding: the DDP run's state, bit for bit (with two ranks the
    # averaged gradients are the same sums halved), on both ranks.
    for r in (r0, r1) if r0["fsdp"] is not None else ():
        assert r["fsdp"].keys() == r0["ddp"].keys()
        for k in r0["ddp"]:
            assert torch.equal(r["fsdp"][k], r0["ddp"][k]), k


def test_data_parallel_replicas_agree(tmp_path):
    check_ranks(run_ranks(tmp_path, "cpu", "gloo"))


def test_rank_seed():
    assert rank_seed(123, 0) == 123
    seeds = {rank_seed(123, r) for r in range(64)}
    assert len(seeds) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert rank_seed(2**63 - 1, 5) < 2**63
    with pytest.raises(ValueError, match="rank"):
        rank_seed(0, -1)


def test_process_group_requires_initialised_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("this process has a process group")
    with pytest.raises(RuntimeError, match="init_process_group"):
        int4train.Int4Linear(8, 8, process_group=object())
    with pytest.raises(RuntimeError, match="init_process_group"):
        int4train.convert_(nn.Sequential(nn.Linear(8, 8)), "hq_lss", process_group=object())


def test_layer_without_group_copies_and_pickles():
    layer = int4train.Int4Linear(16, 8, recipe="hq_bs").eval()
    assert layer.process_group is None
    x = torch.randn(4, 16)
    y = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.process_group is None and clone._rank == 0
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
