"""Crash-safe file writes: write a temporary file in the same folder, fsync it, rename it.

A reader sees either the old file or the complete new one, never a partial write, even if the
process is killed (SIGKILL) at any point. A kill can still leave the temporary file behind: its
name records the writer's host and process id (``.<name>.<host>.<pid>.<random>.tmp``), so the
next start removes the ones whose writer is gone (:func:`remove_stale_temporaries`) without
touching a file another live process is still writing.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

#: a temporary file of another host (or of an older version, without host and pid) is removed
#: only once it is this old: its writer may still be at work on a shared file system
FOREIGN_TEMP_AGE_S = 24 * 3600.0

_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def _default_mode() -> int:
    """Permissions a plain ``open(..., "w")`` would give (0666 less the umask); mkstemp gives 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _default_mode()


def host_tag() -> str:
    """This host's name as it appears in temporary file names (letters, digits and ``-``)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entry table so a rename in it survives a power loss."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{host_tag()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write` whose writer is gone: a process
    of this host that no longer runs, or (another host, or an older name without the writer) a
    file untouched for :data:`FOREIGN_TEMP_AGE_S`."""
    name = path.name
    match = _TEMP.match(name)
    if match is None and _LEGACY_TEMP.match(name) is None:
        return False
    if match is not None and match["host"] == host_tag():
        pid = int(match["pid"])
        return pid != os.getpid() and not pid_alive(pid)
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return False
    return age > FOREIGN_TEMP_AGE_S


def remove_stale_temporaries(folders: Iterable[str | Path]) -> list[Path]:
    """Delete the stale temporary files (:func:`is_stale_temporary`) directly inside ``folders``
    (not below them; a missing folder is skipped); return the ones deleted."""
    removed: list[Path] = []
    now = time.time()
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                candidates = [Path(e.path) for e in entries if e.name.endswith(".tmp") and e.name.startswith(".") and e.is_file(follow_symlinks=False)]
        except OSError:  # missing or unreadable: nothing of ours to clean there
            continue
        for path in candidates:
            if is_stale_temporary(path, now):
                try:
                    path.unlink()
                except OSError:
                    continue
                removed.append(path)
    return removed
