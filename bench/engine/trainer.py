"""The pass: train and evaluate the members of a job together, one epoch loop for every job.

A pass trains one or more members on the same batches: per batch, the input once (cached
features, the frozen backbone's features of the augmented images, or the augmented images a
finetuned member's classifier reads), every member's forward, every member's loss, the backward,
one optimizer step per member; per evaluation, one pass for all members. A single finetuned cell is
a pass of one member. Each member's numbers are those it gets in a pass of its own:

- the gradient of ``sum_i L_i`` with respect to member i's parameters is ``dL_i/dθ_i`` exactly
  (members share no parameter and a shared input carries no gradient);
- each member has its own optimizer, as :func:`bench.engine.optim.make_optimizer` builds it for
  the member alone, its own learning-rate schedule and its own gradient clipping (the norm of its
  own gradients);
- each member has its own random streams (bench.engine.streams), swapped in around its forward;
- shuffling and augmentation depend only on (seed, epoch, process), so a resumed pass sees exactly
  the batches an uninterrupted one would have seen.

Failures stay the member's: an exception in its forward, its loss, its backward (one process) or
its evaluation, a non-finite loss, or a loss without gradient fails that member only; the others
go on. On several processes the failure flags are all-reduced every step, the module holding the
survivors is wrapped again in ``DistributedDataParallel`` and the step is redone from their saved
random streams. A pass of several members that runs out of memory raises :class:`PassTooLarge`
(bench.engine.job halves it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from bench.api.label_states import draw_label_states
from bench.data.batched_arrays import array_loader
from bench.engine.checkpoints import load_member, save_members
from bench.engine.failures import MemberFailure, NoGradient, NonFiniteLoss, PassTooLarge, PeerFailure, finite_outputs
from bench.engine.inputs import Trunk, eval_batch_size
from bench.engine.interrupt import Interrupted
from bench.engine.launch import RunContext
from bench.engine.losses import make_loss
from bench.engine.members import Member, MemberModules, unwrap, wrap
from bench.engine.optim import MemberOptimizer
from bench.engine.predictions import Predictions
from bench.engine.selection import EpochSelector
from bench.engine.streams import RngStream
from bench.models.classifier import reads_label_states

#: mixed into the label-mask-training stream's seed so it differs from the augmentation stream's
LABEL_STREAM = 0x5EED_0F_1ABE15


class Trainer:
    """Trains (from ``first_epoch``) and evaluates ``members`` in one pass; fills each member's
    record, predictions or failure. ``train`` and ``evaluate`` are the whole pass; ``build``,
    ``run_epoch`` and ``predict`` are its steps (used by bench/perf to time one epoch)."""

    def __init__(self, members: list[Member], trunk: Trunk, ctx: RunContext, first_epoch: int = 0) -> None:
        self.members, self.trunk, self.ctx, self.first_epoch = members, trunk, ctx, first_epoch
        self.accelerator = ctx.accelerator
        self.recipe = members[0].cell.recipe  # what the members share: data, batches, epochs, seed
        self.seed = members[0].cell.seed
        for i, m in enumerate(members):
            m.index = i
        # cached features are stored in float16; a member reads them as float32 (HeadOnly does the same)
        self.modules = MemberModules([m.module for m in members], [m.stream for m in members], self.recipe.protocol == "frozen")
        self.active = [i for i, m in enumerate(members) if m.failure is None]
        self.module: Any = None
        self.task: Any = None
        self.steps_per_epoch = 0
        self.loss_fns = [make_loss(m.cell.recipe) for m in members]
        self.label_readers = [reads_label_states(m.module) for m in members]
        self.epoch = first_epoch  # 0-based; the losses are told ``epoch + 1`` (large-loss rejection grows per epoch)
        self.select_loader: Any = None
        # a loss that corrects labels for good (LL-Cp): per member, bool [N, C] over the training
        # rows, the entries flipped to positive so far (None: its loss corrects nothing). Each
        # member has its own, so a pass of several heads gives each what it gets alone.
        self.corrected: list[torch.Tensor | None] = [None] * len(members)
        self.flips: dict[int, torch.Tensor] = {}  # this step's new flips, bool [B, C] per member

    # -- setup -----------------------------------------------------------------------------------

    def build(self, steps_per_epoch: int) -> None:
        """Every member's optimizer, and the module holding all members on the device (in
        ``DistributedDataParallel`` on several processes)."""
        self.steps_per_epoch = steps_per_epoch
        for m in self.members:
            scaler = torch.amp.GradScaler(self.accelerator.device.type) if m.cell.recipe.mixed_precision == "fp16" else None
            m.optimizer = MemberOptimizer(m.backbone, m.head, m.cell.recipe, steps_per_epoch, list(m.module.parameters()), scaler)
        self.module = wrap(self.modules, self.accelerator)

    def describe(self) -> str:
        if len(self.members) == 1:
            return self.members[0].cell.describe()
        c = self.members[0].cell
        return f"{len(self.members)} heads together: {c.dataset} / {c.backbone} / seed {c.seed}"

    # -- training --------------------------------------------------------------------------------

    def train(self) -> None:
        """Train every member for the recipe's epochs (resuming each from its checkpoint), then
        load the weights of the epoch each member's ``select`` keeps."""
        accelerator, recipe, ctx = self.accelerator, self.recipe, self.ctx
        shuffle = torch.Generator()
        items = self.trunk.inputs.train
        correcting = [bool(getattr(fn, "corrects_labels", False)) for fn in self.loss_fns]
        for i in [i for i, c in enumerate(correcting) if c]:
            self.corrected[i] = torch.zeros(items.targets.shape, dtype=torch.bool)
        train_loader = array_loader(items, batch_size=recipe.batch_size, shuffle=True, generator=shuffle, rows=any(correcting))
        self.build(len(train_loader))  # global batches: accelerate splits each across processes
        train_loader = accelerator.prepare(train_loader)
        augmenter, labeler = torch.Generator(), torch.Generator()
        for m in self.members:
            if m.resume is not None:
                saved = load_member(m.resume[0], m.resume[1], m, accelerator.process_index)
                if self.corrected[m.index] is not None and saved is not None:
                    self.corrected[m.index] = saved.to(torch.bool).clone()
        if self.first_epoch:
            if len(self.members) == 1:
                ctx.progress.log(f"resuming {self.members[0].cell.describe()} from its checkpoint after {self.first_epoch} of {recipe.epochs} epochs")
            else:
                ctx.progress.log(f"resuming a group of {len(self.members)} heads ({self.members[0].cell.describe()}, ...) "
                                 f"from its checkpoint after {self.first_epoch} of {recipe.epochs} epochs")
        self.task = ctx.progress.add(self.describe(), total=recipe.epochs * self.steps_per_epoch)
        self.task.advance(self.first_epoch * self.steps_per_epoch)
        for epoch in range(self.first_epoch, recipe.epochs):
            if not self.active:
                break
            shuffle.manual_seed(self.seed * 100_003 + epoch)
            augmenter.manual_seed((self.seed * 100_003 + epoch) * 1_009 + accelerator.process_index)
            # label mask training draws from a stream of its own, so it never shifts the
            # augmentation: a member reading label states gets the same draws alone or together
            labeler.manual_seed(((self.seed * 100_003 + epoch) * 1_009 + accelerator.process_index) ^ LABEL_STREAM)
            self.epoch = epoch
            seconds, images, losses = self.run_epoch(train_loader, augmenter, labeler)
            for i, m in enumerate(self.members):
                if m.failure is None:
                    m.record.seconds += seconds
                    m.record.images += images
                    m.record.losses.append(losses[i])
            self.select(epoch)
            if ctx.checkpoint and epoch + 1 < recipe.epochs:
                corrected = {m.cell.run_id: self.corrected[i] for i, m in enumerate(self.members) if self.corrected[i] is not None}
                save_members(ctx.results_dir, accelerator, epoch, [m for m in self.members if m.failure is None], self.steps_per_epoch,
                             corrected)
        for m in self.members:
            if m.failure is None:
                m.selector.restore(m.selected)
                m.record.selection = m.selector.result(recipe.epochs)

    def fail(self, index: int, failure: MemberFailure) -> None:
        self.members[index].fail(failure)
        if index in self.active:
            self.active.remove(index)

    def share_failures(self, local: dict[int, MemberFailure], flags: torch.Tensor, where: str, step: int) -> list[int]:
        """All processes: the members that failed on any process (``flags`` summed over processes);
        each gets its own exception where it raised, a PeerFailure naming it elsewhere."""
        failed = [i for i, f in enumerate(flags.tolist()) if f]
        if not failed:
            return []
        mine = {i: f"{f.error_type}: {f.error}" for i, f in local.items()}
        messages = gather_object([mine]) if self.accelerator.num_processes > 1 else [mine]
        if len(self.members) > 1:
            oom = [text for m in messages for text in m.values() if "out of memory" in text.lower()]
            if oom:
                raise PassTooLarge(oom[0])
        for i in failed:
            if i in local:
                self.fail(i, local[i])
            else:
                text = "; ".join(f"process {rank}: {m[i]}" for rank, m in enumerate(messages) if i in m)
                self.fail(i, MemberFailure.of(PeerFailure(f"another process failed at {where} {step} ({text})"), "PeerFailure\n"))
        return failed

    def losses(
        self, feats: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None, label_state: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, MemberFailure]]:
        """Every active member's loss on the batch's input; failures by member index.

        ``known`` bool [B, C]: the training labels the run observes (None: all); ``label_state``
        [B, C]: label-mask-training states for the members that read them (None: no such member);
        ``rows`` int64 [B]: the batch's training rows, given when a member's loss corrects labels
        for good: that member's corrected entries reach its loss as observed positives."""
        self.flips = {}
        modules = unwrap(self.module)
        modules.failures = {}
        with self.accelerator.autocast():
            outs = self.module(feats, list(self.active), label_state)
        losses, failures = {}, dict(modules.failures)
        for i, logits in zip(list(self.active), outs):
            if logits is None:
                continue
            try:
                member_targets, member_known = targets, known
                fixed = self.corrected[i]
                if fixed is not None and rows is not None:
                    flipped = fixed[rows.cpu()].to(targets.device)
                    member_targets = torch.where(flipped, torch.ones_like(targets), targets)
                    member_known = flipped if known is None else known.bool() | flipped
                loss = self.loss_fns[i](logits.float(), member_targets.float(), known=member_known, epoch=self.epoch + 1)
                if fixed is not None and rows is not None and self.loss_fns[i].last_modified is not None:
                    self.flips[i] = self.loss_fns[i].last_modified.detach().cpu()
                if not loss.requires_grad:
                    raise NoGradient("the training loss carries no gradient: the head's output is detached from its "
                                     f"parameters or is not a floating-point tensor (got {logits.dtype})")
                losses[i] = loss
            except Exception as exc:  # noqa: BLE001 - that member's failure
                failures[i] = MemberFailure.of(exc)
        return losses, failures

    def keep_corrections(self, rows: torch.Tensor | None) -> None:
        """Make this step's flips permanent: each surviving member's flipped (row, class) entries
        join its ``corrected``. On several processes every process flipped entries of its own rows
        only; the pairs are gathered so that every process keeps the same arrays."""
        if rows is None or all(c is None for c in self.corrected):
            return
        rows = rows.cpu()
        local = []
        for i in self.active:
            if self.corrected[i] is not None and i in self.flips:
                b, c = torch.nonzero(self.flips[i], as_tuple=True)
                local.append((i, rows[b].tolist(), c.tolist()))
        pairs = gather_object(local) if self.accelerator.num_processes > 1 else local
        for i, r, c in pairs:
            fixed = self.corrected[i]
            if fixed is not None and r:
                fixed[torch.tensor(r, dtype=torch.long), torch.tensor(c, dtype=torch.long)] = True

    def backward(self, losses: dict[int, torch.Tensor]) -> None:
        """Backpropagate every active member's loss. On one process each member's own backward
        (a member whose backward raises fails alone); under DDP one backward of the sum, which
        all-reduces every member's gradients at once."""
        if self.accelerator.num_processes == 1:
            for i in list(self.active):
                try:
                    self.members[i].optimizer.scale(losses[i]).backward()
                except Exception as exc:  # noqa: BLE001 - that member's failure
                    self.members[i].optimizer.skip()
                    self.fail(i, MemberFailure.of(exc))
            return
        total = sum(self.members[i].optimizer.scale(losses[i]) for i in self.active)
        total.backward()

    def run_epoch(self, loader: Any, augmenter: torch.Generator, labeler: torch.Generator | None = None) -> tuple[float, int, list[float]]:
        """One pass over ``loader`` for every active member: (seconds, images, mean loss per member).

        A batch is ``(inputs, targets, ignore)`` or, with the observed mask, ``(inputs, targets,
        ignore, known)``, with the training rows ``rows`` as a fifth element when a member's loss
        corrects labels for good (:meth:`keep_corrections`); ``labeler`` draws the label states of members that read them."""
        accelerator, n = self.accelerator, len(self.members)
        device = accelerator.device
        self.module.train()
        if self.trunk.shared_backbone:
            self.trunk.model.eval()
        totals = torch.zeros(n, device=device)
        steps = 0
        start = time.perf_counter()
        for batch in loader:
            inputs, targets, ignore = batch[0], batch[1], batch[2]
            known = batch[3] if len(batch) > 3 else None
            rows = batch[4] if len(batch) > 4 else None
            label_state = None
            if labeler is not None and any(self.label_readers[i] for i in self.active):
                label_state = draw_label_states(targets, labeler, ignore.bool()).to(device)
            snapshot = [m.stream.copy() for m in self.members] if accelerator.num_processes > 1 else None
            try:
                with accelerator.autocast():
                    feats = self.trunk.features(self.trunk.inputs.prepare_train(inputs, augmenter))
                trunk_failure = None
            except Exception as exc:  # noqa: BLE001 - fails every member of the pass
                if accelerator.num_processes == 1:
                    raise
                trunk_failure, feats = MemberFailure.of(exc), None
            while True:
                if feats is not None:
                    losses, failures = self.losses(feats, targets, known, label_state, rows)
                else:
                    losses, failures = {}, {i: trunk_failure for i in self.active}
                # one vector of flags per step: [not finite (n), failed (n), stop], summed over processes
                flags = torch.zeros(2 * n + 1, device=device)
                if losses:
                    index = torch.tensor(list(losses), device=device)
                    flags[index] = (~torch.isfinite(torch.stack([loss.detach() for loss in losses.values()]))).float()
                for i in failures:
                    flags[n + i] = 1.0
                flags[-1] = float(self.ctx.stop.requested)
                if accelerator.num_processes > 1:
                    flags = accelerator.reduce(flags, "sum")
                failed = self.share_failures(failures, flags[n : 2 * n], "training step", steps)
                for i in [i for i, f in enumerate(flags[:n].tolist()) if f and i in self.active]:
                    value = losses[i].item() if i in losses else float("nan")
                    self.fail(i, MemberFailure.of(NonFiniteLoss(f"training loss is {value} (on this or another process) at step {steps} of the epoch"), "NonFiniteLoss\n"))
                    failed.append(i)
                if not failed or accelerator.num_processes == 1 or not self.active:
                    break
                # several processes: DDP expects a gradient for every wrapped parameter, so wrap
                # the survivors again and redo their step from the random states it started with
                self.module = wrap(unwrap(self.module), accelerator)
                for i in self.active:
                    self.members[i].stream.take(snapshot[i])
                    self.modules.streams[i] = self.members[i].stream
            if self.active:
                self.backward(losses)
                for i in list(self.active):
                    self.members[i].optimizer.step()
                self.keep_corrections(rows)
                if self.active:
                    totals[torch.tensor(self.active, device=device)] += torch.stack([losses[i].detach() for i in self.active])
            steps += 1
            if self.task is not None:
                self.task.advance()
            for m in self.members:
                if m.lock is not None:
                    m.lock.refresh()
            if flags[-1].item():
                raise Interrupted(f"stopped by a signal after step {steps} of the epoch")
            if not self.active:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, len(loader.dataset), (totals / max(1, steps)).tolist()

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, loader: Any, prepare: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, Predictions]:
        """One pass over ``loader`` for every active member: per member, the sigmoid scores of
        every sample once (padding duplicates dropped by ``gather_for_metrics``). A member that
        raises fails; the others go on."""
        accelerator, n = self.accelerator, len(self.members)
        device = accelerator.device
        if self.module is None:
            self.module = wrap(self.modules, accelerator)
        self.module.eval()
        self.trunk.model.eval()
        modules = unwrap(self.module)
        columns = list(self.active)
        scores, targets, ignores = [], [], []
        start = time.perf_counter()
        for step, (inputs, target, ignore) in enumerate(loader):
            modules.failures = {}
            failures: dict[int, MemberFailure] = {}
            probs = torch.zeros(len(target), len(columns), target.shape[1], device=device)
            try:
                with accelerator.autocast():
                    feats = self.trunk.features(prepare(inputs))
                    outs = self.module(feats, list(self.active))
                failures.update(modules.failures)
                for i, logits in zip(list(self.active), outs):
                    if logits is None:
                        continue
                    try:
                        probs[:, columns.index(i)] = torch.sigmoid(logits.float())
                    except Exception as exc:  # noqa: BLE001 - e.g. a tuple, or logits of the wrong shape
                        failures[i] = MemberFailure.of(exc)
            except Exception as exc:  # noqa: BLE001 - the shared part failed: every member fails
                if accelerator.num_processes == 1:
                    raise
                failures = {i: MemberFailure.of(exc) for i in self.active}
            errors = torch.zeros(n, device=device)
            for i in failures:
                errors[i] = 1.0
            if accelerator.num_processes > 1:
                errors = accelerator.reduce(errors, "sum")
            self.share_failures(failures, errors, "evaluation batch", step)
            probs, target, ignore = accelerator.gather_for_metrics((probs, target, ignore))
            scores.append(probs.cpu())
            targets.append(target.cpu())
            ignores.append(ignore.cpu())
            if self.task is not None:
                self.task.advance()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        all_scores = torch.cat(scores).numpy()
        all_targets = torch.cat(targets).numpy().astype(np.uint8)
        all_ignore = torch.cat(ignores).numpy().astype(bool)
        return {
            i: Predictions(np.ascontiguousarray(all_scores[:, k]), all_targets, all_ignore, seconds)
            for k, i in enumerate(columns) if self.members[i].failure is None
        }

    def eval_loader(self, items: Any) -> Any:
        return self.accelerator.prepare(array_loader(items, batch_size=eval_batch_size(self.recipe, self.accelerator.num_processes)))

    def select(self, epoch: int) -> None:
        """Model selection after ``epoch``: one pass over the selecting split for all members."""
        selecting = [m for m in self.members if m.failure is None and m.selector.active]
        if not selecting:
            return
        mode = selecting[0].selector.mode
        if self.select_loader is None:
            self.select_loader = self.eval_loader(self.trunk.inputs.val if mode == "best_val" else self.trunk.inputs.test)
        if self.task is not None:
            self.task.grow(len(self.select_loader))
        for i, p in self.predict(self.select_loader, self.trunk.inputs.prepare_eval).items():
            m = self.members[i]
            m.selector.score_epoch(epoch, p, m.selected)

    def evaluate(self) -> None:
        """The test pass: every surviving member's predictions (non-finite scores fail a member).
        The test split is read here, after the last training step (docs/model-selection.md)."""
        if not self.active:
            return
        if self.task is None:
            self.task = self.ctx.progress.add(self.describe(), total=0)
        loader = self.eval_loader(self.trunk.inputs.test)
        self.task.grow(len(loader))
        with contextlib.ExitStack() as checks:
            for i in self.active:
                checks.enter_context(finite_outputs(self.members[i].module, self.members[i].cell.describe()))
            preds = self.predict(loader, self.trunk.inputs.prepare_eval)
        for i, p in preds.items():
            self.members[i].preds = p
        self.task.done()


def trainer_of_one(cell: Any, model: Any, inputs: Any, ctx: RunContext) -> Trainer:
    """A pass of one member that trains ``model`` (a ``Classifier``) whole on ``inputs``, as a
    finetuned cell's job does; ``build`` and ``run_epoch`` then time its epochs (bench/perf)."""
    stream = RngStream.capture(ctx.accelerator.device)
    member = Member(cell, None, model.head, model, model, model, stream, ({}, stream.copy()), backbone=model.backbone)
    member.selector = EpochSelector(cell.recipe.select, ctx.accelerator)
    return Trainer([member], Trunk(model, inputs, shared_backbone=False), ctx)
