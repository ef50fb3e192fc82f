"""Epoch checkpoints, one format for every run, so a killed run continues from its last epoch.

``results/checkpoints/<run_id>/epoch_NNNN/`` holds, for one member of a pass:

- ``state.pt``: the weights of the module it trains and its optimizer's state (with the schedule's
  step and, under fp16, the loss scaler), loaded back with ``weights_only=True``; for a loss that
  corrects labels for good (LL-Cp), also ``corrected``: bool [N, C], the training entries flipped
  to positive so far;
- ``rng_<process>.pt``: its random streams on each process (bench.engine.streams);
- ``progress.json``: epochs done, training seconds and images so far, losses, steps per epoch and
  the model selection's record; ``selection_best.safetensors``: the best epoch's weights.

A checkpoint is saved into ``epoch_NNNN.tmp`` and renamed by the main process once whole, so a
folder without ``.tmp`` is always complete; only the newest is kept, and all are removed when the
run's row is written. Before a checkpoint is used every file in it is read back
(:meth:`EpochCheckpoints.latest`); one that cannot be (damaged by a disk, truncated by a copy,
edited by hand, or written by an older version in another format) is discarded with a warning
naming it, and the run restarts from its first epoch instead of failing on every retry.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from bench.core.atomic import is_no_space, no_space

PROGRESS = "progress.json"
STATE = "state.pt"
PREFIX = "epoch_"


class DamagedCheckpointWarning(UserWarning):
    """An epoch checkpoint could not be read back; it is deleted and its run restarts."""


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_progress(progress: object, epoch: int) -> dict[str, Any]:
    """``progress.json``'s record if it is complete and belongs to ``epoch``, else ``ValueError``."""
    if not isinstance(progress, dict):
        raise ValueError(f"{PROGRESS} is not a JSON object")
    if progress.get("epoch") != epoch:
        raise ValueError(f"{PROGRESS} says epoch {progress.get('epoch')!r}, the folder epoch {epoch}")
    for key in ("seconds", "images"):
        if not _number(progress.get(key)) or progress[key] < 0:
            raise ValueError(f"{PROGRESS} has no valid {key!r} (got {progress.get(key)!r})")
    losses = progress.get("losses")
    if not isinstance(losses, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses):
        raise ValueError(f"{PROGRESS} has no valid 'losses' list")
    steps = progress.get("steps_per_epoch")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{PROGRESS} has no valid 'steps_per_epoch' (got {steps!r})")
    return progress


