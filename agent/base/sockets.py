"""Blocking-socket helpers the inference server and its client share.

Both sides use blocking sockets with kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO: Python's
own timeouts poll() before every recv and send), send large bodies as scatter-gather
without joining them, and may poll briefly before blocking to spare a wake-up.

Invariants:
- A timeout of 0 or less is set as 1 µs: a zero timeval would mean "never time out".
- ``send_parts`` sends every byte of every part, in order, or raises.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from typing import Final

_TIMEVAL: Final = struct.Struct("ll")
_IOV_MAX: Final = 1024  # buffers per sendmsg on Linux
_SEND_BUFFER_MAX: Final = 8 << 20  # what a send buffer may grow to for one large message


def set_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """Set SO_RCVTIMEO or SO_SNDTIMEO on a blocking socket (at least 1 µs)."""
    seconds = max(seconds, 1e-6)
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, int((seconds - whole) * 1e6)))


def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview], sized: int = 0) -> int:
    """Send every part in order without joining them (``sendmsg`` scatter-gather).

    On a Unix socket the send buffer first grows to hold the whole message (up to
    ``_SEND_BUFFER_MAX`` and what ``net.core.wmem_max`` allows): the message then goes
    out in one write and the reader wakes once or twice instead of once per buffer-full
    (the default 208 KiB split the CNN's 602 KB input into four reads; each wake-up of
    an idle CPU costs tens of µs on a VM). ``sized`` is what the previous call on this
    socket returned (0 at first): the largest message the buffer was sized for, so a
    message no larger asks the kernel nothing (a ``getsockopt`` after a model run has
    flushed the caches costs ~20 µs on a small VM, not its warm 1 µs).
    """
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    if sock.family == socket.AF_UNIX:  # TCP: setting SO_SNDBUF would stop autotuning
        total = sum(v.nbytes for v in views)
        if total > sized:
            if total > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(total, _SEND_BUFFER_MAX))
            sized = total
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
    return sized


def poll_recv_into(sock: socket.socket, buffer: memoryview | bytearray, for_s: float) -> int | None:
    """``recv_into`` polled without blocking for up to ``for_s``; None when nothing came
    (the caller then blocks). 0 means the peer closed, as for ``recv_into``."""
    give_up = time.monotonic() + for_s
    while True:
        try:
            return sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.monotonic() >= give_up:
                return None
