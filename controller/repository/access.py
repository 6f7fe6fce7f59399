"""Whether the user who runs ``edgectl serve`` can use the repository's keys and lock.

A repository belongs to one user: the one ``edgectl serve`` runs as (``User=`` of its
systemd unit), who owns the repository folder. A command run as root on it (``sudo
edgectl keys rotate``) would otherwise leave root-owned 0600 keys or a root-owned
``.lock`` that ``serve`` cannot open: its re-signing then fails and, within a timestamp
lifetime, so does every device's refresh.

Invariants:
- The serving user is this process's user, or, when this process runs as root, the
  owner of the repository folder (``serving_user``).
- ``may_access`` is the kernel's rule for the owner, group and other bits, as a pure
  function of a file's owner, group and mode and a user (root may do anything).
- Every refusal names the file, its owner and mode, who cannot use it, and the exact
  ``chown`` (and, if needed, ``chmod``) that fixes it.
- A key file readable by its group or by other users is warned about once per process
  (``warn_once``), never refused: the operator may have reasons (a FAT medium).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from controller.base.errors import RepositoryError

logger = logging.getLogger(__name__)

LOCK_FILE: Final = ".lock"

_warned: set[tuple[str, ...]] = set()
_warned_lock = threading.Lock()


def warn_once(key: tuple[str, ...], message: str, *args: object) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.warning(message, *args)


@dataclass(frozen=True)
class User:
    """A local user: uid, every group it is in, and names for messages."""

    uid: int
    gid: int
    gids: frozenset[int]
    name: str
    group: str


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user_for_uid(uid: int) -> User:
    """The user ``uid`` with its groups (only its own uid and group when it has no
    passwd entry)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return User(uid, uid, frozenset({uid}), str(uid), str(uid))
    gids = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return User(uid, entry.pw_gid, gids, entry.pw_name, _group_name(entry.pw_gid))


def serving_user(repo_dir: Path) -> User:
    """Who runs ``edgectl serve`` on ``repo_dir``: this process's user, or the owner of
    the repository folder when this process runs as root."""
    euid = os.geteuid()
    if euid != 0:
        return user_for_uid(euid)
    try:
        return user_for_uid(repo_dir.stat().st_uid)
    except OSError:
        return user_for_uid(0)


READ: Final = 0o4
READ_WRITE: Final = 0o6
LIST: Final = 0o5  # a folder: read and search


def may_access(st_uid: int, st_gid: int, st_mode: int, user: User, need: int = READ) -> bool:
    """True when ``user`` has every permission bit of ``need`` (``READ``, ``READ_WRITE``,
    ``LIST``) on a file owned by ``st_uid``:``st_gid`` with mode ``st_mode``. Only one
    class of bits applies, as in the kernel: the owner's for its owner, the group's for a
    member, else the others'; root may do anything."""
    if user.uid == 0:
        return True
    if st_uid == user.uid:
        shift = 6
    elif st_gid in user.gids:
        shift = 3
    else:
        shift = 0
    return (st_mode >> shift) & need == need


_FIX_MODE: Final = {READ: "600", READ_WRITE: "644", LIST: "700"}
_VERB: Final = {READ: "read", READ_WRITE: "open", LIST: "list"}


def access_problem(
    path: Path,
    st: os.stat_result,
    user: User,
    need: int = READ,
    who: str = "who runs `edgectl serve` on this repository",
) -> str:
    """What is wrong when ``user`` cannot use ``path`` (``""`` when it can), with the fix:
    the ``chown`` to ``user`` and, when the owner's bits lack ``need``, a ``chmod``."""
    if may_access(st.st_uid, st.st_gid, st.st_mode, user, need):
        return ""
    mode = stat.S_IMODE(st.st_mode)
    fix = f"chown {user.name}:{user.group} {path}"
    if (mode >> 6) & need != need:
        fix += f" && chmod {_FIX_MODE[need]} {path}"
    return (
        f"{path} is owned by {_user_name(st.st_uid)} (uid {st.st_uid}) with mode {mode:04o}: "
        f"{user.name} (uid {user.uid}), {who}, could not {_VERB[need]} it; fix: {fix}"
    )


def group_or_world_readable(st_mode: int) -> bool:
    return bool(st_mode & 0o044)


def warn_if_exposed(path: Path, st: os.stat_result) -> None:
    """Warn (once per process and mode) when a key file is readable beyond its owner."""
    if group_or_world_readable(st.st_mode):
        mode = stat.S_IMODE(st.st_mode)
        warn_once(
            ("exposed", str(path), str(mode)),
            "the key file %s is readable by %s (mode %04o): other local users can sign "
            "with it; fix: chmod 600 %s",
            path,
            "other users" if mode & 0o004 else "its group",
            mode,
            path,
        )


def check_lock(repo_dir: Path) -> None:
    """Make sure the serving user can open the repository's ``.lock``.

    A root process creates a missing lock owned by the serving user (``repo_lock`` would
    otherwise create it root-owned). Raises RepositoryError naming the fix when the lock
    exists and the serving user could not open it.
    """
    user = serving_user(repo_dir)
    path = repo_dir / LOCK_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        if os.geteuid() == 0 and user.uid != 0 and repo_dir.is_dir():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.fchown(fd, user.uid, user.gid)
            finally:
                os.close(fd)
        return
    problem = access_problem(path, st, user, READ_WRITE)
    if problem:
        raise RepositoryError(f"cannot use the repository lock: {problem}")


def give_to_folder_owner(path: Path) -> None:
    """Running as root, hand a file just written to the owner of its folder (the serving
    user, for keys/), so ``serve`` can read what ``sudo edgectl`` wrote."""
    if os.geteuid() != 0:
        return
    folder = path.parent.stat()
    if folder.st_uid == 0:
        return
    try:
        os.chown(path, folder.st_uid, folder.st_gid, follow_symlinks=False)
    except OSError as exc:  # a medium without owners (FAT): nothing to hand over
        logger.warning("cannot hand %s to the owner of its folder: %s", path, exc)
