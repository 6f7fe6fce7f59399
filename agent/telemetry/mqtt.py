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

Callbacks run on paho's network thread; ``on_announce`` must be thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

import agent
from agent.contracts import ANNOUNCE_SCHEMA, announce_topic, device_topic, status_payload
from agent.device.config import AgentConfig
from agent.telemetry.outbox import Outbox

logger = logging.getLogger(__name__)

StatusProvider = Callable[[], Mapping[str, Mapping[str, Any]]]
# How often a sender waiting for a PUBACK (or a connection) looks at whether to stop.
_POLL_S = 0.5
# PUBACKs remembered for the sender (it looks after each one arrives).
_RECENT_ACKS = 1024


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-{config.device_id}",
            clean_session=True,
        )
        if config.mqtt.username:
            client.username_pw_set(config.mqtt.username, config.mqtt.password or None)
        if config.mqtt.tls:
            # Here, not at the top: cryptography is for devices whose broker speaks TLS.
            from agent.device.tls_identity import tls_context

            client.tls_set_context(tls_context(config, os.environ))
        client.reconnect_delay_set(
            min_delay=max(1, int(config.mqtt.reconnect_min_s)),
            max_delay=max(1, int(config.mqtt.reconnect_max_s)),
        )
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._client = client

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

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
        self._client.connect_async(mqtt_cfg.host, mqtt_cfg.port, keepalive=mqtt_cfg.keepalive_s)
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

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            logger.warning(
                "broker %s:%d refused the connection: %s",
                self._config.mqtt.host,
                self._config.mqtt.port,
                reason,
            )
            return
        logger.info("connected to broker %s:%d", self._config.mqtt.host, self._config.mqtt.port)
        self._connected.set()
        client.subscribe(self._announce_topic, qos=1)
        self.publish_status()

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._stopping.is_set():
            logger.info("disconnected from the broker (stopping)")
        elif self._connected.is_set():
            logger.warning("lost the broker connection (%s); reconnecting", reason)
        self._connected.clear()

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
