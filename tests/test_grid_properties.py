"""Property tests: grid expansion and run ids do not depend on the order of keys in the TOML."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.config.grid import load_grid


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def table(header: str, entries: dict, order: random.Random) -> str:
    keys = list(entries)
    order.shuffle(keys)
    return header + "\n" + "".join(f"{k} = {toml_value(entries[k])}\n" for k in keys) + "\n"


def render(grid: dict, order: random.Random) -> str:
    """A TOML grid whose sections and keys come in an order chosen by ``order``.

    The order of entries within ``[[datasets]]`` / ``[[backbones]]`` / ``[[heads]]`` is kept: it is
    the grid's own order. Only the kinds of section and the keys inside each table move.
    """
    sections = [
        table("[recipe]", grid["recipe"], order),
        "".join(table("[[datasets]]", d, order) for d in grid["datasets"]),
        "".join(table("[[backbones]]", b, order) for b in grid["backbones"]),
        "".join(table("[[heads]]", h, order) for h in grid["heads"]),
    ]
    order.shuffle(sections)
    return f"seeds = {toml_value(grid['seeds'])}\n" + "".join(sections)


grids = st.fixed_dictionaries(
    {
        "seeds": st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True),
        "recipe": st.fixed_dictionaries(
            {"epochs": st.integers(1, 5), "lr": st.sampled_from([0.1, 0.01, 1e-3]), "batch_size": st.sampled_from([16, 32])},
            optional={"augment": st.sampled_from(["none", "flip", "flip_crop"]), "optimizer": st.sampled_from(["sgd", "adamw"])},
        ),
        "datasets": st.just([{"name": "shapes", "num_train": 64, "num_test": 32}]),
        "backbones": st.lists(st.sampled_from([{"name": "tiny_cnn"}, {"name": "resnet18"}]), min_size=1, max_size=2, unique_by=lambda b: b["name"]),
        "heads": st.lists(
            st.fixed_dictionaries({"name": st.just("baseline"), "pool": st.lists(st.sampled_from(["avg", "max"]), min_size=1, max_size=2, unique=True)}),
            min_size=1, max_size=2,
        ),
    }
)


@settings(max_examples=40, deadline=None)
@given(grid=grids, first=st.randoms(use_true_random=False), second=st.randoms(use_true_random=False))
def test_run_ids_and_order_are_stable_under_key_order(grid: dict, first: random.Random, second: random.Random) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a.toml", Path(tmp) / "b.toml"
        a.write_text(render(grid, first))
        b.write_text(render(grid, second))
        cells_a, cells_b = load_grid(str(a)).cells, load_grid(str(b)).cells
    assert [c.run_id for c in cells_a] == [c.run_id for c in cells_b]
    n_hparams = sum(len(h["pool"]) for h in grid["heads"])
    assert len({c.run_id for c in cells_a}) == len(cells_a) <= len(grid["seeds"]) * len(grid["backbones"]) * n_hparams
