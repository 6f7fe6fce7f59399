"""What the agent knows and says about its broker connection (issue 20, items 3 and 7).

Pure: no paho, no sockets. ``MqttLink`` tells a ``LinkHealth`` what happens (a connection
attempt failed and why, connected, the connection ended and how); it answers with the
line to log, if any, and keeps the status that ``GET /v2/health/agent`` serves and
``edge-agent status`` prints. ``describe_failure`` turns the exception of a failed
attempt into a cause an operator can act on.

Rate limit: the first failed attempt of a cause is logged at once (WARNING); while the
same cause repeats, one line every ``repeat_every_s`` says it still fails and how many
attempts so far; a new cause is logged at once; the connection that ends a run of
failures is logged with how many there were.

Takeovers: two agents with one identity (a copied config) each take the other's client
id. A broker speaking MQTT 5 may say so: DISCONNECT reason code 0x8E, "Session taken
over" (mosquitto from 2.0.15). Older ones (mosquitto 2.0.11, Debian 12's) just close the
connection; then ``SUSPECT_AFTER`` closes in a row, each of a connection the broker had
accepted at the first attempt and that lasted no longer than the other agent's wait
could explain (twice ``reconnect_max_s``, and some), are taken for a takeover too (a
broker restarting closes the connection once, and refuses the next attempt more often
than not; a NAT dropping idle connections closes long-lived ones). Either way the
agent says it plainly at ERROR, counts it, and waits before reconnecting, so two agents
fighting over one identity do not thrash: after a takeover the broker named, from the
config's ``reconnect_max_s``, doubling per takeover in a row, at most
``TAKEOVER_BACKOFF_MAX_S``; after a suspected one, ``reconnect_max_s`` only, the longest
wait the operator allows between attempts (a flaky path that closes connections, a NAT
or a proxy, looks the same, and must not keep the agent away for minutes).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

# MQTT 5 DISCONNECT reason code: another client connected with this client id.
SESSION_TAKEN_OVER: Final = 0x8E
# Closes in a row by a broker that gives no reason, each soon after it accepted the
# connection, before the agent calls it a takeover.
SUSPECT_AFTER: Final = 3
# The longest wait before reconnecting after takeovers in a row.
TAKEOVER_BACKOFF_MAX_S: Final = 600.0
# A connection that lasted this long before it ended ends a run of takeovers (or of
# unexplained closes): longer than any back-off, so a fight at its slowest still counts.
QUIET_S: Final = 2 * TAKEOVER_BACKOFF_MAX_S

# TLS alerts by which the broker refuses the device's certificate.
_CERT_REFUSED: Final = (
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_REQUIRED",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)


@dataclass(frozen=True)
class Say:
    """One line for the log."""

    level: int
    message: str


def describe_failure(exc: BaseException, broker: str, tls: bool) -> str:
    """Why a connection attempt to ``broker`` (``host:port``) failed, and what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate did not verify ({exc.verify_message}): check "
            "[mqtt] ca_file, and that [mqtt] host is a name in the broker's certificate"
        )
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        what = reason.lower().replace("_", " ") if reason else str(exc)
        if "REVOKED" in reason:
            return (
                f"TLS: the broker refused this device's certificate ({what}): the device "
                "was revoked (edgectl device revoke); enroll it again"
            )
        if "ALERT" in reason and any(alert in reason for alert in _CERT_REFUSED):
            return (
                f"TLS: the broker refused this device's certificate ({what}): is the "
                "device enrolled with this broker's CA, its certificate current, and "
                "[mqtt] cert_file and key_file (or the key credential) its own?"
            )
        if isinstance(exc, ssl.SSLEOFError) or reason in (
            "WRONG_VERSION_NUMBER",
            "UNEXPECTED_EOF_WHILE_READING",
            "RECORD_LAYER_FAILURE",
        ):
            return f"TLS handshake failed ({what}): is {broker} a TLS listener?"
        return f"TLS failed: {what}"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection refused: nothing listens on {broker} (is the broker running, "
            "and [mqtt] host and port its address?)"
        )
    if isinstance(exc, socket.gaierror):
        host = broker.rsplit(":", 1)[0]
        return f"cannot resolve the host name {host!r} ({exc.strerror}): check [mqtt] host"
    if isinstance(exc, TimeoutError):
        return f"no answer from {broker} in time (a firewall, or the wrong host?)"
    if isinstance(exc, ConnectionResetError):
        hint = (
            "is it a TLS listener, and does it accept this device's certificate?"
            if tls
            else "a TLS listener, while [mqtt] tls is off?"
        )
        return f"the broker reset the connection ({hint})"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f" (errno {exc.errno})" if exc.errno else "")
    return f"{type(exc).__name__}: {exc}"