def check_state_files(folder: Path) -> None:
    """Read back the state and random-stream files of ``folder``; ``ValueError`` naming the first
    that is missing or unreadable."""
    for name in (STATE, "rng_0.pt"):
        path = folder / name
        if not path.is_file():
            raise ValueError(f"missing {name}")
    for path in sorted(folder.glob("*.pt"), key=lambda p: (p.name != STATE, p.name)):  # the state first
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch and pickle each raise their own
            raise ValueError(f"{path.name} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
        if path.name == STATE and not (isinstance(state, dict) and {"module", "optimizer"} <= set(state)):
            raise ValueError(f"{STATE} holds no module and optimizer state")


class EpochCheckpoints:
    """The epoch checkpoints of one run."""

    def __init__(self, results_dir: str | Path, run_id: str, accelerator: Accelerator | None) -> None:
        self.root = Path(results_dir) / "checkpoints" / run_id
        self.accelerator = accelerator

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete, readable checkpoint and its progress record, or None (main
        process view). A damaged one is deleted with a :class:`DamagedCheckpointWarning`."""
        if not self.root.is_dir():
            return None
        for folder in sorted(self.root.glob(f"{PREFIX}[0-9][0-9][0-9][0-9]"), reverse=True):
            try:
                try:
                    progress = json.loads((folder / PROGRESS).read_text())
                except (OSError, ValueError) as exc:
                    raise ValueError(f"{PROGRESS} cannot be read ({exc})") from None
                check_progress(progress, int(folder.name[len(PREFIX):]))
                check_state_files(folder)
            except ValueError as exc:
                warnings.warn(
                    f"discarding damaged checkpoint {folder}: {exc}; its run restarts from the first epoch "
                    "(or from an older checkpoint)",
                    DamagedCheckpointWarning,
                    stacklevel=2,
                )
                shutil.rmtree(folder, ignore_errors=True)
                continue
            return folder, progress
        return None

    def folder(self, epoch: int) -> Path:
        return self.root / f"{PREFIX}{epoch:04d}"

    def begin(self, epoch: int) -> Path:
        """Main process: an empty temporary folder for the checkpoint after ``epoch``."""
        tmp = self.folder(epoch).with_name(f"{PREFIX}{epoch:04d}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, progress: dict[str, Any], epoch: int) -> None:
        """Main process: write the progress record, rename the folder, drop older checkpoints."""
        (tmp / PROGRESS).write_text(json.dumps({**progress, "epoch": epoch}))
        final = self.folder(epoch)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.root.iterdir():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        """Delete all checkpoints of the run (main process)."""
        if self.accelerator is None or self.accelerator.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)


def save_members(results_dir: Path, accelerator: Accelerator, epoch: int, members: list[Any], steps_per_epoch: int,
                 corrected: dict[str, torch.Tensor] | None = None) -> None:
    """Every process: save each member's state after ``epoch`` (0-based) into its run's checkpoint;
    ``corrected``: by run id, the bool [N, C] training entries a member's loss flipped for good."""
    books = {m.cell.run_id: EpochCheckpoints(results_dir, m.cell.run_id, accelerator) for m in members}
    tmp = {run_id: book.folder(epoch).with_name(f"{PREFIX}{epoch:04d}.tmp") for run_id, book in books.items()}
    try:
        _write_members(books, tmp, accelerator, epoch, members, steps_per_epoch, corrected or {})
    except Exception as exc:
        # nothing half-written stays behind: the temporary folders go, the last whole checkpoint stays
        for folder in tmp.values():
            shutil.rmtree(folder, ignore_errors=True)
        if is_no_space(exc):
            raise no_space(Path(results_dir) / "checkpoints", None, "an epoch checkpoint") from exc
        raise


def _write_members(books: dict[str, EpochCheckpoints], tmp: dict[str, Path], accelerator: Accelerator, epoch: int,
                   members: list[Any], steps_per_epoch: int, corrected: dict[str, torch.Tensor]) -> None:
    if accelerator.is_main_process:
        for run_id, book in books.items():
            book.begin(epoch)
    accelerator.wait_for_everyone()
    for m in members:
        torch.save(m.stream.state_dict(), tmp[m.cell.run_id] / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for m in members:
            folder = tmp[m.cell.run_id]
            state = {"module": {k: v.detach().cpu() for k, v in m.module.state_dict().items()}, "optimizer": m.optimizer.state_dict()}
            if m.cell.run_id in corrected:
                state["corrected"] = corrected[m.cell.run_id].cpu()
            torch.save(state, folder / STATE)
            m.selector.save(folder)
            progress = {"seconds": m.record.seconds, "images": m.record.images, "losses": m.record.losses,
                        "steps_per_epoch": steps_per_epoch, **m.selector.record()}
            books[m.cell.run_id].commit(folder, progress, epoch)
    accelerator.wait_for_everyone()


def load_member(folder: Path, progress: dict[str, Any], member: Any, process_index: int) -> torch.Tensor | None:
    """Every process: restore one member (weights, optimizer, random streams, record, selection);
    returns the bool [N, C] entries its loss corrected for good (None: it saved none)."""
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    member.module.load_state_dict(state["module"])
    member.optimizer.load_state_dict(state["optimizer"])
    rng = folder / f"rng_{process_index}.pt"
    member.stream.load_state_dict(torch.load(rng if rng.is_file() else folder / "rng_0.pt", weights_only=True))
    member.record.seconds, member.record.images, member.record.losses = progress["seconds"], progress["images"], list(progress["losses"])
    member.selector.resume(progress, folder)
    return state.get("corrected")
