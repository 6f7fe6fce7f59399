"""An acknowledged event survives a power cut on SQLite (issue 19, defect 7).

Ingestion acknowledges a QoS 1 event right after its batch commits, and the device then
deletes it from its outbox. In WAL mode with ``synchronous=NORMAL`` a commit reaches the
disk only at the next checkpoint, so a power cut could lose acknowledged events: the
connection must commit a batch holding a QoS 1 message with ``synchronous=FULL``. A batch
of QoS 0 heartbeats only (nothing is acknowledged) may skip the fsync.

What is asserted is the mode the write connection is in right after each write (only
``write`` changes it), read with ``PRAGMA synchronous`` on that connection.
"""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import Event, device_topic, event_payload
from controller.fleet.ingest import Ingestor, IngestSettings
from controller.fleet.payloads import add_payload
from controller.fleet.records import IngestBatch
from controller.fleet.sqlite import SqliteStore
from controller.fleet.stores import open_store
from tests.controller.fleet.test_ingest_hot_path import good_payload
from tests.e2e_support import wait_until
from tests.helpers import Broker

NORMAL, FULL = 1, 2  # what PRAGMA synchronous returns


def synchronous(store: SqliteStore) -> int:
    """The mode of the connection ``write`` commits on, inside a transaction as ``write``
    runs one."""
    with store._write_lock, store._writer() as cur:
        cur.execute("PRAGMA synchronous")
        (mode,) = cur.fetchone()
        return int(mode)


def test_a_batch_with_something_to_acknowledge_is_committed_with_synchronous_full(
    tmp_path: Path,
) -> None:
    store = open_store(str(tmp_path / "telemetry.sqlite"))  # as edgectl serve opens it
    assert isinstance(store, SqliteStore)
    try:
        assert synchronous(store) == FULL  # before any batch says otherwise
        with store._write_lock:
            (journal,) = store._write_conn.execute("PRAGMA journal_mode").fetchone()
        assert journal == "wal"  # readers still do not block the writer

        heartbeats = IngestBatch(durable=False)
        topic = device_topic("lab", "cam-1", "telemetry")
        add_payload(heartbeats, topic, good_payload(), 1.0)
        store.write(heartbeats)
        assert synchronous(store) == NORMAL

        events = IngestBatch()  # durable unless the caller says otherwise
        event = Event("cam-1", "lab", "s1", 1, "now", "committed", "m", "1.0.0")
        add_payload(events, device_topic("lab", "cam-1", "events"), event_payload(event), 2.0)
        store.write(events)
        assert synchronous(store) == FULL
        assert store.count("events") == 1 and store.count("heartbeats") == 1
    finally:
        store.close()


def test_ingest_commits_what_it_acknowledges_with_synchronous_full(
    tmp_path: Path, broker: Broker
) -> None:
    """Through a real mosquitto: a batch of QoS 0 heartbeats only commits with NORMAL;
    one holding a QoS 1 event or heartbeat with FULL. Before, every commit ran NORMAL."""
    store = SqliteStore(tmp_path / "telemetry.sqlite")
    ingestor = Ingestor(
        IngestSettings(broker.host, broker.port, client_id="ingest-durable", flush_s=0.05), store
    )
    ingestor.start()
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="durable-device")
    device.connect(broker.host, broker.port)
    device.loop_start()
    heartbeat_topic = device_topic("lab", "cam-1", "telemetry")

    def publish(topic: str, payload: bytes, qos: int, count: str, total: int) -> None:
        device.publish(topic, payload, qos=qos).wait_for_publish(timeout=10)
        wait_until(lambda: ingestor.counts[count] >= total, 20, f"{count} to be stored")
        wait_until(lambda: ingestor.unacknowledged == 0, 10, "the acknowledgement")

    try:
        wait_until(lambda: ingestor.is_subscribed, 10, "the ingestor to connect")
        publish(heartbeat_topic, good_payload(), 0, "heartbeats", 1)
        assert synchronous(store) == NORMAL
        event = Event("cam-1", "lab", "s1", 1, "now", "committed", "m", "1.0.0")
        publish(device_topic("lab", "cam-1", "events"), event_payload(event), 1, "events", 1)
        assert synchronous(store) == FULL
        publish(heartbeat_topic, good_payload(requests=3), 0, "heartbeats", 2)
        assert synchronous(store) == NORMAL
        publish(heartbeat_topic, good_payload(requests=4), 1, "heartbeats", 3)  # heartbeat_qos 1
        assert synchronous(store) == FULL
    finally:
        device.loop_stop()
        device.disconnect()
        ingestor.stop()
        store.close()
