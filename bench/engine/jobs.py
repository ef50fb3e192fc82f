"""Jobs, planned up front: what trains in one pass.

A job is the set of cells trained together plus the derived cells that reuse their weights:

- on a frozen backbone (``protocol = "frozen"`` or ``freeze_backbone = true``) with
  ``[run] heads_together = true``, every cell sharing :func:`bench.config.grid.head_group_key`
  (same data, backbone, recipe and seed: the same batches of the same features);
- otherwise each trained cell alone (its backbone trains, or ``heads_together = false``, or
  ``mixed_precision = "fp16"``, whose loss scaler is one per pass);
- a derived (training-free) head joins the job of its source run; when its source is not in the
  grid it is a job of its own that only evaluates.

The grid runs as a loop over jobs (bench.engine.runner); the same families are what ``--shard``
splits (:func:`bench.config.grid.shard_cells`), so a job is never cut across launches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.config.grid import Cell, Grid, head_group_key


@dataclass
class Job:
    """Cells trained in one pass (``cells``, in grid order) and the derived cells evaluated after
    them from their saved weights (``derived``)."""

    key: str
    cells: list[Cell] = field(default_factory=list)
    derived: list[Cell] = field(default_factory=list)

    @property
    def together(self) -> bool:
        """Whether this job trains several cells in one pass (its rows say so in ``trained_with``)."""
        return len(self.cells) > 1

    def all_cells(self) -> list[Cell]:
        return self.cells + self.derived

    def describe(self) -> str:
        first = (self.cells or self.derived)[0]
        return first.describe() if len(self.cells) <= 1 else f"{len(self.cells)} heads together: {first.dataset} / {first.backbone} / seed {first.seed}"


def job_key(cell: Cell, heads_together: bool) -> str:
    """The key of the job that trains ``cell``: its head group's, or its own run id."""
    if heads_together and cell.recipe.mixed_precision != "fp16":
        key = head_group_key(cell)
        if key is not None:
            return key
    return cell.run_id


def plan_jobs(grid: Grid) -> list[Job]:
    """The jobs of ``grid``'s cells, in the order their first cell appears."""
    together = grid.run.heads_together
    jobs: dict[str, Job] = {}
    trained_in: dict[str, Job] = {}
    for cell in grid.cells:
        if cell.source_run_id is not None:
            job = trained_in.get(cell.source_run_id)
            if job is None:
                job = jobs.setdefault(f"derived:{cell.run_id}", Job(f"derived:{cell.run_id}"))
            job.derived.append(cell)
            continue
        key = job_key(cell, together)
        job = jobs.setdefault(key, Job(key))
        job.cells.append(cell)
        trained_in[cell.run_id] = job
    return list(jobs.values())
