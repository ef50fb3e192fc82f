"""One job, start to end: claim its runs, build its members, train them in passes that fit the
memory budget (a pass that runs out of memory is halved), write a row per run, then evaluate the
derived heads that reuse the trained weights.

Every process runs this in step; the main process decides the claims and the memory split (and
broadcasts them), writes rows and weights, and shows progress.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from accelerate.utils import set_seed
from torch import nn

from bench.api.registry import build_head
from bench.config.grid import Cell
from bench.core.errors import DataError, NoSpaceError
from bench.engine.checkpoints import EpochCheckpoints
from bench.engine.claims import claim
from bench.engine.data_store import DataSplits
from bench.engine.failures import MemberFailure, PassTooLarge, is_oom
from bench.engine.inputs import Trunk, make_inputs, make_selector
from bench.engine.interrupt import Interrupted
from bench.engine.jobs import Job
from bench.engine.launch import RunContext, broadcast
from bench.engine.members import Member, TrainingRecord
from bench.engine.memory import head_training_bytes, memory_budget, split_by_memory, trunk_bytes
from bench.engine.outcomes import GridSummary
from bench.engine.rows import failed_row, finished_row, now, write_outputs, write_row
from bench.engine.saved_runs import build_model, frozen_backbone
from bench.engine.streams import RngStream
from bench.engine.trainer import Trainer
from bench.eval.head_cost import PeakMemory
from bench.models.backbones import build_backbone
from bench.models.classifier import Classifier, HeadOnly
from bench.results import store as results
from bench.results.locks import RunLock


def pass_id(cells: list[Cell]) -> str:
    """The id of a pass: a hash of its members' run ids."""
    return hashlib.sha256("\x1f".join(sorted(c.run_id for c in cells)).encode()).hexdigest()[:16]


