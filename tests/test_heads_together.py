"""Heads trained together on a frozen backbone (one pass of bench/engine/trainer.py) equal heads
trained one at a time; a group killed in the middle resumes; a partly finished group trains only the rest; two
processes give the one-process results."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, accelerate_launch, run_cli
from torch import nn

from bench.api import head_class, list_heads
from bench.core.paths import source_file


def project_heads() -> list[str]:
    """Every head of the project's heads/ folder (not probe heads other tests register)."""
    return [name for name in list_heads() if source_file(head_class(name)).startswith("heads/")]
from bench.config.grid import head_group_key, load_grid, shard_cells
from bench.core.errors import UsageError
from bench.engine import memory
from bench.engine import trainer as trainer_module
from bench.engine.streams import RngStream
from bench.results import store as results
from bench.results.store import load_all

METRICS = ("mAP", "CP", "CR", "CF1", "mF1", "OP", "OR", "OF1", "final_train_loss", "val_mAP")

# finetune protocol with the backbone frozen: augmented batches, the backbone run once per batch
# for the whole group; per-epoch model selection on a validation split
AUGMENTED = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 2
batch_size = 24
eval_batch_size = 50
image_size = 32
freeze_backbone = true
augment = "flip"
select = "best_val"
val_fraction = 0.25
grad_clip = 0.5
[[datasets]]
name = "shapes"
num_train = 48
num_test = 30
image_size = 32
[[backbones]]
name = "tiny_cnn"
"""

# frozen protocol: cached features; a slow probe head makes each epoch last long enough to kill
FROZEN = """
seeds = [0]
[recipe]
preset = "embedded_cpu"
epochs = 3
batch_size = 16
eval_batch_size = 50
image_size = 32
protocol = "frozen"
augment = "none"
lr = 0.01
[[datasets]]
name = "shapes"
num_train = 48
num_test = 40
image_size = 32
[[backbones]]
name = "tiny_cnn"
[[heads]]
name = "baseline"
pool = ["avg", "max"]
[[heads]]
name = "csra"
num_heads = [1, 4]
[[heads]]
name = "csra_free"
[[heads]]
name = "slow_probe"
"""

SLOW_PROBE = '''
import time
from torch import nn
from bench.api import Head, register_head

@register_head("slow_probe")
class SlowProbe(Head):
    """Average pooling, dropout, linear; sleeps 0.25 s per training forward."""
    def __init__(self, in_channels: int, num_classes: int, context=None) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        if self.training:
            time.sleep(0.25)
        return self.fc(self.drop(x.mean(dim=(2, 3))))
'''


def cheap_head_cost(head: nn.Module, feature_shape: tuple[int, int, int], device: torch.device, repeats: int = 20):
    """Head latency is not what these tests check: a stand-in that only counts parameters."""
    from bench.eval.head_cost import HeadCost, trainable_parameters

    return HeadCost(0.0, 0.0, 0, trainable_parameters(head))


def run_in_process(grid_file: Path, out: Path, together: bool, monkeypatch: pytest.MonkeyPatch):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from bench.engine import runner
    from bench.engine.interrupt import StopRequest
    from bench.engine.progress import Progress

    from bench.engine import rows

    monkeypatch.setattr(rows, "head_cost", cheap_head_cost)  # both paths measure the cost there
    grid = load_grid(str(grid_file))
    grid.run = grid.run.replace(heads_together=together)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    with StopRequest() as stop:
        summary = runner.run_grid(grid, out, accelerator, Progress(False), stop)
    assert not summary.failed, [o.error for o in summary.failed]
    return load_all(out).set_index("run_id")


def assert_same_runs(mine, theirs, results_mine: Path, results_theirs: Path, exact: bool = True) -> None:
    assert set(mine.index) == set(theirs.index)
    assert (mine["status"] == "finished").all() and (theirs["status"] == "finished").all()
    for run_id in theirs.index:
        a, b = mine.loc[run_id], theirs.loc[run_id]
        for metric in METRICS:
            if b[metric] is None or (isinstance(b[metric], float) and np.isnan(b[metric])):
                assert a[metric] is None or np.isnan(a[metric]), (b["head"], metric)
            else:
                assert a[metric] == pytest.approx(b[metric], rel=1e-6, abs=1e-7), (b["head"], metric)
        assert a["selected_epoch"] == b["selected_epoch"], b["head"]
        sa, sb = results.load_scores(results_mine, run_id), results.load_scores(results_theirs, run_id)
        assert sa["image_ids"] == sb["image_ids"]
        np.testing.assert_allclose(sa["scores"], sb["scores"], rtol=1e-5, atol=1e-6, err_msg=b["head"])
        wa, wb = results.load_weights(results_mine, run_id), results.load_weights(results_theirs, run_id)
        assert wa.keys() == wb.keys(), b["head"]
        for key in wb:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=f"{b['head']} {key}")


def head_estimates(grid_file: Path) -> list[int]:
    """Each trained head's memory estimate (bench.engine.memory), in grid order, as the pass makes it."""
    from bench.api.context import HeadContext
    from bench.api.registry import build_dataset, build_head
    from bench.models.backbones import build_backbone

    cells = [c for c in load_grid(str(grid_file)).cells if c.source_run_id is None]
    backbone = build_backbone(cells[0].backbone)
    size = cells[0].recipe.image_size
    with torch.no_grad():
        shape = tuple(backbone.eval()(torch.zeros(1, 3, size, size)).shape[1:])
    train = build_dataset(cells[0].dataset, cells[0].root, cells[0].train_split, **cells[0].dataset_options)
    context = HeadContext.from_labels(train.classes, train.targets, train.ignore)
    c = len(train.classes)
    return [memory.head_training_bytes(build_head(x.head, shape[0], c, context, **x.hparams), shape, x.recipe.batch_size, x.recipe) for x in cells]


