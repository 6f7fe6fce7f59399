"""Acknowledging on store, against a real mosquitto and real stores.

The devices delete an event from their outbox once the broker has it; so an event the
controller received but did not store must stay unacknowledged, for the broker to send
it again. The failing stores below are the real SQLite and PostgreSQL stores whose
``write`` raises (as on a full disk or a lost server), before or after committing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import device_topic
from controller.fleet.ingest import Ingestor, IngestSettings
from controller.fleet.postgres import PostgresStore
from controller.fleet.records import IngestBatch
from controller.fleet.sqlite import SqliteStore
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import is_postgres, open_store
from tests.controller.fleet.test_ingest import Device, stored_seqs
from tests.controller.fleet.test_ingest_hot_path import good_payload
from tests.controller.test_store_support import store_location
from tests.e2e_support import wait_until
from tests.helpers import Broker

CLIENT_ID = "ingest-ack"


class _Failing:
    """A store's ``write`` that fails while ``failing`` is set. With ``commit_first`` it
    commits a batch and then fails if the batch holds events or heartbeats, as a process
    killed between the commit and the PUBACKs would."""

    def setup_failure(self, commit_first: bool) -> None:
        self.failing = threading.Event()
        self.failing.set()
        self.commit_first = commit_first
        self.attempts = 0

    def write(self, batch: IngestBatch) -> int:
        self.attempts += 1
        if self.commit_first:
            stored = int(super().write(batch))  # type: ignore[misc]
            if self.failing.is_set() and (batch.events or batch.heartbeat_facts):
                raise sqlite3.OperationalError("disk I/O error")
            return stored
        if self.failing.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return int(super().write(batch))  # type: ignore[misc]


class FailingSqliteStore(_Failing, SqliteStore):
    pass


class FailingPostgresStore(_Failing, PostgresStore):
    pass


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where the telemetry store lives: a SQLite file or a fresh PostgreSQL schema."""
    with store_location(request.param, tmp_path) as where:
        yield where


def failing_store(location: str, commit_first: bool = False) -> _Failing:
    store: _Failing
    if is_postgres(location):
        store = FailingPostgresStore(location)
    else:
        store = FailingSqliteStore(Path(location))
    store.setup_failure(commit_first)
    return store


def start_ingest(broker: Broker, store: TelemetryStore, **settings: Any) -> Ingestor:
    """An ingestor of ``store``, connected; ``settings`` override the tests' ones."""
    ingest_settings = IngestSettings(
        broker.host,
        broker.port,
        **{
            "client_id": CLIENT_ID,  # the same persistent session each time
            "flush_s": 0.05,
            "store_retry_max_s": 0.5,
            "stop_timeout_s": 10,
            **settings,
        },
    )
    ingestor = Ingestor(ingest_settings, store)
    ingestor.start()
    wait_until(lambda: ingestor.is_subscribed, 10, "the ingestor to connect")
    return ingestor


@contextmanager
def redelivered(broker: Broker, location: str, kind: str, count: int) -> Iterator[TelemetryStore]:
    """The store at ``location`` under a new ingest, once the broker has sent ``count``
    messages of ``kind`` to it again and it has acknowledged them all."""
    working = open_store(location)
    second = start_ingest(broker, working)
    try:
        wait_until(lambda: second.counts[kind] >= count, 30, f"the {kind} to come again")
        wait_until(lambda: second.unacknowledged == 0, 10, "the acknowledgements")
        yield working
    finally:
        second.stop()
        working.close()


