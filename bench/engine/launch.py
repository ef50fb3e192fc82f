"""What every job of one grid launch shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from bench.config.grid import Grid
from bench.engine.data_store import DataStore
from bench.engine.interrupt import StopRequest
from bench.engine.progress import Progress


@dataclass
class RunContext:
    """The grid, its data, the accelerator, the progress display, the results folder, the stop
    request, and whether epoch checkpoints are written (``[run] checkpoint``)."""

    grid: Grid
    store: DataStore
    accelerator: Accelerator
    progress: Progress
    results_dir: Path
    stop: StopRequest
    checkpoint: bool = True


def broadcast(accelerator: Accelerator, value: Any) -> Any:
    """``value`` of the main process, on every process."""
    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]