def test_every_head_family_together_equals_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Augmented batches through a frozen backbone, per-epoch validation, dropout heads: each head
    trained in the group gets the numbers it gets alone (every registered head, defaults)."""
    grid_file = tmp_path / "augmented.toml"
    grid_file.write_text(AUGMENTED + "".join(f'[[heads]]\nname = "{name}"\n' for name in project_heads()))
    # the real memory split under a budget of half the heads' summed estimates: several passes
    sizes = head_estimates(grid_file)
    budget = sum(sizes) // 2
    monkeypatch.setenv(memory.MEMORY_ENV, repr(budget / 2**20))
    alone = run_in_process(grid_file, tmp_path / "alone", False, monkeypatch)
    together = run_in_process(grid_file, tmp_path / "together", True, monkeypatch)
    assert_same_runs(together, alone, tmp_path / "together", tmp_path / "alone")
    trained = together[together["source_run_id"].isna()]
    derived = together[together["source_run_id"].notna()]
    passes = {t["id"]: t["size"] for t in trained["trained_with"]}
    assert len(trained) == len(sizes) >= 2 and sum(passes.values()) == len(trained)
    assert len(passes) == len(memory.split_by_memory(sizes, budget)) >= 2  # the split the budget gives
    assert max(passes.values()) >= 2  # and heads do share a pass
    assert derived["trained_with"].isna().all() and alone["trained_with"].isna().all()
    # a row of the group has every column a row of its own has
    for run_id in alone.index:
        filled = {c for c, v in alone.loc[run_id].items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
        mine = {c for c, v in together.loc[run_id].items() if v is not None and not (isinstance(v, float) and np.isnan(v))}
        assert filled <= mine, (alone.loc[run_id, "head"], filled - mine)


def test_a_group_that_runs_out_of_memory_trains_in_halves_with_the_same_numbers(
    frozen_grid: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pass of more than two heads raises CUDA's out-of-memory error in its second epoch:
    its heads are put back to their initial state and trained in halves, which resume from the
    heads' first-epoch checkpoints."""
    grid, _env = frozen_grid
    light = tmp_path / "light.toml"
    light.write_text(grid.read_text().replace('[[heads]]\nname = "slow_probe"\n', "").replace("epochs = 3", "epochs = 2"))
    real_epoch = trainer_module.Trainer.run_epoch
    raised = []

    def epoch(self, *args, **kwargs):
        if len(self.members) > 2 and self.members[0].record.losses and not raised:  # an epoch done: the second
            raised.append(len(self.members))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_epoch(self, *args, **kwargs)

    real_load, loaded = trainer_module.load_member, []

    def load(folder, progress, member, *args):
        loaded.append(progress["epoch"])
        return real_load(folder, progress, member, *args)

    alone = run_in_process(light, tmp_path / "alone", False, monkeypatch)
    monkeypatch.setattr(trainer_module.Trainer, "run_epoch", epoch)
    monkeypatch.setattr(trainer_module, "load_member", load)
    together = run_in_process(light, tmp_path / "together", True, monkeypatch)
    assert raised == [4] and loaded == [0, 0, 0, 0]
    assert_same_runs(together, alone, tmp_path / "together", tmp_path / "alone")
    sizes = sorted(t["size"] for t in together["trained_with"] if t is not None)
    assert sizes == [2, 2, 2, 2]


