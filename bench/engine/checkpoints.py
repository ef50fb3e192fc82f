"""Per-epoch training checkpoints, so a killed run continues from its last finished epoch.

``results/checkpoints/<run_id>/epoch_NNNN/`` holds ``accelerator.save_state`` output (model,
optimizer, scheduler, every process's RNG states; loaded back with ``weights_only=True``) plus
``progress.json`` (epochs done, training seconds and images so far, losses). A checkpoint is
saved into ``epoch_NNNN.tmp`` by all processes and renamed by the main process once complete, so
a folder without ``.tmp`` is always whole. Only the newest is kept; all are removed when the run's
row is written.

Before a checkpoint is used, every file in it is read back (:meth:`EpochCheckpoints.latest`). One
that cannot be (damaged by a disk, truncated by a copy, edited by hand) is discarded with a warning
naming it, and the run restarts from its first epoch, instead of failing on every retry.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator

PROGRESS = "progress.json"
#: accelerate's ``save_state`` file names: the model (safetensors, or a pickle with
#: ``safe_serialization=False``), optimizer, scheduler, and process 0's RNG states
MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
REQUIRED_FILES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl")


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
    return progress


def check_state_files(folder: Path) -> None:
    """Read back every file ``accelerator.save_state`` wrote into ``folder`` (with the loaders
    ``load_state`` uses); ``ValueError`` naming the first that is missing or unreadable."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise ValueError(f"no model file ({' or '.join(MODEL_FILES)})")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for path in sorted(folder.iterdir()):
        if path.name == PROGRESS or not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix in (".bin", ".pkl", ".pt"):
                load(path, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch, pickle and safetensors each raise their own
            raise ValueError(f"{path.name} cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


class EpochCheckpoints:
    """The checkpoints of one run."""

    def __init__(self, results_dir: str | Path, run_id: str, accelerator: Accelerator) -> None:
        self.root = Path(results_dir) / "checkpoints" / run_id
        self.accelerator = accelerator

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete, readable checkpoint and its progress record, or None (main
        process view). A damaged one is deleted with a :class:`DamagedCheckpointWarning`."""
        if not self.root.is_dir():
            return None
        for folder in sorted(self.root.glob("epoch_[0-9][0-9][0-9][0-9]"), reverse=True):
            try:
                try:
                    progress = json.loads((folder / PROGRESS).read_text())
                except (OSError, ValueError) as exc:
                    raise ValueError(f"{PROGRESS} cannot be read ({exc})") from None
                check_progress(progress, int(folder.name.split("_")[1]))
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

    def save(self, epoch: int, progress: dict[str, Any], extra: Callable[[Path], None] | None = None) -> None:
        """Save the state after ``epoch`` (0-based) on every process; keep only this one.

        ``extra(folder)``, on the main process, writes more files into the checkpoint before it is
        complete (the model selection's best weights, bench.engine.selection)."""
        final = self.root / f"epoch_{epoch:04d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if extra is not None:
                extra(tmp)
            (tmp / PROGRESS).write_text(json.dumps({**progress, "epoch": epoch}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.root.iterdir():
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load(self, folder: str | Path) -> None:
        """Restore model, optimizer, scheduler and RNG states on every process."""
        self.accelerator.load_state(str(folder))

    def remove(self) -> None:
        """Delete all checkpoints of the run (main process)."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)
