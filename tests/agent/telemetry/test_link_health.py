"""The broker connection's story as pure rules (issue 20, items 3 and 7): failed attempts
logged with their cause and rate-limited while it repeats, the recovery, a takeover of the
client id (said by the broker, or suspected from closes in a row) and the back-off after
it. The same rules against real sockets and a real mosquitto: test_link_failures.py."""

from __future__ import annotations

import logging
import socket

import pytest

from agent.telemetry.link_health import (
    QUIET_S,
    SESSION_TAKEN_OVER,
    TAKEOVER_BACKOFF_MAX_S,
    LinkHealth,
    describe_failure,
    takeover_delay_s,
)
from tests.helpers import ManualClock

BROKER = "10.0.0.5:8883"
REFUSED = describe_failure(ConnectionRefusedError(111, "Connection refused"), BROKER, True)


def _health(clock: ManualClock) -> LinkHealth:
    return LinkHealth(BROKER, "edge-agent-cam-1", first_backoff_s=30.0, clock=clock)


def test_a_cause_names_the_broker_and_what_to_check() -> None:
    assert REFUSED.startswith(f"connection refused: nothing listens on {BROKER}")
    assert "[mqtt] host and port" in REFUSED
    name = describe_failure(socket.gaierror(-2, "Name or service not known"), BROKER, False)
    assert name == (
        "cannot resolve the host name '10.0.0.5' (Name or service not known): check [mqtt] host"
    )
    assert "in time" in describe_failure(TimeoutError("timed out"), BROKER, False)
    plain = describe_failure(ConnectionResetError(104, "Connection reset by peer"), BROKER, False)
    assert "a TLS listener, while [mqtt] tls is off?" in plain
    assert describe_failure(OSError(101, "Network is unreachable"), BROKER, False) == (
        "Network is unreachable (errno 101)"
    )


def test_the_first_failure_is_said_at_once_and_repeats_once_a_minute() -> None:
    clock = ManualClock()
    health = _health(clock)
    first = health.attempt_failed(REFUSED)
    assert first is not None and first.level == logging.WARNING
    assert first.message == f"cannot connect to the broker {BROKER}: {REFUSED}"
    said = [first]
    for _ in range(59):  # an attempt a second for a minute: nothing more
        clock.now += 1.0
        assert health.attempt_failed(REFUSED) is None
    clock.now += 1.0
    again = health.attempt_failed(REFUSED)
    assert again is not None and again.level == logging.WARNING
    assert again.message.startswith(f"still cannot connect to the broker {BROKER}: {REFUSED}")
    assert "(61 failed attempts since " in again.message
    said.append(again)
    # A new cause is said at once.
    tls = "TLS: the broker refused this device's certificate (sslv3 alert certificate revoked)"
    clock.now += 1.0
    changed = health.attempt_failed(tls)
    assert changed is not None and changed.message.endswith(tls)
    status = health.status()
    assert status["connected"] is False
    assert status["failed_attempts"] == 62
    assert status["last_error"]["cause"] == tls
    assert status["failing_since"] is not None


def test_the_connection_after_failures_says_how_many_and_resets_the_count() -> None:
    clock = ManualClock()
    health = _health(clock)
    for _ in range(3):
        health.attempt_failed(REFUSED)
    back = health.connected()
    assert back.level == logging.INFO
    assert back.message.startswith(f"connected to the broker {BROKER} after 3 failed attempts")
    status = health.status()
    assert status["connected"] is True and status["failed_attempts"] == 0
    assert status["last_error"]["cause"] == REFUSED  # still there to read
    assert health.connected().message == f"connected to the broker {BROKER}"
    # The same cause after a connection is said at once again.
    said = health.attempt_failed(REFUSED)
    assert said is not None and said.message.startswith("cannot connect")


