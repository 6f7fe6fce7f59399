"""The agent's MQTT link: fleet announcements in, retained status out.

A thin adapter over paho-mqtt. The announcement is a hint only (the agent verifies
everything through TUF), so a malformed one is logged and ignored, and a lost one is
caught by the poll. The retained status message says ``online: true`` with the versions
served; the broker publishes the last will (``online: false``) when the agent vanishes.

Callbacks run on paho's network thread; ``on_announce`` must be thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

import agent
from agent.config import AgentConfig
from agent.contracts import ANNOUNCE_SCHEMA, announce_topic, device_topic, status_payload

logger = logging.getLogger(__name__)

StatusProvider = Callable[[], Mapping[str, Mapping[str, Any]]]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class MqttLink:
    """Connects to the fleet's broker, follows announcements and keeps status current."""

    def __init__(
        self,
        config: AgentConfig,
        on_announce: Callable[[int | None], None],
        models_status: StatusProvider,
    ) -> None:
        self._config = config
        self._on_announce = on_announce
        self._models_status = models_status
        self._announce_topic = announce_topic(config.fleet)
        self._status_topic = device_topic(config.fleet, config.device_id, "status")
        self._connected = threading.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-{config.device_id}",
            clean_session=True,
        )
        if config.mqtt.username:
            client.username_pw_set(config.mqtt.username, config.mqtt.password or None)
        client.will_set(self._status_topic, self._status(online=False), qos=1, retain=True)
        client.reconnect_delay_set(
            min_delay=max(1, int(config.mqtt.reconnect_min_s)),
            max_delay=max(1, int(config.mqtt.reconnect_max_s)),
        )
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background; paho reconnects on its own after any loss."""
        mqtt_cfg = self._config.mqtt
        self._client.connect_async(mqtt_cfg.host, mqtt_cfg.port, keepalive=mqtt_cfg.keepalive_s)
        self._client.loop_start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Say offline (retained), disconnect and stop the network thread."""
        if self._connected.is_set():
            info = self._client.publish(
                self._status_topic, self._status(online=False), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=timeout_s)
        self._client.disconnect()
        self._client.loop_stop()

    def publish_status(self) -> None:
        """Publish the retained status with the versions served now (no-op while offline)."""
        if not self._connected.is_set():
            return
        self._client.publish(self._status_topic, self._status(online=True), qos=1, retain=True)

    def _status(self, online: bool) -> bytes:
        return status_payload(
            device=self._config.device_id,
            fleet=self._config.fleet,
            online=online,
            models=self._models_status() if online else {},
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
        if self._connected.is_set():
            logger.warning("lost the broker connection (%s); reconnecting", reason)
        self._connected.clear()

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
