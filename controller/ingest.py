"""Ingest devices' status, heartbeats and events from MQTT into the telemetry store.

Two threads and a queue: paho's network thread only enqueues (topic, payload, time
received); the ``ingest-writer`` thread drains the queue in batches (up to
``batch_size`` messages, or what arrived within ``flush_s``), parses them and writes each
batch to the store in one transaction. Batching is what makes SQLite keep up with a large
fleet: one commit per message is about half as fast (docs/benchmarks.md).

The client speaks MQTT 5 with a persistent session (``clean_start`` false, a session
expiry), so QoS 1 events published while this process is down or reconnecting wait in
the broker for it. With ``shared_group`` set it subscribes as
``$share/<group>/edgefleet/v1/fleets/+/devices/+/+``: several workers, one store.

Invariants:
- A message that does not parse, or whose payload names another device or fleet than
  its topic, is counted as rejected and logged (rate-limited), never stored.
- ``stop`` stores what was received before it returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.contracts import (
    Event,
    Heartbeat,
    PayloadError,
    Status,
    device_topic_filter,
    parse_device_topic,
    parse_event,
    parse_status,
    parse_telemetry,
)
from controller.store import IngestBatch, TelemetryStore

logger = logging.getLogger(__name__)

Message = Heartbeat | Event | Status
_PARSERS: Final[dict[str, Callable[[bytes], Message]]] = {
    "telemetry": parse_telemetry,
    "events": parse_event,
    "status": parse_status,
}


def parse_message(topic: str, payload: bytes) -> Message:
    """Parse a device message; raise PayloadError when it breaks the contract.

    The device and fleet in the payload must be those of the topic: the broker's ACL
    binds a device to its topics, so the topic is what identifies the sender.
    """
    fleet, device, kind = parse_device_topic(topic)
    message: Message = _PARSERS[kind](payload)
    if (message.fleet, message.device) != (fleet, device):
        raise PayloadError(
            f"payload names {message.fleet}/{message.device} but arrived on {topic!r}"
        )
    return message


def add_to_batch(
    batch: IngestBatch, message: Message, received_at: float, payload: bytes | None = None
) -> None:
    """Add a parsed message; ``payload`` (a heartbeat as received) is kept as history."""
    if isinstance(message, Heartbeat):
        batch.heartbeats.append((message, received_at))
        if payload is not None and len(batch.heartbeat_payloads) == len(batch.heartbeats) - 1:
            batch.heartbeat_payloads.append(payload)
    elif isinstance(message, Event):
        batch.events.append((message, received_at))
    else:
        batch.statuses.append((message, received_at))


@dataclass(frozen=True)
class IngestSettings:
    host: str
    port: int
    client_id: str
    keepalive_s: int = 30
    shared_group: str = ""
    session_expiry_s: int = 3600
    batch_size: int = 2000
    flush_s: float = 0.2

    @property
    def subscription(self) -> str:
        topic = device_topic_filter()
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic


class Ingestor:
    """Subscribes to every device topic and stores what arrives, in batches."""

    def __init__(self, settings: IngestSettings, store: TelemetryStore) -> None:
        self.settings = settings
        self.store = store
        self.counts: Counter[str] = Counter()
        self._queue: queue.SimpleQueue[tuple[str, bytes, float] | None] = queue.SimpleQueue()
        self._connected = threading.Event()
        self._writer: threading.Thread | None = None
        self._last_reject_log = 0.0
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=mqtt.MQTTv5
        )
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Start the writer and connect in the background (never raises for a down broker)."""
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect, then store everything received so far and stop the writer."""
        self._client.disconnect()
        self._client.loop_stop()
        self._queue.put(None)
        if self._writer is not None:
            self._writer.join(timeout=30)

    # paho callbacks (network thread) --------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            logger.warning("ingest: broker refused us: %s", reason)
            return
        self._connected.set()
        client.subscribe(self.settings.subscription, options=SubscribeOptions(qos=1))
        logger.info(
            "ingest: subscribed to %s (session present: %s)",
            self.settings.subscription,
            getattr(flags, "session_present", "?"),
        )

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self._connected.is_set():
            logger.warning("ingest: lost the broker (%s); reconnecting", reason)
        self._connected.clear()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.put((message.topic, bytes(message.payload), time.time()))

    # the writer thread ----------------------------------------------------------

    def _next_batch(self) -> tuple[list[tuple[str, bytes, float]], bool]:
        """Up to ``batch_size`` messages; True as second item when asked to stop."""
        items: list[tuple[str, bytes, float]] = []
        try:
            first = self._queue.get(timeout=self.settings.flush_s)
        except queue.Empty:
            return items, False
        if first is None:
            return items, True
        items.append(first)
        deadline = time.monotonic() + self.settings.flush_s
        while len(items) < self.settings.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.002)
                continue
            if item is None:
                return items, True
            items.append(item)
        return items, False

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            items, stopping = self._next_batch()
            if items:
                self._store(items)

    def _store(self, items: list[tuple[str, bytes, float]]) -> None:
        batch = IngestBatch()
        for topic, payload, received_at in items:
            try:
                add_to_batch(batch, parse_message(topic, payload), received_at, payload)
            except PayloadError as exc:
                self.counts["rejected"] += 1
                self._log_reject(topic, exc)
        for _attempt in range(3):
            try:
                self.store.write(batch)
                break
            except Exception as exc:  # a store error must not kill ingestion
                logger.error("ingest: storing %d message(s) failed: %s", len(batch), exc)
                time.sleep(1)
        else:
            self.counts["lost"] += len(batch)
            return
        self.counts["heartbeats"] += len(batch.heartbeats)
        self.counts["events"] += len(batch.events)
        self.counts["statuses"] += len(batch.statuses)
        self.counts["batches"] += 1

    def _log_reject(self, topic: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_reject_log > 10:
            self._last_reject_log = now
            logger.warning(
                "ingest: rejected a message on %s: %s (%d rejected so far)",
                topic,
                exc,
                self.counts["rejected"],
            )
