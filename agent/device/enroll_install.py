"""Installing an enrollment's files into the config folder as one set, crash-safe.

``device.key`` and ``device.crt`` are two files, and no rename replaces two files at
once, so the set goes through a journal:

1. **stage**: every new file is written, fsynced and given its mode next to its target,
   as ``.NAME.enroll-new``; the folder is fsynced;
2. **journal**: ``.enroll-pending.json`` (the names, in rename order) is written
   atomically. From here on the install is decided: it only ever rolls forward;
3. **rename**: each staged file over its target, in the journal's order, durably;
4. **done**: the journal is removed.

Invariant: while the journal exists, the new set is complete on disk, each file either
still staged or already renamed (:meth:`PendingInstall.source`). So after an
interruption :func:`recover` completes an install that had written its journal and
deletes the staged files of one that had not (the old set is then untouched). The
agent, which cannot write the folder under systemd, reads the same view
(:func:`read_pending`) to pick a certificate that matches its key.

The key is renamed first: after it, every file still staged is one the agent can read.

Every writer of the identity files (``edge-agent enroll``: recovery, checks and install;
``edge-agent request``) holds :func:`install_lock`, an exclusive ``flock(2)`` on the
config folder itself, for its whole run, so two of them never interleave their staging,
journal and renames, and none reads a key that another is about to replace. The folder
is locked rather than a file in it, so the folder holds only the identity files and
nothing is left to clean up; the kernel releases the lock when its holder exits or is
killed, so a crash never leaves a stale lock. A second writer waits up to ``wait_s``,
then raises :class:`InstallLockedError` naming the holder. The agent only reads, never
locks: it copes with any moment of an install (:func:`read_pending`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.base.errors import AgentError
from agent.base.fsutil import atomic_write, durable_rename, fsync_dir

logger = logging.getLogger(__name__)

JOURNAL: Final = ".enroll-pending.json"
JOURNAL_SCHEMA: Final = "edgefleet.enroll-pending/1"
STAGED_SUFFIX: Final = ".enroll-new"

# How often a writer that waits for the lock tries it again.
LOCK_POLL_S: Final = 0.1

# Called after each step with its name ("staged", "journal", then each file's name once
# it is in place): the install's tests interrupt it there.
StepHook = Callable[[str], None]


class InstallLockedError(AgentError):
    """Another writer held the config folder's install lock for longer than the wait."""


class InstallPendingError(AgentError):
    """An interrupted install is pending; what was asked must wait until it is completed."""


