"""Watching secrets as they are written (issue #18, defect 4).

``watching_fsyncs`` wraps ``os.fsync`` (a hook: the file system stays real) to catch the
instant a file's data has reached the disk, and records the file's name, size and mode at
that instant and, under a folder given as ``probe_under``, whether another local user
could open it right then (a real process running as ``nobody``). A key whose temporary
file is 0644 at that instant can be opened by every local user, who keeps the
descriptor after any later ``chmod``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NOBODY = 65534


@dataclass(frozen=True)
class Synced:
    """A regular file at the instant it was fsynced."""

    path: Path
    size: int
    mode: int
    readable_by_nobody: bool | None  # None: not probed


@dataclass
class FsyncWatch:
    probe_under: Path | None = None
    seen: list[Synced] = field(default_factory=list)

    def temporaries_of(self, target: Path) -> list[Synced]:
        """The fsyncs of ``target``'s temporary files (``.NAME.…`` beside it) with data."""
        return [
            s
            for s in self.seen
            if s.path.parent == target.parent
            and s.path.name.startswith(f".{target.name}.")
            and s.size > 0
        ]


def readable_by(path: Path, uid: int) -> bool:
    """Whether a process running as ``uid`` (no groups) can open ``path`` for reading."""
    probe = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
         "/bin/sh", "-c", 'exec 3<"$0"', str(path)],
        capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    return probe.returncode == 0


@contextlib.contextmanager
def watching_fsyncs(
    monkeypatch: pytest.MonkeyPatch, probe_under: Path | None = None
) -> Iterator[FsyncWatch]:
    """Record every regular file fsynced in the block, under a umask of 022 (a root
    shell's: what `edge-agent request` and `edgectl` run with)."""
    watch = FsyncWatch(probe_under)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            probed = probe_under is not None and path.is_relative_to(probe_under)
            readable = readable_by(path, NOBODY) if probed else None
            watch.seen.append(Synced(path, st.st_size, stat.S_IMODE(st.st_mode), readable))
        real_fsync(fd)

    old_umask = os.umask(0o022)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", fsync)
            yield watch
    finally:
        os.umask(old_umask)


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A 0755 folder every local user can reach (``tmp_path`` sits in a 0700 one).

    Skips the test unless it runs as root with ``setpriv`` (to act as another user).
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another local user")
    root = Path(tempfile.mkdtemp(prefix="edgefleet-shared-", dir="/tmp"))
    try:
        root.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
