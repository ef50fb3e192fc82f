"""Reliability, round 2 (issue 17): damaged files, concurrent derived heads, crafted run ids, stray
temporary files, non-finite scores. Each test asserts the message or warning, the exit status, and
that nothing already written was lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_GRID
from torch import nn

from bench.api.registry import HEADS
from bench.cli import main
from bench.config.grid import config_hash, load_grid
from bench.core.atomic import host_tag
from bench.core.errors import UsageError
from bench.results import store as results
from bench.results.locks import RunLock

#: the tiny grid at 32 px (a quarter of the work) plus a derived head (csra_free reuses the
#: trained average-pooling baseline): 3 runs, 2 of them trained
SMALL = TINY_GRID.replace("epochs = 1", "epochs = 1\nimage_size = 32").replace("num_train = 96", "num_train = 64")
GRID = SMALL + '[[heads]]\nname = "csra_free"\n'
#: one trained run and its derived head
PAIR = SMALL.replace('pool = ["avg", "max"]', 'pool = "avg"') + '[[heads]]\nname = "csra_free"\n'


def unwrapped(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def files_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def cells(grid: Path) -> dict[str, str]:
    """head (with pool) -> run id."""
    return {c.head + (f"-{c.hparams['pool']}" if "pool" in c.hparams else ""): c.run_id for c in load_grid(str(grid)).cells}


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("grid") / "tiny.toml"
    path.write_text(GRID)
    return path


@pytest.fixture(scope="module")
def reference(grid_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid, trained once (3 runs: baseline avg, baseline max, csra_free)."""
    out = tmp_path_factory.mktemp("reference") / "results"
    assert main(["--grid", str(grid_file), "--results", str(out)]) == 0
    assert len(results.load_all(out)) == 3
    return out


@pytest.fixture
def copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(reference, out)
    return out


def damaged_warnings(record: pytest.WarningsRecorder, path: Path) -> list[str]:
    return [str(w.message) for w in record if str(path) in str(w.message)]


# -- item 1: one damaged file does not make a results directory unusable --------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _garbage(path: Path) -> None:
    path.write_bytes(b"PAR1" + os.urandom(200))


def _duplicate_image(path: Path) -> None:
    """What a run on a test split listing one image twice wrote before duplicates were refused."""
    table = pq.read_table(path)
    doubled = pa.concat_tables([table, table.slice(0, 1)]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(doubled, path)


def _wrong_classes(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"classes": b'["only one"]'}), path)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _duplicate_image, _wrong_classes], ids=lambda f: f.__name__.strip("_"))
def test_damaged_score_file_leaves_report_and_later_launches_working(copy: Path, grid_file: Path, capsys: pytest.CaptureFixture, damage) -> None:
    run_id = cells(grid_file)["baseline-avg"]  # the reference every Δ mAP is computed against
    path = results.scores_path(copy, run_id)
    damage(path)
    before = files_digest(copy / "runs")
    with pytest.warns(UserWarning) as record:
        status = main(["report", "--results", str(copy), "--format", "md", "--resamples", "50"])
    assert status == 0
    said = damaged_warnings(record, path)
    assert len(said) == 1 and "delete it" in said[0] and "run the grid again" in said[0], said
    board = (copy / "leaderboard.md").read_text()
    assert all(head in board for head in ("baseline", "csra_free")) and "is damaged" in board  # every run listed, a note says why Δ is missing
    if damage is _truncate:  # (the launch's report is the one above: once is enough)
        capsys.readouterr()
        assert main(["--grid", str(grid_file), "--results", str(copy)]) == 0  # a later launch: no traceback
        assert "0 trained, 3 already done, 0 failed" in unwrapped(capsys.readouterr().out)
    assert files_digest(copy / "runs") == before


