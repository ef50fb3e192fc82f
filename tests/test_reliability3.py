"""Reliability, round 3 (issue 26): plugins that misbehave, data identity, full disks, numbers that
pass a type check and then fail every run, locks and results files, the console's width. Each test
asserts the message, the exit status, and what is (not) written.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import TINY_GRID, run_cli


def unwrapped(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


CALLS = """
import contextlib, io, json, sys, warnings
from bench.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        warnings.showwarning = lambda m, c, f, l, file=None, line=None: print(f"warning: {m}", file=sys.stderr)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    out.append([code, o.getvalue(), e.getvalue()])
print(json.dumps(out))
"""


def _cli_calls(env: dict[str, str], *argvs: list[str]) -> list[tuple[int, str, str]]:
    """Several command lines run by ``bench.cli.main`` in ONE fresh process (a plugin folder in
    ``env`` is loaded once, as in one launch): (exit status, stdout, stderr) of each."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", CALLS, json.dumps(argvs)], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(call) for call in json.loads(done.stdout.splitlines()[-1])]


def _plugin(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD_HEAD = """
    from torch import nn
    from bench.api import register_head

    @register_head("{name}")
    class Head(nn.Module):
        sweep = ()

        def __init__(self, in_channels, num_classes, context=None, *, width: int = 1):
            super().__init__()
            {init}
            self.fc = nn.Linear(in_channels, num_classes)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))
"""


# -- 6. plugins ------------------------------------------------------------------------------------


def test_runtime_error_in_one_sweep_value_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    heads = tmp_path / "heads"
    _plugin(heads, "picky", GOOD_HEAD.format(name="picky", init='if width == 2: raise RuntimeError("width 2 is not built")'))
    grid = tmp_path / "g.toml"
    grid.write_text(TINY_GRID.replace('name = "baseline"\npool = ["avg", "max"]', 'name = "picky"\nwidth = [1, 2]'))
    result = run_cli("--grid", str(grid), "--results", str(tmp_path / "r"), env={"HEADBENCH_HEADS_PATH": str(heads)})
    text = unwrapped(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "head 'picky'" in text and "picky.py" in text and "width=2" in text and "RuntimeError: width 2 is not built" in text


def test_plugin_calling_sys_exit_at_import_silences_nothing(tmp_path: Path, tiny_grid: Path) -> None:
    from test_report import write_experiment

    heads = tmp_path / "heads"
    _plugin(heads, "quitter", "import sys\nsys.exit(3)\n")
    write_experiment(tmp_path / "r", "shapes", "baseline", {"pool": "avg"}, 0.0, 0)
    launch, listed, report = _cli_calls(
        {"HEADBENCH_HEADS_PATH": str(heads)},
        ["--grid", str(tiny_grid), "--dry-run"],
        ["--list"],
        ["report", "--results", str(tmp_path / "r"), "--format", "console", "--resamples", "20"],
    )
    assert launch[0] == 0, launch[2][-2000:]
    assert "every dataset, backbone and head of these cells builds" in unwrapped(launch[1])
    assert "quitter.py failed to import: it called sys.exit(3) at import" in unwrapped(launch[2])  # said once, at the first load
    assert listed[0] == 2 and "baseline(" in listed[1] and "quitter.py failed to import: it called sys.exit(3)" in unwrapped(listed[2])
    assert report[0] == 0 and "baseline" in report[1]


def test_broken_plugin_blocks_only_the_grids_that_use_it(tmp_path: Path, tiny_grid: Path) -> None:
    heads = tmp_path / "heads"
    _plugin(heads, "aaa_broken", textwrap.dedent(GOOD_HEAD.format(name="wobbly", init="pass")) + "\nraise RuntimeError('half-written plugin')\n")
    uses = tmp_path / "uses.toml"
    uses.write_text(TINY_GRID + '[[heads]]\nname = "wobbly"\n')
    every = tmp_path / "every.toml"
    every.write_text(TINY_GRID.replace('name = "baseline"\npool = ["avg", "max"]', 'name = "*"'))
    unrelated, used, star = _cli_calls(
        {"HEADBENCH_HEADS_PATH": str(heads)},
        ["--grid", str(tiny_grid), "--dry-run"], ["--grid", str(uses), "--dry-run"], ["--grid", str(every), "--dry-run"],
    )
    assert unrelated[0] == 0, unrelated[2][-2000:]
    assert "aaa_broken.py failed to import: RuntimeError: half-written plugin" in unwrapped(unrelated[2])
    text = unwrapped(used[2])
    assert used[0] == 2 and "Traceback" not in used[2]
    assert "[[heads]] 2 (wobbly)" in text and "unknown head 'wobbly'" in text and "aaa_broken.py failed to import" in text
    assert star[0] == 2 and '[[heads]] 1 ("*")' in unwrapped(star[2]) and "aaa_broken.py" in star[2]


def test_head_named_like_the_wildcard_is_refused(tmp_path: Path, tiny_grid: Path) -> None:
    heads = tmp_path / "heads"
    _plugin(heads, "star", GOOD_HEAD.format(name="*", init="pass"))
    listed = run_cli("--list", env={"HEADBENCH_HEADS_PATH": str(heads)})
    text = unwrapped(listed.stderr)
    assert listed.returncode == 2 and "star.py failed to import" in text and "got '*'" in text
    assert "*(" not in listed.stdout


# -- 5. numbers that pass a type check and then fail every run ------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "allowed"),
    [
        ("lr = 1e300", "'lr'", "<= 100.0"),
        ("lr = 1e39", "'lr'", "<= 100.0"),  # above float32's range
        ("warmup_epochs = 1e308", "'warmup_epochs'", "<= 100000"),
        ("batch_size = 100_000_000_000", "'batch_size'", "<= 1048576"),
        ("weight_decay = 1e30", "'weight_decay'", "<= 100.0"),
    ],
)
def test_recipe_numbers_have_a_finite_range(tmp_path: Path, line: str, key: str, allowed: str) -> None:
    from bench.config.grid import load_grid
    from bench.core.errors import UsageError

    grid = tmp_path / "g.toml"
    lines = [ln for ln in TINY_GRID.splitlines() if not ln.startswith(line.split(" = ")[0] + " = ")]
    grid.write_text("\n".join(lines).replace("epochs = 1\n", f"epochs = 1\n{line}\n"))
    with pytest.raises(UsageError) as info:
        load_grid(str(grid))
    text = str(info.value)
    assert str(grid) in text and key in text and "out of range" in text and allowed in text


def test_head_float_beyond_float32_is_refused_on_load(tmp_path: Path) -> None:
    from bench.config.grid import load_grid
    from bench.core.errors import UsageError

    grid = tmp_path / "g.toml"
    grid.write_text(TINY_GRID.replace('name = "baseline"\npool = ["avg", "max"]', 'name = "csra"\nlam = [0.1, 1e39]'))
    with pytest.raises(UsageError, match=r"\[\[heads\]\] 1 \(csra\).*'lam' = 1e\+39.*float32"):
        load_grid(str(grid))
    grid.write_text(TINY_GRID.replace('name = "baseline"\npool = ["avg", "max"]', 'name = "csra"\nlam = [0.1, 3e38]'))
    assert len(load_grid(str(grid)).cells) == 2  # within float32: accepted


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "0.5", "-1"])
def test_env_number_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    from bench.core.errors import UsageError
    from bench.results import store

    monkeypatch.setenv("HEADBENCH_LOCK_STALE_S", value)
    with pytest.raises(UsageError, match=r"\$HEADBENCH_LOCK_STALE_S = '[^']+': expected a finite number of seconds in 1 \.\. 2592000"):
        store.check_writable(tmp_path / "r")
    monkeypatch.setenv("HEADBENCH_LOCK_STALE_S", " 120 ")
    store.check_writable(tmp_path / "r")
    from bench.results.locks import RunLock

    assert RunLock(tmp_path / "r", "0123456789abcdef").stale_after == 120.0


