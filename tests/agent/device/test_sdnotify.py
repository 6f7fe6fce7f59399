"""sd_notify against a real datagram socket in $NOTIFY_SOCKET, path and abstract namespace."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.device.sdnotify import Notifier, NotifyError, format_message, parse_address


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound where systemd would put one: a path."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def _received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(8192).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_status_stopping_and_watchdog_arrive_as_datagrams(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.is_enabled
    notifier.ready("serving digits 1.0.0")
    assert _received(sock) == {"READY": "1", "STATUS": "serving digits 1.0.0"}
    notifier.status("line one\nline two")
    assert _received(sock) == {"STATUS": "line one line two"}
    notifier.watchdog()
    assert _received(sock) == {"WATCHDOG": "1"}
    notifier.stopping()
    assert _received(sock) == {"STOPPING": "1"}


def test_abstract_namespace_socket() -> None:
    name = f"edgefleet-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}"})
        notifier.ready()
        assert _received(sock) == {"READY": "1"}


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.is_enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready("x")
    notifier.watchdog()


def test_a_missing_socket_raises_naming_it(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with pytest.raises(NotifyError, match=r"gone\.sock"):
        notifier.ready()


def test_watchdog_interval_from_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000000"}
    assert Notifier.from_environ(env).watchdog_interval_s == 20.0
    # A watchdog meant for another process of the unit is not ours to feed.
    mine = Notifier.from_environ({**env, "WATCHDOG_PID": "4242"}, pid=4242)
    assert mine.watchdog_interval_s == 20.0
    theirs = Notifier.from_environ({**env, "WATCHDOG_PID": "1"}, pid=4242)
    assert theirs.watchdog_interval_s is None
    with pytest.raises(NotifyError, match="WATCHDOG_USEC"):
        Notifier.from_environ({**env, "WATCHDOG_USEC": "soon"})


def test_addresses_and_messages_are_checked() -> None:
    assert parse_address("@name") == b"\0name"
    assert parse_address("/run/systemd/notify") == "/run/systemd/notify"
    with pytest.raises(NotifyError, match="vsock"):
        parse_address("vsock:2:1234")
    with pytest.raises(NotifyError, match="upper-case"):
        format_message({"ready": 1})
    with pytest.raises(NotifyError, match="exceeds"):
        format_message({"STATUS": "x" * 5000})
    assert format_message({"READY": 1, "STATUS": "ok"}) == b"READY=1\nSTATUS=ok"
