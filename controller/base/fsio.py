"""Durable file writes and the repository lock.

Invariants:
- ``atomic_write`` leaves either the old file or the complete new one, never a torn
  file, and its temporary file is never readable beyond the target's mode (a key is
  0600 from the instant its temporary file exists). It is the agent's
  (``agent.base.fsutil``): the one implementation both programs use.
- ``repo_lock`` is an exclusive ``fcntl`` lock on ``<repo>/.lock``; every change to a
  repository happens while it is held, by ``edgectl release`` and ``edgectl serve`` alike.
- Every durable step (``atomic_write``, ``durable_rename``, ``durable_unlink``) passes
  through ``agent.base.fsutil``'s step hook. Test-only, and only for the commands of
  ``edgectl`` other than ``serve`` (``install_step_hook_from_env``):
  ``EDGEFLEET_TEST_WRITE_LOG=FILE`` appends ``N<TAB>PATH`` to FILE after the Nth step,
  and ``EDGEFLEET_TEST_KILL_AT_WRITE=N`` (only with the log) then SIGKILLs the process
  right after step N (tests/kill_points/).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

from agent.base.fsutil import atomic_write, durable_unlink, set_step_hook
from controller.base.errors import UsageError

__all__ = ["atomic_write", "durable_unlink", "install_step_hook_from_env", "make_dir", "repo_lock"]

# Test-only (tests/kill_points/); never set them for a real controller.
WRITE_LOG_ENV: Final = "EDGEFLEET_TEST_WRITE_LOG"
KILL_AT_WRITE_ENV: Final = "EDGEFLEET_TEST_KILL_AT_WRITE"


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


def install_step_hook_from_env(environ: Mapping[str, str]) -> bool:
    """Test-only: with ``EDGEFLEET_TEST_WRITE_LOG=FILE``, log every durable step of this
    process to FILE (``N<TAB>PATH``); with ``EDGEFLEET_TEST_KILL_AT_WRITE=N`` as well,
    SIGKILL the process right after step N is logged. Returns True when installed.

    Neither set: nothing is installed (the hook stays ``None``). The kill alone, or a
    count that is not a positive integer, raises UsageError: a half-set test hook is a
    mistake, never silently ignored. A warning on stderr says the hook is active.
    """
    log = environ.get(WRITE_LOG_ENV)
    kill_text = environ.get(KILL_AT_WRITE_ENV)
    if not log:
        if kill_text:
            raise UsageError(f"{KILL_AT_WRITE_ENV} is test-only and needs {WRITE_LOG_ENV}")
        return False
    kill_at = 0
    if kill_text:
        if not kill_text.isdigit() or int(kill_text) < 1:
            raise UsageError(f"{KILL_AT_WRITE_ENV} expected a step number >= 1, got {kill_text!r}")
        kill_at = int(kill_text)
    print(
        f"edgectl: warning: {WRITE_LOG_ENV} is set: logging durable steps for a test"
        + (f", SIGKILL after step {kill_at}" if kill_at else ""),
        file=sys.stderr,
        flush=True,
    )
    steps = 0

    def hook(path: Path) -> None:
        nonlocal steps
        steps += 1
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{steps}\t{path}\n".encode())
        finally:
            os.close(fd)
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    set_step_hook(hook)
    return True