def test_bad_lock_env_is_exit_2_before_training(tmp_path: Path, tiny_grid: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main

    monkeypatch.setenv("HEADBENCH_LOCK_STALE_S", "abc")
    assert main(["--grid", str(tiny_grid), "--results", str(tmp_path / "r")]) == 2
    assert "$HEADBENCH_LOCK_STALE_S = 'abc'" in unwrapped(capsys.readouterr().err)
    assert not list((tmp_path / "r").rglob("*.parquet"))


# -- 7. locks and results files ---------------------------------------------------------------------


def test_lock_that_is_a_folder_is_named_not_a_traceback(tmp_path: Path, tiny_grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main
    from bench.config.grid import load_grid
    from bench.core.errors import UsageError
    from bench.results.locks import RunLock

    run_id = load_grid(str(tiny_grid)).cells[0].run_id
    (tmp_path / "r" / "locks" / f"{run_id}.lock").mkdir(parents=True)
    (tmp_path / "r" / "locks" / f"{run_id}.lock" / "keep.txt").write_text("the user's")
    assert main(["--grid", str(tiny_grid), "--results", str(tmp_path / "r")]) == 2
    text = unwrapped(capsys.readouterr().err)
    assert f"{run_id}.lock" in text and "not plain files" in text
    with pytest.raises(UsageError, match="is not a plain file"):  # the lock itself, whoever asks
        RunLock(tmp_path / "r", run_id).acquire()
    assert (tmp_path / "r" / "locks" / f"{run_id}.lock" / "keep.txt").read_text() == "the user's"  # never deleted


# -- 4. a full disk ----------------------------------------------------------------------------------


def test_full_disk_in_an_atomic_write_names_folder_and_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import errno
    import os

    from bench.core import atomic
    from bench.core.errors import NoSpaceError

    (tmp_path / "old.bin").write_bytes(b"old")
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(NoSpaceError) as info:
        atomic.atomic_write_bytes(tmp_path / "old.bin", b"x" * 3000)
    text = str(info.value)
    assert str(tmp_path) in text and "old.bin" in text and "2.9 KiB" in text and "free" in text
    assert (tmp_path / "old.bin").read_bytes() == b"old"  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]  # no temporary left
    monkeypatch.setattr(os, "fsync", real_fsync)
    atomic.atomic_write_bytes(tmp_path / "old.bin", b"new")
    assert (tmp_path / "old.bin").read_bytes() == b"new"

    def quota(tmp: Path) -> None:
        tmp.write_bytes(b"y" * 5000)
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    with pytest.raises(NoSpaceError, match="4.9 KiB"):  # unknown size: the bytes written before it failed
        atomic.atomic_write(tmp_path / "other.bin", quota)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]


