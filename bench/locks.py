"""Run claims: one lock file per run id, so two launches sharing a results directory never train
the same run at the same time.

``results/locks/<run_id>.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local and NFSv3+
file systems) and holds the owner's host, pid and start time as JSON. A lock is stale when its
owner is on this host and no longer alive, or when its file has not been touched for
``stale_after`` seconds (the owner refreshes it while it trains; this covers owners on other
hosts). A stale lock is reclaimed by renaming it away first — only one claimant's rename can
succeed — and then creating a fresh one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

DEFAULT_STALE_AFTER_S = float(os.environ.get("HEADBENCH_LOCK_STALE_S", 3600))
REFRESH_EVERY_S = 30.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """A claim on one run id. Use :meth:`acquire`; :meth:`refresh` while working; :meth:`release`."""

    def __init__(self, results_dir: str | Path, run_id: str, stale_after: float = DEFAULT_STALE_AFTER_S) -> None:
        self.path = Path(results_dir) / "locks" / f"{run_id}.lock"
        self.stale_after = stale_after
        self._last_refresh = 0.0
        self.held = False

    def owner(self) -> dict | None:
        """The current owner's ``{"host", "pid", "since"}``, or None if unlocked/unreadable."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _is_stale(self) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        owner = self.owner()
        if owner is not None and owner.get("host") == socket.gethostname():
            return not _pid_alive(int(owner.get("pid", -1)))
        return age > self.stale_after

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
        self.held = True
        self._last_refresh = time.monotonic()
        return True

    def acquire(self) -> bool:
        """Claim the run; False if a live owner holds it."""
        if self._create():
            return True
        if not self._is_stale():
            return False
        grave = self.path.with_name(f"{self.path.name}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(self.path, grave)  # only one reclaimer wins this rename
        except FileNotFoundError:
            pass
        else:
            grave.unlink(missing_ok=True)
        return self._create()

    def refresh(self) -> None:
        """Touch the lock (at most every ``REFRESH_EVERY_S``) so other hosts see it is alive."""
        if self.held and time.monotonic() - self._last_refresh > REFRESH_EVERY_S:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass
            self._last_refresh = time.monotonic()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
