"""Who is at the other end of the Unix socket: the kernel's word for it, and whether this
process can tell local users apart at all.

A peer's uid, gid (SO_PEERCRED) and supplementary groups (SO_PEERGROUPS) are what the
kernel recorded when it connected, translated into the agent's user namespace. Under
systemd's ``PrivateUsers=yes`` that namespace maps only root and the service's own user
and group: every other local user reads as the overflow id (65534), so uids would tell
no one apart. The shipped unit therefore runs without it (docs/operations.md, "The
service"); ``IdMap`` notices when a drop-in brings it back.

Invariants:
- Credentials come from the kernel at connect time, never from ``/proc/<pid>``
  (``ProtectProc=invisible`` hides it, and a pid may be reused by then).
- When this process's namespace leaves ids unmapped, the overflow uid and gid are
  unknown: ``IdMap.is_known_uid`` is False for them, and the server lets such a peer
  match no allow-list entry and own no shared memory (fail closed). The real user
  ``nobody`` (65534) is then refused too: the two cannot be told apart.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_PEERCRED: Final = struct.Struct("3i")
# Linux >= 4.13; Python does not name it. 59 on every architecture but alpha, mips,
# parisc and sparc, where the agent is not built.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_MAX_GROUPS: Final = 65536  # NGROUPS_MAX
_EVERY_ID: Final = 2**32 - 1  # ids 0 .. 2**32 - 2 (-1 is "no id")
_OVERFLOW_ID: Final = 65534  # the kernel's default overflowuid / overflowgid


@dataclass(frozen=True)
class PeerCredentials:
    """A Unix peer as the kernel saw it connect."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]  # supplementary groups (empty when the kernel cannot say)


def read_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of ``sock``'s peer. Raises OSError when the kernel gives none."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid, _groups(sock))


def _groups(sock: socket.socket) -> frozenset[int]:
    size = 64 * 4
    while size <= _MAX_GROUPS * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == 34:  # ERANGE: more groups than fit; ask again, larger
                size *= 4
                continue
            return frozenset()  # an older kernel
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return frozenset()


@dataclass(frozen=True)
class IdMap:
    """Which uids and gids this process's user namespace can tell apart."""

    uids_complete: bool = True
    gids_complete: bool = True
    overflow_uid: int = _OVERFLOW_ID
    overflow_gid: int = _OVERFLOW_ID

    @property
    def is_complete(self) -> bool:
        return self.uids_complete and self.gids_complete

    def is_known_uid(self, uid: int) -> bool:
        """False for the id every unmapped user reads as."""
        return self.uids_complete or uid != self.overflow_uid

    def is_known_gid(self, gid: int) -> bool:
        return self.gids_complete or gid != self.overflow_gid


def covers_every_id(id_map: str) -> bool:
    """Whether a ``/proc/<pid>/uid_map`` (or ``gid_map``) maps every id of the parent
    namespace, as the initial namespace does (``0 0 4294967295``): then no peer reads as
    the overflow id. Lines: ``inside outside count``."""
    ranges = sorted(
        (int(fields[1]), int(fields[2]))
        for fields in (line.split() for line in id_map.splitlines())
        if len(fields) == 3
    )
    reached = 0
    for start, count in ranges:
        if start > reached:
            return False
        reached = max(reached, start + count)
    return reached >= _EVERY_ID


def read_id_map(proc: Path = Path("/proc")) -> IdMap:
    """This process's ``IdMap`` (complete when ``/proc`` cannot tell: outside a user
    namespace, every id is mapped)."""

    def complete(name: str) -> bool:
        try:
            return covers_every_id((proc / "self" / name).read_text())
        except OSError:
            return True

    def overflow(name: str) -> int:
        try:
            return int((proc / "sys" / "kernel" / name).read_text())
        except (OSError, ValueError):
            return _OVERFLOW_ID

    return IdMap(
        complete("uid_map"), complete("gid_map"), overflow("overflowuid"), overflow("overflowgid")
    )
