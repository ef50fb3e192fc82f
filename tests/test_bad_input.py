"""Bad input: every usage error names the file or key and what would be valid, and exits with 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_GRID

from bench.cli import main


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


def grid(tmp_path: Path, text: str) -> str:
    path = tmp_path / "g.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda t: t.replace("epochs = 1", "epohcs = 1"), ["unknown recipe key 'epohcs'", "'epochs'"]),
        (lambda t: t.replace("batch_size = 32", 'batch_size = "32"'), ["'batch_size' = '32'", "wrong type", "a int >= 1"]),
        (lambda t: t.replace('name = "baseline"', 'name = "csr"'), ["unknown head 'csr'", "'baseline'"]),
        (lambda t: t.replace('name = "shapes"', 'name = "voc"'), ["unknown dataset 'voc'", "'shapes'"]),
        (lambda t: t.replace('name = "tiny_cnn"', 'name = "resnet"'), ["unknown backbone 'resnet'", "'resnet50'"]),
    ],
)
def test_bad_grid_file(tmp_path: Path, capsys: pytest.CaptureFixture, edit, fragments: list[str]) -> None:
    path = grid(tmp_path, edit(TINY_GRID))
    status, err = run(capsys, "--grid", path, "--results", str(tmp_path / "r"))
    assert status == 2
    assert err.startswith("error: ") and path in err
    for fragment in fragments:
        assert fragment in err, err


def test_weights_file_that_is_not_a_state_dict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "weights.pt"
    torch.save([1, 2, 3], bad)
    text = TINY_GRID.replace('name = "tiny_cnn"', f'name = "tiny_cnn"\nweights = "{bad}"')
    status, err = run(capsys, "--grid", grid(tmp_path, text), "--results", str(tmp_path / "r"))
    assert status == 2 and str(bad) in err and "not a state dict" in err
    assert not (tmp_path / "r" / "runs").exists() or not any((tmp_path / "r" / "runs").iterdir())


def test_weights_file_that_does_not_fit_names_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "weights.pt"
    from bench.models.backbones import build_backbone

    state = build_backbone("tiny_cnn").body.state_dict()
    state["0.weight"] = torch.zeros(8, 3, 3, 3)  # the first conv has 16 filters
    del state["4.weight"]
    torch.save(state, bad)
    text = TINY_GRID.replace('name = "tiny_cnn"', f'name = "tiny_cnn"\nweights = "{bad}"')
    status, err = run(capsys, "--grid", grid(tmp_path, text), "--results", str(tmp_path / "r"))
    assert status == 2 and str(bad) in err
    assert "missing keys: 4.weight" in err and "0.weight: file (8, 3, 3, 3) vs model (16, 3, 3, 3)" in err


def test_missing_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = TINY_GRID.replace('name = "tiny_cnn"', 'name = "tiny_cnn"\nweights = "/nonexistent/w.pth"')
    status, err = run(capsys, "--grid", grid(tmp_path, text), "--results", str(tmp_path / "r"))
    assert status == 2 and "/nonexistent/w.pth" in err and "does not exist" in err


def test_unwritable_results_directory_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, err = run(capsys, "--grid", grid(tmp_path, TINY_GRID), "--results", str(blocker / "results"))
    assert status == 2 and f"results directory {blocker / 'results'} is not writable" in err


def test_batch_size_must_split_across_processes_is_checked_up_front(tmp_path: Path) -> None:
    """(the check itself; the 2-process launch is exercised in test_end_to_end)"""
    from bench.config.grid import load_grid
    from bench.core.errors import UsageError
    from bench.engine.runner import DataStore, preflight

    class TwoProcesses:
        num_processes = 2

        def main_process_first(self):
            import contextlib

            return contextlib.nullcontext()

    g = load_grid(grid(tmp_path, TINY_GRID.replace("batch_size = 32", "batch_size = 33")))
    with pytest.raises(UsageError, match="batch_size = 33 is global and must be divisible by the number of processes"):
        preflight(g, DataStore(TwoProcesses()))


def test_bad_data_root_argument(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, err = run(capsys, "--grid", grid(tmp_path, TINY_GRID), "--data-root", "shapes")
    assert status == 2 and "--data-root expects NAME=PATH" in err


# -- issue 17, item 2: every setting is validated before any training --------------------------------


def _recipe_line(line: str):
    return lambda t: t.replace("epochs = 1", f"epochs = 1\n{line}")


def _dataset_line(line: str):
    return lambda t: t.replace('name = "shapes"', f'name = "shapes"\n{line}')


WITH_DERIVED = TINY_GRID + '[[heads]]\nname = "csra_free"\n'


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (_recipe_line("lr = nan"), ["recipe key 'lr' = nan", "not a finite number", "a float >= 0.0"]),
        (_recipe_line("warmup_epochs = inf"), ["recipe key 'warmup_epochs' = inf", "not a finite number", ">= 0.0"]),
        (_recipe_line("momentum = nan"), ["recipe key 'momentum' = nan", "not a finite number", "<= 1.0"]),
        (_recipe_line("weight_decay = -inf"), ["recipe key 'weight_decay' = -inf", "not a finite number"]),
        (_recipe_line("image_size = 100000"), ["recipe key 'image_size' = 100000", "out of range", "<= 4096"]),
        (_recipe_line("nesterov = true"), ["nesterov = true needs optimizer = 'sgd' with momentum > 0", "optimizer is 'adamw'"]),
        (_recipe_line('optimizer = "sgd"\nmomentum = 0.0\nnesterov = true'), ["nesterov = true needs optimizer = 'sgd' with momentum > 0", "momentum 0.0"]),
        (lambda t: t.replace("seeds = [0]", "seeds = [0, -1]"), ["'seeds' holds -1", "0 .. 4294967295"]),
        (lambda t: t.replace("seeds = [0]", "seeds = 4294967296"), ["'seeds' holds 4294967296", "0 .. 4294967295"]),
        (_dataset_line("root = 5"), ["[[datasets]] 1 (shapes): root = 5 must be a non-empty string"]),
        (_dataset_line("test_split = 3"), ["test_split = 3 must be a non-empty string", "valid splits: 'train', 'test'"]),
        (_dataset_line('train_split = ""'), ["train_split = '' must be a non-empty string"]),
        (_dataset_line("min_object = nan"), ["[[datasets]] 1 (shapes): 'min_object' = nan is not a finite number"]),
        (lambda t: t.replace('name = "baseline"', 'name = "csra"\nlam = inf').replace('pool = ["avg", "max"]', ""), ["'lam' = inf"]),
        (lambda t: "description = 5\n" + t, ["'description' must be a string"]),
        (lambda t: "run = 5\n" + t, ["'run' must be a table [run]"]),
        (lambda t: WITH_DERIVED + '[run]\nsave_weights = "none"\n', ["[run] save_weights = 'none'", "csra_free (", "set save_weights = 'all'"]),
        (lambda t: WITH_DERIVED + '[run]\nsave_weights = "head"\n', ["[run] save_weights = 'head'", "csra_free (", "derived_from"]),
    ],
    ids=lambda v: "" if callable(v) else v[0][:40],
)
def test_bad_setting_is_exit_2_before_any_training(tmp_path: Path, capsys: pytest.CaptureFixture, edit, fragments: list[str]) -> None:
    path = grid(tmp_path, edit(TINY_GRID))
    status, err = run(capsys, "--grid", path, "--results", str(tmp_path / "r"))
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and path in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "r").exists()  # nothing trained, nothing written


def test_grid_file_that_is_not_text_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "g.toml"
    path.write_bytes(b"\xff\xfe\x00 not utf-8")
    status, err = run(capsys, "--grid", str(path), "--results", str(tmp_path / "r"))
    assert status == 2 and err.count("\n") == 1 and f"{path}: not valid TOML" in err


def test_derived_head_with_full_weights_is_accepted(tmp_path: Path) -> None:
    from bench.config.grid import load_grid

    g = load_grid(grid(tmp_path, WITH_DERIVED + '[run]\nsave_weights = "all"\n'))
    assert any(c.source_run_id for c in g.cells)
    assert load_grid(grid(tmp_path, TINY_GRID + '[run]\nsave_weights = "none"\n')).run.save_weights == "none"  # no derived head


# -- issue 17, items 4 and 5: data mistakes are reported ----------------------------------------------


def folder_data(root: Path, train: list[str], test: list[str], unreadable: tuple[str, ...] = ()) -> Path:
    """A ``folder`` dataset: 8x8 PNGs (``unreadable`` ones hold garbage) and manifests whose rows
    are ``"name.png,labels"``."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for line in train + test:
        name = line.split(",")[0]
        if name in unreadable:
            (root / name).write_bytes(b"not an image at all")
        elif not (root / name).exists():
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
    (root / "train.csv").write_text("path,labels\n" + "\n".join(train) + "\n")
    (root / "test.csv").write_text("path,labels\n" + "\n".join(test) + "\n")
    return root


