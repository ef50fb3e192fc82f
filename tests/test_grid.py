"""Grid files: validation errors that name file, key and allowed values; stable run ids."""

from __future__ import annotations

import hashlib
import itertools

import os
from pathlib import Path

import pytest
from conftest import TINY_GRID, run_cli

from bench.api import registry
from bench.config.grid import config_hash, load_grid
from bench.core.errors import UsageError

PLUGIN = '''
from torch import nn
from bench.api.dataset import MultiLabelDataset
from bench.api.registry import register_dataset, register_head

@register_head("scaled_probe")
class ScaledProbe(nn.Module):
    def __init__(self, in_channels, num_classes, context=None, *, scale: float = 1.0, depth: int = 1):
        super().__init__()

@register_dataset("rooted_probe")
class RootedProbe(MultiLabelDataset):
    needs_root = True
    expected_layout = "expects ROOT/labels.csv"

    def __init__(self, root=None, split="train"):
        raise AssertionError("never built by these tests")
'''


@pytest.fixture(scope="module", autouse=True)
def probe_plugins(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "probes.py").write_text(PLUGIN)
    old = os.environ.get("HEADBENCH_HEADS_PATH")
    os.environ["HEADBENCH_HEADS_PATH"] = str(folder)
    registry.load_plugins()
    yield
    if old is None:
        del os.environ["HEADBENCH_HEADS_PATH"]
    else:
        os.environ["HEADBENCH_HEADS_PATH"] = old


def write(tmp_path: Path, text: str, name: str = "g.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_expansion_is_a_product_over_seeds_and_hparams(tmp_path: Path) -> None:
    text = TINY_GRID.replace("seeds = [0]", "seeds = [0, 1, 2]") + '[[heads]]\nname = "scaled_probe"\nscale = [0.5, 1, 2]\ndepth = [1, 2]\n'
    grid = load_grid(str(write(tmp_path, text)))
    assert len(grid.cells) == 3 * (2 + 3 * 2)
    assert [c.seed for c in grid.cells[:8]] == [0] * 8
    probe = [c for c in grid.cells if c.head == "scaled_probe"]
    assert {(c.hparams["scale"], c.hparams["depth"]) for c in probe} == {(s, d) for s in (0.5, 1.0, 2.0) for d in (1, 2)}
    assert all(isinstance(c.hparams["scale"], float) for c in probe)  # 1 and 1.0 are one value


def test_run_ids_do_not_depend_on_key_order(tmp_path: Path) -> None:
    a = """
seeds = [0, 1]
[recipe]
preset = "embedded_cpu"
epochs = 2
lr = 0.01
[[datasets]]
name = "shapes"
num_train = 96
num_test = 50
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "scaled_probe"
scale = [1, 2.5]
depth = [1, 2]
"""
    b = """
[[heads]]
depth = [1, 2]
scale = [1.0, 2.5]
name = "scaled_probe"

[[backbones]]
name = "tiny_cnn"

[[datasets]]
num_test = 50
name = "shapes"
num_train = 96

[recipe]
lr = 1e-2
epochs = 2
preset = "embedded_cpu"
"""
    b = "seeds = [0, 1]\n" + b
    ids_a = [c.run_id for c in load_grid(str(write(tmp_path, a, "a.toml"))).cells]
    ids_b = [c.run_id for c in load_grid(str(write(tmp_path, b, "b.toml"))).cells]
    assert ids_a == ids_b and len(set(ids_a)) == 8


def test_config_hash_is_stable_and_sensitive() -> None:
    base = {"a": 1, "b": {"x": [1, 2], "y": "z"}}
    assert config_hash(base) == config_hash({"b": {"y": "z", "x": [1, 2]}, "a": 1})
    assert config_hash(base) != config_hash({"a": 1, "b": {"x": [2, 1], "y": "z"}})
    assert len(config_hash(base)) == 16


def test_run_identity_is_pinned(tmp_path: Path) -> None:
    """Literal values computed once (2026-12-05). A change to how a configuration is resolved or
    hashed moves every run_id, and every results directory's finished runs would be trained
    again: if such a change is deliberate, update these literals knowingly (and say so)."""
    base = {"a": 1, "b": {"x": [1, 2], "y": "z"}}
    assert config_hash(base) == "8feb9bb154b581bf"
    # the definition: sha256 of the key-sorted compact JSON, first 16 hex digits
    assert hashlib.sha256(b'{"a":1,"b":{"x":[1,2],"y":"z"}}').hexdigest()[:16] == "8feb9bb154b581bf"
    cells = load_grid(str(write(tmp_path, TINY_GRID, "tiny.toml"))).cells
    assert [(c.head, c.hparams, c.seed, c.run_id) for c in cells] == [
        ("baseline", {"pool": "avg"}, 0, "7e378e6cb4481dd2"),
        ("baseline", {"pool": "max"}, 0, "acebd5019bffdbda"),
    ]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("seeds = [0]", "sedds = [0]"), ["unknown top-level key", "'sedds'", "'seeds'"]),
        (lambda t: t.replace("epochs = 1", 'epochs = "ten"'), ["'epochs'", "wrong type", "int"]),
        (lambda t: t.replace("epochs = 1", "epochs = 0"), ["'epochs'", "out of range", ">= 1"]),
        (lambda t: t.replace("epochs = 1", 'optimizer = "adam"'), ["'optimizer'", "'sgd', 'adamw'"]),
        (lambda t: t.replace("epochs = 1", "epoch = 1"), ["unknown recipe key 'epoch'", "'epochs'"]),
        (lambda t: t.replace('preset = "embedded_cpu"', 'preset = "fast"'), ["preset 'fast'", "'csra_voc'"]),
        (lambda t: t.replace('name = "tiny_cnn"', 'name = "resnet7"'), ["unknown backbone 'resnet7'", "'resnet18'"]),
        (lambda t: t.replace('name = "tiny_cnn"', 'name = "tiny_cnn"\nweight = "x"'), ["[[backbones]] 1", "'weight'", "'weights'"]),
        (lambda t: t.replace('name = "baseline"', 'name = "baselin"'), ["unknown head 'baselin'", "'baseline'"]),
        (lambda t: t.replace('pool = ["avg", "max"]', 'pooling = "avg"'), ["[[heads]] 1", "heads/baseline.py", "'pooling'", "valid: 'pool'"]),
        (lambda t: t.replace('pool = ["avg", "max"]', "pool = []"), ["'pool' is an empty list"]),
        (lambda t: t.replace('pool = ["avg", "max"]', "pool = 3"), ["'pool' = 3", "expected one of 'avg', 'max'"]),
        (lambda t: t.replace("num_train = 96", "num_train = [96, 200]"), ["[[datasets]] 1", "'num_train' is a list"]),
        (lambda t: t.replace("num_train = 96", "num_trian = 96"), ["[[datasets]] 1", "'num_trian'", "'num_train'"]),
        (lambda t: t.replace('name = "shapes"', 'name = "shapes"\ntest_split = "val"'), ["test_split = 'val'", "'train', 'test'"]),
        (lambda t: t.replace("seeds = [0]", 'seeds = ["a"]'), ["'seeds' must be"]),
        (lambda t: t.split("[[heads]]")[0], ["[[heads]]"]),
        (lambda t: t.replace("epochs = 1", "epochs = = 1"), ["not valid TOML"]),
        (lambda t: t + "[run]\nsave_weights = \"some\"\n", ["[run] save_weights", "'all', 'head', 'none'"]),
    ],
)
def test_bad_grid_files_get_specific_errors(tmp_path: Path, edit, expected: list[str]) -> None:
    path = write(tmp_path, edit(TINY_GRID))
    with pytest.raises(UsageError) as err:
        load_grid(str(path))
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, message