def test_events_a_failing_store_did_not_take_are_stored_by_the_next_ingest(
    tmp_path: Path, broker: Broker, location: str
) -> None:
    store = failing_store(location)
    assert isinstance(store, TelemetryStore)
    first = start_ingest(broker, store)
    device = Device(tmp_path, broker.port)
    try:
        wait_until(lambda: device.link.is_connected, 10, "the device to connect")
        produced = device.produce(300)
        # The events and the device's status, far more than mosquitto's default
        # max_inflight_messages (20): the Receive Maximum the ingest asked for applies.
        wait_until(lambda: first.unacknowledged >= 300, 20, "the events held unacknowledged")
        wait_until(lambda: device.outbox.pending == 0, 20, "the device to delete them")
        wait_until(lambda: store.attempts >= 3, 20, "the batch to be retried")
        assert store.count("events") == 0
        first.stop()
        assert first.counts["lost"] == 0 and first.counts["events"] == 0
        store.close()

        with redelivered(broker, location, "events", 300) as working:
            assert stored_seqs(working) == produced  # each once, in the order produced
            assert working.count("events") == 300
    finally:
        device.close()
        first.stop()


def test_a_batch_is_retried_until_the_store_recovers_then_acknowledged(
    tmp_path: Path, broker: Broker
) -> None:
    store = failing_store(str(tmp_path / "telemetry.sqlite"))
    assert isinstance(store, SqliteStore)
    ingestor = start_ingest(broker, store)
    device = Device(tmp_path, broker.port)
    try:
        wait_until(lambda: device.link.is_connected, 10, "the device to connect")
        produced = device.produce(50)
        wait_until(lambda: ingestor.unacknowledged >= 50, 20, "the events held unacknowledged")
        wait_until(lambda: store.attempts >= 2, 20, "the batch to be retried")
        assert store.count("events") == 0

        store.failing.clear()  # the disk has room again
        wait_until(lambda: stored_seqs(store) == produced, 20, "the events to be stored")
        wait_until(lambda: ingestor.unacknowledged == 0, 10, "the acknowledgements")
        assert ingestor.counts["events"] == 50 and ingestor.counts["lost"] == 0
    finally:
        device.close()
        ingestor.stop()
        store.close()


def test_events_stored_but_not_acknowledged_come_again_and_are_stored_once(
    tmp_path: Path, broker: Broker, location: str
) -> None:
    store = failing_store(location, commit_first=True)
    assert isinstance(store, TelemetryStore)
    first = start_ingest(broker, store)
    device = Device(tmp_path, broker.port)
    try:
        wait_until(lambda: device.link.is_connected, 10, "the device to connect")
        produced = device.produce(100)
        # The writer holds the first batch with events (committed), the rest wait.
        wait_until(lambda: store.count("events") > 0, 20, "events to be committed")
        wait_until(lambda: first.unacknowledged >= 100, 10, "the events unacknowledged")
        first.stop()
        store.close()

        # The broker sends all 100 again, the committed ones too.
        with redelivered(broker, location, "events", 100) as working:
            assert working.count("events") == 100
            assert stored_seqs(working) == produced
    finally:
        device.close()
        first.stop()


def test_heartbeats_stored_but_not_acknowledged_come_again_and_are_stored_once(
    broker: Broker, location: str
) -> None:
    """QoS 1 heartbeats (``heartbeat_qos = 1``): the broker sends them again, and the
    failing store's retries commit them again too; each adds one history row."""
    store = failing_store(location, commit_first=True)
    assert isinstance(store, TelemetryStore)
    first = start_ingest(broker, store)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="beats-qos1")
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()
    try:
        infos = [
            publisher.publish(device_topic("lab", f"d{i}", "telemetry"), good_payload(f"d{i}"), 1)
            for i in range(50)
        ]
        for info in infos:
            info.wait_for_publish(timeout=10)
        wait_until(lambda: store.attempts >= 3, 20, "the committed batch to be retried")
        wait_until(lambda: first.unacknowledged >= 50, 10, "the heartbeats unacknowledged")
        first.stop()
        store.close()

        with redelivered(broker, location, "heartbeats", 50) as working:
            assert working.count("heartbeats") == 50
            assert [len(working.heartbeats(f"d{i}")) for i in range(50)] == [1] * 50
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        first.stop()
