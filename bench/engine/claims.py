"""Which runs of a job this launch trains: skip the finished, the failed (unless retried) and the
ones another launch holds; lock the rest (main process, before any training)."""

from __future__ import annotations

from pathlib import Path

from bench.config.grid import Cell
from bench.results import store as results
from bench.results.locks import RunLock


def claim(cell: Cell, results_dir: Path, retry_failed: bool) -> tuple[str, RunLock | None]:
    """Main process: decide what to do with a cell — ``run`` (with its lock held), or a reason to
    skip: ``already-finished``, ``failed-before`` (not retried without ``--retry-failed``), ``not-failed``
    (with ``--retry-failed``), ``claimed`` (another launch is training it), or for a derived head
    ``source-unfinished`` (:func:`source_pending`)."""
    status = results.run_status(results_dir, cell.run_id)
    if status == "finished":
        return "already-finished", None
    if retry_failed and status != "failed":
        return "not-failed", None
    if status == "failed" and not retry_failed:
        return "failed-before", None
    if cell.source_run_id is not None:
        waiting = source_pending(cell, results_dir)
        if waiting is not None:
            return waiting, None
    lock = RunLock(results_dir, cell.run_id)
    if not lock.acquire():
        return "claimed", None
    if results.run_status(results_dir, cell.run_id) == "finished":  # finished while we looked
        lock.release()
        return "already-finished", None
    return "run", lock


def source_pending(cell: Cell, results_dir: Path) -> str | None:
    """Main process, for a derived head: why it cannot run now, or None when its source run has a
    row (finished; or failed, and then the derived run fails naming that status).

    ``claimed``: another launch holds the source; it runs this cell right after it (a derived cell
    belongs to its source's job), so this launch leaves it to that one instead of recording a false
    failure. ``source-unfinished``: the source has no row and nobody holds it (its launch was
    stopped); the next launch of the grid runs both. The lock is looked at before the row: the
    holder writes the row before it releases the lock, so a finished source is never missed.
    """
    assert cell.source_run_id is not None
    if RunLock(results_dir, cell.source_run_id).is_claimed():
        return "claimed"
    if results.run_status(results_dir, cell.source_run_id) is None:
        return "source-unfinished"
    return None
