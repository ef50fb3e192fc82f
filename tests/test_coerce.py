"""One coercion rule (bench.core.coerce.coerce) for head hyper-parameters, dataset options, recipe
keys and [run] options (issue 23): each case is written out by hand, and the four places of a grid
that take a value must all refuse a boolean where a number is expected and all convert 1 -> 1.0."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import pytest

from bench.config.grid import load_grid
from bench.config.run_options import RunOptions
from bench.core.coerce import ANY_SETTING, CoerceError, OutOfRange, annotation_of, coerce
from bench.core.errors import UsageError


@pytest.mark.parametrize(
    ("annotation", "value", "expected"),
    [
        (int, 3, 3),
        (float, 3, 3.0),
        (float, 2.5, 2.5),
        (bool, False, False),
        (str, "a", "a"),
        (Literal["a", "b"], "b", "b"),
        (int | None, None, None),
        (int | float, 2, 2),  # the first option that accepts it: an int stays an int
        (float | int, 2, 2.0),
        (list[float], [1, 2.5], [1.0, 2.5]),
        (tuple[int, ...], [1, 2], (1, 2)),
        (list, (1, "a"), [1, "a"]),
        (Any, {"x": 1}, {"x": 1}),
        (ANY_SETTING, True, True),
        (ANY_SETTING, 7, 7),
        (ANY_SETTING, [1], [1]),
    ],
)
def test_accepted_values(annotation: Any, value: Any, expected: Any) -> None:
    out = coerce(annotation, value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (int, True),  # a bool is never a number
        (float, False),
        (int, 2.0),
        (bool, 1),
        (str, 3),
        (Literal[1, 2], True),  # equal (True == 1) but not of the literal's type
        (Literal["a"], "A"),
        (int | None, "3"),
        (list[int], 3),
        (list[int], [1, "2"]),
        (type(None), 0),
        (ANY_SETTING, {"table": 1}),
    ],
)
def test_refused_types(annotation: Any, value: Any) -> None:
    with pytest.raises(CoerceError) as err:
        coerce(annotation, value)
    assert not isinstance(err.value, OutOfRange)


def test_ranges() -> None:
    for bad in (math.nan, math.inf, -math.inf, 10**400):
        with pytest.raises(OutOfRange):
            coerce(float, bad)
    with pytest.raises(OutOfRange, match=r"within \+-5"):
        coerce(int, 6, max_int=5)
    assert coerce(int, -5, max_int=5) == -5
    with pytest.raises(OutOfRange, match=r"within \+-10"):
        coerce(float, 10.5, max_float=10.0)
    assert coerce(int, 2**63 - 1) == 2**63 - 1
    with pytest.raises(OutOfRange):
        coerce(int, 2**63)
    # a union reports the range, not a type mismatch, when only the range failed
    with pytest.raises(OutOfRange):
        coerce(int | None, 2**70)


def test_annotation_of_a_default() -> None:
    assert annotation_of(0.5) is float and annotation_of(3) is int and annotation_of(True) is bool
    assert annotation_of((1, 2)) is list and annotation_of([1]) is list
    assert annotation_of(None) == ANY_SETTING


GRID = """
seeds = [0]
[recipe]
epochs = {epochs}
lr = {lr}
[[datasets]]
name = "shapes"
num_train = {num_train}
num_test = 32
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "csra"
lam = {lam}
[run]
heads_together = {together}
"""
GOOD = {"epochs": "1", "lr": "1", "num_train": "64", "lam": "1", "together": "true"}


def _grid(tmp_path: Path, **changes: str) -> Path:
    path = tmp_path / "g.toml"
    path.write_text(GRID.format(**{**GOOD, **changes}))
    return path


def test_every_place_of_a_grid_uses_the_rule(tmp_path: Path) -> None:
    grid = load_grid(str(_grid(tmp_path)))
    cell = grid.cells[0]
    assert cell.recipe.lr == 1.0 and type(cell.recipe.lr) is float  # recipe: int -> float
    assert cell.hparams["lam"] == 1.0 and type(cell.hparams["lam"]) is float  # head: int -> float
    assert cell.dataset_options["num_train"] == 64
    assert grid.run == RunOptions(heads_together=True)
    for key, fragment in (("epochs", "'epochs' = True"), ("num_train", "'num_train' = True"),
                          ("lam", "'lam' = True"), ("together", "heads_together = 1")):
        with pytest.raises(UsageError) as err:
            load_grid(str(_grid(tmp_path, **{key: "1" if key == "together" else "true"})))
        assert fragment in str(err.value) and str(tmp_path / "g.toml") in str(err.value), str(err.value)


def test_run_options_name_the_key_and_values(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\[run\] save_weights = 'some'; expected one of 'all', 'head', 'none'"):
        RunOptions.from_table({"save_weights": "some"}, "g.toml")
    with pytest.raises(UsageError, match=r"unknown \[run\] key 'speed'; valid: 'checkpoint', 'heads_together', 'save_weights'"):
        RunOptions.from_table({"speed": 1}, "g.toml")
    assert RunOptions().replace(checkpoint="none") == RunOptions(checkpoint="none")
    with pytest.raises(UsageError):
        RunOptions().replace(checkpoint="sometimes")
