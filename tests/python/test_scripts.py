"""The benchmark scripts' pure-Python parts (the scripts themselves need a GPU)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", range(1, 9))
def test_bench_module_orders_balance_neighbours(n):
    # Every layer right after every other equally often and in every place equally often, each row
    # a permutation: the module benchmark's rounds must not favour a layer by its neighbour.
    rows = load_script("bench_module").williams_orders(n)
    assert len(rows) == (2 * n if n % 2 else n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    after = Counter((row[j], row[j + 1]) for row in rows for j in range(n - 1))
    assert len(after) == n * (n - 1) and len(set(after.values())) <= 1
    place = Counter((v, j) for row in rows for j, v in enumerate(row))
    assert len(place) == n * n and len(set(place.values())) == 1
