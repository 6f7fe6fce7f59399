"""Ingest devices' status, heartbeats and events from MQTT into the telemetry store.

Two threads and a backlog: paho's network thread only enqueues (topic, payload, time
received, and what is needed to acknowledge it); the ``ingest-writer`` thread drains the
backlog (``controller.fleet.backlog``) in batches (up to ``batch_size`` messages, or
what arrived within ``flush_s``), parses them, writes each batch to the store in one
transaction and only then acknowledges its QoS 1 messages (PUBACK). Batching is what
makes SQLite keep up with a large fleet: one commit per message is about half as fast
(docs/benchmarks.md).

Parsing a message is ``controller.fleet.payloads.add_payload`` (pure; heartbeats take a
hot path there). The socket is read up to 512 KiB at a time, under sustained traffic at
most once per 10 ms, and PUBLISH packets are split out of it here (``read_packets``), all
of one read put in the backlog at once; paho handles every other packet
(``_IngestClient``).

The client speaks MQTT 5 with a persistent session (``clean_start`` false, a session
expiry), so QoS 1 events published while this process is down or reconnecting wait in
the broker for it, and so do the ones it received but never acknowledged: the broker
sends those again after a reconnect. Acknowledging manually, the client tells the
broker how many unacknowledged messages it may hold (the CONNECT property Receive
Maximum, ``IngestSettings.receive_maximum``); mosquitto's own ``max_inflight_messages``
(20 by default) applies only to clients that do not send it. With ``shared_group`` set it
subscribes as ``$share/<group>/edgefleet/v1/fleets/+/devices/+/+``: several workers, one
store. The subscription is QoS 1, so no QoS 2 message ever arrives.

A store outage: the writer retries the batch it holds (backoff up to
``store_retry_max_s``, an error logged per attempt) and acknowledges nothing meanwhile;
the broker stops sending QoS 1 messages once ``receive_maximum`` are unacknowledged and
queues the rest (up to its ``max_queued_messages``). QoS 0 messages keep coming and wait
in the backlog here, at most ``IngestSettings.qos0_backlog_max`` of them: past that, the
heartbeat superseded longest ago by a newer one of its device gives way (``coalesced``),
or when there is none the oldest QoS 0 message (``dropped``); see
``controller.fleet.backlog``. Both are counted and logged at most every 10 s. So a long
store outage costs bounded memory and, with the bound at least the number of devices,
loses history rows but no device's latest heartbeat.

Invariants:
- A QoS 1 message is acknowledged only after the transaction holding it committed, on
  the disk (a batch holding one is ``IngestBatch.durable``: SQLite syncs its commit), or
  when it is rejected for good (it does not parse); so a message this process received
  but did not store is sent again by the broker, never lost, power cuts included.
  Redelivery may repeat a stored message: events and heartbeats are stored once (the
  store's keys), status and heartbeat figures only move forward (controller.fleet.store).
- Acknowledgements go out in the order the messages arrived, and only on the connection
  that delivered them (a packet id means nothing on the next one; the broker sends
  what was not acknowledged again there).
- No QoS 1 message is ever dropped; at most ``qos0_backlog_max`` QoS 0 messages wait
  (besides the batch the writer holds).
- A message that does not parse, or whose payload names another device or fleet than
  its topic, is counted as rejected and logged (rate-limited), never stored.
- One message cannot stop ingestion. The parsers refuse what the store cannot hold;
  should the store still refuse a batch for what it holds (``TelemetryStore.is_data_error``:
  the same rows would fail again), the batch is split in halves, and halves of those,
  until the message it refuses is alone: that one is dropped, counted as refused
  (reason ``poison``), logged and acknowledged, and the others are stored. Any other
  store error (the database down, a full disk) is retried with backoff and drops nothing.
- With a ``RosterReader`` (the device registry): a message from a device that is not
  enrolled, is revoked, or is enrolled in another fleet than its topic's, and a heartbeat
  with counts no device can serve, are counted as refused by reason (``refusals``) and
  logged (rate-limited), never stored (``controller.fleet.roster``,
  ``controller.fleet.payloads.check_plausible``). The roster is taken once per batch;
  checking a message against it is one dict lookup.
- Each device's statuses and events, in the order they arrive, go through
  ``controller.fleet.conflicts`` once (not again when a batch is split): an event showing
  another agent using the device's identity is still stored, and the batch marks the
  device's row; counted (``counts["identity_conflicts"]``) and logged as a WARNING at
  most once an hour per device.
- ``stop`` stores and acknowledges what was received before it returns, unless the store
  fails then: it does not retry, leaves those messages unacknowledged for the broker
  to send again (QoS 0 ones are counted as lost) and returns within ``stop_timeout_s``.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.contracts import PayloadError, device_topic_filter
from controller.fleet.backlog import QUEUED, Backlog, Item
from controller.fleet.conflicts import ConflictWatch
from controller.fleet.payloads import DEFAULT_MAX_REQUESTS_PER_S, Admission, add_payload
from controller.fleet.records import IngestBatch
from controller.fleet.roster import POISON, RefusedMessage, RosterReader
from controller.fleet.store import TelemetryStore

logger = logging.getLogger(__name__)


class _Refused(Exception):
    """The store refused a batch for what it holds (``TelemetryStore.is_data_error``)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


