"""What happened to each cell of a grid in one launch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.config.grid import Cell


@dataclass
class CellOutcome:
    """One cell in this launch: ``finished`` or ``failed`` (with the error), or the reason it was
    skipped (bench.engine.claims.claim)."""

    cell: Cell
    status: str
    row: dict[str, Any] | None = None
    error: str = ""


@dataclass
class GridSummary:
    """Outcomes of all cells of a grid, job by job; ``interrupted`` if a signal stopped it."""

    outcomes: list[CellOutcome] = field(default_factory=list)
    interrupted: bool = False

    @property
    def trained(self) -> int:
        """Cells run (trained or evaluated) by this launch that finished."""
        return self.count("finished")

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    def add(self, cell: Cell, row_or_reason: dict[str, Any] | str) -> None:
        if isinstance(row_or_reason, str):
            self.outcomes.append(CellOutcome(cell, row_or_reason))
        else:
            row = row_or_reason
            self.outcomes.append(CellOutcome(cell, row["status"], row, row.get("error", "") or ""))
