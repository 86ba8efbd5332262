"""Tests of the accuracy-table driver (python -m int4train.train.table): a real run of two recipes and
two seeds in parallel processes, the summary's statistics, the deadline, and argument errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from int4train.train import table

WORDS = ["the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon"]
LM_TINY = "--layers 1 --d-model 32 --heads 2 --context 16 --batch-size 8 --warmup 1 --steps 3"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("table") / "tiny.txt"
    path.write_text(" ".join(f"the {rng.choice(WORDS)} saw the {rng.choice(WORDS)}." for _ in range(300)))
    return path


def test_run_and_summarize(text_file, tmp_path, capsys):
    out = tmp_path / "t"
    rc = table.main(["run", "--out", str(out), "--tasks", "lm", "--recipes", "fp,hq_lss", "--seeds", "0,1",
                     "--preset", "tiny", "--jobs", "2",
                     "--task-args", f"lm=--data {text_file} {LM_TINY} --limit-test 256"])
    assert rc == 0, capsys.readouterr().out
    runs = table.load_runs([str(out)])
    assert sorted((r["recipe"], r["seed"]) for r in runs) == [("fp", 0), ("fp", 1), ("hq_lss", 0), ("hq_lss", 1)]
    assert all(r["steps"] == 3 and r["task"] == "lm" for r in runs)
    # Each run's log holds its exact command.
    assert (out / "lm" / "hq_lss-s1" / "log.txt").read_text().startswith("$ ")
    md = tmp_path / "table.md"
    assert table.main(["summarize", str(out), "--md", str(md), "--plots", str(tmp_path / "plots")]) == 0
    text = md.read_text()
    fp = [r["metrics"]["val_loss"] for r in runs if r["recipe"] == "fp"]
    mean, std = table.mean_std(fp)
    assert f"| fp | {mean:.4f} ± {std:.4f} | — | 0,1 |" in text
    assert "| hq_lss |" in text and (tmp_path / "plots" / "lm.png").stat().st_size > 0
    # --json collects the runs into one file that summarize reads back to the same table.
    collected = tmp_path / "runs.json"
    assert table.main(["summarize", str(out), "--json", str(collected)]) == 0
    back = json.loads(collected.read_text())["runs"]
    assert [(r["recipe"], r["seed"]) for r in back] == [("fp", 0), ("fp", 1), ("hq_lss", 0), ("hq_lss", 1)]
    assert all(r["loss_curve"] and r["command"] and "_path" not in r for r in back)
    md2 = tmp_path / "table2.md"
    assert table.main(["summarize", str(collected), "--md", str(md2)]) == 0
    assert md2.read_text() == text
    # A run collected into two files counts once.
    assert len(table.load_runs([str(collected), str(out), str(collected)])) == 4


def test_summary_statistics_and_gap():
    def run(recipe, seed, acc):
        return {"task": "imagecls", "recipe": recipe, "seed": seed, "steps": 10, "train_time_s": 2.0,
                "metrics": {"accuracy": acc}, "device": "cpu", "preset": "tiny", "torch_version": "x",
                "loss_curve": [1.0, 0.5], "config": {"step_init": "mse"}}

    runs = [run("fp", 0, 0.90), run("fp", 1, 0.92), run("hq_lss", 0, 0.89), run("hq_lss", 1, 0.91)]
    text = table.summarize(runs)
    assert "| fp | 91.00 ± 1.41 | — | 0,1 | 0.200 |" in text
    assert "| hq_lss | 90.00 ± 1.41 | -1.00 pt | 0,1 | 0.200 |" in text
    m, s = table.mean_std([3.0])
    assert m == 3.0 and math.isnan(s)
    # Runs of different lengths are never averaged together: each length gets its rows, compared with
    # the fp row of the same length.
    longer = [dict(run(r, sd, a), steps=20) for r, sd, a in [("fp", 0, 0.95), ("hq_lss", 0, 0.93)]]
    text = table.summarize(runs + longer)
    assert "| fp @10 steps | 91.00 ± 1.41 | — | 0,1 | 0.200 |" in text
    assert "| hq_lss @10 steps | 90.00 ± 1.41 | -1.00 pt | 0,1 | 0.200 |" in text
    assert "| hq_lss @20 steps | 93.00 ± n/a | -2.00 pt | 0 | 0.100 |" in text
    assert "10, 20 steps" in text


def test_deadline_stops_and_reports(text_file, tmp_path, capsys):
    # A zero deadline starts nothing: the exit status says the table is incomplete.
    rc = table.main(["run", "--out", str(tmp_path / "t"), "--tasks", "lm", "--recipes", "fp", "--seeds", "0",
                     "--deadline", "0", "--task-args", f"lm=--data {text_file} {LM_TINY}"])
    assert rc == 1
    assert "1 not started" in capsys.readouterr().out
    assert table.load_runs([str(tmp_path / "t")]) == []


def test_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        table.main(["run", "--out", str(tmp_path), "--recipes", "int3"])
    with pytest.raises(SystemExit):
        table.main(["run", "--out", str(tmp_path), "--task-args", "nope=--steps 1"])
    with pytest.raises(SystemExit):
        table.main(["run", "--out", str(tmp_path), "--seeds", "a,b"])
    assert table.main(["summarize", str(tmp_path / "empty")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_failed_run_is_reported(tmp_path, capsys):
    rc = table.main(["run", "--out", str(tmp_path / "t"), "--tasks", "lm", "--recipes", "fp", "--seeds", "0",
                     "--task-args", f"lm=--data {tmp_path / 'missing.txt'}"])
    assert rc == 1
    log = (tmp_path / "t" / "lm" / "fp-s0" / "log.txt").read_text()
    assert "missing.txt" in log
    assert json.dumps(table.load_runs([str(tmp_path / "t")])) == "[]"


def test_runs_spread_over_gpus(text_file, tmp_path, capsys, monkeypatch):
    # Two runs at once on two GPU ids: each run is pinned to the least-loaded one. (On a machine without
    # those GPUs the CLI runs on the CPU; the pinning is what is checked.)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out = tmp_path / "t"
    rc = table.main(["run", "--out", str(out), "--tasks", "lm", "--recipes", "fp", "--seeds", "0,1",
                     "--preset", "tiny", "--jobs", "2", "--gpus", "3,5",
                     "--task-args", f"lm=--data {text_file} {LM_TINY} --limit-test 256 --device cpu"])
    assert rc == 0, capsys.readouterr().out
    pins = sorted((out / "lm" / f"fp-s{s}" / "log.txt").read_text().splitlines()[1] for s in (0, 1))
    assert pins == ["# CUDA_VISIBLE_DEVICES=3", "# CUDA_VISIBLE_DEVICES=5"]


def test_gpu_ids(monkeypatch):
    assert table.gpu_ids("none") == []
    assert table.gpu_ids("2,0") == ["2", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert table.gpu_ids("auto") == ["4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert table.gpu_ids("auto") == []
    with pytest.raises(SystemExit):
        table.gpu_ids("cuda:0")


def test_recipe_variants_get_rows_of_their_own(text_file, tmp_path, capsys):
    out = tmp_path / "t"
    rc = table.main(["run", "--out", str(out), "--tasks", "lm", "--recipes", "hq_lss,hq_lss:lss_budget=2",
                     "--seeds", "0", "--preset", "tiny", "--jobs", "2", "--gpus", "none",
                     "--task-args", f"lm=--data {text_file} {LM_TINY} --limit-test 256 --device cpu"])
    assert rc == 0, capsys.readouterr().out
    assert (out / "lm" / "hq_lss@lss_budget2.0-s0" / "metrics.json").exists()
    text = table.summarize(table.load_runs([str(out)]))
    assert "| hq_lss |" in text and "| hq_lss:lss_budget=2.0 |" in text
    # A max_hadamard_block variant gets its own folder and row; so do collected runs that recorded the
    # block only in their configuration.
    rc = table.main(["run", "--out", str(out), "--tasks", "lm", "--recipes", "hq_bs:max_hadamard_block=1",
                     "--seeds", "0", "--preset", "tiny", "--jobs", "1", "--gpus", "none",
                     "--task-args", f"lm=--data {text_file} {LM_TINY} --limit-test 256 --device cpu"])
    assert rc == 0, capsys.readouterr().out
    (run,) = table.load_runs([str(out / "lm" / "hq_bs@max_hadamard_block1-s0")])
    assert run["recipe_spec"] == "hq_bs:max_hadamard_block=1" and run["config"]["max_hadamard_block"] == 1
    old = dict(run, recipe_spec="hq_bs")
    assert "| hq_bs:max_hadamard_block=1 |" in table.summarize([old])
    # A finished run counts as done only if it ran with the current settings: one recorded before
    # step_init existed (mean_abs then) is run again.
    path = out / "lm" / "hq_lss-s0" / "metrics.json"
    record = json.loads(path.read_text())
    del record["runs"][0]["config"]["step_init"]
    path.write_text(json.dumps(record))
    capsys.readouterr()
    rc = table.main(["run", "--out", str(out), "--tasks", "lm", "--recipes", "hq_lss,hq_lss:lss_budget=2",
                     "--seeds", "0", "--preset", "tiny", "--jobs", "1", "--gpus", "none",
                     "--task-args", f"lm=--data {text_file} {LM_TINY} --limit-test 256 --device cpu"])
    printed = capsys.readouterr().out
    assert rc == 0 and "1 runs already done" in printed and "1 runs in" in printed, printed
    (again,) = table.load_runs([str(path)])
    assert again["config"]["step_init"] == "mse"
    # A step_init variant: its CLI flag and folder, alone and with the other options.
    assert table._recipe_flags("hq_lss:step_init=mean_abs") == (
        "hq_lss", ["--step-init", "mean_abs"], "hq_lss@step_initmean_abs")
    assert table._recipe_flags("hq_bs:max_hadamard_block=1,step_init=mean_abs") == (
        "hq_bs", ["--max-hadamard-block", "1", "--step-init", "mean_abs"],
        "hq_bs@max_hadamard_block1@step_initmean_abs")
    assert table._recipe_flags("hq_bs:step_init=mse") == ("hq_bs", [], "hq_bs")
    # The products' engine (a spec option: the ops see it) becomes --gemm and a folder of its own.
    assert table._recipe_flags("hq_lss:lss_budget=1.5,gemm=int8,step_init=mean_abs") == (
        "hq_lss", ["--lss-budget", "1.5", "--step-init", "mean_abs", "--gemm", "int8"],
        "hq_lss@lss_budget1.5@step_initmean_abs@gemmint8")
    assert table._recipe_flags("hq_lss:grad_scale=row") == (
        "hq_lss", ["--grad-scale", "row"], "hq_lss@grad_scalerow")
    # A spec of several options in a --recipes list: the items after its first continue it.
    assert table._recipe_list("fp,hq_lss:grad_scale=row,lss_budget=1.25,hq_bs") == [
        "fp", "hq_lss:grad_scale=row,lss_budget=1.25", "hq_bs"]
    assert table._recipe_flags("hq_lss:grad_scale=row,lss_budget=1.25") == (
        "hq_lss", ["--lss-budget", "1.25", "--grad-scale", "row"],
        "hq_lss@lss_budget1.25@grad_scalerow")
    with pytest.raises(SystemExit, match="follows no recipe spec"):
        table._recipe_list("hq_lss,lss_budget=1.5")
    # The same recipe twice (its options in another order), and an option the CLI has not: errors.
    with pytest.raises(SystemExit, match="are the same recipe"):
        table.main(["run", "--out", str(out), "--recipes",
                    "hq_lss:grad_scale=row,lss_budget=1.25,hq_lss:lss_budget=1.25,grad_scale=row"])
    with pytest.raises(SystemExit, match="dense_fallback is not an option"):
        table.main(["run", "--out", str(out), "--recipes", "hq_bs:dense_fallback=auto"])
    # Rows: runs from before step_init existed used mean_abs; a step_lr_scale other than the task
    # preset's gets a row of its own.
    base = dict(run, recipe="hq_bs", recipe_spec="hq_bs", config={"step_lr_scale": 0.01})
    assert table._spec(base) == "hq_bs:step_init=mean_abs"
    assert table._spec(dict(base, config={"step_init": "mse", "step_lr_scale": 0.01})) == "hq_bs"
    assert table._spec(dict(base, config={"step_init": "mse", "step_lr_scale": 1.0})) == (
        "hq_bs step_lr_scale=1.0")
    assert table._spec(dict(base, recipe="fp", recipe_spec="fp", config={"step_lr_scale": 1.0})) == "fp"
    with pytest.raises(SystemExit):
        table.main(["run", "--out", str(out), "--recipes", "hq_bs:lss_budget=1.5"])
    with pytest.raises(SystemExit):
        table.main(["run", "--out", str(out), "--recipes", "hq_lss:lss_budget=9"])
