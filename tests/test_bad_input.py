"""Bad input: every usage error names the file or key and what would be valid, and exits with 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.cli import main
from conftest import TINY_GRID


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
    from bench.backbones import build_backbone

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
    from bench.errors import UsageError
    from bench.grid import load_grid
    from bench.runner import DataStore, preflight

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
