"""A grid's ``[run]`` table: execution settings, not part of any run's identity."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from bench.core.coerce import CoerceError, coerce
from bench.core.errors import UsageError, choices


@dataclass(frozen=True)
class RunOptions:
    """How a grid runs (``[run]``); changing one never changes a result or a ``run_id``."""

    #: what a finished run keeps in ``weights/``: the whole model, the head only, or nothing
    #: (a derived head such as CSRA without training needs ``"all"``: checked on load)
    save_weights: Literal["all", "head", "none"] = "all"
    #: ``"epoch"``: a checkpoint after every epoch, so a killed run resumes; ``"none"``: restart
    checkpoint: Literal["epoch", "none"] = "epoch"
    #: frozen backbone: a cell group's heads train in one pass (bench/engine/jobs.py); false: one at a time
    heads_together: bool = True

    @classmethod
    def from_table(cls, table: Any, where: str) -> "RunOptions":
        """The options of a ``[run]`` table, each checked against its annotation
        (:func:`bench.core.coerce.coerce`); missing keys keep their defaults."""
        if not isinstance(table, dict):
            raise UsageError(f"{where}: 'run' must be a table [run], got {table!r}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(table) - set(hints))
        if unknown:
            raise UsageError(f"{where}: unknown [run] key {unknown[0]!r}; valid: {choices(sorted(hints))}")
        values = {}
        for key, value in table.items():
            try:
                values[key] = coerce(hints[key], value)
            except CoerceError as exc:
                raise UsageError(f"{where}: [run] {key} = {value!r}; {exc}") from None
        return cls(**values)

    def replace(self, **changes: Any) -> "RunOptions":
        """A copy with ``changes`` (checked like the table's values)."""
        return RunOptions.from_table({**dataclasses.asdict(self), **changes}, "RunOptions.replace")