def test_a_head_that_fails_leaves_its_group_and_the_others_finish_as_alone(
    frozen_grid: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One head's loss turns NaN in training, another raises at evaluation: each fails as it does
    alone (same error type), and the rest of the group finishes with its one-at-a-time numbers."""
    from bench.api.registry import head_class

    grid, _env = frozen_grid
    light = tmp_path / "light.toml"
    light.write_text(grid.read_text().replace('[[heads]]\nname = "slow_probe"\n', "").replace("epochs = 3", "epochs = 2"))
    csra, baseline = head_class("csra"), head_class("baseline")
    real_csra, real_baseline = csra.forward, baseline.forward

    def nan_when_four(self, x):  # CSRA with 4 heads: non-finite logits in training
        out = real_csra(self, x)
        return out * float("nan") if self.training and self.num_heads == 4 else out

    def raise_when_max(self, x):  # max-pool baseline: fails at evaluation
        if not self.training and self.pool == "max":
            raise RuntimeError("probe failure at evaluation")
        return real_baseline(self, x)

    monkeypatch.setattr(csra, "forward", nan_when_four)
    monkeypatch.setattr(baseline, "forward", raise_when_max)

    def outcome(together: bool):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        from bench.engine import runner
        from bench.engine.interrupt import StopRequest
        from bench.engine.progress import Progress

        from bench.engine import rows

        monkeypatch.setattr(rows, "head_cost", cheap_head_cost)
        g = load_grid(str(light))
        g.run = g.run.replace(heads_together=together)
        out = tmp_path / ("together" if together else "alone")
        with StopRequest() as stop:
            runner.run_grid(g, out, Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True)), Progress(False), stop)
        return load_all(out).set_index("run_id"), out

    (alone, alone_dir), (together, together_dir) = outcome(False), outcome(True)
    assert (alone["status"] == together.loc[alone.index, "status"]).all()
    failed = alone[alone["status"] == "failed"]
    assert sorted(failed["error_type"]) == ["NonFiniteLoss", "RuntimeError"]
    assert (together.loc[failed.index, "error_type"] == failed["error_type"]).all()
    assert (together.loc[failed.index, "error"] == failed["error"]).all()  # same message: same step, same value
    ok = alone[alone["status"] == "finished"].index
    assert len(ok) >= 2  # the other baseline, the other CSRA (and the derived head of the avg baseline)
    assert_same_runs(together.loc[ok], alone.loc[ok], together_dir, alone_dir)


def finished_digests(folder: Path) -> dict[str, str]:
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in (folder / "runs").glob("*.parquet")}


@pytest.fixture(scope="module")
def frozen_grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("frozen")
    plugins = folder / "heads"
    plugins.mkdir()
    (plugins / "slow_probe.py").write_text(SLOW_PROBE)
    grid = folder / "frozen.toml"
    grid.write_text(FROZEN)
    return grid, {"HEADBENCH_HEADS_PATH": str(plugins)}


@pytest.fixture(scope="module")
def frozen_reference(frozen_grid: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    grid, env = frozen_grid
    alone = grid.with_name("alone.toml")
    alone.write_text(grid.read_text() + "[run]\nheads_together = false\n")
    out = tmp_path_factory.mktemp("reference")
    result = run_cli("--grid", str(alone), "--results", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_killed_group_resumes_and_a_partly_finished_group_trains_only_the_rest(
    frozen_grid: tuple[Path, dict[str, str]], frozen_reference: Path, tmp_path: Path
) -> None:
    grid, env = frozen_grid
    out = tmp_path / "results"
    reference = load_all(frozen_reference).set_index("run_id")
    # one head already finished (as if trained by an earlier launch): never retrained
    done = reference[reference["head"] == "csra"].index[0]
    for sub, suffix in (("runs", ".parquet"), ("scores", ".parquet"), ("weights", ".safetensors")):
        (out / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(frozen_reference / sub / f"{done}{suffix}", out / sub / f"{done}{suffix}")
    before = finished_digests(out)

    members = [rid for rid in reference.index if rid != done and pd.isna(reference.loc[rid, "source_run_id"])]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_bench.py"), "--grid", str(grid), "--results", str(out)],
                            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    # SIGKILL once every member has saved its first epoch (the slow probe keeps the group in epoch 2 or 3)
    while len(list((out / "checkpoints").glob("*/epoch_0000/progress.json"))) < len(members) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    locks = {p.stem for p in (out / "locks").glob("*.lock")}
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert locks == set(members), "the group claims every member it trains"
    assert not list((out / "runs").glob("*.parquet")) or finished_digests(out) == before  # nothing else finished yet

    again = run_cli("--grid", str(grid), "--results", str(out), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming a group of {len(members)} heads" in again.stdout
    assert finished_digests(out)[done] == before[done]
    mine = load_all(out).set_index("run_id")
    assert_same_runs(mine, reference, out, frozen_reference)
    sizes = {mine.loc[rid, "head"]: mine.loc[rid, "trained_with"]["size"] for rid in members}
    assert set(sizes.values()) == {len(members)}, sizes
    assert not any((out / "checkpoints").iterdir()) and not any((out / "locks").iterdir())


def test_two_processes_train_the_group_as_one_process_does(frozen_grid: tuple[Path, dict[str, str]], frozen_reference: Path, tmp_path: Path) -> None:
    """One DDP wrapper around all heads on 2 processes: the results of one process (float tolerance:
    gradients are averaged over two half batches)."""
    grid, env = frozen_grid
    fast = grid.with_name("fast.toml")
    fast.write_text(grid.read_text().replace('[[heads]]\nname = "slow_probe"\n', ""))
    out = tmp_path / "results"
    result = run_cli("--grid", str(fast), "--results", str(out), launcher=accelerate_launch(2), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    mine, reference = load_all(out).set_index("run_id"), load_all(frozen_reference).set_index("run_id")
    assert (mine["world_size"] == 2).all() and (mine["status"] == "finished").all()
    trained = mine[mine["source_run_id"].isna()]
    assert trained["trained_with"].map(lambda t: t["size"]).eq(len(trained)).all()
    for run_id in mine.index:  # (final_train_loss is the main process's, on its half of each batch)
        assert mine.loc[run_id, "mAP"] == pytest.approx(reference.loc[run_id, "mAP"], abs=2e-4), mine.loc[run_id, "head"]


MISBEHAVING = '''
import torch
from torch import nn
from bench.api import Head, register_head


class Probe(Head):
    def __init__(self, in_channels: int, num_classes: int, context=None) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def logits(self, x):
        return self.fc(x.mean(dim=(2, 3)))


@register_head("bn_mlp_probe")
class BatchNormMLP(Head):
    """A common MLP head: BatchNorm1d cannot run a training forward on a batch of one."""
    def __init__(self, in_channels: int, num_classes: int, context=None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.net(x.mean(dim=(2, 3)))


@register_head("raising_probe")
class Raising(Probe):
    def forward(self, x):
        raise RuntimeError("probe: forward refuses")


@register_head("tuple_probe")
class Pair(Probe):
    def forward(self, x):
        return self.logits(x), self.logits(x)


@register_head("detached_probe")
class Detached(Probe):
    def forward(self, x):
        return self.logits(x).detach()


@register_head("integer_probe")
class Integer(Probe):
    def forward(self, x):
        return (self.logits(x) > 0).long()
'''


def test_a_misbehaving_head_costs_only_its_own_row_and_fails_as_it_does_alone(frozen_grid: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Issue 26 (1, 2): a BatchNorm MLP head trains in a group as alone (the memory estimate's
    forward on one feature map cannot crash the launch); a head that raises in forward, returns a
    tuple, a detached or an integer tensor fails in the group exactly as alone (no gradient: failed,
    not an untrained ``finished``), and every other head finishes with its one-at-a-time numbers."""
    plugins = tmp_path / "heads"
    plugins.mkdir()
    (plugins / "misbehaving.py").write_text(MISBEHAVING)
    grid, _env = frozen_grid
    text = grid.read_text().replace('[[heads]]\nname = "slow_probe"\n', "").replace("epochs = 3", "epochs = 2")
    text = text.replace('[[heads]]\nname = "csra_free"\n', "")
    text += "".join(f'[[heads]]\nname = "{n}"\n' for n in ("bn_mlp_probe", "raising_probe", "tuple_probe", "detached_probe", "integer_probe"))
    env = {"HEADBENCH_HEADS_PATH": str(plugins)}
    out = {}
    for together in (False, True):
        g = tmp_path / f"g_{together}.toml"
        g.write_text(text + f"[run]\nheads_together = {str(together).lower()}\n")
        out[together] = tmp_path / f"results_{together}"
        result = run_cli("--grid", str(g), "--results", str(out[together]), env=env)
        assert result.returncode == 1, result.stderr[-3000:]  # some runs failed; no crash, every row written
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    alone, together = load_all(out[False]).set_index("run_id"), load_all(out[True]).set_index("run_id")
    assert set(alone.index) == set(together.index) and len(alone) == 9
    assert together.loc[together["status"] == "finished", "trained_with"].map(lambda t: t is not None and t["size"] >= 2).all()
    status = together.set_index("head")["status"].to_dict()
    assert status == alone.set_index("head")["status"].to_dict() == {
        "baseline": "finished", "csra": "finished", "bn_mlp_probe": "finished", "raising_probe": "failed",
        "tuple_probe": "failed", "detached_probe": "failed", "integer_probe": "failed",
    }
    failed = alone[alone["status"] == "failed"]
    assert (together.loc[failed.index, "error_type"] == failed["error_type"]).all()
    assert (together.loc[failed.index, "error"] == failed["error"]).all()
    assert dict(zip(failed["head"], failed["error_type"])) == {
        "raising_probe": "RuntimeError", "tuple_probe": "AttributeError", "detached_probe": "NoGradient", "integer_probe": "NoGradient",
    }
    ok = alone[alone["status"] == "finished"].index
    assert_same_runs(together.loc[ok], alone.loc[ok], out[True], out[False])


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_memory_split_is_greedy_and_keeps_an_oversized_head_alone() -> None:
    assert memory.split_by_memory([3, 3, 3, 3], 7) == [[0, 1], [2, 3]]
    assert memory.split_by_memory([2, 9, 2, 2, 2], 5) == [[0], [1], [2, 3], [4]]
    assert memory.split_by_memory([1, 1, 1], 100) == [[0, 1, 2]]


def test_memory_estimate_of_a_linear_head_by_hand() -> None:
    """mean over positions + Linear(d, C): the forward keeps the pooled input [1, d] (the weight is
    a parameter) and returns [1, C]; AdamW keeps 2 states per parameter."""

    class Pool(nn.Module):
        def __init__(self, d: int, c: int) -> None:
            super().__init__()
            self.fc = nn.Linear(d, c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=(2, 3)))

    from bench.config.recipe import resolve_recipe

    d, c, batch = 32, 5, 16
    head = Pool(d, c)
    before = torch.get_rng_state()
    got = memory.head_training_bytes(head, (d, 4, 4), batch, resolve_recipe({"optimizer": "adamw"}, "test"))
    assert torch.equal(before, torch.get_rng_state())
    assert got == batch * (4 * d + 4 * c) + 4 * (d * c + c) * (2 + 2)