def closed_before_accepting(tls: bool) -> str:
    """The cause when the broker closed the connection before its CONNACK."""
    hint = (
        "does it accept this device's certificate?"
        if tls
        else "a TLS listener, while [mqtt] tls is off?"
    )
    return f"the broker closed the connection before accepting it ({hint})"


def takeover_delay_s(takeovers: int, first_s: float) -> float:
    """The wait before reconnecting after ``takeovers`` (≥ 1) in a row: ``first_s``,
    doubling, at most ``TAKEOVER_BACKOFF_MAX_S``."""
    if takeovers < 1:
        raise ValueError(f"takeovers expected >= 1, got {takeovers}")
    return float(min(TAKEOVER_BACKOFF_MAX_S, max(first_s, 1.0) * (1 << min(takeovers - 1, 16))))


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


class LinkHealth:
    """The broker connection's story: failed attempts (rate-limited lines), connections,
    losses and takeovers; ``status`` for the local status endpoint. Thread-safe (paho's
    network thread writes, the inference server's threads read)."""

    def __init__(
        self,
        broker: str,
        client_id: str,
        *,
        first_backoff_s: float = 30.0,
        repeat_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self._first_backoff_s = first_backoff_s
        # A close counts towards a suspected takeover only after a connection this short.
        self._short_s = 2 * max(first_backoff_s, 1.0) + 5.0
        self._repeat_every_s = repeat_every_s
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._connected = False
        self._since: datetime = wall()  # when the present state (connected or not) began
        self._connected_at = 0.0  # monotonic
        self._failed = 0  # failed attempts since the last connection
        self._first_failed_at: datetime | None = None
        self._cause: str | None = None  # of the last failed attempt in this run
        self._said_at = 0.0  # monotonic: the last line about this run
        self._said_failed = 0
        self._last_error: tuple[str, datetime] | None = None
        self._last_loss: tuple[str, datetime] | None = None
        self._takeovers = 0
        self._takeovers_in_row = 0
        self._last_takeover_at: datetime | None = None
        self._closes_in_row = 0

    # -- what happened

    def attempt_failed(self, cause: str) -> Say | None:
        """A connection attempt failed: the line to log, or None while rate-limited."""
        with self._lock:
            now, at = self._clock(), self._wall()
            self._closes_in_row = 0  # the broker refuses: not two agents taking turns
            self._failed += 1
            self._last_error = (cause, at)
            if self._first_failed_at is None:
                self._first_failed_at = at
            if cause != self._cause:
                self._cause, self._said_at, self._said_failed = cause, now, self._failed
                return Say(logging.WARNING, f"cannot connect to the broker {self.broker}: {cause}")
            if now - self._said_at < self._repeat_every_s:
                return None
            self._said_at, self._said_failed = now, self._failed
            return Say(
                logging.WARNING,
                f"still cannot connect to the broker {self.broker}: {cause} ({self._failed} "
                f"failed attempts since {_iso(self._first_failed_at)})",
            )

    def connected(self) -> Say:
        with self._lock:
            failed, first = self._failed, self._first_failed_at
            self._connected, self._since = True, self._wall()
            self._connected_at = self._clock()
            self._failed, self._first_failed_at, self._cause = 0, None, None
        if failed:
            return Say(
                logging.INFO,
                f"connected to the broker {self.broker} after {failed} failed attempt"
                f"{'s' if failed > 1 else ''} since {_iso(first) if first else '?'}",
            )
        return Say(logging.INFO, f"connected to the broker {self.broker}")

    def ended(
        self, reason: str, *, reason_code: int | None, closed_by_broker: bool
    ) -> tuple[Say, float | None]:
        """An accepted connection ended (not by the agent's own stop): the line to log,
        and the wait before reconnecting when it was taken over (None: the usual).

        ``reason_code``: the broker's DISCONNECT reason code, if it sent one;
        ``closed_by_broker``: it closed the connection without one."""
        with self._lock:
            now, at = self._clock(), self._wall()
            lasted_s = now - self._connected_at
            self._connected, self._since = False, at
            if lasted_s > QUIET_S:
                self._takeovers_in_row = self._closes_in_row = 0
            certain = reason_code == SESSION_TAKEN_OVER
            if not certain and closed_by_broker and lasted_s <= self._short_s:
                self._closes_in_row += 1
            elif not certain:
                self._closes_in_row = 0
            suspected = not certain and self._closes_in_row >= SUSPECT_AFTER
            if not (certain or suspected):
                self._takeovers_in_row = 0
                if closed_by_broker:
                    reason = (
                        "the broker closed it: restarting, or another client connected "
                        f"with this device's client id {self.client_id}?"
                    )
                self._last_loss = (reason, at)
                return Say(
                    logging.WARNING, f"lost the broker connection ({reason}); reconnecting"
                ), None
            self._takeovers += 1
            self._last_takeover_at = at
            count = f"{self._takeovers} time{'s' if self._takeovers > 1 else ''} so far"
            ask = (
                "is this device's config (agent.toml and its certificate) copied to another "
                "machine running edge-agent? Stop the other one, or enroll it as a device of "
                "its own"
            )
            if certain:
                self._takeovers_in_row += 1
                delay_s = takeover_delay_s(self._takeovers_in_row, self._first_backoff_s)
                how = "the broker says so: Session taken over"
                self._last_loss = (f"taken over by another client ({how})", at)
                message = (
                    f"another client connected to the broker {self.broker} with this "
                    f"device's client id {self.client_id} and took its session over ({how}; "
                    f"{count}): {ask}. Reconnecting in {delay_s:.0f} s"
                )
            else:
                delay_s = takeover_delay_s(1, self._first_backoff_s)
                how = (
                    f"the broker closed this device's connection {self._closes_in_row} times "
                    "in a row without a reason, accepting the next one at once each time"
                )
                self._last_loss = (f"taken over by another client, most likely ({how})", at)
                message = (
                    f"{how} ({self.broker}): most likely another client connects with this "
                    f"device's client id {self.client_id} and takes its session over "
                    f"({count}): {ask}. (A proxy or NAT that keeps closing connections looks "
                    f"the same.) Reconnecting in {delay_s:.0f} s"
                )
            return Say(
                logging.ERROR,
                message,
            ), delay_s

    # -- what it is now

    def status(self, *, connected: bool | None = None) -> dict[str, Any]:
        """The status ``GET /v2/health/agent`` serves under ``broker``."""
        with self._lock:
            error = self._last_error
            loss = self._last_loss
            return {
                "address": self.broker,
                "client_id": self.client_id,
                "connected": self._connected if connected is None else connected,
                "since": _iso(self._since),
                "failed_attempts": self._failed,
                "failing_since": (
                    _iso(self._first_failed_at) if self._first_failed_at is not None else None
                ),
                "last_error": None if error is None else {"cause": error[0], "at": _iso(error[1])},
                "last_loss": None if loss is None else {"reason": loss[0], "at": _iso(loss[1])},
                "takeovers": self._takeovers,
                "last_takeover_at": (
                    _iso(self._last_takeover_at) if self._last_takeover_at is not None else None
                ),
            }
