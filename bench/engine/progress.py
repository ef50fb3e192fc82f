"""Progress bars for long work, shown by the main process only (rich); silent elsewhere."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress


class Task:
    """One bar: ``advance()`` per unit of work, ``done()`` at the end."""

    def __init__(self, bars: RichProgress | None, task_id: int | None) -> None:
        self._bars, self._id = bars, task_id

    def advance(self, amount: float = 1.0) -> None:
        if self._bars is not None:
            self._bars.advance(self._id, amount)

    def grow(self, amount: float) -> None:
        """Add ``amount`` units to the bar's total (work whose size is known only when it starts)."""
        if self._bars is not None:
            total = next(t.total for t in self._bars.tasks if t.id == self._id)
            self._bars.update(self._id, total=(total or 0) + amount)

    def done(self) -> None:
        if self._bars is not None:
            self._bars.remove_task(self._id)


class Progress:
    """A set of progress bars; every method is a no-op when ``enabled`` is False."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self._bars = (
            RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=True,
            )
            if enabled
            else None
        )

    def __enter__(self) -> "Progress":
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def add(self, description: str, total: float) -> Task:
        """A new bar of ``total`` units."""
        if self._bars is None:
            return Task(None, None)
        return Task(self._bars, self._bars.add_task(description, total=total))

    def callback(self, description: str) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback drawing a bar (for loops that know their total)."""
        state: dict[str, object] = {}

        def update(done: int, total: int) -> None:
            if "task" not in state:
                state["task"], state["done"] = self.add(description, total), 0
            state["task"].advance(done - state["done"])  # type: ignore[union-attr]
            state["done"] = done
            if done >= total:
                state["task"].done()  # type: ignore[union-attr]

        return update

    def log(self, message: str) -> None:
        """Print a line above the bars (main process only)."""
        if self._bars is not None:
            self._bars.console.print(message)
