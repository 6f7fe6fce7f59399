"""POSIX access ACLs, as the kernel stores them: how a client lets one other user (the
agent's) open its shared-memory object, and no one else.

The shipped unit runs the agent as its own dynamic user, which cannot open a client's
``0600`` object; widening the group or other bits would open it to every local user. An
ACL entry for the agent's uid opens it to that uid alone. The ACL is the extended
attribute ``system.posix_acl_access``: a version, then ``(tag, perm, id)`` entries in
order of tag, then id (docs: acl(5); layout: ``include/uapi/linux/posix_acl_xattr.h``).

Invariants:
- ``with_user`` keeps every entry it was given but the one for ``uid``, and sets the mask
  to the union of the user, group-owner and group entries' permissions, so adding a user
  takes nothing away from anyone and gives nothing to anyone else.
- An object without an ACL starts from its mode's owner, group and other bits.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import Final

XATTR: Final = "system.posix_acl_access"
_VERSION: Final = 2
_HEADER: Final = struct.Struct("<I")
_ENTRY: Final = struct.Struct("<HHI")
USER_OBJ: Final = 0x01
USER: Final = 0x02
GROUP_OBJ: Final = 0x04
GROUP: Final = 0x08
MASK: Final = 0x10
OTHER: Final = 0x20
NO_ID: Final = 0xFFFFFFFF  # the id of the owner, group-owner, mask and other entries
READ_WRITE: Final = 0o6

Entry = tuple[int, int, int]  # tag, permission bits (rwx: 4, 2, 1), id


def parse(raw: bytes) -> list[Entry]:
    """The entries of an ACL attribute. Raises ValueError when it is not one."""
    if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % _ENTRY.size:
        raise ValueError(f"an ACL attribute expected 4 + 8n bytes, got {len(raw)}")
    (version,) = _HEADER.unpack_from(raw)
    if version != _VERSION:
        raise ValueError(f"ACL attribute version expected {_VERSION}, got {version}")
    return [
        _ENTRY.unpack_from(raw, offset) for offset in range(_HEADER.size, len(raw), _ENTRY.size)
    ]


def encode(entries: list[Entry]) -> bytes:
    """The attribute holding ``entries`` (in the order the kernel requires)."""
    ordered = sorted(entries, key=lambda e: (e[0], e[2]))
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*e) for e in ordered)


def from_mode(mode: int) -> list[Entry]:
    """The ACL a file without one has: its mode's owner, group and other bits."""
    return [
        (USER_OBJ, (mode >> 6) & 0o7, NO_ID),
        (GROUP_OBJ, (mode >> 3) & 0o7, NO_ID),
        (OTHER, mode & 0o7, NO_ID),
    ]


def with_user(entries: list[Entry], uid: int, perm: int) -> list[Entry]:
    """``entries`` with user ``uid`` given exactly ``perm``, and the mask recomputed."""
    kept = [e for e in entries if e[0] != MASK and not (e[0] == USER and e[2] == uid)]
    kept.append((USER, perm, uid))
    mask = 0
    for tag, bits, _ in kept:
        if tag in (USER, GROUP_OBJ, GROUP):
            mask |= bits
    return [*kept, (MASK, mask, NO_ID)]


def grant_user(path: Path, uid: int, perm: int = READ_WRITE) -> None:
    """Let user ``uid`` open the regular file ``path`` with ``perm``, adding to its ACL.

    Raises OSError: the file is missing or not a regular file, it is not the caller's,
    or its filesystem has no ACLs (EOPNOTSUPP).
    """
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    try:
        entries = parse(os.getxattr(path, XATTR, follow_symlinks=False))
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        entries = from_mode(info.st_mode)
    os.setxattr(path, XATTR, encode(with_user(entries, uid, perm)), follow_symlinks=False)
