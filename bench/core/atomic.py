"""Crash-safe file writes: write a temporary file in the same folder, fsync it, rename it.

A reader sees either the old file or the complete new one, never a partial write, even if the
process is killed (SIGKILL) at any point. A kill can still leave the temporary file behind: its
name records the writer's host and process id (``.<name>.<host>.<pid>.<random>.tmp``), so the
next start removes the ones whose writer is gone (:func:`remove_stale_temporaries`) without
touching a file another live process is still writing.

A full file system (``ENOSPC`` / ``EDQUOT``) is a :class:`bench.core.errors.NoSpaceError` naming the
folder, its free space and the bytes needed (:func:`no_space`), with the temporary file removed:
nothing half-written stays behind, and the same command run again behaves the same way.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from bench.core.errors import NoSpaceError

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


#: the error numbers of a full file system (no space; quota exceeded)
NO_SPACE_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) says the file system is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def free_bytes(folder: str | Path) -> int | None:
    """Bytes free to this user in ``folder``'s file system (its nearest existing parent), or None."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def no_space(folder: str | Path, needed: int | None, what: str = "") -> NoSpaceError:
    """The error to raise when writing ``needed`` bytes (None: unknown) into ``folder`` failed
    for lack of space (or would: a preflight check)."""
    return NoSpaceError(folder, needed, free_bytes(folder), what)


def atomic_write(path: str | Path, write: Callable[[Path], None], size_hint: int | None = None) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it to ``path`` atomically.

    A full file system raises :class:`NoSpaceError` (the temporary file removed); ``size_hint``
    (bytes, when the caller knows them) goes into its message, else the bytes written before
    the disk filled (a lower bound)."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{host_tag()}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, _MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except BaseException as exc:
        written = 0
        if tmp is not None:
            try:
                written = tmp.stat().st_size
            except OSError:
                pass
            tmp.unlink(missing_ok=True)
        if is_no_space(exc):
            raise no_space(path.parent, size_hint or written or None, str(path.name)) from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), size_hint=len(data))


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
