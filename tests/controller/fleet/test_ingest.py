"""Ingestion from a real mosquitto: outages, the outbox's bound, shared subscriptions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import (
    Event,
    SystemFigures,
    device_topic,
    event_payload,
    telemetry_payload,
)
from agent.device.config import AgentConfig, parse_config
from agent.telemetry.mqtt import MqttLink
from agent.telemetry.outbox import Outbox
from agent.telemetry.reporter import IntervalStats, TelemetryReporter, build_heartbeat
from controller.fleet.ingest import Ingestor, IngestSettings
from controller.fleet.postgres import PostgresStore
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from tests.controller.test_store_support import store_for
from tests.e2e_support import wait_until
from tests.helpers import Broker, free_port, start_broker

FLEET = "lab"


def start_persistent_broker(workdir: Path, port: int | None = None) -> Broker:
    """A private mosquitto that keeps sessions and queued messages across a restart."""
    return start_broker(workdir, port, persistent=True)


def agent_config(tmp_path: Path, port: int, device: str = "dev-1") -> AgentConfig:
    return parse_config(
        {
            "device_id": device,
            "fleet": FLEET,
            "state_dir": str(tmp_path / device),
            "repository": {"url": "http://127.0.0.1:9"},
            "mqtt": {"port": port, "reconnect_min_s": 1, "reconnect_max_s": 1},
            "telemetry": {"event_ack_timeout_s": 2},
        },
        tmp_path,
        {},
    )


def make_event(device: str, stream: str, seq: int) -> bytes:
    return event_payload(Event(device, FLEET, stream, seq, "now", "install_started", "m", "1.0.0"))


class Device:
    """An agent's MQTT link and outbox in this process."""

    def __init__(self, tmp_path: Path, port: int, max_events: int = 10_000) -> None:
        self.config = agent_config(tmp_path, port)
        self.outbox = Outbox(tmp_path / "outbox.sqlite", max_events)
        self.link = MqttLink(self.config, lambda _v: None, lambda: {}, self.outbox)
        self.topic = device_topic(FLEET, "dev-1", "events")
        self.link.start()

    def produce(self, n: int) -> list[int]:
        return [
            self.outbox.append(self.topic, lambda s, q: make_event("dev-1", s, q)) for _ in range(n)
        ]

    def close(self) -> None:
        self.link.stop()
        self.outbox.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[TelemetryStore]:
    store = open_store(str(tmp_path / "telemetry.sqlite"))
    yield store
    store.close()


def ingestor_for(broker: Broker, store: TelemetryStore, name: str, group: str = "") -> Ingestor:
    ingestor = Ingestor(
        IngestSettings(broker.host, broker.port, client_id=name, shared_group=group, flush_s=0.05),
        store,
    )
    ingestor.start()
    wait_until(lambda: ingestor.is_subscribed, 10, f"{name} to connect")
    return ingestor


def stored_seqs(store: TelemetryStore) -> list[int]:
    return [e.seq for e in store.events(device="dev-1", limit=100_000)]


def test_events_produced_during_a_broker_outage_arrive_in_order(
    tmp_path: Path, sqlite_store: TelemetryStore
) -> None:
    broker = start_persistent_broker(tmp_path / "broker")
    ingestor = ingestor_for(broker, sqlite_store, "ingest-outage")
    device = Device(tmp_path, broker.port)
    try:
        wait_until(lambda: device.link.is_connected, 10, "the device to connect")
        produced = device.produce(20)
        wait_until(lambda: stored_seqs(sqlite_store) == produced, 20, "the first events")

        broker.stop()
        wait_until(lambda: not device.link.is_connected, 10, "the device to see the outage")
        produced += device.produce(300)
        time.sleep(1.5)  # the device keeps trying while the broker is away
        produced += device.produce(30)
        assert device.outbox.pending == 330

        broker = start_persistent_broker(tmp_path / "broker", port=broker.port)
        wait_until(lambda: len(stored_seqs(sqlite_store)) >= 350, 60, "every event to arrive")
        assert stored_seqs(sqlite_store) == produced  # each once, in the order produced
        wait_until(lambda: device.outbox.pending == 0, 10, "the outbox to drain")
        assert device.outbox.dropped == 0
    finally:
        device.close()
        ingestor.stop()
        broker.stop()


def test_a_full_outbox_drops_the_oldest_and_the_heartbeat_reports_it(
    tmp_path: Path, sqlite_store: TelemetryStore
) -> None:
    port = free_port()
    device = Device(tmp_path, port, max_events=50)  # no broker yet: the device is offline
    broker: Broker | None = None
    ingestor: Ingestor | None = None
    try:
        produced = device.produce(80)
        assert device.outbox.dropped == 30
        broker = start_persistent_broker(tmp_path / "broker", port=port)
        ingestor = ingestor_for(broker, sqlite_store, "ingest-bound")
        # Nothing subscribed before now: what the device sent earlier is not lost either,
        # because it only sends what is still in its outbox once connected.
        wait_until(lambda: stored_seqs(sqlite_store) == produced[30:], 30, "the newest 50")
        reporter = TelemetryReporter(
            device="dev-1",
            fleet=FLEET,
            interval_s=10.0,
            stats=IntervalStats(),
            outbox=device.outbox,
            models_status=lambda: {},
            publish_heartbeat=device.link.publish_heartbeat,
            disk_path=tmp_path,
        )
        assert reporter.heartbeat()
        store = sqlite_store
        wait_until(lambda: store.devices() and store.devices()[0].outbox_dropped == 30, 10, "")
    finally:
        device.close()
        if ingestor is not None:
            ingestor.stop()
        if broker is not None:
            broker.stop()


def test_workers_on_a_shared_subscription_split_the_load_into_one_postgres(
    tmp_path: Path, broker: Broker
) -> None:
    with store_for("postgres", tmp_path) as first_store:
        assert isinstance(first_store, PostgresStore)
        second_store = open_store(first_store.dsn)
        workers = [
            ingestor_for(broker, first_store, "worker-a", group="edgefleet"),
            ingestor_for(broker, second_store, "worker-b", group="edgefleet"),
        ]
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fleet-sim")
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        try:
            infos = []
            for i in range(400):
                beat = build_heartbeat(
                    device=f"d{i}",
                    fleet=FLEET,
                    at="now",
                    seq=1,
                    interval_s=10.0,
                    uptime_s=1.0,
                    system=SystemFigures(),
                    models_status={},
                    interval={},
                )
                topic = device_topic(FLEET, f"d{i}", "telemetry")
                infos.append(publisher.publish(topic, telemetry_payload(beat), qos=1))
            for info in infos:
                info.wait_for_publish(timeout=10)
            wait_until(lambda: first_store.count("heartbeats") == 400, 30, "400 heartbeats")
            split = [w.counts["heartbeats"] for w in workers]
            assert sum(split) == 400 and all(n > 0 for n in split), split
            assert first_store.count("devices") == 400
        finally:
            publisher.loop_stop()
            publisher.disconnect()
            for w in workers:
                w.stop()
            second_store.close()
