"""MQTT announcements: a retained hint per fleet that new metadata exists.

A thin adapter over paho-mqtt 2: ``connect_async`` + ``loop_start`` so a broker that is
down at start or goes away later is retried in the background (1–30 s backoff) while the
HTTP side keeps serving.

Invariants:
- ``announce`` publishes only while connected and reports whether it did, so the
  caller retries on its next tick instead of queueing stale hints inside paho.
- Every (re)connection raises the ``needs_announce`` flag: retained messages may have
  been lost with a broker restart, so the current state is published again.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import announce_payload, announce_topic

logger = logging.getLogger(__name__)


class Announcer:
    """Publishes retained QoS 1 announcements on ``announce_topic(fleet)``."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        keepalive_s: int = 30,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: connect over TLS with this context (``controller.serve.mqtt_tls``)."""
        self._host, self._port, self._keepalive_s = host, port, keepalive_s
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._needs_announce = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if tls is not None:
            self._client.tls_set_context(tls)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting in the background; never raises for an unreachable broker."""
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            logger.warning("MQTT broker %s:%d refused us: %s", self._host, self._port, reason)
            return
        logger.info("connected to MQTT broker %s:%d", self._host, self._port)
        self._connected.set()
        self._needs_announce.set()

    def _on_connect_fail(self, _c: Any, _u: Any) -> None:
        logger.warning(
            "MQTT broker %s:%d unreachable; retrying (HTTP keeps serving)", self._host, self._port
        )

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if self._stopping.is_set():
            logger.info("disconnected from MQTT broker %s:%d (stopping)", self._host, self._port)
        else:
            logger.warning(
                "lost MQTT broker %s:%d (%s); reconnecting", self._host, self._port, reason
            )

    def take_needs_announce(self) -> bool:
        """True once after every (re)connection."""
        if self._needs_announce.is_set():
            self._needs_announce.clear()
            return True
        return False

    def announce(self, fleets: list[str], timestamp_version: int, published_at: str) -> bool:
        """Publish each fleet's announcement; False when not connected or a publish failed."""
        if not self._connected.is_set():
            return False
        for fleet in fleets:
            info = self._client.publish(
                announce_topic(fleet),
                announce_payload(fleet, timestamp_version, published_at),
                qos=1,
                retain=True,
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                logger.warning("announce to fleet %s failed: %s", fleet, mqtt.error_string(info.rc))
                return False
        logger.info("announced timestamp version %d to %d fleet(s)", timestamp_version, len(fleets))
        return True
