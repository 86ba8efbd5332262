"""Tests of the training CLI (python -m int4train.train): a tiny smoke run of each task on small data
made here (text, JSONL with a tiny BERT folder, IDX and .npz images), learning and determinism, the
outputs (metrics.json, loss.png, the table), and the errors for a missing file, an unknown field and
an empty split. The real data sets and the real MiniLM are exercised where they are installed.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from int4train.train import cli
from int4train.train import data as D
from int4train.train.plotting import ema

# A one-block GPT and ViT of width 32, on 2 threads (the CI machine's cores).
LM_TINY = "--layers 1 --d-model 32 --heads 2 --context 16 --batch-size 8 --warmup 2 --no-progress"
VIT_TINY = "--layers 1 --d-model 32 --heads 2 --patch 4 --batch-size 16 --warmup 2 --no-progress"
WORDS = ["the", "whale", "sea", "ship", "captain", "white", "boat", "harpoon", "deck", "crew"]
BLOCK0 = ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc", "blocks.0.fc_out"]


def run_cli(args: str, capsys):
    """Runs the CLI in-process on a space-separated argument string (the paths here have no spaces);
    returns (exit status, stdout, stderr)."""
    rc = cli.main(args.split() + ["--threads", "2"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def load_metrics(out_dir: Path) -> list:
    with open(out_dir / "metrics.json") as f:
        return json.load(f)["runs"]


# -------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    # A small, learnable text: sentences of a fixed grammar over ten words.
    rng = random.Random(0)
    sents = [f"the {rng.choice(WORDS)} saw the {rng.choice(WORDS)}." for _ in range(600)]
    path = tmp_path_factory.mktemp("lm") / "tiny.txt"
    path.write_text(" ".join(sents) + "\n", encoding="utf-8")
    return path


def _jsonl_records(n: int, with_split: bool = True) -> list:
    # Label pos or neg, told by one cue word among random filler; every fourth record is a test one.
    rng = random.Random(1)
    recs = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        cue = rng.choice(["good", "great"]) if label == "pos" else rng.choice(["bad", "awful"])
        text = " ".join([rng.choice(WORDS) for _ in range(3)] + [cue] + [rng.choice(WORDS)])
        rec = {"id": i, "body": text, "label": label}
        if with_split:
            rec["split"] = "test" if i % 4 == 3 else "train"
        recs.append(rec)
    return recs


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cls") / "tiny.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for rec in _jsonl_records(96):
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT with a WordPiece tokenizer, saved as a Hugging Face folder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "awful", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(str(folder))
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}
    dims = struct.pack(">" + "i" * array.ndim, *array.shape)
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + dims
    payload = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + payload)


def _images(n: int, seed: int):
    # Two classes: noise (0), and noise with a bright 4x4 square in a random quadrant (1).
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for i in np.flatnonzero(y):
        r, c = 4 * rng.integers(0, 2, 2)
        x[i, r : r + 4, c : c + 4] += 180
    return x, y


@pytest.fixture(scope="module")
def idx_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("idx")
    xtr, ytr = _images(256, 0)
    xte, yte = _images(64, 1)
    write_idx(folder / "train-images-idx3-ubyte.gz", xtr)
    write_idx(folder / "train-labels-idx1-ubyte.gz", ytr)
    write_idx(folder / "t10k-images-idx3-ubyte", xte)  # uncompressed works too
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", yte)
    return folder


# ----------------------------------------------------------------------------------- lm task


def test_lm_smoke_two_recipes(text_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(
        f"--task lm --data {text_file} --recipe fp,hq_lss --steps 4 --out {out} {LM_TINY}", capsys
    )
    assert rc == 0, err
    runs = load_metrics(out)
    assert [r["recipe"] for r in runs] == ["fp", "hq_lss"]
    for r in runs:
        assert r["task"] == "lm" and r["seed"] == 0 and r["preset"] == "tiny"
        assert r["device"] == "cpu" and r["steps"] == 4 and len(r["loss_curve"]) == 4
        assert all(math.isfinite(v) for v in r["loss_curve"])
        m = r["metrics"]
        assert math.isfinite(m["val_loss"])
        assert m["bits_per_char"] == pytest.approx(m["val_loss"] / math.log(2))
        assert r["throughput"] > 0 and r["throughput_unit"] == "tok/s"
        assert r["wall_time_s"] >= r["train_time_s"] >= r["first_step_s"] > 0
        assert r["config"]["d_model"] == 32 and r["config"]["context"] == 16
        assert r["int4train_version"]
        # Only the block's four projections are converted: not the embeddings, not the LM head.
        assert r["int4_layers"] == BLOCK0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = stdout[stdout.index("recipe ") :]
    assert "fp " in table and "hq_lss " in table and "bits/char" in table


def test_lm_quantizes_every_call(text_file, tmp_path, capsys, monkeypatch):
    # The CLI measures the method: its layers get dense_fallback "never" (on a GPU the default
    # small-shape rule would run these small layers as F.linear), and its records keep the
    # recipe's name without the rule (Recipe.method_label).
    import int4train

    seen = []
    convert = int4train.convert_

    def recording_convert(model, recipe, **kwargs):
        seen.append(recipe)
        return convert(model, recipe=recipe, **kwargs)

    monkeypatch.setattr(int4train, "convert_", recording_convert)
    out = tmp_path / "out"
    rc, _, err = run_cli(
        f"--task lm --data {text_file} --recipe hq_bs --steps 2 --out {out} {LM_TINY}", capsys
    )
    assert rc == 0, err
    assert [r.dense_fallback for r in seen] == ["never"]
    assert [r["recipe_spec"] for r in load_metrics(out)] == ["hq_bs"]


@pytest.mark.parametrize("recipe", ["fp", "hq_lss"])
def test_lm_learns(text_file, tmp_path, capsys, recipe):
    # 80 steps on a ten-word grammar: the loss must fall far below where it starts (~log 20).
    args = f"--task lm --data {text_file} --recipe {recipe} --steps 80 --lr 1e-2 --out {tmp_path}"
    rc, _, err = run_cli(f"{args} {LM_TINY}", capsys)
    assert rc == 0, err
    (r,) = load_metrics(tmp_path)
    start = float(np.mean(r["loss_curve"][:3]))
    assert r["final_train_loss"] < 0.6 * start
    assert r["metrics"]["val_loss"] < 0.6 * start


def test_lm_deterministic_given_seed(text_file, tmp_path, capsys):
    curves = []
    for k, seed in enumerate([3, 3, 4]):
        out = tmp_path / str(k)
        args = f"--task lm --data {text_file} --recipe hq_lss --steps 5 --seed {seed} --out {out}"
        rc, _, err = run_cli(f"{args} {LM_TINY}", capsys)
        assert rc == 0, err
        curves.append(load_metrics(out)[0]["loss_curve"])
    assert curves[0] == curves[1]
    assert curves[0] != curves[2]


def test_lm_lss_budget(text_file, tmp_path, capsys):
    # --lss-budget reaches hq_lss only: the runs record the spec, and budget 2 trains exactly as hq_bs.
    args = f"--task lm --data {text_file} --recipe hq_bs,hq_lss,fp --lss-budget 2 --steps 4 --out {tmp_path}"
    rc, stdout, err = run_cli(f"{args} {LM_TINY}", capsys)
    assert rc == 0, err
    bs, lss, fp = load_metrics(tmp_path)
    assert lss["recipe"] == "hq_lss" and lss["recipe_spec"] == "hq_lss:lss_budget=2.0"
    assert lss["config"]["lss_budget"] == 2.0 and bs["config"]["lss_budget"] is None
    assert bs["recipe_spec"] == "hq_bs" and fp["recipe_spec"] == "fp"
    assert lss["loss_curve"] == bs["loss_curve"]
    assert "hq_lss:lss_budget=2.0" in stdout


def test_lm_max_hadamard_block(text_file, tmp_path, capsys):
    # --max-hadamard-block 1 switches the transform off for the hq recipes (recorded, block 1 chosen);
    # it changes their training, and leaves the other recipes alone.
    base = f"--task lm --data {text_file} --steps 4 {LM_TINY}"
    rc, _, err = run_cli(f"{base} --recipe hq_bs,lsq_luq --max-hadamard-block 1 --out {tmp_path / 'a'}", capsys)
    assert rc == 0, err
    off, luq = load_metrics(tmp_path / "a")
    assert off["config"]["max_hadamard_block"] == 1 and luq["config"]["max_hadamard_block"] is None
    assert off["recipe_spec"] == "hq_bs:max_hadamard_block=1" and luq["recipe_spec"] == "lsq_luq"
    assert off["hadamard_blocks"] and set(off["hadamard_blocks"].values()) == {1}
    assert luq["hadamard_blocks"] == {}
    rc, _, err = run_cli(f"{base} --recipe hq_bs --out {tmp_path / 'b'}", capsys)
    assert rc == 0, err
    (on,) = load_metrics(tmp_path / "b")
    assert on["config"]["max_hadamard_block"] == 256
    assert max(on["hadamard_blocks"].values()) > 1
    assert on["loss_curve"] != off["loss_curve"]


@pytest.mark.parametrize(
    "flag, value, recipe, default, same_curve",
    [
        # LSQ's rule for the first steps instead of the default error search: another run.
        ("step-init", "mean_abs", "hq_lss", "mse", False),
        # The CUDA products' engine: the same integers, and the CPU ignores it: the same loss curve
        # bit for bit.
        ("gemm", "int8", "hq_bs", "auto", True),
    ],
    ids=["step_init", "gemm"],
)
def test_lm_lsq_option(text_file, tmp_path, capsys, flag, value, recipe, default, same_curve):
    # An LSQ recipes' option is recorded in the run's config and, when not the default, in its label;
    # the fp recipe ignores it (None); without LSQ recipes it is a usage error.
    key = flag.replace("-", "_")
    base = f"--task lm --data {text_file} --steps 3 {LM_TINY}"
    rc, _, err = run_cli(f"{base} --recipe {recipe},fp --{flag} {value} --out {tmp_path / 'a'}", capsys)
    assert rc == 0, err
    lsq, fp = load_metrics(tmp_path / "a")
    assert lsq["recipe_spec"] == f"{recipe}:{key}={value}" and lsq["config"][key] == value
    assert fp["recipe_spec"] == "fp" and fp["config"][key] is None
    rc, _, err = run_cli(f"{base} --recipe {recipe} --out {tmp_path / 'b'}", capsys)
    assert rc == 0, err
    (plain,) = load_metrics(tmp_path / "b")
    assert plain["config"][key] == default and plain["recipe_spec"] == recipe
    assert lsq["config"]["step_lr_scale"] == plain["config"]["step_lr_scale"] == 0.01  # lm preset's
    assert (plain["loss_curve"] == lsq["loss_curve"]) == same_curve
    rc, _, err = run_cli(f"{base} --recipe fp --{flag} {default} --out {tmp_path / 'c'}", capsys)
    assert rc == 2 and f"--{flag} applies to the LSQ recipes" in err


def test_lm_grad_scale(text_file, tmp_path, capsys):
    # --grad-scale row: recorded for hq_bs / hq_lss (None for the others), in the label, another run;
    # a usage error without them.
    base = f"--task lm --data {text_file} --steps 3 {LM_TINY}"
    rc, _, err = run_cli(f"{base} --recipe hq_lss,fp --grad-scale row --out {tmp_path / 'a'}", capsys)
    assert rc == 0, err
    lss, fp = load_metrics(tmp_path / "a")
    assert lss["recipe_spec"] == "hq_lss:grad_scale=row" and lss["config"]["grad_scale"] == "row"
    assert fp["recipe_spec"] == "fp" and fp["config"]["grad_scale"] is None
    rc, _, err = run_cli(f"{base} --recipe hq_lss --out {tmp_path / 'b'}", capsys)
    assert rc == 0, err
    (plain,) = load_metrics(tmp_path / "b")
    assert plain["config"]["grad_scale"] == "tensor" and plain["recipe_spec"] == "hq_lss"
    assert plain["loss_curve"] != lss["loss_curve"]
    rc, _, err = run_cli(f"{base} --recipe hq,fp --grad-scale row --out {tmp_path / 'c'}", capsys)
    assert rc == 2 and "--grad-scale applies to hq_bs and hq_lss" in err


def test_lm_step_lr_scale(text_file, tmp_path, capsys):
    base = f"--task lm --data {text_file} --steps 3 {LM_TINY}"
    rc, _, err = run_cli(f"{base} --recipe hq_lss --step-lr-scale 0.5 --out {tmp_path / 'd'}", capsys)
    assert rc == 0, err
    assert load_metrics(tmp_path / "d")[0]["config"]["step_lr_scale"] == 0.5


def test_lm_byte_level(tmp_path, capsys):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 40)  # not UTF-8
    args = f"--task lm --data {path} --steps 2 --recipe fp --out {tmp_path / 'o'} {LM_TINY}"
    rc, _, err = run_cli(args, capsys)
    assert rc == 2 and "not UTF-8" in err and "--level byte" in err
    rc, _, err = run_cli(f"{args} --level byte", capsys)
    assert rc == 0, err
    (r,) = load_metrics(tmp_path / "o")
    assert r["data"]["vocab_size"] == 256 and "bits_per_byte" in r["metrics"]


# ------------------------------------------------------------------------------ textcls task


def test_textcls_smoke(jsonl_file, bert_folder, tmp_path, capsys):
    rc, stdout, err = run_cli(
        f"--task textcls --data {jsonl_file} --model {bert_folder} --text-field body "
        f"--recipe hq_lss,fp --steps 3 --batch-size 8 --max-length 16 --no-progress --out {tmp_path}",
        capsys,
    )
    assert rc == 0, err
    runs = load_metrics(tmp_path)
    assert [r["recipe"] for r in runs] == ["hq_lss", "fp"]
    for r in runs:
        assert r["data"]["classes"] == ["neg", "pos"]
        assert r["data"]["train_samples"] == 72 and r["data"]["test_samples"] == 24
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["metrics"]["test_samples"] == 24
        # Two BERT layers of six projections; the pooler and the classifier stay as they are.
        layers = r["int4_layers"]
        assert len(layers) == 12
        assert all(n.startswith("encoder.encoder.layer.") for n in layers)
    assert "test accuracy" in stdout


def test_textcls_fraction_split_and_limits(tmp_path, bert_folder, capsys):
    path = tmp_path / "nosplit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _jsonl_records(40, with_split=False)))
    rc, _, err = run_cli(
        f"--task textcls --data {path} --model {bert_folder} --text-field body "
        "--test-fraction 0.25 --split-seed 5 --limit-train 20 --recipe fp --steps 2 "
        f"--batch-size 4 --max-length 16 --no-progress --out {tmp_path}",
        capsys,
    )
    assert rc == 0, err
    (r,) = load_metrics(tmp_path)
    assert r["data"]["train_samples"] == 20 and r["data"]["test_samples"] == 10


def test_split_by_fraction_is_seeded_and_disjoint():
    tr, te = D.split_indices(50, 0.2, seed=7)
    assert len(te) == 10 and len(tr) == 40 and sorted(tr + te) == list(range(50))
    assert D.split_indices(50, 0.2, seed=7) == (tr, te)
    assert D.split_indices(50, 0.2, seed=8) != (tr, te)
    sub = D.subset(tr, 15, seed=0)
    assert len(sub) == 15 and sub == sorted(sub) and set(sub) <= set(tr)


# ----------------------------------------------------------------------------- imagecls task


def test_imagecls_idx_smoke_and_learning(idx_folder, tmp_path, capsys):
    args = f"--task imagecls --data {idx_folder} --recipe hq_lss --steps 60 --lr 3e-3"
    rc, _, err = run_cli(f"{args} --out {tmp_path} {VIT_TINY}", capsys)
    assert rc == 0, err
    (r,) = load_metrics(tmp_path)
    assert r["data"]["image_shape"] == [1, 8, 8] and r["data"]["num_classes"] == 2
    assert r["data"]["train_samples"] == 256 and r["metrics"]["test_samples"] == 64
    assert r["int4_layers"] == BLOCK0
    # Whether there is a bright square is easy to learn: far above chance (0.5) on the test split.
    assert r["metrics"]["accuracy"] >= 0.9
    assert r["throughput_unit"] == "samples/s"


def test_imagecls_npz(tmp_path, capsys):
    x, y = _images(80, 2)
    split = tmp_path / "split.npz"
    y64 = y.astype(np.int64)
    np.savez(
        split,
        x_train=x[:60, :, :, None],
        y_train=y64[:60],
        x_test=x[60:, :, :, None],
        y_test=y64[60:],
    )  # channels last
    args = f"--task imagecls --recipe fp --steps 2 {VIT_TINY}"
    rc, _, err = run_cli(f"{args} --data {split} --out {tmp_path / 'a'}", capsys)
    assert rc == 0, err
    assert load_metrics(tmp_path / "a")[0]["data"]["test_samples"] == 20
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=x, y=y)
    rc, _, err = run_cli(f"{args} --data {plain} --out {tmp_path / 'b'}", capsys)
    assert rc == 2 and "--test-fraction" in err
    rc, _, err = run_cli(
        f"{args} --data {plain} --test-fraction 0.25 --out {tmp_path / 'b'}", capsys
    )
    assert rc == 0, err
    assert load_metrics(tmp_path / "b")[0]["data"]["test_samples"] == 20


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    write_idx(tmp_path / "a.idx", a)
    b = D.read_idx(tmp_path / "a.idx")
    assert b.dtype == np.float32 and np.array_equal(a, b)
    (tmp_path / "bad.idx").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(D.DataError, match="need 5 bytes"):
        D.read_idx(tmp_path / "bad.idx")


# ------------------------------------------------------------------------------------- errors


def test_error_missing_file(tmp_path, capsys):
    rc, _, err = run_cli(f"--task lm --data {tmp_path / 'nope.txt'} --no-progress", capsys)
    assert rc == 2
    assert "error: --data: no such file or directory" in err and "nope.txt" in err


@pytest.mark.parametrize("flag", ["--text-field", "--label-field", "--split-field"])
def test_error_unknown_field(jsonl_file, bert_folder, tmp_path, capsys, flag):
    rc, _, err = run_cli(
        f"--task textcls --data {jsonl_file} --model {bert_folder} --text-field body "
        f"{flag} nosuchfield --no-progress --out {tmp_path}",
        capsys,
    )
    assert rc == 2
    assert f"{flag}: unknown field 'nosuchfield'" in err
    assert "body, id, label, split" in err  # the fields the records do have


def test_error_empty_split(jsonl_file, bert_folder, tmp_path, capsys):
    rc, _, err = run_cli(
        f"--task textcls --data {jsonl_file} --model {bert_folder} --text-field body "
        f"--test-value dev --no-progress --out {tmp_path}",
        capsys,
    )
    assert rc == 2
    assert "the test split" in err and "is empty" in err and "test, train" in err


def test_error_empty_lm_split(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("call me ishmael. " * 6)  # 102 characters: 10 for validation, < context + 1
    rc, _, err = run_cli(f"--task lm --data {path} --steps 1 {LM_TINY} --out {tmp_path}", capsys)
    assert rc == 2 and "validation split" in err and "too short" in err


def test_error_empty_image_split(tmp_path, capsys):
    x, y = _images(10, 3)
    path = tmp_path / "e.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    rc, _, err = run_cli(f"--task imagecls --data {path} {VIT_TINY} --out {tmp_path}", capsys)
    assert rc == 2 and "the test split" in err and "is empty" in err


@pytest.mark.parametrize(
    "args, message",
    [
        ("--task imagecls --context 8", "--context applies to --task lm"),
        ("--task lm --recipe fp,int3", "unknown recipe 'int3'"),
        ("--task lm --d-model 30 --heads 4", "multiple of --heads"),
        ("--task lm --data spam-assassin", "built-in data set of --task textcls"),
        ("--task textcls --model /nonexistent/model", "--model: no such folder"),
        ("--task lm --recipe fp,hq_bs --lss-budget 1.5", "--lss-budget applies to hq_lss"),
        ("--task lm --recipe fp,int8 --max-hadamard-block 1", "--max-hadamard-block applies to the hq"),
    ],
    ids=["flag-of-other-task", "unknown-recipe", "heads", "shortcut-of-other-task", "model",
         "lss-budget-without-hq_lss", "hadamard-block-without-hq"],
)
def test_usage_errors(args, message, capsys):
    rc, _, err = run_cli(f"{args} --no-progress", capsys)
    assert rc == 2 and message in err


def test_max_hadamard_block_not_a_power_of_two(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--task", "lm", "--max-hadamard-block", "48"])
    assert e.value.code == 2
    assert "--max-hadamard-block: expected a power of two in [1, 256], got 48" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["2.5", "0.1"])
def test_lss_budget_out_of_range(capsys, bad):
    with pytest.raises(SystemExit) as e:
        cli.main(["--task", "lm", "--lss-budget", bad])
    assert e.value.code == 2
    assert f"--lss-budget: expected a number in [0.125, 2], got {bad}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_error_cuda_missing(capsys):
    rc, _, err = run_cli("--task lm --device cuda", capsys)
    assert rc == 2 and "CUDA is not available" in err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--task", "--recipe", "--seed", "--preset", "--device", "--amp", "--out",
                 "--no-progress", "--data", "--steps", "--limit-train", "--test-fraction"]:  # fmt: skip
        assert flag in text


def test_module_entry_point(tmp_path):
    # `python -m int4train.train` runs the CLI: an error's exit status and message.
    cmd = [sys.executable, "-m", "int4train.train", "--task", "lm", "--data", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def torchrun(args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "int4train.train", *args.split(), "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_lm_torchrun_two_processes(text_file, tmp_path, capsys):
    # Two processes (gloo, CPU) train one model with DDP, each on its half of every global batch:
    # fp's first loss is the one-process run's (the same global batch, before any update), rank 0
    # alone writes the outputs, and the runs record their launcher.
    args = f"--task lm --data {text_file} --recipe fp,hq_lss --steps 4 {LM_TINY}"
    proc = torchrun(f"{args} --out {tmp_path / 'ddp'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = load_metrics(tmp_path / "ddp")
    for r in runs:
        assert r["processes"] == 2
        assert r["command"].startswith("torchrun --nnodes 1 --nproc_per_node 2")
        assert len(r["loss_curve"]) == 4 and all(math.isfinite(v) for v in r["loss_curve"])
    assert proc.stdout.count("hq_lss: val_loss") == 1  # printed by rank 0 only
    rc, _, err = run_cli(f"{args} --out {tmp_path / 'one'}", capsys)
    assert rc == 0, err
    single = load_metrics(tmp_path / "one")
    assert single[0]["processes"] == 1
    assert runs[0]["loss_curve"][0] == pytest.approx(single[0]["loss_curve"][0], rel=1e-6)


@pytest.mark.parametrize("task", ["lm", "imagecls"])
def test_rank_shares_make_the_global_batch(task, text_file, idx_folder):
    # Each rank's batches are its contiguous share of the one-process batches, in order.
    from int4train.train import tasks as T

    data, tiny = (text_file, LM_TINY) if task == "lm" else (idx_folder, VIT_TINY)
    args = cli.build_parser().parse_args(f"--task {task} --data {data} {tiny}".split())
    t = T.TASKS[task](cli.build_config(args), args)
    t.prepare()

    def first(ranks, n=3):
        it = t.batches(torch.Generator().manual_seed(5), torch.device("cpu"), ranks)
        return [next(it) for _ in range(n)]

    whole = first(T.Ranks())
    parts = [first(T.Ranks(r, 2)) for r in range(2)]
    for k, batch in enumerate(whole):
        for i, field in enumerate(batch):
            joined = torch.cat([parts[0][k][i], parts[1][k][i]])
            assert torch.equal(joined, field) and len(parts[0][k][i]) == len(field) // 2
    with pytest.raises(D.DataError, match="multiple of 3"):
        T.Ranks(0, 3).share(list(range(8)))


def test_torchrun_batch_must_split(text_file, tmp_path):
    proc = torchrun(f"--task lm --data {text_file} --steps 2 --out {tmp_path} {LM_TINY} "
                    "--batch-size 7")
    assert proc.returncode != 0
    assert "--batch-size 7 is the global batch: it must be a multiple of the 2 processes" in (
        proc.stderr)


# ---------------------------------------------------------------------------- pieces, shortcuts


def test_ema_is_bias_corrected():
    assert ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / 0.75])


def test_moby_dick_shortcut_is_shipped():
    path = D.resolve_shortcut("moby-dick")
    assert path.name == "moby-dick.txt.gz"
    text = D.load_text(path, limit_train=1000, limit_test=1000, context=128)
    assert text.level == "char" and len(text.train) == 1000
    assert "".join(text.vocab[i] for i in text.train[:7]) == "CHAPTER"


def _shortcut_or_skip(name):
    try:
        return D.resolve_shortcut(name)
    except D.DataError as e:
        pytest.skip(str(e))


def test_spam_assassin_shortcut():
    d = D.load_jsonl_classification(_shortcut_or_skip("spam-assassin"))
    assert d.classes == ["ham", "spam"]
    assert len(d.train_texts) == 4805 and len(d.test_texts) == 1241


def test_fashion_mnist_shortcut():
    labels = D.read_idx(_shortcut_or_skip("fashion-mnist") / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def test_textcls_with_real_minilm(tmp_path, capsys):
    try:
        D.resolve_pretrained(None)
    except D.DataError as e:
        pytest.skip(str(e))
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _jsonl_records(16)))
    rc, _, err = run_cli(
        f"--task textcls --data {path} --text-field body --recipe hq_lss --steps 1 "
        f"--batch-size 4 --max-length 12 --no-progress --out {tmp_path}",
        capsys,
    )
    assert rc == 0, err
    (r,) = load_metrics(tmp_path)
    assert r["data"]["model"].endswith("model") and len(r["int4_layers"]) == 36  # 6 layers x 6


def test_lm_deterministic_flag(text_file, tmp_path, capsys):
    # --deterministic runs the same math (on the CPU, bit for bit the curve without it), records
    # itself, and restores torch's mode afterwards for an in-process caller.
    curves = []
    for k, flag in enumerate(["", "--deterministic"]):
        out = tmp_path / str(k)
        args = f"--task lm --data {text_file} --recipe hq_lss --steps 4 --seed 1 --out {out} {flag}"
        rc, stdout, err = run_cli(f"{args} {LM_TINY}", capsys)
        assert rc == 0, err
        run = load_metrics(out)[0]
        assert run["deterministic"] is bool(flag)
        assert ("(deterministic)" in stdout) is bool(flag)
        curves.append(run["loss_curve"])
    assert curves[0] == curves[1]
    assert not torch.are_deterministic_algorithms_enabled()
