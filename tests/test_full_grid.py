"""The full grids (issue 3): `--grid full --dry-run` lists cells and skipped datasets without
training; `full-embedded` expands; bad head values in a grid stop the launch before training."""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import cli
from bench.api import head_class, list_heads
from bench.config.grid import load_grid
from bench.config.recipe import resolve_recipe

ROOT_VARS = ("HEADBENCH_ROOT_VOC2007", "HEADBENCH_ROOT_COCO2014", "HEADBENCH_ROOT_NUSWIDE")
# per dataset x backbone x seed, the seed heads' declared sweeps: baseline 2, csra 5 x 4 + 4
# (H = 1, T = inf), csra_free 4, ml_gcn 3 x 4 + official + identity, attention fusion 1
SEED_HEADS = {"baseline": 2, "csra": 24, "csra_free": 4, "ml_gcn": 14, "attention_fusion": 1}


def declared_count(name: str) -> int:
    """Configurations in head ``name``'s declared sweep (1 when it declares none)."""
    sweep = head_class(name).sweep or ({},)
    return sum(math.prod(len(v) if isinstance(v, list) else 1 for v in entry.values()) for entry in sweep)


def cells_per_setup() -> int:
    """Every registered head with its declared sweep: the full grids take them all ("*")."""
    return sum(declared_count(name) for name in list_heads())
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@pytest.fixture
def no_roots(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ROOT_VARS:
        monkeypatch.delenv(var, raising=False)


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def test_full_dry_run_lists_cells_and_one_skip_per_missing_root(tmp_path: Path, no_roots: None, capsys: pytest.CaptureFixture[str]) -> None:
    voc = tmp_path / "VOC2007"
    voc.mkdir()
    results = tmp_path / "results"
    status = cli.main(["--grid", "full", "--dry-run", "--data-root", f"voc2007={voc}", "--results", str(results)])
    captured = capsys.readouterr()
    out = captured.out
    # the cells are listed, then the dry run builds every dataset / backbone / head: the empty
    # VOC folder is reported (usage error) before anyone launches the grid
    assert status == 2
    assert f"{voc} is not a VOC2007 folder" in flat(captured.err)
    text = flat(out)
    cells = 2 * 3 * cells_per_setup()  # backbones x seeds x heads, voc2007 only
    assert "grid full (" in text
    assert f": {cells} cells" in text
    # one skip line per missing root, each saying how to give it
    assert text.count(": skipped, no data root given") == 2
    assert "coco2014: skipped" in text and "--data-root coco2014=PATH" in text and "$HEADBENCH_ROOT_COCO2014" in text
    assert "nuswide: skipped" in text and "--data-root nuswide=PATH" in text and "$HEADBENCH_ROOT_NUSWIDE" in text
    assert "voc2007: skipped" not in text
    listed = re.findall(r"^\s*\d+\s+([0-9a-f]{16})\s+(\S+) / (\S+) / (\w+)\(", out, flags=re.M)
    assert len(listed) == cells and len({r[0] for r in listed}) == cells
    assert {r[1] for r in listed} == {"voc2007"} and {r[2] for r in listed} == {"resnet50", "resnet101"}
    assert Counter(r[3] for r in listed) == Counter({k: declared_count(k) * 6 for k in list_heads()})
    assert not results.exists()  # nothing trained, nothing written


def test_full_dry_run_with_every_root_and_none(tmp_path: Path, no_roots: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for var in ROOT_VARS:
        folder = tmp_path / var
        folder.mkdir()
        monkeypatch.setenv(var, str(folder))
    assert cli.main(["--grid", "full", "--dry-run"]) == 2  # listed, then the empty folders are reported
    text = flat(capsys.readouterr().out)
    assert f": {3 * 2 * 3 * cells_per_setup()} cells" in text and "skipped" not in text
    for var in ROOT_VARS:
        monkeypatch.delenv(var)
    assert cli.main(["--grid", "full", "--dry-run"]) == 0
    text = flat(capsys.readouterr().out)
    assert ": 0 cells" in text and text.count(": skipped, no data root given") == 3


def test_seed_heads_declare_the_paper_sweeps() -> None:
    assert {name: declared_count(name) for name in SEED_HEADS} == SEED_HEADS


def documented_count() -> int:
    """The number of head configurations the README promises for the full grids."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = re.findall(r"every registered head with its declared sweep: (\d+) configurations", readme)
    assert len(found) == 1, "README.md no longer states the full grid's count of head configurations"
    return int(found[0])


def test_full_grids_run_the_documented_count_of_configurations(no_roots: None) -> None:
    """README's count, the declared sweeps of the heads shipped in heads/ (counted here), and the
    grids a fresh process expands agree: a sweep edited without the README (or a grid expansion
    that drops configurations) fails. (A fresh process: other test modules register probe heads
    in this one.)"""
    count = documented_count()
    shipped = [n for n in list_heads() if Path(inspect.getfile(head_class(n))).parent == ROOT / "heads"]
    assert sum(declared_count(name) for name in shipped) == count
    env = {k: v for k, v in os.environ.items() if k != "HEADBENCH_HEADS_PATH" and not k.startswith("HEADBENCH_ROOT_")}
    code = "from bench.config.grid import load_grid; print(len(load_grid('full-embedded').cells), len(load_grid('full', data_roots={'voc2007': '/'}).cells))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # full-embedded: 2 seeds; full: ResNet-50/101 x 3 seeds, voc2007 only (the others have no root)
    assert result.stdout.split() == [str(2 * count), str(2 * 3 * count)]


def test_full_grid_cells(tmp_path: Path, no_roots: None) -> None:
    grid = load_grid("full", data_roots={"voc2007": str(tmp_path)})
    assert len(grid.cells) == 6 * cells_per_setup()
    assert {c.recipe.image_size for c in grid.cells} == {448}
    assert grid.cells[0].recipe == resolve_recipe({"preset": "csra_voc"}, "test")
    csra = [c for c in grid.cells if c.head == "csra" and c.seed == 0 and c.backbone == "resnet101"]
    assert {(c.hparams["num_heads"], c.hparams["lam"]) for c in csra if not c.hparams["t1_inf"]} == {
        (h, lam) for h in (1, 2, 4, 6, 8) for lam in (0.1, 0.3, 0.5, 1.0)
    }
    gcn = [c.hparams for c in grid.cells if c.head == "ml_gcn" and c.seed == 0 and c.backbone == "resnet101"]
    paper = {(h["tau"], h["p"]) for h in gcn if h["reweight"] == "paper" and h["graph"] == "cooccurrence"}
    assert paper == {(t, p) for t in (0.3, 0.4, 0.5) for p in (0.1, 0.2, 0.25, 0.3)}
    assert any(h["reweight"] == "official" and (h["tau"], h["p"]) == (0.4, 0.25) for h in gcn)
    assert any(h["graph"] == "identity" for h in gcn)
    # every csra_free row comes right after (or after other rows of) its trained avg baseline
    ids = {c.run_id: i for i, c in enumerate(grid.cells)}
    for i, cell in enumerate(grid.cells):
        if cell.head == "csra_free":
            source = grid.cells[ids[cell.source_run_id]]
            assert ids[cell.source_run_id] < i and source.head == "baseline" and source.hparams == {"pool": "avg"}
            assert (source.seed, source.backbone, source.dataset) == (cell.seed, cell.backbone, cell.dataset)
    weights = {c.backbone: c.weights for c in grid.cells}
    assert weights == {"resnet50": "resnet50-11ad3fa6.pth", "resnet101": "resnet101-cd907fc2.pth"}


def test_full_embedded_expands_the_same_head_grid() -> None:
    grid = load_grid("full-embedded")
    seeds = sorted({c.seed for c in grid.cells})
    assert len(grid.cells) == len(seeds) * cells_per_setup() and not grid.skipped
    assert {c.dataset for c in grid.cells} == {"shapes"} and {c.backbone for c in grid.cells} == {"tiny_cnn"}
    full = load_grid("full", data_roots={"voc2007": "/"})
    heads = lambda g: sorted((c.head, tuple(sorted(c.hparams.items()))) for c in g.cells if c.seed == 0 and c.backbone == g.cells[0].backbone)  # noqa: E731
    assert heads(grid) == heads(full)


def test_paper_recipes_are_presets_a_grid_can_name(tmp_path: Path) -> None:
    csra = resolve_recipe({"preset": "csra_voc"}, "t")
    assert (csra.optimizer, csra.lr, csra.lr * csra.lrp, csra.momentum, csra.weight_decay) == ("sgd", 0.1, pytest.approx(0.01), 0.9, 1e-4)
    assert (csra.batch_size, csra.epochs, csra.warmup_epochs, csra.schedule, csra.step_size, csra.gamma) == (16, 30, 2.0, "step", 4, 0.1)
    assert (csra.augment, csra.crop_scale_min, csra.image_size, csra.loss) == ("flip_crop", 0.7, 448, "bce")
    gcn = resolve_recipe({"preset": "mlgcn_voc"}, "t")
    assert (gcn.optimizer, gcn.lr, gcn.lrp, gcn.image_size, gcn.loss) == ("sgd", 0.1, 0.1, 448, "multilabel_soft_margin")
    assert gcn.epochs < gcn.step_size  # the release never decays within its 20 epochs
    text = (CONFIGS / "full.toml").read_text()
    path = tmp_path / "mlgcn.toml"
    path.write_text(text.replace('preset = "csra_voc"', 'preset = "mlgcn_voc"'))
    grid = load_grid(str(path), data_roots={"voc2007": str(tmp_path)})
    assert grid.cells[0].recipe == gcn


BAD_GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 1
batch_size = 16
[[datasets]]
name = "shapes"
num_train = 32
num_test = 16
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
"""


@pytest.mark.parametrize(
    "entry, expected",
    [
        ('name = "csra"\nnum_heads = [1, 3]', ["heads/csra.py", "num_heads = 3 is not allowed", "allowed values: 1, 2, 4, 6, 8"]),
        ('name = "ml_gcn"\ntau = [0.4, 1.5]', ["heads/ml_gcn.py", "tau = 1.5 is out of range", "0 < tau <= 1"]),
        ('name = "ml_gcn"\np = 1.5', ["heads/ml_gcn.py", "p = 1.5 is out of range", "0 <= p <= 1"]),
        ('name = "ml_gcn"\nembeddings = "glove:/nonexistent/glove.txt"', ["heads/ml_gcn.py", "/nonexistent/glove.txt does not exist"]),
    ],
)
def test_bad_head_values_stop_the_launch_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_GRID + "[[heads]]\n" + entry + "\n")
    results = tmp_path / "results"
    status = cli.main(["--grid", str(path), "--results", str(results)])
    err = flat(capsys.readouterr().err)
    assert status == 2, err
    for text in expected:
        assert text in err
    assert err.count("error:") == 1
    assert not list(results.glob("runs/*.parquet"))  # preflight failed: not even the valid baseline trained
