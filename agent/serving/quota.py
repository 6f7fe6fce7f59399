"""Shares of a server-wide resource: a total, and the most any one client may hold.

The inference server keeps two: its connections, and the request-body bytes held in
memory (bodies being received and buffers kept for reuse). A client is a peer key: the
uid the kernel gives for a Unix peer (SO_PEERCRED), or one key for every TCP client
together (loopback TCP carries no identity).

Invariants:
- ``held`` never exceeds ``total``, and no key holds more than ``per_peer``: a ``take``
  that would pass either takes nothing and says why.
- ``give`` returns exactly what a ``take`` granted; a key holding nothing is forgotten,
  so the table is as large as the clients holding something right now.
- Thread-safe: one lock around a few integer updates.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Literal

Refusal = Literal["peer", "total"]  # what a take would have passed

TCP_PEER = "tcp"  # the key of every loopback TCP client together


class Quota:
    """``total`` units shared by every peer, at most ``per_peer`` to each."""

    def __init__(self, total: int, per_peer: int, unit: str, settings: str) -> None:
        if total <= 0 or not 0 < per_peer <= total:
            raise ValueError(f"expected 0 < per_peer <= total, got {per_peer}, {total}")
        self.total = total
        self.per_peer = per_peer
        self.unit = unit  # what is counted, for refusals: "connections"
        self.settings = settings  # the config keys that set the limits, for refusals
        self._lock = threading.Lock()
        self._held: dict[Hashable, int] = {}
        self.held = 0

    def take(self, peer: Hashable, amount: int) -> Refusal | None:
        """Take ``amount`` for ``peer``: None when granted, else which limit it would
        pass (nothing is taken then)."""
        with self._lock:
            mine = self._held.get(peer, 0)
            if mine + amount > self.per_peer:
                return "peer"
            if self.held + amount > self.total:
                return "total"
            self._held[peer] = mine + amount
            self.held += amount
            return None

    def explain(self, refusal: Refusal, peer: Hashable) -> str:
        """Why a take was refused, for the client (what it holds, the limit, the keys)."""
        if refusal == "peer":
            return (
                f"this client ({_describe(peer)}) holds {self.held_by(peer)} {self.unit}, "
                f"at most {self.per_peer} per client ({self.settings}); retry later"
            )
        return (
            f"{self.held} {self.unit} held by every client, at most {self.total} "
            f"({self.settings}); retry later"
        )

    def give(self, peer: Hashable, amount: int) -> None:
        """Give back ``amount`` that ``take`` granted to ``peer``."""
        with self._lock:
            left = self._held.get(peer, 0) - amount
            if left > 0:
                self._held[peer] = left
            else:
                self._held.pop(peer, None)
            self.held -= amount

    def held_by(self, peer: Hashable) -> int:
        return self._held.get(peer, 0)


def _describe(peer: Hashable) -> str:
    return "every TCP client" if peer == TCP_PEER else f"uid {peer}"


def share_of(total: int, share: float) -> int:
    """What one peer may hold of ``total`` with a ``share`` (0 < share <= 1): at least 1."""
    return max(1, int(total * share))
