"""Crash-safe file writes (temporary sibling, fsync, rename or link) and writer locks."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX advisory locks; elsewhere writers of one file must not overlap
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def fsync_dir(directory: Path) -> None:
    """Persist a rename or unlink by syncing its directory (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = True, sync_dir: bool = True
) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file.

    The bytes go to a temporary file in the same directory, created with ``mode``
    (so a private key is never readable by others, not even briefly), are fsynced,
    and then replace ``path`` with ``os.replace`` (atomic on POSIX and Windows).
    With ``overwrite=False`` the file is published with ``os.link``, which fails
    atomically if ``path`` already exists. The temporary file's name is random (a
    restarted process may reuse a crashed one's pid) and has the form
    ``.<name>.<16 hex digits>.tmp``, so that a reader listing the directory can skip
    or sweep it.

    Parameters
    ----------
    path : Path
        Destination file.
    data : bytes
        Complete new content.
    mode : int
        Permission bits of the new file; ``os.open`` applies the umask, so the file
        is at most this permissive.
    overwrite : bool
        Whether an existing ``path`` may be replaced.
    sync_dir : bool
        Whether to fsync the directory afterwards; a caller writing many files into
        one directory may sync it once itself (:func:`fsync_dir`).

    Raises
    ------
    FileExistsError
        If ``overwrite`` is False and ``path`` exists.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock for writing ``path`` (a ``.<name>.lock`` sibling)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
