"""Events keep their order across a lost connection (issue 18, chaos seed 22).

A real mosquitto, the controller's real ingestor and store, and an agent's real MQTT link
and outbox, with a TCP proxy between the link and the broker that the test can hold
(nothing the agent sends reaches the broker) and cut (every connection reset, new ones
refused until let through).

The event published just before the link dropped must reach the store before those
appended while the link was down: paho sends its unacknowledged message again after
reconnecting, but only once the ``on_connect`` callback returned, and the agent's status
provider, which that callback calls, reads every journal from disk (slow on a loaded
device). The test makes it slow on purpose: it holds that one callback for a while.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import device_topic
from agent.telemetry.mqtt import MqttLink
from agent.telemetry.outbox import Outbox
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from tests.controller.fleet.test_ingest import (
    FLEET,
    agent_config,
    ingestor_for,
    make_event,
    stored_seqs,
)
from tests.e2e_support import wait_until
from tests.helpers import Broker

# How long the agent's first status after the reconnection takes: longer than the old
# sender's wait for a PUBACK (event_ack_timeout_s = 2 in agent_config) and its pause.
SLOW_STATUS_S = 4.0


class CutProxy:
    """A TCP proxy on 127.0.0.1 to ``upstream_port`` that can hold what clients send and
    cut every connection."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._refusing = False
        self._closed = False
        self.held_bytes = 0
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    def hold(self) -> None:
        """From now on, what clients send is read but not forwarded."""
        self._flowing.clear()

    def cut(self) -> None:
        """Close every connection and refuse new ones until ``let_through``."""
        with self._lock:
            self._refusing = True
            for sock in self._sockets:
                _reset(sock)
            self._sockets.clear()

    def let_through(self) -> None:
        with self._lock:
            self._refusing = False
            self.held_bytes = 0
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._refusing:
                    _reset(client)
                    continue
                upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if from_client and not self._flowing.is_set():
                    with self._lock:
                        self.held_bytes += len(data)
                    continue
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Close at once (RST), also while a pump thread blocks reading it: a bare close()
    would wait for that read to end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class SlowStatus:
    """The agent's status provider; once armed, its next call from paho's network thread
    (the status published on reconnecting) takes ``SLOW_STATUS_S``."""

    def __init__(self) -> None:
        self._armed = threading.Event()
        self.slowed = threading.Event()

    def arm(self) -> None:
        self._armed.set()

    def __call__(self) -> Mapping[str, Mapping[str, Any]]:
        if self._armed.is_set() and threading.current_thread().name.startswith("paho"):
            self._armed.clear()
            time.sleep(SLOW_STATUS_S)
            self.slowed.set()
        return {}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    s = open_store(str(tmp_path / "telemetry.sqlite"))
    yield s
    s.close()


def test_an_event_cut_off_before_its_puback_is_stored_before_those_appended_after(
    tmp_path: Path, broker: Broker, store: TelemetryStore
) -> None:
    ingestor = ingestor_for(broker, store, "ingest-order")
    proxy = CutProxy(broker.port)
    status = SlowStatus()
    outbox = Outbox(tmp_path / "outbox.sqlite", 100)
    link = MqttLink(agent_config(tmp_path, proxy.port), lambda _v: None, status, outbox)
    topic = device_topic(FLEET, "dev-1", "events")

    def produce(n: int) -> list[int]:
        return [outbox.append(topic, lambda s, q: make_event("dev-1", s, q)) for _ in range(n)]

    link.start()
    try:
        wait_until(lambda: link.is_connected, 10, "the link to connect")
        produced = produce(14)
        wait_until(lambda: stored_seqs(store) == produced, 20, "events 1-14 in the store")

        proxy.hold()
        produced += produce(1)  # 15: published, never reaches the broker
        wait_until(lambda: proxy.held_bytes > 0, 10, "event 15 to be sent and held")
        proxy.cut()
        wait_until(lambda: not link.is_connected, 10, "the link to see the cut")
        produced += produce(5)  # 16-20, while the link is down

        status.arm()
        proxy.let_through()
        wait_until(status.slowed.is_set, 30, "the link to reconnect")
        wait_until(lambda: len(stored_seqs(store)) >= 20, 30, "every event in the store")
        assert stored_seqs(store) == produced  # each once, in the order produced
        wait_until(lambda: outbox.pending == 0, 10, "the outbox to drain")
    finally:
        link.stop()
        outbox.close()
        ingestor.stop()
        proxy.close()