@contextlib.contextmanager
def install_lock(config_dir: Path, wait_s: float) -> Iterator[None]:
    """Hold the exclusive install lock of ``config_dir`` (an existing folder) while the
    block runs; wait up to ``wait_s`` (0: not at all) while another process holds it.

    Raises InstallLockedError when the wait runs out, FileNotFoundError when the folder
    does not exist, OSError when it cannot be opened.
    """
    fd = os.open(config_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:  # closing the descriptor releases the lock
        _acquire(fd, config_dir, wait_s)
        yield
    finally:
        os.close(fd)


def _acquire(fd: int, config_dir: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            raise InstallLockedError(
                f"{config_dir} is locked by {_holder(fd)}, another `edge-agent enroll` or "
                f"`edge-agent request` (or a `flock {config_dir}`), still after {wait_s:g} s: "
                "let it finish, then run this again"
            )
        if not waiting:
            waiting = True
            logger.warning(
                "%s is locked by %s: waiting up to %g s for it", config_dir, _holder(fd), wait_s
            )
        time.sleep(LOCK_POLL_S)


def _holder(fd: int) -> str:
    """Who holds the flock on ``fd``'s file, from ``/proc/locks`` (best effort)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        lines = []
    pids = sorted(
        {f[4] for f in map(str.split, lines) if f[1:2] == ["FLOCK"] and f[5:6] == [ident]}
    )
    return f"process {', '.join(pids)}" if pids else "another process"


def refuse_pending(config_dir: Path, doing: str) -> None:
    """Raise InstallPendingError (saying what ``doing`` waits for) when an interrupted
    install is pending in ``config_dir``; AgentError for an unreadable journal."""
    if read_pending(config_dir) is not None:
        raise InstallPendingError(
            f"an install into {config_dir} was interrupted and is pending "
            f"({config_dir / JOURNAL}), so its device.key may be about to be replaced: "
            "run `edge-agent enroll ARCHIVE` again with the archive being installed (it "
            f"completes the install before it checks the archive), then {doing} again"
        )


def staged_path(config_dir: Path, name: str) -> Path:
    return config_dir / f".{name}{STAGED_SUFFIX}"


@dataclass(frozen=True)
class PendingInstall:
    """An install whose journal is written and whose renames may not all be done."""

    config_dir: Path
    names: tuple[str, ...]

    @property
    def journal(self) -> Path:
        return self.config_dir / JOURNAL

    def source(self, name: str) -> Path:
        """Where the new set's ``name`` is now: staged, or already renamed into place."""
        staged = staged_path(self.config_dir, name)
        return staged if staged.exists() else self.config_dir / name


def read_pending(config_dir: Path) -> PendingInstall | None:
    """The install pending in ``config_dir``, or None. Raises AgentError for a journal
    that cannot be read or is not one (never written by enroll: it is written atomically).
    """
    path = config_dir / JOURNAL
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read the install journal {path}: {exc}") from None
    names = doc.get("files") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or doc.get("schema") != JOURNAL_SCHEMA
        or not isinstance(names, list)
        or not all(isinstance(n, str) and _is_plain_name(n) for n in names)
    ):
        raise AgentError(
            f"{path} is not an install journal (expected schema {JOURNAL_SCHEMA!r} and a "
            f"list of file names, got {doc!r}): remove it and run `edge-agent enroll` again"
        )
    return PendingInstall(config_dir, tuple(names))


def install_files(
    config_dir: Path,
    files: Mapping[str, bytes],
    order: Sequence[str],
    mode_of: Callable[[str], int],
    *,
    after_step: StepHook | None = None,
) -> list[Path]:
    """Install ``files`` (those of ``order`` present, in that order) as one set; return
    the paths written.

    Raises AgentError when an interrupted install is pending (:func:`recover` it first:
    files checked against the folder before that may no longer match it); OSError when
    the folder cannot be written: before the journal the old set is untouched; after it,
    the next :func:`recover` completes the install.
    """
    if read_pending(config_dir) is not None:
        raise AgentError(
            f"an install into {config_dir} was interrupted and is pending: "
            "`edge-agent enroll` completes it before it checks an archive"
        )
    names = [n for n in order if n in files]
    as_root = os.geteuid() == 0
    for name in names:
        _stage(staged_path(config_dir, name), files[name], mode_of(name), as_root)
    fsync_dir(config_dir)
    _step(after_step, "staged")
    atomic_write(
        config_dir / JOURNAL,
        json.dumps({"schema": JOURNAL_SCHEMA, "files": names}).encode(),
        mode=0o644,
    )
    _step(after_step, "journal")
    return _complete(PendingInstall(config_dir, tuple(names)), after_step)


def recover(config_dir: Path) -> list[Path]:
    """Finish what an interrupted install left in ``config_dir``; return the paths renamed.

    With a journal, the install rolls forward; without, staged files are leftovers of one
    that never decided, and are removed. Each case logs one warning. Raises AgentError for
    an unreadable journal, OSError when the folder cannot be written.
    """
    pending = read_pending(config_dir)
    if pending is not None:
        done = _complete(pending, None)
        logger.warning(
            "completed an install into %s interrupted after its journal was written: "
            "renamed %s into place (the rest already was)",
            config_dir,
            ", ".join(p.name for p in done) or "nothing",
        )
        return done
    leftovers = sorted(
        [*config_dir.glob(f".*{STAGED_SUFFIX}"), *config_dir.glob(f".{JOURNAL}.tmp-*")]
    )
    for path in leftovers:
        path.unlink()
    if leftovers:
        fsync_dir(config_dir)
        logger.warning(
            "removed %s, left by an install into %s interrupted before its journal was "
            "written: the files installed before it stay",
            ", ".join(p.name for p in leftovers),
            config_dir,
        )
    return []


def _complete(pending: PendingInstall, after_step: StepHook | None) -> list[Path]:
    done = []
    for name in pending.names:
        staged = staged_path(pending.config_dir, name)
        if staged.exists():  # else renamed before the interruption
            durable_rename(staged, pending.config_dir / name)
            done.append(pending.config_dir / name)
        _step(after_step, name)
    pending.journal.unlink()
    fsync_dir(pending.config_dir)
    return done


def _stage(path: Path, data: bytes, mode: int, as_root: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # so the file is created with its mode, never wider
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask may have narrowed it
        if as_root:
            os.fchown(f.fileno(), 0, 0)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _step(hook: StepHook | None, name: str) -> None:
    if hook is not None:
        hook(name)


def _is_plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and not name.startswith(".")