def test_memory_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory.MEMORY_ENV, "1.5")
    assert memory.memory_budget(torch.device("cpu")) == int(1.5 * 2**20)
    monkeypatch.setenv(memory.MEMORY_ENV, "lots")
    with pytest.raises(UsageError, match=memory.MEMORY_ENV):
        memory.memory_budget(torch.device("cpu"))


def test_rng_streams_are_private_to_each_head() -> None:
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    a, b = RngStream.capture(torch.device("cpu")), RngStream.capture(torch.device("cpu"))
    with a:
        first = torch.rand(3)
    with b:
        same = torch.rand(3)  # b starts where a started
    with a:
        second = torch.rand(3)
    assert torch.equal(first, same) and not torch.equal(first, second)
    assert torch.equal(outer_before, torch.get_rng_state())  # the global stream did not move
    torch.manual_seed(0)
    assert torch.equal(torch.cat([first, second]), torch.rand(6))  # a continues its own stream


def test_a_shard_keeps_a_head_group_together(tmp_path: Path) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text(FROZEN.replace('[[heads]]\nname = "slow_probe"\n', "").replace("seeds = [0]", "seeds = [0, 1, 2]"))
    cells = load_grid(str(grid)).cells
    keys = {head_group_key(c) for c in cells}
    assert len(keys) == 3 and None not in keys
    for count in (2, 3):
        shards = [shard_cells(cells, k, count) for k in range(1, count + 1)]
        assert sorted(c.run_id for s in shards for c in s) == sorted(c.run_id for c in cells)
        for s in shards:
            for key in {head_group_key(c) for c in s}:
                assert sum(head_group_key(c) == key for c in s) == sum(head_group_key(c) == key for c in cells)