def test_damaged_row_is_skipped_with_one_warning_and_the_run_is_run_again(copy: Path, grid_file: Path, capsys: pytest.CaptureFixture) -> None:
    run_id = cells(grid_file)["baseline-max"]
    path = results.row_path(copy, run_id)
    original = results.read_row(path)
    _truncate(path)
    others = {k: v for k, v in files_digest(copy / "runs").items() if run_id not in k}
    with pytest.warns(UserWarning) as record:
        assert main(["report", "--results", str(copy), "--format", "md", "--resamples", "50"]) == 0
    said = damaged_warnings(record, path)
    assert len(said) == 1 and "the next launch of its grid runs that run again" in said[0]
    capsys.readouterr()
    assert main(["--grid", str(grid_file), "--results", str(copy)]) == 0
    assert "1 trained, 2 already done, 0 failed" in unwrapped(capsys.readouterr().out)
    assert results.read_row(path)["mAP"] == original["mAP"]  # rebuilt, the same number
    assert {k: v for k, v in files_digest(copy / "runs").items() if run_id not in k} == others


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [("mAP", "high", "column 'mAP' holds string"), ("status", "done", "status 'done'"), ("hparams", "{not json", "column .hparams. is not valid JSON")],
)
def test_row_with_a_wrong_value_is_skipped_not_a_crash(copy: Path, grid_file: Path, column: str, value: str, reason: str) -> None:
    run_id = cells(grid_file)["baseline-max"]
    path = results.row_path(copy, run_id)
    table = pq.read_table(path)
    index = table.column_names.index(column)
    pq.write_table(table.set_column(index, pa.field(column, pa.string()), pa.array([value])), path)
    with pytest.warns(UserWarning, match=reason):
        frame = results.load_all(copy)
    assert sorted(frame["run_id"]) == sorted(v for k, v in cells(grid_file).items() if k != "baseline-max")


def test_damaged_weights_are_a_usage_error_naming_the_file(copy: Path, grid_file: Path, capsys: pytest.CaptureFixture) -> None:
    run_id = cells(grid_file)["baseline-avg"]
    path = results.weights_path(copy, run_id)
    _truncate(path)
    assert main(["evaluate", "--run-id", run_id, "--results", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "is damaged" in err and "run the grid again" in err


def _checkpoint(folder: Path, progress: dict, damaged: str) -> None:
    """A checkpoint folder as the trainer lays it out (bench/engine/checkpoints.py), with
    ``damaged`` unreadable."""
    from bench.engine.optim import MemberOptimizer
    from bench.engine.streams import RngStream

    model = nn.Linear(3, 2)
    from bench.config.recipe import resolve_recipe

    recipe = resolve_recipe({"optimizer": "sgd", "momentum": 0.9}, "test")
    optimizer = MemberOptimizer(None, model, recipe, 4, list(model.parameters()))
    folder.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "optimizer": optimizer.state_dict()}, folder / "state.pt")
    torch.save(RngStream.capture(torch.device("cpu")).state_dict(), folder / "rng_0.pt")
    (folder / "progress.json").write_text(json.dumps(progress))
    if damaged:
        _truncate(folder / damaged)


GOOD_PROGRESS = {"epoch": 0, "seconds": 1.0, "images": 64, "losses": [0.7], "steps_per_epoch": 4}


@pytest.mark.parametrize(
    ("progress", "damaged", "reason"),
    [
        (GOOD_PROGRESS, "state.pt", "state.pt cannot be read"),
        (GOOD_PROGRESS, "rng_0.pt", "rng_0.pt cannot be read"),
        ({"epoch": 0}, "", "no valid 'seconds'"),
        ({k: v for k, v in GOOD_PROGRESS.items() if k != "steps_per_epoch"}, "", "no valid 'steps_per_epoch'"),
        ({**GOOD_PROGRESS, "epoch": 3}, "", "says epoch 3"),
    ],
)
def test_damaged_checkpoint_is_found_and_deleted(tmp_path: Path, progress: dict, damaged: str, reason: str) -> None:
    from bench.engine.checkpoints import EpochCheckpoints

    checkpoints = EpochCheckpoints(tmp_path, "a" * 16, accelerator=None)
    _checkpoint(checkpoints.root / "epoch_0000", progress, damaged)
    with pytest.warns(UserWarning, match=f"discarding damaged checkpoint .*epoch_0000: .*{reason}"):
        assert checkpoints.latest() is None
    assert not (checkpoints.root / "epoch_0000").exists()


