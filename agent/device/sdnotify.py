"""The systemd notification protocol (``sd_notify``), from the agent's side.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: a Unix datagram socket,
a path or (starting with ``@``) a name in the abstract namespace. Each datagram is one
or more ``KEY=VALUE`` lines: ``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``.
With ``WatchdogSec=`` systemd also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the
process it expects pings from); a service silent for that long is killed and, with
``Restart=on-failure``, started again.

Own implementation rather than the PyPI ``sdnotify`` package: that one swallows every
error and has no watchdog helper. Here ``Notifier.send`` raises ``NotifyError``; the
orchestrator (``agent.app``) decides what a failed notification means.

Invariants: without ``$NOTIFY_SOCKET`` (not under systemd, or a unit of another type)
``Notifier.from_environ`` returns a notifier whose methods do nothing, so callers never
branch on "am I under systemd". Messages are ASCII-safe single datagrams: a newline in
a ``STATUS=`` text would start a new assignment, so it is replaced by a space.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from agent.base.errors import AgentError

NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"
WATCHDOG_USEC: Final = "WATCHDOG_USEC"
WATCHDOG_PID: Final = "WATCHDOG_PID"
# systemd reads at most this much of one datagram (NOTIFY_BUFFER_MAX is 4 KiB in v252).
MAX_MESSAGE_BYTES: Final = 4096


class NotifyError(AgentError):
    """A notification could not be delivered to systemd (the message says why)."""


@dataclass(frozen=True)
class Notifier:
    """Sends notifications to ``address`` (None: not under systemd, every call a no-op).

    ``watchdog_interval_s`` is systemd's watchdog timeout for this process (None: no
    watchdog asked for); ping at least twice per interval.
    """

    address: str | bytes | None = None
    watchdog_interval_s: float | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd's environment describes.

        Raises NotifyError when ``$NOTIFY_SOCKET`` or ``$WATCHDOG_USEC`` is malformed.
        """
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET, "")
        if not raw:
            return cls()
        return cls(address=parse_address(raw), watchdog_interval_s=_watchdog_s(env, pid))

    @property
    def is_enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> None:
        """Send ``KEY=VALUE`` lines in one datagram: ``send(READY=1, STATUS="...")``.

        Raises NotifyError when the socket is missing or refuses the datagram.
        """
        if self.address is None:
            return
        message = format_message(fields)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.connect(self.address)
                sent = sock.send(message)
            except OSError as exc:
                raise NotifyError(
                    f"cannot notify systemd at {_show(self.address)}: {exc.strerror or exc}"
                ) from None
        if sent != len(message):
            raise NotifyError(f"systemd took {sent} of {len(message)} bytes of a notification")

    def ready(self, status: str = "") -> None:
        """The service is up: systemd marks it started and starts what waits for it."""
        self.send(READY=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> None:
        """A one-line status shown by ``systemctl status``."""
        self.send(STATUS=text)

    def stopping(self, status: str = "") -> None:
        self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> None:
        """Tell systemd this process is alive (resets the ``WatchdogSec=`` timer)."""
        self.send(WATCHDOG=1)


def parse_address(raw: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` → an address for ``socket.connect``.

    ``/path`` is a filesystem socket, ``@name`` one in the abstract namespace (a leading
    NUL byte on the wire). Raises NotifyError for anything else (systemd 254's
    ``vsock:`` addresses among them).
    """
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    raise NotifyError(
        f"${NOTIFY_SOCKET}: expected an absolute path or an @abstract name, got {raw!r}"
    )


def format_message(fields: Mapping[str, str | int]) -> bytes:
    """``{"READY": 1, "STATUS": "x"}`` → ``b"READY=1\\nSTATUS=x"``; raises NotifyError."""
    if not fields:
        raise NotifyError("a notification needs at least one KEY=VALUE")
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise NotifyError(f"notification key expected upper-case A-Z0-9_, got {key!r}")
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    message = "\n".join(lines).encode()
    if len(message) > MAX_MESSAGE_BYTES:
        raise NotifyError(
            f"notification of {len(message)} bytes exceeds systemd's {MAX_MESSAGE_BYTES}"
        )
    return message


def _watchdog_s(env: Mapping[str, str], pid: int | None) -> float | None:
    usec_text = env.get(WATCHDOG_USEC, "")
    if not usec_text:
        return None
    owner = env.get(WATCHDOG_PID, "")
    if owner and owner != str(pid if pid is not None else os.getpid()):
        return None  # the watchdog is meant for another process of the unit
    try:
        usec = int(usec_text)
    except ValueError:
        usec = 0
    if usec <= 0:
        raise NotifyError(f"${WATCHDOG_USEC}: expected a positive integer, got {usec_text!r}")
    return usec / 1_000_000


def _show(address: str | bytes) -> str:
    if isinstance(address, bytes):
        return "@" + address[1:].decode(errors="replace")
    return address
