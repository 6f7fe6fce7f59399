"""Durable file operations: every write that matters is atomic. The agent and the
controller (``controller.base.fsio``) share this one implementation.

An atomic write goes to a temporary file in the same directory, is flushed and fsynced,
renamed over the target, and the directory is fsynced, so after a crash or power cut the
target holds either the old content or the new one, never a mix.

Secrets (``device.key``, the controller's signing keys and CA key) go through the same
write, so its temporary file is created the way a secret must be: a fresh name, with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (never an existing file or a planted symlink) and
permissions no wider than its final ``mode`` from the instant it exists, set exactly
before the first byte is written. Nobody who may not read the target can open the
temporary file while the data is in it, and no descriptor opened earlier can exist.

Every durable step (``atomic_write``, ``durable_rename``, ``durable_unlink``) ends by
calling the step hook, ``None`` unless a test installed one (``set_step_hook``): only
``edgectl`` does, and only under ``EDGEFLEET_TEST_WRITE_LOG`` (``controller.base.fsio``),
so a test can SIGKILL the controller right after each of its durable steps. Unset, it
costs one comparison per write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

# A new file only: never an existing one, never through a symlink, not inherited by children.
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Test-only: called with the path after each durable step (see the module docstring).
_step_hook: Callable[[Path], None] | None = None


def set_step_hook(hook: Callable[[Path], None] | None) -> None:
    """Test-only: run ``hook(path)`` after every durable step of this process (None: none).

    ``controller.base.fsio.install_step_hook_from_env`` is its one production caller."""
    global _step_hook
    _step_hook = hook


def _stepped(path: Path) -> None:
    if _step_hook is not None:
        _step_hook(path)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permissions ``mode``
    (exactly: the umask does not narrow it). Creates ``path``'s folder if it is missing.

    The temporary file ``.NAME.tmp-XXXXXXXX`` is never readable beyond ``mode``, at no
    instant (see the module docstring). Raises OSError when the folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = _create_temporary(path, mode)
    except OSError as exc:
        exc.filename = str(path)  # the file meant, not a temporary name (EROFS, ENOSPC)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exactly ``mode`` whatever the umask, before any data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(path)  # name the file meant, not none (write) or a temporary
        raise
    fsync_dir(path.parent)
    _stepped(path)


def _create_temporary(path: Path, mode: int) -> tuple[int, Path]:
    """A new, empty file beside ``path`` that nobody else can have opened."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            # ``mode`` & 0o600 at creation: owner-only until fchmod sets ``mode``.
            return os.open(tmp, _CREATE_FLAGS, mode & 0o600), tmp
        except FileExistsError:
            continue  # a leftover or another writer's name: draw another
    raise FileExistsError(f"no free temporary name beside {path}")


def durable_rename(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (same filesystem) and fsync the directories involved."""
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)
    _stepped(dst)


def durable_unlink(path: Path) -> bool:
    """Remove the file ``path`` and fsync its folder; False when it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    _stepped(path)
    return True


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def free_bytes(path: Path) -> int:
    """Bytes available to an unprivileged writer on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
