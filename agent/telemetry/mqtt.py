"""The agent's MQTT link: fleet announcements in; status, heartbeats and events out.

A thin adapter over paho-mqtt. The announcement is a hint only (the agent verifies
everything through TUF), so a malformed one is logged and ignored, and a lost one is
caught by the poll. The retained status message says ``online: true`` with the versions
served; the broker publishes the last will (``online: false``, with the versions served
when the will was last set) when the agent vanishes.

Heartbeats go out only while connected (QoS from config, never retained). Events are
drained from the on-disk outbox by the ``outbox-sender`` thread: oldest first, QoS 1,
one at a time, and an event leaves the outbox only after the broker's PUBACK. One in
flight is what keeps the order across a lost connection: paho sends its unacknowledged
message again after reconnecting, and the next event is published only once that one
is acknowledged, so no event can overtake an earlier one on the new connection (a
window of several would let the sender's new publishes go before paho's resends). The
cost is one round trip to the broker per event. Delivery is at least once: a PUBACK
lost with the connection makes the event go again, with the same (stream, seq), which
readers use to drop the duplicate. The sender also gives the outbox the chance to write
the events it holds in memory while the disk refuses them (``Outbox.persist_held``).

With ``[mqtt] tls`` the link speaks TLS (1.2 or later), verifies the broker against
``ca_file`` and its host name, and presents the device's client certificate; the broker
takes the certificate's CN (the device id) as the identity its ACL checks. Missing or
unreadable TLS files, and a key that is not its certificate's, are a ``ConfigError`` at
construction, before anything connects (``agent.device.tls_identity``).

The link speaks MQTT 5 (as the controller does), with a clean start and no session kept
after a disconnect, as MQTT 3.1.1's clean session did: a broker's reason codes then say
why it refused or ended a connection. Every failed connection attempt is logged with its
cause (a refused TCP connection, a TLS failure, a refused CONNACK, a connection closed
before it was accepted), rate-limited while the cause repeats, and a takeover of the
device's client id by another client is logged plainly at ERROR and followed by a
back-off (``agent.telemetry.link_health``). ``broker_status`` is what ``GET
/v2/health/agent`` serves.

Callbacks run on paho's network thread; ``on_announce`` must be thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

import agent
from agent.contracts import ANNOUNCE_SCHEMA, announce_topic, device_topic, status_payload
from agent.device.config import AgentConfig
from agent.telemetry.link_health import (
    LinkHealth,
    Say,
    closed_before_accepting,
    describe_failure,
)
from agent.telemetry.outbox import Outbox

logger = logging.getLogger(__name__)

StatusProvider = Callable[[], Mapping[str, Mapping[str, Any]]]
# How often a sender waiting for a PUBACK (or a connection) looks at whether to stop.
_POLL_S = 0.5
# PUBACKs remembered for the sender (it looks after each one arrives).
_RECENT_ACKS = 1024


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class _LinkClient(mqtt.Client):
    """paho's client, keeping why a connection failed or ended: the exception of the last
    connection attempt (``reconnect`` raises it; paho's loop swallows it and calls
    ``on_connect_fail`` without it), the last error reading the socket (paho only logs
    it), and whether the broker closed the socket (a read of no bytes).

    ``_sock_recv`` is a paho 2.x internal (the dependency is pinned below 3);
    tests/agent/telemetry/test_link_failures.py runs it against real sockets.
    """

    attempt_error: BaseException | None = None
    socket_error: OSError | None = None
    peer_closed = False

    def reconnect(self) -> MQTTErrorCode:
        self.attempt_error, self.socket_error, self.peer_closed = None, None, False
        try:
            return super().reconnect()
        except (OSError, ValueError) as exc:
            self.attempt_error = exc
            raise

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            data = super()._sock_recv(bufsize)
        except BlockingIOError:
            raise
        except OSError as exc:
            self.socket_error = exc
            raise
        if not data:
            self.peer_closed = True
        return data


class MqttLink:
    """Connects to the fleet's broker, follows announcements and keeps status current."""

    def __init__(
        self,
        config: AgentConfig,
        on_announce: Callable[[int | None], None],
        models_status: StatusProvider,
        outbox: Outbox | None = None,
    ) -> None:
        self._config = config
        self._on_announce = on_announce
        self._models_status = models_status
        self._outbox = outbox
        self._announce_topic = announce_topic(config.fleet)
        self._status_topic = device_topic(config.fleet, config.device_id, "status")
        self._telemetry_topic = device_topic(config.fleet, config.device_id, "telemetry")
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._sender: threading.Thread | None = None
        # PUBACKs as they arrive: (serial, message id). paho's MQTTMessageInfo cannot say
        # that a message published while disconnected (rc NO_CONN) was delivered later.
        self._acks = threading.Condition()
        self._ack_serial = 0
        self._recent_acks: deque[tuple[int, int]] = deque(maxlen=_RECENT_ACKS)
        client_id = f"edge-agent-{config.device_id}"
        self._health = LinkHealth(
            f"{config.mqtt.host}:{config.mqtt.port}",
            client_id,
            first_backoff_s=config.mqtt.reconnect_max_s,
        )
        # CONNECT sent, no CONNACK yet: a close now is a failed attempt, not a loss.
        self._attempting = False
        client = _LinkClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if config.mqtt.username:
            client.username_pw_set(config.mqtt.username, config.mqtt.password or None)
        if config.mqtt.tls:
            # Here, not at the top: cryptography is for devices whose broker speaks TLS.
            from agent.device.tls_identity import tls_context

            client.tls_set_context(tls_context(config, os.environ))
        client.reconnect_delay_set(**self._reconnect_delays())
        client.on_pre_connect = self._handle_pre_connect
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._client = client

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def broker_status(self) -> dict[str, Any]:
        """The broker connection now: address, client id, connected (since when), failed
        attempts since the last connection and the last one's cause, the last loss, and
        takeovers of the client id (``GET /v2/health/agent`` serves it)."""
        return self._health.status(connected=self._connected.is_set())

    def _reconnect_delays(self) -> dict[str, int]:
        mqtt_cfg = self._config.mqtt
        return {
            "min_delay": max(1, int(mqtt_cfg.reconnect_min_s)),
            "max_delay": max(1, int(mqtt_cfg.reconnect_max_s)),
        }

    @property
    def is_running(self) -> bool:
        """Whether the link's threads still run (after ``start``, before ``stop``): paho's
        network thread (it reconnects; an exception in a callback ends it) and the outbox
        sender. Either ended, the agent is deaf or mute to its fleet for good."""
        # paho keeps its network thread in ``_thread`` and has no public accessor.
        network = self._client._thread
        if network is None or not network.is_alive():
            return False
        return self._sender is None or self._sender.is_alive()

    def start(self) -> None:
        """Connect in the background; paho reconnects on its own after any loss."""
        mqtt_cfg = self._config.mqtt
        self._set_will()
        # A clean start, and no session expiry: nothing kept after a disconnect.
        self._client.connect_async(
            mqtt_cfg.host, mqtt_cfg.port, keepalive=mqtt_cfg.keepalive_s, clean_start=True
        )
        self._client.loop_start()
        if self._outbox is not None:
            self._sender = threading.Thread(
                target=self._drain_outbox, name="outbox-sender", daemon=True
            )
            self._sender.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the sender, say offline (retained), disconnect and stop the network thread."""
        self._stopping.set()
        if self._sender is not None:
            if self._outbox is not None:
                self._outbox.wake()
            with self._acks:
                self._acks.notify_all()
            self._sender.join(timeout=timeout_s + _POLL_S)
        if self._connected.is_set():
            info = self._client.publish(
                self._status_topic, self._status(online=False, models=True), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    def publish_status(self) -> None:
        """Publish the retained status with the versions served now (no-op while offline)."""
        self._set_will()
        if not self._connected.is_set():
            return
        self._client.publish(self._status_topic, self._status(online=True), qos=1, retain=True)

    def publish_heartbeat(self, payload: bytes) -> bool:
        """Publish a heartbeat if connected; False when it was skipped."""
        if not self._connected.is_set():
            return False
        info = self._client.publish(
            self._telemetry_topic, payload, qos=self._config.telemetry.heartbeat_qos
        )
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _set_will(self) -> None:
        # The will goes out with the next CONNECT: keep it naming the versions served, so
        # "offline" still says what the device runs.
        self._client.will_set(
            self._status_topic, self._status(online=False, models=True), qos=1, retain=True
        )

    def _status(self, online: bool, models: bool | None = None) -> bytes:
        with_models = online if models is None else models
        return status_payload(
            device=self._config.device_id,
            fleet=self._config.fleet,
            online=online,
            models=self._models_status() if with_models else {},
            agent_version=agent.__version__,
            at=_now(),
        )

    # paho callbacks (network thread) ------------------------------------------

    def _handle_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._attempting = True

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """The attempt failed before CONNECT went out (TCP, DNS or the TLS handshake)."""
        self._attempting = False
        exc = self._client.attempt_error
        cause = (
            describe_failure(exc, self._health.broker, self._config.mqtt.tls)
            if exc is not None
            else "the connection failed (no cause known)"
        )
        _say(self._health.attempt_failed(cause))

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._attempting = False
        if reason.is_failure:
            _say(self._health.attempt_failed(f"the broker refused the connection: {reason}"))
            return
        client.reconnect_delay_set(**self._reconnect_delays())  # after a takeover's back-off
        _say(self._health.connected())
        self._connected.set()
        client.subscribe(self._announce_topic, qos=1)
        self.publish_status()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        attempting, self._attempting = self._attempting, False
        if self._stopping.is_set():
            logger.info("disconnected from the broker (stopping)")
            return
        link = self._client
        if not was_connected:
            if attempting:  # CONNECT went out; the connection ended before a CONNACK
                error = link.socket_error
                cause = (
                    describe_failure(error, self._health.broker, self._config.mqtt.tls)
                    if error is not None
                    else closed_before_accepting(self._config.mqtt.tls)
                )
                _say(self._health.attempt_failed(cause))
            return
        from_broker = bool(getattr(flags, "is_disconnect_packet_from_server", False))
        code = getattr(reason, "value", None) if from_broker else None
        error = link.socket_error
        if isinstance(error, ssl.SSLError):  # e.g. a certificate revoked mid-connection
            text = describe_failure(error, self._health.broker, self._config.mqtt.tls)
        elif error is not None:
            text = error.strerror or str(error)
        else:
            text = str(reason)
        line, delay_s = self._health.ended(
            text, reason_code=code, closed_by_broker=not from_broker and link.peer_closed
        )
        _say(line)
        if delay_s is not None:
            # paho waits min_delay before its next attempt (doubling up to max_delay if
            # that fails too); a successful connection restores the configured delays.
            whole_s = max(1, round(delay_s))
            client.reconnect_delay_set(min_delay=whole_s, max_delay=whole_s)

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        with self._acks:
            self._ack_serial += 1
            self._recent_acks.append((self._ack_serial, mid))
            self._acks.notify_all()

    # the outbox sender (its own thread) -----------------------------------------

    def _drain_outbox(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        while not self._stopping.is_set():
            outbox.persist_held()  # the disk may have room again
            if not self._connected.wait(timeout=_POLL_S):
                continue
            if not outbox.wait_for_events(timeout_s=_POLL_S):
                continue
            for item in outbox.peek(1):
                if self._deliver(item.seq, item.topic, item.payload):
                    outbox.remove([item.seq])

    def _deliver(self, seq: int, topic: str, payload: bytes) -> bool:
        """Publish one event (QoS 1) and wait for its PUBACK, however many reconnections
        that takes (paho sends it again after each); False if the link stops first."""
        with self._acks:
            since = self._ack_serial
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # paho did not keep it (NO_CONN: kept, sent once connected).
            logger.warning("event %d not queued by the MQTT client (%s)", seq, info.rc)
            self._stopping.wait(_POLL_S)
            return False
        patience_s = self._config.telemetry.event_ack_timeout_s
        said_late_at = time.monotonic() + patience_s
        with self._acks:
            while not self._stopping.is_set():
                if any(n > since and mid == info.mid for n, mid in self._recent_acks):
                    return True
                if time.monotonic() > said_late_at:
                    logger.info(
                        "event %d: no PUBACK after %.0f s; paho sends it again after "
                        "reconnecting, and the next waits for it",
                        seq,
                        patience_s,
                    )
                    said_late_at = float("inf")
                self._acks.wait(_POLL_S)
        return False

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        if message.topic != self._announce_topic:
            return
        try:
            doc = json.loads(message.payload)
            if not isinstance(doc, dict) or doc.get("schema") != ANNOUNCE_SCHEMA:
                raise ValueError(f"schema expected {ANNOUNCE_SCHEMA!r}")
            version = doc.get("timestamp_version")
            timestamp_version = version if isinstance(version, int) else None
        except ValueError as exc:
            logger.warning("ignoring malformed announcement on %s: %s", message.topic, exc)
            return
        logger.info(
            "announcement for fleet %s (timestamp v%s)", self._config.fleet, timestamp_version
        )
        self._on_announce(timestamp_version)


def _say(line: Say | None) -> None:
    if line is not None:
        logger.log(line.level, "%s", line.message)