FOLDER_GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 1
batch_size = 4
eval_batch_size = 8
image_size = 16
[[datasets]]
name = "folder"
root = "{root}"
classes = "cat,dog"
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
"""

TRAIN = [f"tr{i}.png,{'cat' if i % 2 else 'dog;cat'}" for i in range(8)]
TEST = [f"te{i}.png,{'dog' if i % 2 else 'cat'}" for i in range(6)]


def test_image_listed_twice_in_a_manifest_is_exit_2_naming_the_lines(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = folder_data(tmp_path / "data", TRAIN, [*TEST[:3], "te0.png,dog", *TEST[3:]])
    path = grid(tmp_path, FOLDER_GRID.format(root=root))
    status, err = run(capsys, "--grid", path, "--results", str(tmp_path / "r"), "--dry-run")
    assert status == 2 and err.count("\n") == 1, err
    assert f"image 'te0.png' is listed twice: {root / 'test.csv'}, line 2 and {root / 'test.csv'}, line 5" in err


def test_image_listed_twice_by_any_plugin_is_a_data_error_naming_the_entries() -> None:
    """The harness's own check (by ``image_id``), for plugins that do not check themselves."""
    from bench.core.errors import DataError
    from bench.engine.data_store import check_listed_once

    class Split:
        def __len__(self) -> int:
            return 4

        def image_id(self, i: int) -> str:
            return ["a.jpg", "b.jpg", "c.jpg", "b.jpg"][i]

    with pytest.raises(DataError, match=r"dataset 'x' split 'test' lists image 'b.jpg' twice \(entries 2 and 4 of the split\)"):
        check_listed_once(Split(), "x", "test")


