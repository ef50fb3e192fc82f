"""Run claims: one lock file per run id, so two launches sharing a results directory never train
the same run at the same time.

``results/locks/<run_id>.lock`` holds the owner's host, pid and start time as JSON. It is written
complete under a temporary name and hard-linked into place (``os.link`` fails when the name exists:
atomic on local and NFSv3+ file systems), so a lock file is never empty or half-written, even when
its creator is killed. A lock is stale when its owner is on this host and no longer alive, when its
file has not been touched for ``stale_after`` seconds (the owner refreshes it while it trains; this
covers owners on other hosts), or when its content cannot be read (a damaged file, reclaimed with a
warning once it is :data:`DAMAGED_GRACE_S` old). A stale lock is reclaimed by renaming it away
first — only one claimant's rename can succeed — and then creating a fresh one.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from bench.core.atomic import host_tag, pid_alive
from bench.core.env import env_number
from bench.core.errors import UsageError

#: seconds after which an untouched lock of another host is stale; ``$HEADBENCH_LOCK_STALE_S``
DEFAULT_STALE_AFTER_S = 3600.0
STALE_ENV = "HEADBENCH_LOCK_STALE_S"
REFRESH_EVERY_S = 30.0
#: an unreadable lock younger than this may be one an older version is still writing (it created
#: the file first and wrote its content after); older, it is damaged and reclaimed
DAMAGED_GRACE_S = 10.0
LOCKS = "locks"
_GRAVE = ".stale-"


def stale_after_s() -> float:
    """``$HEADBENCH_LOCK_STALE_S`` (default :data:`DEFAULT_STALE_AFTER_S`), checked: 1 s to 30 days.
    A live owner refreshes its lock at least four times per stale time (:meth:`RunLock.refresh`),
    so even a short stale time never makes a live lock look stale."""
    value = env_number(STALE_ENV, DEFAULT_STALE_AFTER_S, 1.0, 30 * 24 * 3600.0, "seconds")
    assert value is not None
    return value


def check_lock_folder(results_dir: str | Path) -> None:
    """A :class:`UsageError` naming every entry of ``results/locks/`` that is not a plain file (a
    folder made by hand or by a copy tool): it would hold its run forever, and the harness never
    deletes a folder it did not make."""
    folder = Path(results_dir) / LOCKS
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is not a folder: it holds the run locks; move it away and run the same command again")
    odd = sorted(p.name for p in folder.glob("*.lock") if not p.is_file() or p.is_symlink()) if folder.is_dir() else []
    if odd:
        raise UsageError(
            f"{folder} holds {len(odd)} lock(s) that are not plain files: {', '.join(odd[:5])}"
            f"{' ...' if len(odd) > 5 else ''}; a lock is a small file the harness writes itself: remove "
            f"{'them' if len(odd) > 1 else 'it'} (no launch may be running) and run the same command again"
        )


def remove_graves(results_dir: str | Path) -> list[Path]:
    """Delete the renamed-away stale locks (``<run_id>.lock.stale-...``) a killed reclaimer left;
    nothing reads them, so removing one that a live reclaimer is about to delete is harmless."""
    removed = []
    for grave in (Path(results_dir) / LOCKS).glob(f"*.lock{_GRAVE}*"):
        try:
            grave.unlink()
        except OSError:
            continue
        removed.append(grave)
    return removed


class RunLock:
    """A claim on one run id. Use :meth:`acquire`; :meth:`refresh` while working; :meth:`release`."""

    def __init__(self, results_dir: str | Path, run_id: str, stale_after: float | None = None) -> None:
        self.path = Path(results_dir) / LOCKS / f"{run_id}.lock"
        self.stale_after = stale_after_s() if stale_after is None else stale_after
        self._last_refresh = 0.0
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        """The current owner's ``{"host", "pid", "since"}``, or None if unlocked/unreadable."""
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not (isinstance(owner, dict) and isinstance(owner.get("host"), str) and isinstance(owner.get("pid"), int)):
            return None
        return owner

    def _is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        owner = self.owner()
        if owner is None:
            if self.path.exists() and age > DAMAGED_GRACE_S:
                warnings.warn(f"lock file {self.path} is damaged (no readable owner); reclaiming it", stacklevel=3)
                return True
            return age > self.stale_after
        if owner["host"] == socket.gethostname():
            return not pid_alive(owner["pid"])
        return age > self.stale_after

    def _check_plain(self) -> None:
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise UsageError(f"lock {self.path} is not a plain file (a folder?): remove it (no launch may be running) and run the same command again")

    def is_claimed(self) -> bool:
        """Whether another live owner (not this process) holds this run; claims nothing."""
        self._check_plain()
        if self.held or not self.path.exists():
            return False
        owner = self.owner()
        if owner is not None and owner["host"] == socket.gethostname() and owner["pid"] == os.getpid():
            return False
        return not self._is_stale()

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        content = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        tmp = self.path.with_name(f".{self.path.name}.{host_tag()}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            tmp.write_text(content)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: exclusive create, then write
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(content)
        finally:
            tmp.unlink(missing_ok=True)
        self.held = True
        self._last_refresh = time.monotonic()
        return True

    def acquire(self) -> bool:
        """Claim the run; False if a live owner holds it. A lock path that is not a plain file
        (a folder) is a :class:`UsageError` naming it: the harness never deletes what it did not make."""
        self._check_plain()
        if self._create():
            return True
        if not self._is_stale():
            return False
        grave = self.path.with_name(f"{self.path.name}{_GRAVE}{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, grave)  # only one reclaimer wins this rename
        except FileNotFoundError:
            pass
        else:
            grave.unlink(missing_ok=True)
        return self._create()

    def refresh(self) -> None:
        """Touch the lock (at most every ``REFRESH_EVERY_S``, and at least four times per
        ``stale_after``, so a short ``HEADBENCH_LOCK_STALE_S`` never lets a live owner's lock go
        stale) so other hosts see it is alive."""
        if self.held and time.monotonic() - self._last_refresh > min(REFRESH_EVERY_S, self.stale_after / 4):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass
            self._last_refresh = time.monotonic()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
