"""Durable file writes and the repository lock.

Invariants:
- ``atomic_write`` leaves either the old file or the complete new one, never a torn
  file: it writes a temporary file in the same directory, fsyncs it, renames it over
  the destination and fsyncs the directory so the rename survives a power cut.
- ``repo_lock`` is an exclusive ``fcntl`` lock on ``<repo>/.lock``; every change to a
  repository happens while it is held, by ``edgectl release`` and ``edgectl serve`` alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably with permissions ``mode``.

    Raises OSError when the directory is missing or not writable.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def make_dir(path: Path, mode: int = 0o755) -> None:
    """Create ``path`` (and parents) and make sure its own mode is ``mode``."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)


@contextlib.contextmanager
def repo_lock(repo_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of a repository for the duration of the block."""
    with open(repo_dir / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
