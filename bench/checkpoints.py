"""Per-epoch training checkpoints, so a killed run continues from its last finished epoch.

``results/checkpoints/<run_id>/epoch_NNNN/`` holds ``accelerator.save_state`` output (model,
optimizer, scheduler, every process's RNG states; loaded back with ``weights_only=True``) plus
``progress.json`` (epochs done, training seconds and images so far, losses). A checkpoint is
saved into ``epoch_NNNN.tmp`` by all processes and renamed by the main process once complete, so
a folder without ``.tmp`` is always whole. Only the newest is kept; all are removed when the run's
row is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

PROGRESS = "progress.json"


class EpochCheckpoints:
    """The checkpoints of one run."""

    def __init__(self, results_dir: str | Path, run_id: str, accelerator: Accelerator) -> None:
        self.root = Path(results_dir) / "checkpoints" / run_id
        self.accelerator = accelerator

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint and its progress record, or None (main process view)."""
        if not self.root.is_dir():
            return None
        for folder in sorted(self.root.glob("epoch_[0-9][0-9][0-9][0-9]"), reverse=True):
            try:
                return folder, json.loads((folder / PROGRESS).read_text())
            except (OSError, ValueError):
                continue  # damaged by hand: fall back to an older one
        return None

    def save(self, epoch: int, progress: dict[str, Any]) -> None:
        """Save the state after ``epoch`` (0-based) on every process; keep only this one."""
        final = self.root / f"epoch_{epoch:04d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
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
