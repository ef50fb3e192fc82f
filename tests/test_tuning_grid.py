"""``[tune]`` in a grid (bench/config/tune.py, docs/tuning.md): expansion, identity, groups, shards, refusals.

Grids are written to a temporary folder; nothing trains. Expected points are written out here by
hand (not taken from the code's product).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import main
from bench.config.grid import head_group_key, load_grid, shard_cells
from bench.config.tune import refit_recipe
from bench.core.errors import UsageError

BASE = """
seeds = [0, 1]

[recipe]
epochs = 2
image_size = 32
lr = 0.003
select = "best_val"
{recipe}

{tune}

[[datasets]]
name = "shapes"
num_train = 40
num_test = 20

[[backbones]]
name = "tiny_cnn"

[[heads]]
name = "baseline"
pool = ["avg", "max"]

[[heads]]
name = "csra"
num_heads = 1
lam = 0.5

[[heads]]
name = "csra_free"
lam = 0.5
"""

TUNE = """
[tune]
weight_decay = [0.0, 0.01]
lr = [0.0003, 0.003, 0.03]
"""
# grid order: keys in name order (lr, weight_decay), values in file order
POINTS = [
    {"lr": 0.0003, "weight_decay": 0.0}, {"lr": 0.0003, "weight_decay": 0.01},
    {"lr": 0.003, "weight_decay": 0.0}, {"lr": 0.003, "weight_decay": 0.01},
    {"lr": 0.03, "weight_decay": 0.0}, {"lr": 0.03, "weight_decay": 0.01},
]


def grid_file(tmp_path: Path, tune: str = TUNE, recipe: str = "", name: str = "g.toml") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(tune=tune, recipe=recipe))
    return path


def configs_of(cells) -> set[tuple[str, str]]:
    return {(c.head, repr(sorted(c.hparams.items()))) for c in cells}


def test_every_head_configuration_and_seed_is_trained_at_every_point(tmp_path: Path) -> None:
    grid = load_grid(str(grid_file(tmp_path)))
    # 4 head configurations (baseline avg/max, csra, csra_free) x 2 seeds x 6 points
    assert len(grid.cells) == 4 * 2 * 6
    assert len({c.run_id for c in grid.cells}) == len(grid.cells)
    by_group: dict[tuple, list] = {}
    for cell in grid.cells:
        by_group.setdefault((cell.head, repr(sorted(cell.hparams.items())), cell.seed), []).append(cell)
        # the recipe is the grid's with the point's values on top
        assert cell.recipe.lr == cell.tune_point["lr"] and cell.recipe.weight_decay == cell.tune_point["weight_decay"]
        assert cell.recipe.epochs == 2 and cell.recipe.select == "best_val"
        assert cell.tune_fields()["tune_points"] == 6
    assert len(by_group) == 8
    for members in by_group.values():
        # the same points, in grid order, for every head configuration x seed
        assert [c.tune_point for c in members] == POINTS
        assert [c.tune_index for c in members] == list(range(6))
        assert len({c.tune_group for c in members}) == 1
    assert len({members[0].tune_group for members in by_group.values()}) == 8
    # the grid's [recipe] (lr 0.003, weight decay 1e-4 by default) is no point; with 0.0 it is point 3
    assert {c.tune_default for c in grid.cells} == {None}
    grid = load_grid(str(grid_file(tmp_path, recipe="weight_decay = 0.0", name="d.toml")))
    assert {c.tune_default for c in grid.cells} == {2}


def test_a_derived_head_reuses_the_source_run_of_its_own_point(tmp_path: Path) -> None:
    grid = load_grid(str(grid_file(tmp_path)))
    by_id = {c.run_id: c for c in grid.cells}
    derived = [c for c in grid.cells if c.head == "csra_free"]
    assert len(derived) == 12
    for cell in derived:
        source = by_id[cell.source_run_id]
        assert source.head == "baseline" and source.hparams["pool"] == "avg"
        assert source.tune_point == cell.tune_point and source.seed == cell.seed


def test_a_grid_without_tune_keeps_its_run_ids(tmp_path: Path) -> None:
    # literal ids of configs/smoke.toml's first cells as main computed them before [tune] existed
    cells = load_grid("smoke").cells
    assert [c.run_id for c in cells[:3]] == ["2c20558f35e471ae", "91875a73cf5bb083", "5ed214c180473a16"]
    assert all(c.tune_group is None and c.tune_fields() == {} and "tune" not in c.config() for c in cells)
    # a point is never the same run as the untuned run of its recipe (whose row has no tune group)
    tuned = load_grid(str(grid_file(tmp_path))).cells
    plain = load_grid(str(grid_file(tmp_path, tune="", recipe="weight_decay = 0.01", name="p.toml"))).cells
    assert not {c.run_id for c in tuned} & {c.run_id for c in plain}


def test_points_of_a_frozen_backbone_share_one_pass_per_seed(tmp_path: Path) -> None:
    frozen = 'protocol = "frozen"\naugment = "none"'
    grid = load_grid(str(grid_file(tmp_path, recipe=frozen)))
    keys = {}
    for cell in grid.cells:
        keys.setdefault(cell.seed, set()).add(head_group_key(cell))
    assert {s: len(k) for s, k in keys.items()} == {0: 1, 1: 1}
    assert keys[0] != keys[1]
    # finetuned backbone: every point is a pass of its own
    assert {head_group_key(c) for c in load_grid(str(grid_file(tmp_path, name="f.toml"))).cells} == {None}


@pytest.mark.parametrize("frozen", [False, True])
def test_a_shard_never_splits_a_tune_group(tmp_path: Path, frozen: bool) -> None:
    recipe = 'protocol = "frozen"\naugment = "none"' if frozen else ""
    grid = load_grid(str(grid_file(tmp_path, tune=TUNE + "refit = true", recipe=recipe)))
    cells = grid.cells + grid.refits
    count = 2 if frozen else 3  # frozen: one family per seed (an empty shard is a usage error)
    shards = [shard_cells(cells, k, count) for k in range(1, count + 1)]
    assert sorted(c.run_id for s in shards for c in s) == sorted(c.run_id for c in cells)
    owner = {}
    for k, shard in enumerate(shards):
        for cell in shard:
            assert owner.setdefault(cell.tune_group, k) == k, "a tune group (points and refit) is split across shards"
    assert all(shards)
    if frozen:
        with pytest.raises(UsageError, match="is empty"):
            shard_cells(cells, 3, 3)


def test_refit_cells_depend_on_their_group_and_train_the_chosen_point_on_all_training_images(tmp_path: Path) -> None:
    grid = load_grid(str(grid_file(tmp_path, tune=TUNE + "refit = true")))
    assert load_grid(str(grid_file(tmp_path, name="n.toml"))).refits == []
    # csra_free is derived (no training): not refit
    assert sorted((c.head, c.seed) for c in grid.refits) == sorted((h, s) for h in ("baseline", "baseline", "csra") for s in (0, 1))
    for refit in grid.refits:
        points = [c for c in grid.cells if c.tune_group == refit.tune_group]
        assert len(points) == 6 and set(refit.tune_sources) == {c.run_id for c in points}
        assert refit.tune_refit and refit.recipe.select == "last"
        assert refit.run_id not in refit.tune_sources
        recipe = refit_recipe(refit.recipe, {"lr": 0.03, "weight_decay": 0.01})
        assert (recipe.lr, recipe.weight_decay, recipe.select, recipe.epochs) == (0.03, 0.01, "last", 2)
    assert len({r.run_id for r in grid.refits}) == 6


@pytest.mark.parametrize(
    ("tune", "recipe", "named"),
    [
        ("[tune]\nepochs = [2, 4]", "", "'epochs'"),
        ("[tune]\nselect = ['best_val', 'last']", "", "'select'"),
        ("[tune]\nval_fraction = [0.1, 0.2]", "", "'val_fraction'"),
        ("[tune]\nimage_size = [32, 64]", "", "'image_size'"),
        ("[tune]\nbatch_size = [16, 32]", "", "'batch_size'"),
        ("[tune]\nprotocol = ['frozen', 'finetune']", "", "'protocol'"),
        ("[tune]\nlearning_rate = [0.1]", "", "'learning_rate'"),
        ("[tune]\nlr = 0.1", "", "lr"),
        ("[tune]\nlr = []", "", "lr"),
        ("[tune]\nlr = [0.1, 0.1]", "", "lr"),
        ("[tune]\nlr = [-1.0, 0.1]", "", "'lr'"),
        ("[tune]\nasl_clip = [0.0, 0.05]", "", "'asl_clip'"),
        ("[tune]\nlr = [0.1, 0.01]\nrefit = 'yes'", "", "refit"),
        ("[tune]\nlr = [0.1, 0.01]", 'select = "best_test"', "'select'"),
    ],
)
def test_bad_tune_tables_are_refused_naming_the_key(tmp_path: Path, tune: str, recipe: str, named: str) -> None:
    path = grid_file(tmp_path, tune=tune)
    text = path.read_text()
    if recipe:
        text = text.replace('select = "best_val"', recipe)
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_grid(str(path))
    assert str(path) in str(info.value) and named in str(info.value)


def test_tune_without_a_validation_split_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = grid_file(tmp_path)
    path.write_text(path.read_text().replace('select = "best_val"\n', ""))  # select = "last": no validation split
    assert main(["--grid", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'select'" in err and "best_val" in err and str(path) in err


def test_tunable_keys_cover_the_optimisation(tmp_path: Path) -> None:
    tune = """[tune]
optimizer = ["adamw", "sgd"]
momentum = [0.9, 0.0]
loss = ["asl"]
asl_gamma_neg = [2.0, 4.0]
grad_clip = [0.0, 10.0]
"""
    grid = load_grid(str(grid_file(tmp_path, tune=tune)))
    assert len(grid.cells) == 4 * 2 * 2 * 2 * 1 * 2 * 2
    seen = {(c.recipe.optimizer, c.recipe.momentum, c.recipe.loss, c.recipe.asl_gamma_neg, c.recipe.grad_clip) for c in grid.cells}
    assert len(seen) == 16


def test_a_tuned_cell_is_rebuilt_from_its_stored_config_with_the_same_run_id(tmp_path: Path) -> None:
    from bench.config.grid import Cell

    grid = load_grid(str(grid_file(tmp_path, tune=TUNE + "refit = true")))
    for cell in [*grid.cells[:3], grid.refits[0]]:
        again = Cell.from_config(cell.config())
        assert again.run_id == cell.run_id and again.tune_group == cell.tune_group