def _small_filesystem(folder: Path, size: str) -> bool:
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0


def test_full_disk_launch_is_exit_2_and_the_rerun_the_same(tmp_path: Path, tiny_grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    from bench.cli import main

    small = tmp_path / "small"
    if not _small_filesystem(small, "1m"):
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    try:
        for attempt in range(2):
            assert main(["--grid", str(tiny_grid), "--results", str(small / "results")]) == 2, attempt
            text = unwrapped(capsys.readouterr().err)
            assert f"no space left in {small / 'results'}" in text and "16.0 MiB is needed" in text
            assert not [p for p in small.rglob("*") if p.is_file()], attempt  # nothing written, no lock
    finally:
        subprocess.run(["umount", str(small)], check=False)


# -- 3. the folder dataset's data is part of its identity ------------------------------------------

FOLDER_GRID = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 1
batch_size = 2
eval_batch_size = 2
image_size = 16
[[datasets]]
name = "folder"
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = "avg"
"""


def _folder(root: Path, labels: str) -> Path:
    """A tiny folder dataset whose test image t1 has ``labels``."""
    from bench.api.registry import dataset_class

    dataset_class("folder").write_sample(root)
    (root / "test.csv").write_text(f"path,labels\nt1.jpg,{labels}\nt2.jpg,bird;dog\n")
    return root


def test_folder_data_is_part_of_the_run_identity(tmp_path: Path) -> None:
    import shutil

    from bench.config.grid import load_grid

    a, b = _folder(tmp_path / "A", "cat"), _folder(tmp_path / "B", "dog")
    grid = tmp_path / "f.toml"
    grid.write_text(FOLDER_GRID)
    id_a = load_grid(str(grid), data_roots={"folder": str(a)}).cells[0].run_id
    id_b = load_grid(str(grid), data_roots={"folder": str(b)}).cells[0].run_id
    assert id_a != id_b
    shutil.copytree(a, tmp_path / "copy")  # a copy (new file times) of the same data is the same run
    assert load_grid(str(grid), data_roots={"folder": str(tmp_path / "copy")}).cells[0].run_id == id_a
    (tmp_path / "copy" / "t1.jpg").write_bytes((a / "t1.jpg").read_bytes() + b"\0" * 10)  # other picture, same labels
    assert load_grid(str(grid), data_roots={"folder": str(tmp_path / "copy")}).cells[0].run_id != id_a
    twice = tmp_path / "twice.toml"
    twice.write_text(FOLDER_GRID.replace('name = "folder"', f'name = "folder"\nroot = "{a}"\n[[datasets]]\nname = "folder"\nroot = "{b}"'))
    assert sorted(c.run_id for c in load_grid(str(twice)).cells) == sorted([id_a, id_b])
    # a published dataset's identity is unchanged: no data digest in its config
    assert all("data" not in c.config()["dataset"] for c in load_grid("smoke").cells)


def test_folder_a_then_b_into_one_results_dir_trains_b(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _folder(tmp_path / "A", "cat"), _folder(tmp_path / "B", "dog")
    grid = tmp_path / "f.toml"
    grid.write_text(FOLDER_GRID)
    results = tmp_path / "r"
    from bench.cli import main

    for root in (a, b):
        assert main(["--grid", str(grid), "--results", str(results), "--data-root", f"folder={root}"]) == 0
        assert "1 trained, 0 already done" in unwrapped(capsys.readouterr().out)
    assert len(list((results / "runs").glob("*.parquet"))) == 2


# -- 9. smaller ones -----------------------------------------------------------------------------------


def _png16(path: Path, samples, color_type: int) -> None:
    """Write a 16-bit PNG of ``samples`` (uint16 [H, W, channels]) with each of the five row filters
    (PNG spec §9.2, rows cycling through None, Sub, Up, Average, Paeth)."""
    import struct
    import zlib

    import numpy as np

    h, w, c = samples.shape
    raw = samples.astype(">u2").reshape(h, w * c).view(np.uint8).reshape(h, w * c * 2).astype(np.int64)
    bpp = c * 2
    rows, prev = [], np.zeros(raw.shape[1], dtype=np.int64)
    for y in range(h):
        row, kind = raw[y], y % 5
        left = np.concatenate([np.zeros(bpp, dtype=np.int64), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, dtype=np.int64), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(row)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        rows.append(bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes())
        prev = row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("color_type", "channels"), [(0, 1), (2, 3), (6, 4), (4, 2)])
def test_16bit_png_of_every_colour_type_uses_one_scale(tmp_path: Path, color_type: int, channels: int) -> None:
    import numpy as np

    from bench.api.image_files import open_rgb

    rng = np.random.default_rng(color_type)
    samples = rng.integers(0, 65536, size=(10, 9, channels)).astype(np.uint16)
    samples[0, 0, : max(1, channels - 1)] = [255, 65535, 32896][: max(1, channels - 1)]  # high byte 0 but v/257 ~ 1; white; 128
    if channels in (2, 4):
        samples[:, :, -1] = 65535  # opaque everywhere but one pixel
        samples[1, 1, -1] = 0
    path = tmp_path / "wide.png"
    _png16(path, samples, color_type)
    colour = samples[:, :, : max(1, channels - 1) if channels in (2, 4) else channels].astype(np.int64)
    expected = (2 * colour + 257) // 514  # round(v / 257), halves up: the documented 16-bit rule
    if expected.shape[2] == 1:
        expected = np.repeat(expected, 3, axis=2)
    if channels in (2, 4):
        expected[1, 1] = 255  # fully transparent over white
    got = np.asarray(open_rgb(path)).astype(np.int64)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected), np.argwhere(got != expected)[:5]


def test_empty_name_list_is_an_error_not_the_whole_grid(tmp_path: Path, tiny_grid: Path) -> None:
    from bench.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--grid", str(tiny_grid), "--heads", ",", "--dry-run"])
    assert info.value.code == 2


def test_empty_shard_says_so(tmp_path: Path, tiny_grid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main

    tiny_grid.write_text(TINY_GRID.replace('preset = "embedded_cpu"', 'preset = "embedded_cpu"\nprotocol = "finetune"'))
    assert main(["--grid", str(tiny_grid), "--shard", "3/3", "--results", str(tmp_path / "r")]) == 2
    text = unwrapped(capsys.readouterr().err)
    assert "--shard 3/3 is empty" in text and "only 2 families" in text and "use at most 2 shards" in text
    assert not (tmp_path / "r").exists()


def test_batch_larger_than_the_training_split_warns() -> None:
    import numpy as np

    from bench.data.batched_arrays import ArrayItems, array_loader
    from bench.data.label_checks import TrainingDataWarning

    items = ArrayItems(np.zeros((5, 2), np.float32), np.zeros((5, 3), np.uint8), np.zeros((5, 3), bool))
    with pytest.warns(TrainingDataWarning, match=r"batch_size = 6 is larger than the 5 training images: every epoch is one batch"):
        array_loader(items, batch_size=6, shuffle=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array_loader(items, batch_size=5, shuffle=True)  # exactly one full batch: fine
        array_loader(items, batch_size=100)  # evaluation: a batch may exceed the split


def test_class_without_training_positive_is_named_and_counted() -> None:
    import numpy as np
    import pandas as pd

    from bench.data.label_checks import classes_without_positives, no_positive_message
    from bench.report import model

    targets = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1]], np.uint8)
    ignore = np.array([[0, 0, 1], [0, 0, 0], [0, 0, 1]], bool)  # 'c' is positive only where ignored
    missing = classes_without_positives(["a", "b", "c"], targets, ignore)
    assert missing == ["b", "c"]
    assert classes_without_positives(["a", "b", "c"], targets) == ["b"]
    text = no_positive_message("folder", "train", missing, 3)
    assert text is not None and "2 of 3 classes" in text and "'b', 'c'" in text and "'train'" in text
    assert no_positive_message("folder", "train", [], 3) is None
    line = model.untrained_classes_line(pd.Series({"train_classes_without_positives": 2}))
    assert line is not None and "2 class(es) have no positive training label" in line
    assert model.untrained_classes_line(pd.Series({"train_classes_without_positives": 0})) is None
    assert model.untrained_classes_line(pd.Series({"dataset": "shapes"})) is None  # rows written before the column


def test_manifest_path_with_a_leading_space_is_that_file(tmp_path: Path) -> None:
    from bench.api.registry import build_dataset, dataset_class
    from bench.core.errors import DataError

    root = tmp_path / "f"
    dataset_class("folder").write_sample(root)
    (root / " spaced.jpg").write_bytes((root / "2.jpg").read_bytes())
    (root / "train.csv").write_text("path,labels\n spaced.jpg,cat\n 2.jpg ,dog\n")
    assert build_dataset("folder", str(root), "train").image_files == [" spaced.jpg", "2.jpg"]
    (root / "train.csv").write_text("path,labels\n absent.jpg,cat\n")
    with pytest.raises(DataError, match=r"train\.csv, line 2: absent\.jpg"):
        build_dataset("folder", str(root), "train")