def test_image_listed_twice_in_an_annotation_list_names_the_entries(tmp_path: Path) -> None:
    from bench.api.image_files import listed_images_digest
    from bench.core.errors import DataError

    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"instances.json: image 'a.jpg' is listed twice \(entries 1 and 3\)"):
        listed_images_digest(tmp_path, ["a.jpg", "b.jpg", "a.jpg"], "image", "instances.json")


def test_test_images_also_in_the_training_split_are_counted_in_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = folder_data(tmp_path / "data", TRAIN, [*TEST, "tr1.png,cat", "tr2.png,dog"])
    path = grid(tmp_path, FOLDER_GRID.format(root=root))
    with pytest.warns(UserWarning) as record:
        status, err = run(capsys, "--grid", path, "--results", str(tmp_path / "r"), "--dry-run")
    assert status == 0, err
    said = [str(w.message) for w in record]
    assert any("2 of the 8 images of test split 'test' are also in training split 'train' ('tr1.png', 'tr2.png')" in s for s in said), said
    assert any("test split 'test' has only 8 images (fewer than 100)" in s for s in said), said


def test_small_test_split_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.warns(UserWarning, match="test split 'test' has only 51 images \\(fewer than 100\\)"):
        status, _ = run(capsys, "--grid", grid(tmp_path, TINY_GRID), "--results", str(tmp_path / "r"), "--dry-run")
    assert status == 0


def test_split_with_no_readable_image_is_exit_2_naming_the_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: an obscure 'torch.cat(): expected a non-empty list' in a failed row."""
    root = folder_data(tmp_path / "data", TRAIN, TEST, unreadable=tuple(line.split(",")[0] for line in TEST))
    path = grid(tmp_path, FOLDER_GRID.format(root=root))
    with pytest.warns(UserWarning, match="skipping unreadable image te0.png"):
        status, err = run(capsys, "--grid", path, "--results", str(tmp_path / "r"))
    assert status == 2, err
    assert "dataset 'folder' split 'test': none of its 6 images can be decoded" in err and "te0.png" in err
    assert not list((tmp_path / "r" / "runs").glob("*.parquet"))  # no failed row recording a data mistake


# -- issue 17, items 6 and 7: run ids and output places -----------------------------------------------


@pytest.mark.parametrize("run_id", ["../../etc/passwd", "ABCDEF0123456789", "1a2b3c", "1a2b3c4d5e6f7a8b/", ""])
def test_evaluate_accepts_only_the_harness_run_id_form(tmp_path: Path, capsys: pytest.CaptureFixture, run_id: str) -> None:
    (tmp_path / "r" / "runs").mkdir(parents=True)
    status, err = run(capsys, "evaluate", "--run-id", run_id, "--results", str(tmp_path / "r"))
    assert status == 2 and err.count("\n") == 1
    assert f"--run-id {run_id!r} is not a run id of this harness: expected 16 lowercase hexadecimal digits" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r", "runs"]


def test_evaluate_of_an_unknown_run_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "r" / "runs").mkdir(parents=True)
    status, err = run(capsys, "evaluate", "--run-id", "1a2b3c4d5e6f7a8b", "--results", str(tmp_path / "r"))
    assert status == 2 and "no result for run id '1a2b3c4d5e6f7a8b'" in err


def test_report_bootstrap_seed_must_not_be_negative(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "r" / "runs").mkdir(parents=True)
    status, err = run(capsys, "report", "--results", str(tmp_path / "r"), "--bootstrap-seed", "-1")
    assert status == 2 and "--bootstrap-seed must be an integer >= 0, got -1" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["under_a_file", "a_file", "name_too_long"])
def test_report_into_an_impossible_place_is_exit_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, where: str) -> None:
    (tmp_path / "r" / "runs").mkdir(parents=True)
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    out = {"under_a_file": blocker / "report", "a_file": blocker, "name_too_long": tmp_path / ("x" * 300)}[where]
    status, err = run(capsys, "report", "--results", str(tmp_path / "r"), "--out", str(out))
    assert status == 2, err
    assert err.startswith("error: --out: cannot write the report into") and err.count("\n") == 1 and "Traceback" not in err, err
    assert blocker.read_text() == "keep me"