class JobRun:
    """Runs one :class:`Job` of the grid into ``summary`` (sets ``summary.interrupted`` on a stop)."""

    def __init__(self, job: Job, ctx: RunContext, retry_failed: bool, summary: GridSummary) -> None:
        self.job, self.ctx, self.retry_failed, self.summary = job, ctx, retry_failed, summary
        self.accelerator = ctx.accelerator
        self.locks: dict[str, RunLock] = {}
        self.written: set[str] = set()

    def run(self) -> None:
        try:
            if self.job.cells:
                self.train()
            for cell in self.job.derived:
                if self.summary.interrupted:
                    break
                self.derived(cell)
        except Interrupted:
            self.summary.interrupted = True
        finally:
            for run_id, lock in self.locks.items():
                if run_id not in self.written:
                    lock.release()
            self.accelerator.free_memory()

    def fail_unrun(self, exc: BaseException) -> None:
        """Claim the job's cells and record each as failed with ``exc`` without training (a refit
        whose tune group has no point that can win: bench.engine.refits)."""
        try:
            self.fail_all([cell for cell, _ in self.claims(self.job.cells)], exc)
        finally:
            for run_id, lock in self.locks.items():
                if run_id not in self.written:
                    lock.release()

    # -- claims and rows ---------------------------------------------------------------------------

    def claims(self, cells: list[Cell]) -> list[tuple[Cell, tuple[Path, dict[str, Any]] | None]]:
        """Main process decides, every process learns: the cells to run, each with the epoch
        checkpoint it resumes from (or None); the others' outcomes say why they are skipped."""
        ctx, acc = self.ctx, self.accelerator
        plan = None
        if acc.is_main_process:
            plan = []
            for cell in cells:
                decision, lock = claim(cell, ctx.results_dir, self.retry_failed)
                found = None
                if decision == "run":
                    assert lock is not None
                    self.locks[cell.run_id] = lock
                    if ctx.checkpoint and cell.source_run_id is None:
                        latest = EpochCheckpoints(ctx.results_dir, cell.run_id, acc).latest()
                        found = [str(latest[0]), latest[1]] if latest else None
                plan.append((decision, found))
        plan = broadcast(acc, plan)
        out = []
        for cell, (decision, found) in zip(cells, plan):
            if decision != "run":
                self.summary.add(cell, decision)
            else:
                out.append((cell, (Path(found[0]), found[1]) if found else None))
        return out

    def write(self, cell: Cell, row: dict[str, Any]) -> None:
        write_row(self.ctx.results_dir, self.accelerator, row, self.locks.get(cell.run_id))
        self.written.add(cell.run_id)
        self.summary.add(cell, row)

    def fail_all(self, cells: list[Cell], exc: BaseException) -> None:
        for cell in cells:
            self.write(cell, failed_row(cell, self.ctx.grid.name, self.accelerator, exc))

    # -- training ----------------------------------------------------------------------------------

    def train(self) -> None:
        claimed = self.claims(self.job.cells)
        if not claimed:
            return
        ctx, acc = self.ctx, self.accelerator
        setup_start, started = time.perf_counter(), now()
        memory = PeakMemory(acc.device)
        memory.reset()
        try:
            members, trunk, data = self.setup(claimed)
        except (DataError, NoSpaceError, Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - the shared setup failed: every claimed run fails
            self.fail_all([cell for cell, _ in claimed], exc)
            return
        setup_s = time.perf_counter() - setup_start
        for m in [m for m in members if m.failure is not None]:  # a head that could not be built
            self.write(m.cell, failed_row(m.cell, ctx.grid.name, acc, m.failure))
        members = [m for m in members if m.failure is None]
        queue = self.passes(members, trunk, split=True)
        while queue:
            first_epoch, sub = queue.pop(0)
            pass_start = time.perf_counter()
            try:
                trainer = Trainer(sub, trunk, ctx, first_epoch)
                trainer.train()
                trainer.evaluate()
            except (Interrupted, DataError, NoSpaceError):
                raise
            except Exception as exc:  # noqa: BLE001 - the pass failed (not one member): its runs fail, unless memory
                acc.free_memory()
                if len(sub) > 1 and (isinstance(exc, PassTooLarge) or is_oom(exc)):
                    ctx.progress.log(f"{len(sub)} heads together ran out of memory ({str(exc)[:200]}); training them in two halves")
                    for m in sub:
                        m.reset()
                    half = len(sub) // 2
                    queue[0:0] = self.passes(sub[:half], trunk, split=False) + self.passes(sub[half:], trunk, split=False)
                    continue
                self.fail_all([m.cell for m in sub], exc)
                continue
            pass_wall = time.perf_counter() - pass_start + setup_s * len(sub) / len(members)
            for m in sub:
                self.write(m.cell, self.row(m, trainer, trunk, data, started, memory, pass_wall))
            acc.free_memory()

    def setup(self, claimed: list[tuple[Cell, Any]]) -> tuple[list[Member], Trunk, DataSplits]:
        """The backbone and every member drawn as in a run of its own (set_seed, backbone, head),
        the inputs, and each member's model selection."""
        ctx, acc = self.ctx, self.accelerator
        first = claimed[0][0]
        recipe = first.recipe
        data = ctx.store.splits(first, ctx.progress)
        set_seed(first.seed)
        backbone = build_backbone(first.backbone, first.weights)
        normalize = recipe.input_normalization == "backbone"
        shared = frozen_backbone(first)
        after_backbone = RngStream.capture(acc.device)
        members: list[Member] = []
        model = None
        for cell, resume in claimed:
            after_backbone.restore()
            try:
                head = build_head(cell.head, backbone.out_channels, len(data.classes), data.context, **cell.hparams)
            except Exception as exc:  # noqa: BLE001 - this head's run fails, the others train
                failed = Member(cell, self.locks.get(cell.run_id), nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity(),
                                RngStream.capture(acc.device), ({}, RngStream.capture(acc.device)))
                failed.failure = MemberFailure.of(exc)
                members.append(failed)
                continue
            stream = RngStream.capture(acc.device)
            if shared:  # the head alone trains, on the features of the shared frozen backbone
                module, view, selected, own_backbone = head, None, HeadOnly(head), None
            else:  # the backbone trains: the member is the whole classifier (a job of one)
                model = Classifier(backbone, head, freeze_backbone=False, normalize=normalize)
                module, view, selected, own_backbone = model, model, model, backbone
            # to start again after an out-of-memory split (only a pass of several members is split)
            initial = ({k: v.detach().clone() for k, v in module.state_dict().items()} if len(claimed) > 1 else {}, stream.copy())
            members.append(Member(cell, self.locks.get(cell.run_id), head, module, view, selected, stream, initial,
                                  backbone=own_backbone, resume=resume))
        if shared:
            model = Classifier(backbone, nn.Identity(), freeze_backbone=True, normalize=normalize)
        assert model is not None, "a job whose backbone trains has one cell"
        inputs = make_inputs(first, model, data, ctx.store, ctx.progress)
        trunk = Trunk(model, inputs, shared_backbone=shared and recipe.protocol != "frozen")
        if shared:
            model.to(acc.device).eval()
        for m in members:
            if m.failure is None:
                if m.view is None:
                    m.view = m.selected if recipe.protocol == "frozen" else Classifier(backbone, m.head, freeze_backbone=True, normalize=normalize)
                m.selector = make_selector(m.cell, inputs, acc)
        return members, trunk, data

    def passes(self, members: list[Member], trunk: Trunk, split: bool) -> list[tuple[int, list[Member]]]:
        """Passes to train: members grouped by the epoch they resume from (after an out-of-memory
        split, a fresh look at their checkpoints), each split to fit the memory budget when ``split``."""
        acc = self.accelerator
        if not split:
            found = None
            if acc.is_main_process:
                found = []
                for m in members:
                    latest = EpochCheckpoints(self.ctx.results_dir, m.cell.run_id, acc).latest() if self.ctx.checkpoint else None
                    found.append([str(latest[0]), latest[1]] if latest else None)
            found = broadcast(acc, found)
            for m, f in zip(members, found):
                m.resume = (Path(f[0]), f[1]) if f else None
        by_epoch: dict[int, list[Member]] = {}
        for m in members:
            by_epoch.setdefault(m.resume[1]["epoch"] + 1 if m.resume else 0, []).append(m)
        out = []
        for first_epoch, ms in by_epoch.items():
            parts = self.memory_split(ms, trunk) if split and len(ms) > 1 else [list(range(len(ms)))]
            out += [(first_epoch, [ms[i] for i in part]) for part in parts]
        return out

    def memory_split(self, members: list[Member], trunk: Trunk) -> list[list[int]]:
        """Main process estimates, every process learns: passes that fit the memory budget."""
        acc = self.accelerator
        parts = None
        if acc.is_main_process:
            recipe = members[0].cell.recipe
            batch = max(1, recipe.batch_size // acc.num_processes)
            shape = tuple(trunk.inputs.feature_shape)
            sizes = [head_training_bytes(m.head, shape, batch, m.cell.recipe) for m in members]
            if recipe.protocol == "frozen":  # the batch of cached features, as read and as float
                reserve = batch * int(np.prod(shape)) * (4 + np.dtype(recipe.feature_dtype).itemsize)
            else:
                reserve = trunk_bytes(trunk.model, recipe.image_size, batch, acc.device)
            parts = split_by_memory(sizes, memory_budget(acc.device, reserve))
            if len(parts) > 1:
                self.ctx.progress.log(f"{len(members)} heads split into {len(parts)} passes to fit the memory budget")
        return broadcast(acc, parts)

    def row(self, m: Member, trainer: Trainer, trunk: Trunk, data: DataSplits, started: str, memory: PeakMemory, pass_wall: float) -> dict[str, Any]:
        """A member's row: failed, or finished with its metrics and outputs (``pass_wall``: the
        pass's wall time with its share of the job's setup; the row's ``wall_s`` is its share)."""
        ctx, acc, cell = self.ctx, self.accelerator, m.cell
        if m.failure is not None:
            return failed_row(cell, ctx.grid.name, acc, m.failure)
        size = len(trainer.members)
        model = trunk.model
        extra = {"trained_with": {"id": pass_id([x.cell for x in trainer.members]), "size": size, "wall_s": pass_wall}} if self.job.together else {}
        try:
            row = finished_row(
                cell, ctx.grid.name, acc, started=started, data=data, record=m.record, preds=m.preds, model=model,
                feature_shape=trunk.inputs.feature_shape,
                total_params=sum(p.numel() for p in model.backbone.parameters()) + sum(p.numel() for p in m.head.parameters()),
                backbone_flops=ctx.store.backbone_flops(cell, model), source_run_id=None, **extra,
            )
            write_outputs(row, ctx, cell, data=data, preds=m.preds, head=m.head, feature_shape=trunk.inputs.feature_shape,
                          state_dict=m.view.state_dict, memory=memory)
        except (Interrupted, DataError, NoSpaceError):
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the head's cost cannot be measured: its run fails alone
            return failed_row(cell, ctx.grid.name, acc, exc)
        row["wall_s"] = pass_wall / size
        row["finished_at"] = now()
        return row

    # -- derived heads -----------------------------------------------------------------------------

    def derived(self, cell: Cell) -> None:
        """Claim and evaluate one derived head (its source's row is written by now)."""
        if not self.claims([cell]):
            return
        try:
            row = self.evaluate_derived(cell)
        except (Interrupted, DataError, NoSpaceError):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded, the grid goes on
            row = failed_row(cell, self.ctx.grid.name, self.accelerator, exc)
        self.write(cell, row)
        self.accelerator.free_memory()

    def evaluate_derived(self, cell: Cell) -> dict[str, Any]:
        """The source run's trained model with the derived head (``adopt``), evaluated as a pass of
        one member that does not train."""
        ctx, acc, recipe = self.ctx, self.accelerator, cell.recipe
        started, wall_start = now(), time.perf_counter()
        memory = PeakMemory(acc.device)
        memory.reset()
        data = ctx.store.splits(cell, ctx.progress)
        set_seed(cell.seed)
        model = build_model(cell, data, ctx.results_dir)
        inputs = make_inputs(cell, model, data, ctx.store, ctx.progress)
        on_features = recipe.protocol == "frozen"
        module = model.head if on_features else model
        view = HeadOnly(model.head) if on_features else model
        stream = RngStream.capture(acc.device)
        member = Member(cell, self.locks.get(cell.run_id), model.head, module, view, view, stream, ({}, stream.copy()))
        member.selector = make_selector(cell, inputs, acc)
        model.to(acc.device)
        trainer = Trainer([member], Trunk(model, inputs, shared_backbone=False), ctx, first_epoch=recipe.epochs)
        val = trainer.predict(trainer.eval_loader(inputs.val), inputs.prepare_eval).get(0) if recipe.select == "best_val" else None
        source_epoch = results.run_row(ctx.results_dir, cell.source_run_id).get("selected_epoch")
        member.record = TrainingRecord(selection=member.selector.derived(source_epoch or recipe.epochs, val))
        trainer.evaluate()
        if member.failure is not None:
            return failed_row(cell, ctx.grid.name, acc, member.failure)
        row = finished_row(
            cell, ctx.grid.name, acc, started=started, data=data, record=member.record, preds=member.preds, model=model,
            feature_shape=inputs.feature_shape, total_params=sum(p.numel() for p in model.parameters()),
            backbone_flops=ctx.store.backbone_flops(cell, model), source_run_id=cell.source_run_id,
        )
        write_outputs(row, ctx, cell, data=data, preds=member.preds, head=model.head, feature_shape=inputs.feature_shape,
                      state_dict=view.state_dict, memory=memory)
        row["wall_s"] = time.perf_counter() - wall_start
        row["finished_at"] = now()
        return row