def test_whole_checkpoint_is_used(tmp_path: Path) -> None:
    from bench.engine.checkpoints import EpochCheckpoints

    checkpoints = EpochCheckpoints(tmp_path, "a" * 16, accelerator=None)
    _checkpoint(checkpoints.root / "epoch_0000", GOOD_PROGRESS, "")
    folder, progress = checkpoints.latest()
    assert folder.name == "epoch_0000" and progress == GOOD_PROGRESS


def test_damaged_epoch_checkpoint_is_discarded_and_the_run_restarts(reference: Path, tmp_path: Path) -> None:
    """Before: the run failed on every --retry-failed (load_state of a damaged file)."""
    grid = tmp_path / "g.toml"
    grid.write_text(SMALL.replace('pool = ["avg", "max"]', 'pool = "avg"'))
    out = tmp_path / "results"
    run_id = next(iter(cells(grid).values()))
    folder = out / "checkpoints" / run_id / "epoch_0000"
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text(json.dumps(GOOD_PROGRESS))
    for file in ("state.pt", "rng_0.pt"):
        (folder / file).write_bytes(b"\x00garbage" * 10)
    with pytest.warns(UserWarning) as record:
        assert main(["--grid", str(grid), "--results", str(out)]) == 0
    said = [str(w.message) for w in record if "discarding damaged checkpoint" in str(w.message)]
    assert len(said) == 1 and "restarts from the first epoch" in said[0] and "state.pt cannot be read" in said[0]
    mine, theirs = results.run_row(out, run_id), results.run_row(reference, run_id)
    assert mine["status"] == "finished" and mine["mAP"] == theirs["mAP"]  # restarted from scratch: the same number
    assert not (out / "checkpoints" / run_id).exists()


def test_damaged_bootstrap_cache_is_recomputed_with_a_warning(copy: Path) -> None:
    args = ["report", "--results", str(copy), "--format", "md", "--resamples", "50"]
    assert main(args) == 0
    board = (copy / "leaderboard.md").read_text()
    caches = sorted((copy / ".cache" / "bootstrap").glob("*"))
    assert caches
    for path in caches:
        _truncate(path)
    with pytest.warns(UserWarning, match="bootstrap cache file .* is damaged"):
        assert main(args) == 0
    assert (copy / "leaderboard.md").read_text() == board


def test_damaged_lock_file_is_reclaimed_after_a_grace_period(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, "a" * 16)
    lock.path.parent.mkdir(parents=True)
    lock.path.write_text("")  # what a writer killed between create and write used to leave
    assert not lock.acquire()  # young: maybe still being written
    old = time.time() - 60
    os.utime(lock.path, (old, old))
    with pytest.warns(UserWarning, match="is damaged .* reclaiming it"):
        assert lock.acquire()
    assert lock.owner()["pid"] == os.getpid()  # written whole, never empty
    lock.release()
    assert not list(lock.path.parent.iterdir())  # no temporary file left by the link-based creation


# -- item 5: a test split too small for a class to have a positive is said in the leaderboard -------


def test_classes_left_out_of_map_are_noted_in_the_leaderboard(copy: Path, grid_file: Path) -> None:
    run_id = cells(grid_file)["baseline-max"]
    row = results.run_row(copy, run_id)
    classes = row["num_classes"]
    row["classes_evaluated"] = classes - 2  # as a run on a test split where 2 classes have no positive records it
    results.write_row(copy, row)
    assert main(["report", "--results", str(copy), "--format", "md", "--resamples", "50"]) == 0
    board = unwrapped((copy / "leaderboard.md").read_text())
    assert f"shapes, test split `test`: 2 of {classes} classes have no positive (non-ignored) test image, so they are left out of mAP" in board
    assert "of 1 run(s)" in board


# -- item 3: concurrent launches and derived heads ------------------------------------------------