def test_a_takeover_the_broker_names_is_an_error_with_a_growing_back_off() -> None:
    clock = ManualClock()
    health = _health(clock)
    delays = []
    for n in range(1, 7):
        health.connected()
        clock.now += 5.0
        line, delay_s = health.ended(
            "Session taken over", reason_code=SESSION_TAKEN_OVER, closed_by_broker=False
        )
        assert line.level == logging.ERROR
        assert "another client connected to the broker" in line.message
        assert "with this device's client id edge-agent-cam-1" in line.message
        assert "copied to another machine" in line.message
        assert "the broker says so: Session taken over" in line.message
        assert f"{n} time" in line.message
        assert delay_s is not None and f"Reconnecting in {delay_s:.0f} s" in line.message
        delays.append(delay_s)
    assert delays == [30.0, 60.0, 120.0, 240.0, 480.0, 600.0]
    status = health.status()
    assert status["takeovers"] == 6 and status["last_takeover_at"] is not None
    assert status["last_loss"]["reason"].startswith("taken over by another client")
    # A connection that lasts past the quiet time ends the run: the next waits the least.
    health.connected()
    clock.now += QUIET_S + 1
    _, delay_s = health.ended("x", reason_code=SESSION_TAKEN_OVER, closed_by_broker=False)
    assert delay_s == 30.0


def test_closes_without_a_reason_are_a_takeover_from_the_third_in_a_row() -> None:
    clock = ManualClock()
    health = _health(clock)
    lines = []
    for _ in range(4):
        health.connected()
        clock.now += 2.0
        lines.append(health.ended("Unspecified error", reason_code=None, closed_by_broker=True))
    (first, none1), (second, none2), (third, delay3), (fourth, delay4) = lines
    assert second.level == logging.WARNING and fourth.level == logging.ERROR
    assert none1 is None and none2 is None
    assert first.level == logging.WARNING
    assert first.message == (
        "lost the broker connection (the broker closed it: restarting, or another client "
        "connected with this device's client id edge-agent-cam-1?); reconnecting"
    )
    assert third.level == logging.ERROR
    assert third.message.startswith(
        "the broker closed this device's connection 3 times in a row without a reason, "
        f"accepting the next one at once each time ({BROKER}): most likely another client "
        "connects with this device's client id edge-agent-cam-1 and takes its session over "
        "(1 time so far): is this device's config (agent.toml and its certificate) copied "
        "to another machine running edge-agent?"
    )
    # Only suspected: the wait is reconnect_max_s, never longer (a flaky path looks alike).
    assert (delay3, delay4) == (30.0, 30.0)
    assert health.status()["takeovers"] == 2


def test_a_refused_attempt_another_loss_or_a_long_connection_breaks_the_run() -> None:
    for breaker in ("refused attempt", "other loss", "long connection"):
        clock = ManualClock()
        health = _health(clock)
        for _ in range(2):
            health.connected()
            health.ended("Unspecified error", reason_code=None, closed_by_broker=True)
        if breaker == "refused attempt":  # a broker restarting refuses for a while
            health.attempt_failed(REFUSED)
        elif breaker == "other loss":
            health.connected()
            health.ended("keep alive timeout", reason_code=None, closed_by_broker=False)
        else:  # closed after longer than another agent's wait explains (a NAT, say)
            health.connected()
            clock.now += 2 * 30.0 + 6.0
            health.ended("Unspecified error", reason_code=None, closed_by_broker=True)
        health.connected()
        line, delay_s = health.ended("Unspecified error", reason_code=None, closed_by_broker=True)
        assert line.level == logging.WARNING and delay_s is None, breaker
        assert health.status()["takeovers"] == 0


def test_the_back_off_doubles_to_its_cap() -> None:
    assert takeover_delay_s(1, 30.0) == 30.0
    assert takeover_delay_s(3, 30.0) == 120.0
    assert takeover_delay_s(100, 30.0) == TAKEOVER_BACKOFF_MAX_S
    assert takeover_delay_s(1, 0.2) == 1.0  # paho waits whole seconds, at least one
    with pytest.raises(ValueError, match="takeovers expected >= 1"):
        takeover_delay_s(0, 30.0)
