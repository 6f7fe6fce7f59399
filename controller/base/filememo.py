"""Reuse what was computed from a file while the file has not changed.

``/metrics`` reads ``REPO_DIR/ca/devices.json`` (24 MB at 100,000 devices, ~0.5 s to
parse) and ``crl.pem`` at every scrape; both change only when a device is enrolled,
renewed or revoked. ``FileMemo`` keeps the value computed from a file with the file's
identity and version from one ``os.stat`` and recomputes when they differ.

Invariants:
- The key is ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``, or None while the
  file does not exist: a file that appears, vanishes or changes is recomputed at the
  next ``get``. Our writers replace files atomically (``controller.base.fsio.atomic_write``:
  temporary file + rename), so every write gives the path a new inode even when it lands
  in the same timestamp tick with the same size. ``st_ctime_ns`` also catches an in-place
  rewrite whose mtime was set back (``cp -p``, ``tar``, ``rsync --inplace -t``): no call
  sets the ctime.
- A value is reused only when the file was at least ``settle_s`` old (its mtime and
  ctime, against the caller's wall clock) when it was stat'ed. Otherwise an in-place
  rewrite in the same timestamp tick with the same size (coarse-grained or 2 s FAT
  timestamps, or an inode number reused by two renames within one tick) could not be
  told apart; such a file is read again at the next ``get``, once it has settled the
  value is kept. A write therefore costs at most one extra computation.
- The stat comes before the computation: a change in between at worst makes the next
  ``get`` compute again; a stale value is never stored under a newer key.
- What ``compute`` raises propagates and nothing is stored (a file made readable again
  by ``chmod`` keeps its mtime). No other error is raised: a stat that fails for another
  reason than a missing file (a folder without search permission) computes without
  reusing, so ``compute`` raises as it would have.
- Thread-safe; concurrent ``get`` calls compute once and the others wait for the value.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Generic, TypeVar

T = TypeVar("T")

# Longer than any file system's timestamp granularity we may meet (FAT: 2 s).
SETTLE_S: Final = 3.0

FileKey = tuple[int, int, int, int, int]


def file_key(path: Path) -> FileKey | None:
    """The identity and version of ``path`` (None when it does not exist). Raises
    OSError for a stat that fails otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class _Entry(Generic[T]):
    key: FileKey | None
    value: T
    settled: bool


class FileMemo(Generic[T]):
    """``compute()``'s last value, reused while ``path`` keeps its stat (module docstring)."""

    def __init__(self, path: Path, compute: Callable[[], T], *, settle_s: float = SETTLE_S) -> None:
        self.path = path
        self._compute = compute
        self._settle_ns = int(settle_s * 1e9)
        self._entry: _Entry[T] | None = None
        self._lock = threading.Lock()

    def get(self, wall_now_s: float) -> T:
        """The value for the file as it is now; ``wall_now_s`` is Unix seconds (the
        clock file times are in)."""
        with self._lock:
            try:
                key = file_key(self.path)
            except OSError:
                self._entry = None
                return self._compute()
            entry = self._entry
            if entry is not None and entry.settled and entry.key == key:
                return entry.value
            self._entry = None
            value = self._compute()
            self._entry = _Entry(key, value, self._settled(key, wall_now_s))
            return value

    def _settled(self, key: FileKey | None, wall_now_s: float) -> bool:
        if key is None:
            return True  # an absent file has no timestamps; it appears with a new key
        changed_ns = max(key[3], key[4])
        return int(wall_now_s * 1e9) - changed_ns >= self._settle_ns