# A message as read off the wire: (topic, payload, qos, packet id).
Received = tuple[str, bytes, int, int]

_PUBLISH: Final = 0x30


def read_packets(
    buffer: bytes, pos: int = 0, mqtt5: bool = True
) -> tuple[list[Received], tuple[int, bytes] | None, int]:
    """Read the MQTT packets of ``buffer`` (bytes from the broker) from offset ``pos``.

    Returns the PUBLISH packets of QoS 0 and 1 read, decoded as (topic, payload, qos,
    packet id); the first packet of another kind (or a QoS 2 PUBLISH), as (its first
    byte, its body), where reading stopped, else None; and the offset reading stopped at:
    after that packet, or at a packet not all read yet (it waits for the next read).

    A PUBLISH's MQTT 5 properties are skipped: this client announces no topic aliases
    (so a topic is never empty for one) and no subscription identifiers, and ingestion
    reads none. A topic that is not UTF-8 is decoded with replacement characters (the
    topic's names then fail their check: rejected, counted). Raises ValueError for a
    malformed packet (a length past its end, a remaining length over four bytes);
    IndexError for one whose fields run past the bytes read.
    """
    messages: list[Received] = []
    size = len(buffer)
    while size - pos >= 2:
        header = buffer[pos]
        length, shift, i = 0, 0, pos + 1
        while True:
            if i >= size:
                return messages, None, pos  # the length is not all here yet
            byte = buffer[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 21:
                raise ValueError("a remaining length longer than four bytes")
        end = i + length
        if end > size:
            break
        qos = (header >> 1) & 3
        if header & 0xF0 != _PUBLISH or qos > 1:
            return messages, (header, buffer[i:end]), end
        if length < 2:
            raise ValueError("a PUBLISH too short for its topic")
        start = i + 2 + ((buffer[i] << 8) | buffer[i + 1])
        topic = buffer[i + 2 : start].decode("utf-8", "replace")
        mid = 0
        if qos:
            mid = (buffer[start] << 8) | buffer[start + 1]
            start += 2
        if mqtt5:
            props, shift = 0, 0
            while True:
                byte = buffer[start]
                start += 1
                props |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ValueError("a property length longer than four bytes")
            start += props
        if start > end:
            raise ValueError("a PUBLISH whose topic or properties run past its end")
        messages.append((topic, buffer[start:end], qos, mid))
        pos = end
    return messages, None, pos


class _IngestClient(mqtt.Client):
    """paho's client, reading the socket its own way: one read of up to ``CHUNK``, every
    complete packet in it split out by ``read_packets``, the PUBLISHes handed on in one
    list per read (``on_received``), every other packet to paho's own handlers.

    paho reads a packet with one ``recv`` for its first byte, one per byte of its length
    and one for the rest, then builds a ``Properties`` object and an ``MQTTMessage`` per
    PUBLISH: measured as more than half of ingestion's CPU (docs/benchmarks.md).
    Acknowledging, keepalive, reconnecting and writing stay paho's. A QoS 2 PUBLISH
    (never sent: the subscription is QoS 1) would take paho's path to ``on_message``.

    Under sustained traffic the socket is read at most once per ``READ_EVERY_S``: a read
    that emptied the socket less than that ago waits out the rest before the next one,
    so what arrives meanwhile is read at once (up to ``CHUNK`` bytes). Each read costs
    the network thread a wake-up, a ``select``, paho's loop and the GIL taken from the
    writer thread: read as the bytes came, at 10,000 heartbeats a second, about 9
    heartbeats a read, this thread spent 9-14 µs of CPU a heartbeat, 6-7 with a read at
    most every 5 ms and 4.5-5 every 20 ms (docs/benchmarks.md, telemetry ingest,
    2026-12-03 19:40 UTC). The wait delays only what arrives within ``READ_EVERY_S`` of
    the last read (the writer batches for ``IngestSettings.flush_s`` anyway) and never
    follows a read that filled ``CHUNK`` (more may be waiting: read on at once), so it
    caps nothing: 512 KiB a read every 10 ms would be 50 MB/s.

    These overrides are paho 2.x internals (the dependency is pinned below 3);
    tests/controller/fleet/test_ingest*.py run them against a real mosquitto.
    """

    CHUNK: Final = 524288
    READ_EVERY_S: Final = 0.01

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_received: Callable[[list[Received]], None] | None = None
        self._rx = b""  # the start of a packet not all read yet
        self._rx_sock: Any = None  # the socket it came from
        self._drained_at = -math.inf  # when a read last emptied the socket (monotonic)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is not None:
            on_message(self, self._userdata, message)

    def _packet_read(self) -> MQTTErrorCode:
        wait = self._drained_at + self.READ_EVERY_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            data = self._recv_available()
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:  # a timeout, a reset, no socket
            self._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if not data:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        self._drained_at = time.monotonic() if len(data) < self.CHUNK else -math.inf
        if self._rx_sock is not self._sock:  # a new connection: nothing of the last one
            self._rx, self._rx_sock = b"", self._sock
        buffer = self._rx + data if self._rx else data
        rc, pos = MQTTErrorCode.MQTT_ERR_SUCCESS, 0
        try:
            while True:
                messages, other, pos = read_packets(buffer, pos, self._protocol == mqtt.MQTTv5)
                if messages and self.on_received is not None:
                    self.on_received(messages)
                if other is None:
                    break
                rc = self._handle_packet(*other)
                if rc:
                    break
        except (ValueError, IndexError) as exc:
            self._easy_log(mqtt.MQTT_LOG_ERR, "received a malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._rx = buffer[pos:]
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return rc

    def _recv_available(self) -> bytes:
        """What the socket holds, up to ``CHUNK`` bytes: one ``recv`` on a plain socket;
        on TLS, records until none is left (a TLS socket's ``recv`` returns one record,
        at most 16 KiB). Raises BlockingIOError when nothing is there; b"" at the end of
        the stream (only when nothing came before it)."""
        data = self._sock_recv(self.CHUNK)
        if not data or len(data) == self.CHUNK or not isinstance(self._sock, ssl.SSLSocket):
            return data
        parts = [data]
        size = len(data)
        while size < self.CHUNK:
            try:
                more = self._sock_recv(self.CHUNK - size)
            except BlockingIOError:
                break
            if not more:  # the end of the stream: the next read says so
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts)

    def _handle_packet(self, header: int, body: bytes) -> MQTTErrorCode:
        """Hand one packet to paho's handlers, as its own reading would."""
        self._in_packet = _in_packet(header, body)
        try:
            return self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_ERR, "received a malformed packet: %s", exc)
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            self._in_packet = _in_packet(0, b"")