def test_filters_keep_only_named_entries_and_reject_unknown_ones(tmp_path: Path) -> None:
    text = TINY_GRID + '[[heads]]\nname = "scaled_probe"\n'
    path = write(tmp_path, text)
    assert {c.head for c in load_grid(str(path), heads=["scaled_probe"]).cells} == {"scaled_probe"}
    with pytest.raises(UsageError, match="unknown head 'no_such_head'.*registered heads: .*'baseline'"):
        load_grid(str(path), heads=["no_such_head"])


def test_heads_option_runs_a_registered_head_the_grid_does_not_list(tmp_path: Path) -> None:
    """--heads NAME with a head the grid does not list: its declared sweep on the grid's setup."""
    from bench.api import head_class

    path = write(tmp_path, TINY_GRID)
    cells = load_grid(str(path), heads=["csra"]).cells
    sweep = head_class("csra").sweep
    expected = sum(len(list(itertools.product(*[v if isinstance(v, list) else [v] for v in entry.values()]))) for entry in sweep)
    assert [c.head for c in cells] == ["csra"] * expected and expected > 1
    assert {(c.dataset, c.backbone, c.seed) for c in cells} == {("shapes", "tiny_cnn", 0)}
    # a head with no declared sweep runs once with its defaults
    cells = load_grid(str(path), heads=["scaled_probe"]).cells
    assert [(c.head, c.hparams) for c in cells] == [("scaled_probe", {"scale": 1.0, "depth": 1})]


def test_dataset_without_root_is_skipped_with_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADBENCH_ROOT_ROOTED_PROBE", raising=False)
    text = TINY_GRID.replace('[[backbones]]', '[[datasets]]\nname = "rooted_probe"\n\n[[backbones]]')
    grid = load_grid(str(write(tmp_path, text)))
    assert {c.dataset for c in grid.cells} == {"shapes"}
    assert len(grid.skipped) == 1
    line = grid.skipped[0]
    assert "rooted_probe" in line and "--data-root rooted_probe=PATH" in line and "$HEADBENCH_ROOT_ROOTED_PROBE" in line
    assert "expects ROOT/labels.csv" in line



def test_a_given_root_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    text = TINY_GRID.replace('[[backbones]]', '[[datasets]]\nname = "rooted_probe"\n\n[[backbones]]')
    missing = tmp_path / "nowhere"
    with pytest.raises(UsageError) as err:
        load_grid(str(write(tmp_path, text)), data_roots={"rooted_probe": str(missing)})
    assert f"data root {missing} does not exist" in str(err.value) and "expects ROOT/labels.csv" in str(err.value)


def test_root_is_not_part_of_the_run_id(tmp_path: Path) -> None:
    path = write(tmp_path, TINY_GRID)
    a = load_grid(str(path)).cells
    b = load_grid(str(path), data_roots={"shapes": str(tmp_path)}).cells
    assert [c.run_id for c in a] == [c.run_id for c in b]
    assert b[0].root == str(tmp_path)


def test_unknown_grid_name_lists_the_grids() -> None:
    with pytest.raises(UsageError, match="grid 'nosuch' not found.*'smoke'"):
        load_grid("nosuch")


def test_cli_usage_error_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, TINY_GRID.replace("epochs = 1", "epochs = -3"))
    result = run_cli("--grid", str(path), "--dry-run")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "'epochs' = -3" in result.stderr
