"""Durable file writes and the repository lock.

Invariants:
- ``atomic_write`` leaves either the old file or the complete new one, never a torn
  file, and its temporary file is never readable beyond the target's mode (a key is
  0600 from the instant its temporary file exists). It is the agent's
  (``agent.base.fsutil``): the one implementation both programs use.
- ``repo_lock`` is an exclusive ``fcntl`` lock on ``<repo>/.lock``; every change to a
  repository happens while it is held, by ``edgectl release`` and ``edgectl serve`` alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from agent.base.fsutil import atomic_write

__all__ = ["atomic_write", "make_dir", "repo_lock"]


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