def _in_packet(header: int, body: bytes) -> Any:
    """paho's record of the packet it reads (``Client._in_packet``), all read."""
    return {
        "command": header,
        "have_remaining": 1 if header else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": bytearray(body),
        "to_process": 0,
        "pos": 0,
    }


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
    store_retry_max_s: float = 10.0
    stop_timeout_s: float = 30.0
    # QoS 0 messages held while the store is slow or down (about 1 KB each); at least the
    # devices this worker hears from, so that each one's latest heartbeat is kept.
    qos0_backlog_max: int = 100_000
    # Heartbeats counting more requests per model than this per second are refused.
    max_requests_per_s: float = DEFAULT_MAX_REQUESTS_PER_S

    @property
    def subscription(self) -> str:
        topic = device_topic_filter()
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic

    @property
    def receive_maximum(self) -> int:
        """Unacknowledged QoS 1 messages the broker may send us (MQTT 5 Receive Maximum).

        A batch is acknowledged after its commit, while the next one fills: a window of
        four batches keeps the broker sending during a commit (at most 65535, MQTT's
        limit; at least 1000, so small batches are not throttled by the round trip).
        """
        return min(65535, max(1000, 4 * self.batch_size))


class Ingestor:
    """Subscribes to every device topic and stores what arrives, in batches; acknowledges
    a QoS 1 message once it is stored."""

    _RETRY_FIRST_S: Final = 0.5
    _SHED_LOG_EVERY_S: Final = 10.0
    _CONFLICT_LOG_EVERY_S: Final = 3600.0

    def __init__(
        self,
        settings: IngestSettings,
        store: TelemetryStore,
        tls: ssl.SSLContext | None = None,
        roster: RosterReader | None = None,
    ) -> None:
        """``tls``: connect over TLS with this context (``controller.serve.mqtt_tls``);
        ``roster``: admit only what the device registry allows (``controller.fleet.roster``).

        Raises ValueError when ``settings.qos0_backlog_max`` is below 1."""
        self.settings = settings
        self.store = store
        self._roster = roster
        # Written by the writer thread, except coalesced and dropped (the network thread).
        self.counts: Counter[str] = Counter()
        # Messages refused by reason (controller.fleet.roster.REFUSAL_REASONS); writer thread.
        self.refusals: Counter[str] = Counter()
        self._backlog = Backlog(settings.qos0_backlog_max)
        self._connected = threading.Event()
        # Set once the broker acknowledged the subscription of the current connection:
        # only from then on does it route the fleet's messages here (QoS 0 ones published
        # before are not held for a subscription that does not exist yet).
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        self._last_drop_log: dict[str, float] = {}
        # Writer thread: two agents on one identity (controller.fleet.conflicts).
        self._conflicts = ConflictWatch()
        self._last_conflict_log: dict[tuple[str, str], float] = {}
        self._last_shed_log = -math.inf
        # Which connection a message came on: an acknowledgement is sent only on it. The
        # network thread moves it on (dis)connect, under the lock the writer acks under.
        self._connection = 0
        self._ack_lock = threading.Lock()
        # QoS 1 messages received (network thread) and settled: acknowledged, or left to
        # the broker to send again (writer thread). Each is written by one thread only.
        self._received_qos1 = 0
        self._settled_qos1 = 0
        client = _IngestClient(
            CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=mqtt.MQTTv5
        )
        if tls is not None:
            client.tls_set_context(tls)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.max_inflight_messages_set(1000)
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_received = self._on_received
        self._client = client

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def is_subscribed(self) -> bool:
        """Connected, and the broker acknowledged the subscription (``is_connected`` is
        set before the SUBSCRIBE is even sent)."""
        return self._connected.is_set() and self._subscribed.is_set()

    @property
    def qos0_waiting(self) -> int:
        """QoS 0 messages held for the writer (at most ``qos0_backlog_max``)."""
        return self._backlog.qos0_held

    @property
    def unacknowledged(self) -> int:
        """QoS 1 messages received and not yet acknowledged (nor left to the broker)."""
        return self._received_qos1 - self._settled_qos1

    def start(self) -> None:
        """Start the writer and connect in the background (never raises for a down broker)."""
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.receive_maximum
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Store and acknowledge everything received so far, then disconnect.

        Returns within about ``stop_timeout_s``: a batch the store fails to take is not
        retried now; its messages stay unacknowledged, and the broker keeps them for the
        persistent session.
        """
        self._stopping.set()
        self._backlog.close()
        if self._writer is not None:
            self._writer.join(timeout=self.settings.stop_timeout_s)
            if self._writer.is_alive():
                logger.error(
                    "ingest: the store did not finish within %.0f s; disconnecting with "
                    "%d message(s) unacknowledged (the broker sends them again)",
                    self.settings.stop_timeout_s,
                    self.unacknowledged,
                )
        with self._ack_lock:
            self._connection += 1  # a writer still running must not ack any more
        self._connected.clear()  # so the disconnect is not logged as lost
        self._client.disconnect()  # after the acks queued before it
        self._client.loop_stop()

    # paho callbacks (network thread) --------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            logger.warning("ingest: broker refused us: %s", reason)
            return
        with self._ack_lock:
            self._connection += 1
        self._subscribed.clear()
        self._connected.set()
        client.subscribe(self.settings.subscription, options=SubscribeOptions(qos=1))
        logger.info(
            "ingest: subscribed to %s (session present: %s)",
            self.settings.subscription,
            getattr(flags, "session_present", "?"),
        )

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if refused:
            logger.warning(
                "ingest: broker refused the subscription to %s: %s",
                self.settings.subscription,
                ", ".join(str(r) for r in refused),
            )
            return
        self._subscribed.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._subscribed.clear()
        with self._ack_lock:
            self._connection += 1
        if self._stopping.is_set():
            logger.info("ingest: disconnected from the broker (stopping)")
        elif self._connected.is_set():
            logger.warning("ingest: lost the broker (%s); reconnecting", reason)
        self._connected.clear()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        qos = message.qos
        if qos:
            self._received_qos1 += 1
        outcome = self._backlog.put(
            (message.topic, bytes(message.payload), time.time(), qos, message.mid, self._connection)
        )
        if outcome != QUEUED:
            self._count_shed(outcome)

    def _on_received(self, messages: list[Received]) -> None:
        """Hold the messages of one read for the writer (``_IngestClient``)."""
        received_at, connection = time.time(), self._connection
        qos1 = sum(1 for message in messages if message[2])
        if qos1:
            self._received_qos1 += qos1
        shed = self._backlog.put_many(
            [
                (topic, payload, received_at, qos, mid, connection)
                for topic, payload, qos, mid in messages
            ]
        )
        for outcome in shed:
            self._count_shed(outcome)

    def _count_shed(self, outcome: str) -> None:
        """Count a QoS 0 message given up at the bound; log it at most every 10 s."""
        self.counts[outcome] += 1
        now = time.monotonic()
        if now - self._last_shed_log >= self._SHED_LOG_EVERY_S:
            self._last_shed_log = now
            logger.warning(
                "ingest: %d QoS 0 message(s) wait for the store, the most allowed "
                "(qos0_backlog_max); so far %d heartbeat(s) replaced by a newer one of "
                "their device, %d message(s) dropped",
                self._backlog.qos0_held,
                self.counts["coalesced"],
                self.counts["dropped"],
            )

    # the writer thread ----------------------------------------------------------

    def _next_batch(self) -> list[Item]:
        """Up to ``batch_size`` messages: those that arrive within ``flush_s`` of the first
        (after ``stop``, only those that arrived before it)."""
        backlog, size = self._backlog, self.settings.batch_size
        if not backlog.wait(self.settings.flush_s):
            return []
        items = backlog.take(size)
        deadline = time.monotonic() + self.settings.flush_s
        while items and len(items) < size and not backlog.is_closed:
            # Woken by the next put (one per read of the socket) or by close.
            if not backlog.wait(deadline - time.monotonic()):
                break
            items += backlog.take(size - len(items))
        return items

    def _write_loop(self) -> None:
        unstored: list[Item] = []
        while not self._backlog.is_finished:
            items = self._next_batch()
            if items and not self._store(items):
                unstored = items  # the store failed while stopping
                break
        # What arrived after stop, or after that failure.
        self._leave_to_broker(unstored + self._backlog.take_rest())

    def _store(self, items: list[Item]) -> bool:
        """Parse and store ``items``, then acknowledge them; False when the store failed
        and ``stop`` was called (nothing acknowledged then).

        A batch the store refuses for what it holds is split in two, each half written
        on its own (and split again if refused), so only the message it cannot hold is
        left out (``_drop_poison``)."""
        roster = self._roster.current() if self._roster is not None else None
        admission = Admission(roster, self.settings.max_requests_per_s)
        # A stack: the first half is written first.
        pieces = [self._parse(items, admission, observe=True)]
        while pieces:
            batch, parsed = pieces.pop()
            try:
                if not self._write_until_stored(batch):
                    return False
            except _Refused as refused:
                if len(parsed) == 1:
                    self._drop_poison(parsed[0], refused.cause)
                else:
                    half = len(parsed) // 2
                    pieces.append(self._parse(parsed[half:], admission))
                    first = self._parse(parsed[:half], admission)
                    first[0].conflicts = batch.conflicts  # found once, written once
                    pieces.append(first)
                continue
            self.counts["heartbeats"] += len(batch.heartbeats) + len(batch.heartbeat_facts)
            self.counts["events"] += len(batch.events)
            self.counts["statuses"] += len(batch.statuses)
        self.counts["batches"] += 1
        self._acknowledge(items)
        return True

    def _parse(
        self, items: list[Item], admission: Admission, observe: bool = False
    ) -> tuple[IngestBatch, list[Item]]:
        """The batch of what ``items`` hold and the items it holds (one entry each): a
        message that breaks the contract or is refused is counted, logged and left out.
        Pure but for the counts, so a part of ``items`` parses again to the same rows;
        with ``observe`` (the first parse of a batch), statuses and events also go
        through the identity-conflict rule (``_observe``)."""
        batch = IngestBatch()
        parsed: list[Item] = []
        for item in items:
            topic, received_at = item[0], item[2]
            try:
                add_payload(batch, topic, item[1], received_at, admission)
            except RefusedMessage as exc:
                self.counts["refused"] += 1
                self.refusals[exc.reason] += 1
                self._log_dropped("refused", topic, exc)
            except PayloadError as exc:
                self.counts["rejected"] += 1
                self._log_dropped("rejected", topic, exc)
            except Exception as exc:  # a parser's bug must not stop ingestion either
                self.counts["rejected"] += 1
                self._log_dropped("rejected", topic, PayloadError(f"{type(exc).__name__}: {exc}"))
            else:
                parsed.append(item)
                if observe and not topic.endswith("/telemetry"):
                    self._observe(batch, topic, received_at)
        # On the disk before the acknowledgement: only a QoS 1 message is acknowledged.
        batch.durable = any(item[3] for item in parsed)
        return batch, parsed

    def _observe(self, batch: IngestBatch, topic: str, received_at: float) -> None:
        """Feed the status or event just added to ``batch`` (from ``topic``) to the
        identity-conflict rule; mark a conflict in ``batch``, count and log it."""
        if topic.endswith("/status"):
            status = batch.statuses[-1][0]
            self._conflicts.status(status.fleet, status.device)
            return
        if not topic.endswith("/events"):
            return
        event = batch.events[-1][0]
        conflict = self._conflicts.event(event.fleet, event.device, event.stream, event.seq)
        if conflict is None:
            return
        what = conflict.describe()
        batch.conflicts.append((event.fleet, event.device, what, received_at))
        self.counts["identity_conflicts"] += 1
        key = (event.fleet, event.device)
        now = time.monotonic()
        if now - self._last_conflict_log.get(key, -math.inf) >= self._CONFLICT_LOG_EVERY_S:
            self._last_conflict_log[key] = now
            logger.warning(
                "ingest: device %s (fleet %s): %s Find the second agent (broker log: two "
                "connections taking the client id edge-agent-%s from each other); give it "
                "its own identity (edgectl device add) or stop it. Logged at most once an "
                "hour per device; counted in edgefleet_device_identity_conflicts_total",
                event.device,
                event.fleet,
                what,
                event.device,
            )

    def _drop_poison(self, item: Item, exc: Exception) -> None:
        """Leave out a message the store refused on its own for what it holds: counted as
        refused (``poison``), logged at most every 10 s, acknowledged with its batch."""
        self.counts["refused"] += 1
        self.refusals[POISON] += 1
        now = time.monotonic()
        if now - self._last_drop_log.get(POISON, -math.inf) > 10:
            self._last_drop_log[POISON] = now
            logger.error(
                "ingest: the store cannot hold a message on %s (%s: %s); dropped it and "
                "stored the rest of its batch (%d such message(s) so far)",
                item[0],
                type(exc).__name__,
                exc,
                self.refusals[POISON],
            )

    def _write_until_stored(self, batch: IngestBatch) -> bool:
        """Write ``batch``, retrying with backoff while the store fails; False if it still
        fails once ``stop`` was called. Raises ``_Refused`` at once when the store refuses
        it for what it holds: writing it again would fail again."""
        if not len(batch):
            return True
        delay, attempt = self._RETRY_FIRST_S, 1
        while True:
            try:
                self.store.write(batch)
            except Exception as exc:  # a store error must not kill ingestion
                if self.store.is_data_error(exc):
                    raise _Refused(exc) from exc
                if self._stopping.is_set():
                    logger.error(
                        "ingest: storing %d message(s) failed while stopping: %s",
                        len(batch),
                        exc,
                    )
                    return False
                logger.error(
                    "ingest: storing %d message(s) failed (attempt %d): %s; retrying in "
                    "%.1f s, %d message(s) unacknowledged and %d QoS 0 waiting meanwhile",
                    len(batch),
                    attempt,
                    exc,
                    delay,
                    self.unacknowledged,
                    self._backlog.qos0_held,
                )
                self._stopping.wait(delay)
                delay, attempt = min(delay * 2, self.settings.store_retry_max_s), attempt + 1
                continue
            if attempt > 1:
                logger.warning(
                    "ingest: stored %d message(s) after %d attempts", len(batch), attempt
                )
            return True

    def _acknowledge(self, items: list[Item]) -> None:
        """PUBACK the QoS 1 messages of ``items`` in order, on the connection that
        delivered them; on a later one the broker has already sent them again."""
        with self._ack_lock:
            connection = self._connection
            for item in items:
                if item[3]:
                    if item[5] == connection:
                        self._client.ack(item[4], item[3])
                    self._settled_qos1 += 1

    def _leave_to_broker(self, items: list[Item]) -> None:
        """Give up on ``items`` without acknowledging them: the broker keeps the QoS 1
        ones for the session; QoS 0 ones are lost (counted)."""
        left_qos1 = sum(1 for item in items if item[3])
        self._settled_qos1 += left_qos1
        self.counts["lost"] += len(items) - left_qos1
        if left_qos1:
            logger.warning(
                "ingest: left %d QoS 1 message(s) unacknowledged; the broker sends them again",
                left_qos1,
            )

    def _log_dropped(self, outcome: str, topic: str, exc: Exception) -> None:
        """Log a message ``rejected`` (breaks the contract) or ``refused`` (its sender or
        counts are not admitted), at most every 10 s per outcome."""
        now = time.monotonic()
        if now - self._last_drop_log.get(outcome, -math.inf) > 10:
            self._last_drop_log[outcome] = now
            logger.warning(
                "ingest: %s a message on %s: %s (%d %s so far)",
                outcome,
                topic,
                exc,
                self.counts[outcome],
                outcome,
            )