def test_derived_head_is_left_to_the_launch_holding_its_source(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text(PAIR)
    out = tmp_path / "results"
    ids = cells(grid)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # "another launch", alive
    try:
        lock = RunLock(out, ids["baseline-avg"])
        lock.path.parent.mkdir(parents=True)
        lock.path.write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "since": time.time()}))
        assert main(["--grid", str(grid), "--results", str(out)]) == 0
        text = capsys.readouterr()
        assert "0 trained, 0 already done, 0 failed, 2 claimed by another launch" in unwrapped(text.out), text.out + text.err
        assert "FAILED" not in text.err and not list((out / "runs").glob("*.parquet"))  # no false failure recorded
    finally:
        other.kill()
        other.wait()
    # the holder is gone (its lock is stale): the next launch runs the source, then the derived head
    assert main(["--grid", str(grid), "--results", str(out)]) == 0
    assert "2 trained, 0 already done, 0 failed" in unwrapped(capsys.readouterr().out)
    rows = results.load_all(out).set_index("head")
    assert (rows["status"] == "finished").all() and rows.loc["csra_free", "source_run_id"] == ids["baseline-avg"]


def test_derived_head_without_a_source_row_waits_instead_of_failing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--retry-failed with a failed derived run whose source has no row: the source is not retried
    (it never failed), so the derived run cannot run; it is reported, not failed again."""
    grid = tmp_path / "g.toml"
    grid.write_text(PAIR)
    out = tmp_path / "results"
    ids = cells(grid)
    failed = {"run_id": ids["csra_free"], "status": "failed", "head": "csra_free", "error": "no result for run id", "finished_at": "2026-01-01T00:00:00"}
    results.write_row(out, failed)
    before = files_digest(out / "runs")
    assert main(["--grid", str(grid), "--results", str(out), "--retry-failed"]) == 0
    assert "1 waiting for a source run that has no result yet" in unwrapped(capsys.readouterr().out)
    assert files_digest(out / "runs") == before


# -- item 6: run ids from rows never become paths outside the results directory --------------------


def test_crafted_row_cannot_make_the_report_write_outside_the_results_directory(copy: Path, tmp_path: Path) -> None:
    template = pq.read_table(next((copy / "runs").glob("*.parquet")))
    evil_ids = ["../../escaped", "/tmp/escaped", "a" * 15 + "/", "A" * 16]
    for k, evil in enumerate(evil_ids):
        table = template.set_column(template.column_names.index("run_id"), "run_id", pa.array([evil]))
        pq.write_table(table, copy / "runs" / f"crafted{k}.parquet")
    renamed = template.set_column(template.column_names.index("run_id"), "run_id", pa.array(["f" * 16]))
    pq.write_table(renamed, copy / "runs" / f"{'e' * 16}.parquet")  # a valid id under another file's name
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.warns(UserWarning) as record:
        assert main(["report", "--results", str(copy), "--format", "md,html", "--resamples", "50"]) == 0
    said = [str(w.message) for w in record if "crafted" in str(w.message) or "e" * 16 in str(w.message)]
    assert len(said) == 5 and all("is not of the harness's form" in s for s in said[:4]), said
    assert sorted(p.name for p in tmp_path.iterdir()) == outside_before
    assert not list(Path("/tmp").glob("escaped*")) and not list(tmp_path.parent.glob("escaped*"))
    assert len(results.load_all(copy)) == 3
    for evil in evil_ids:
        with pytest.raises(UsageError, match="16 lowercase hexadecimal digits"):
            results.scores_path(copy, evil)


def test_config_hash_has_the_run_id_form() -> None:
    for config in ({}, {"a": 1}, {"seed": 2**32 - 1, "x": [1.5, "y"]}):
        assert results.is_run_id(config_hash(config))


# -- item 7: a killed writer leaves nothing that a later run keeps ---------------------------------


def test_stray_temporary_files_are_removed_at_the_next_start(copy: Path, grid_file: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, host = int(finished.stdout), host_tag()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stray = [
            copy / f".leaderboard.md.{host}.{dead}.abcdefgh.tmp",
            copy / "plots" / f".x__tradeoff.png.{host}.{dead}.abcd1234.tmp",
            copy / ".cache" / "bootstrap" / f".k.npz.{host}.{dead}.zzzz_9zz.tmp",
            copy / "runs" / f".{'a' * 16}.parquet.{host}.{dead}.qwertyui.tmp",
            copy / "scores" / f".{'a' * 16}.parquet.{host}.{dead}.asdfghjk.tmp",
            copy / "weights" / f".{'a' * 16}.safetensors.{host}.{dead}.zxcvbnmq.tmp",
            copy / ".report.html.abcdefgh.tmp",  # an older writer's name, two days old
        ]
        kept = [
            copy / f".report.html.{host}.{alive.pid}.abcdefgh.tmp",  # a live writer on this host
            copy / f".report.html.elsewhere.{dead}.abcdefgh.tmp",  # another host's, recent
            copy / "runs" / "notes.tmp",  # not ours
        ]
        for path in stray + kept:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half a file")
        old = time.time() - 2 * 24 * 3600
        os.utime(stray[-1], (old, old))
        (copy / "locks").mkdir(exist_ok=True)
        grave = copy / "locks" / f"{'a' * 16}.lock.stale-{socket.gethostname()}-{dead}"
        grave.write_text("{}")
        before = files_digest(copy / "runs") | {"scores/" + k: v for k, v in files_digest(copy / "scores").items()}
        assert main(["report", "--results", str(copy), "--format", "md", "--resamples", "50"]) == 0
        assert [p for p in stray[:3] if p.exists()] == []  # the report's own folders
        assert main(["--grid", str(grid_file), "--results", str(copy)]) == 0  # a launch cleans the rest
        assert [p for p in stray if p.exists()] == [] and not grave.exists()
        assert all(p.exists() for p in kept)
        after = files_digest(copy / "runs") | {"scores/" + k: v for k, v in files_digest(copy / "scores").items()}
        assert {k: v for k, v in after.items() if not k.endswith(".tmp")} == {k: v for k, v in before.items() if not k.endswith(".tmp")}
    finally:
        alive.kill()
        alive.wait()


# -- item 8: non-finite scores at evaluation fail the run ----------------------------------------

class EvalProbe(nn.Module):
    """Average pooling + linear; in evaluation one logit becomes ``value`` (+inf, -inf or NaN)."""

    def __init__(self, in_channels: int, num_classes: int, context=None, *, value: str = "inf") -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.mean(dim=(2, 3)))
        if self.training:
            return logits
        out = logits.clone()
        out[0, 0] = float(self.value)
        return out


@pytest.fixture
def eval_probe(monkeypatch: pytest.MonkeyPatch) -> str:
    """The probe registered for this test only (a plugin folder would stay registered for the
    rest of the session, and grids with ``name = "*"`` in other tests would run it)."""
    EvalProbe.registry_name = "eval_probe"
    monkeypatch.setitem(HEADS._table, "eval_probe", EvalProbe)
    return "eval_probe"


def test_non_finite_scores_at_evaluation_fail_the_run(tmp_path: Path, eval_probe: str, capsys: pytest.CaptureFixture) -> None:
    """+inf became a score of 1 and -inf a score of 0 through the sigmoid: a silent wrong mAP."""
    grid = tmp_path / "g.toml"
    grid.write_text(SMALL.replace('name = "baseline"\npool = ["avg", "max"]', f'name = "{eval_probe}"\nvalue = ["inf", "-inf", "nan"]'))
    out = tmp_path / "results"
    assert main(["--grid", str(grid), "--results", str(out)]) == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 3 and all("scores at evaluation are not finite" in line for line in failed), err
    assert any("1 +inf" in line for line in failed) and any("1 -inf" in line for line in failed) and any("1 NaN" in line for line in failed)
    rows = results.load_all(out)
    probes = rows[rows["head"] == eval_probe]
    assert len(probes) == 3 and (probes["status"] == "failed").all() and (probes["error_type"] == "NonFiniteScores").all()
    assert not any(results.scores_path(out, r).exists() for r in probes["run_id"])  # no score file of garbage
