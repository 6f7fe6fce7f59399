"""The repository over MQTT, the device's side: ``MqttFetcher`` fetches metadata and targets
as chunks, for devices that reach only the broker.

The wire format (topics, chunk requests and answers) is a contract the agent owns:
``agent.contracts.chunks``; ``controller.serve.mqtt_repo`` answers it.

- Flow control: the device keeps at most ``window`` requests in flight and asks for at
  most ``chunk_bytes`` per request; the controller caps both the chunk size and the work
  it queues, and answers 503 beyond it.
- The transfer obeys the same ``TransferGuard`` (overall deadline, minimum progress) as
  HTTP; the file size the controller states only paces the requests: lengths come from
  signed metadata, enforced by the caller.

``MqttFetcher`` is a ``ResumableFetcher``: URLs are ``mqtt://repository/<path>`` where
``<path>`` starts with ``metadata/`` or ``targets/``.
"""

from __future__ import annotations

import logging
import queue
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tuf.api.exceptions import DownloadError, DownloadHTTPError

from agent.contracts.chunks import (
    REPO_DIRS,
    Chunk,
    ChunkRequest,
    parse_chunk,
    request_topic,
    response_topic,
)
from agent.device.config import MqttConfig
from agent.update.fetcher import ResumableFetcher, TransferGuard, TransferLimits

logger = logging.getLogger(__name__)

URL_PREFIX: Final = "mqtt://repository/"
# Silent read timeouts in a row (each re-sends what is in flight) before giving up.
_SILENT_ROUNDS: Final = 3


def repo_path(url: str) -> str:
    """``mqtt://repository/metadata/1.root.json`` → ``metadata/1.root.json``."""
    if not url.startswith(URL_PREFIX):
        raise DownloadError(f"not an MQTT repository URL: {url!r}")
    path = url[len(URL_PREFIX) :]
    if path.split("/", 1)[0] not in REPO_DIRS:
        raise DownloadError(f"not a repository path: {path!r}")
    return path


class MqttFetcher(ResumableFetcher):
    """Fetches repository files as MQTT chunks through the fleet's broker.

    One paho client, connected on first use and kept; ``fetch_from`` blocks the calling
    thread (the update check's worker), paho's network thread delivers the answers.
    """

    def __init__(
        self,
        mqtt_config: MqttConfig,
        fleet: str,
        device: str,
        limits: TransferLimits,
        *,
        chunk_bytes: int = 64 * 1024,
        window: int = 4,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._config = mqtt_config
        self._tls = tls
        self._limits = limits
        self._chunk_bytes = chunk_bytes
        self._window = window
        self._request_topic = request_topic(fleet, device)
        self._response_topic = response_topic(fleet, device)
        self._client_id = f"edge-agent-{device}-repo"
        self._lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._ready = threading.Event()
        self._inboxes: dict[str, queue.Queue[Chunk]] = {}

    # ------------------------------------------------------------------ connection

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            self._ready.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _connected_client(self) -> mqtt.Client:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            client = self._client
        if not self._ready.wait(self._limits.connect_timeout_s):
            raise DownloadError(
                f"MQTT broker {self._config.host}:{self._config.port} did not accept us within "
                f"{self._limits.connect_timeout_s:g}s"
            )
        return client

    def _connect(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, clean_session=True
        )
        if self._config.username:
            client.username_pw_set(self._config.username, self._config.password or None)
        if self._tls is not None:  # the same TLS and client certificate as agent.telemetry.mqtt
            client.tls_set_context(self._tls)
        client.connect_timeout = self._limits.connect_timeout_s
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        try:
            client.connect(self._config.host, self._config.port, self._config.keepalive_s)
        except (OSError, ValueError) as exc:
            raise DownloadError(
                f"cannot reach MQTT broker {self._config.host}:{self._config.port}: {exc}"
            ) from exc
        client.loop_start()
        return client

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            logger.warning("MQTT broker refused the repository client: %s", reason)
            return
        client.subscribe(self._response_topic, qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, _codes: Any, _p: Any) -> None:
        self._ready.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._ready.clear()
        logger.info("repository MQTT client disconnected (%s)", reason)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            chunk = parse_chunk(bytes(message.payload))
        except ValueError as exc:
            logger.warning("ignoring a malformed repository answer: %s", exc)
            return
        inbox = self._inboxes.get(chunk.transfer)
        if inbox is not None:
            inbox.put(chunk)

    # ------------------------------------------------------------------ transfers

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        path = repo_path(url)
        client = self._connected_client()
        transfer = secrets.token_hex(8)
        inbox: queue.Queue[Chunk] = queue.Queue()
        self._inboxes[transfer] = inbox
        guard = TransferGuard(url, self._limits)
        try:
            first = self._first_chunk(client, transfer, path, offset, inbox, guard)
        except BaseException:
            self._inboxes.pop(transfer, None)
            raise
        return offset, self._body(client, transfer, path, first, inbox, guard)

    def _send(self, client: mqtt.Client, transfer: str, path: str, offset: int) -> None:
        request = ChunkRequest(transfer, path, offset, self._chunk_bytes)
        info = client.publish(self._request_topic, request.to_bytes(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise DownloadError(f"cannot publish a chunk request: {mqtt.error_string(info.rc)}")

    def _wait(self, inbox: queue.Queue[Chunk], guard: TransferGuard) -> Chunk | None:
        timeout = max(0.0, min(self._limits.read_timeout_s, guard.remaining_s()))
        try:
            return inbox.get(timeout=timeout)
        except queue.Empty:
            guard.observe(0)  # raises once past the deadline or below minimum progress
            return None

    def _first_chunk(
        self,
        client: mqtt.Client,
        transfer: str,
        path: str,
        offset: int,
        inbox: queue.Queue[Chunk],
        guard: TransferGuard,
    ) -> Chunk:
        silent = busy = 0
        self._send(client, transfer, path, offset)
        while True:
            chunk = self._wait(inbox, guard)
            if chunk is None:
                silent += 1
                if silent >= _SILENT_ROUNDS:
                    raise DownloadError(f"{path}: no answer over MQTT ({silent} read timeouts)")
                self._send(client, transfer, path, offset)
                continue
            if chunk.status == 503:
                guard.observe(0)
                time.sleep(min(0.05 * 2**busy, 1.0))
                busy += 1
                self._send(client, transfer, path, offset)
                continue
            if chunk.status == 404:
                raise DownloadHTTPError(f"{path}: not found (MQTT)", 404)
            if chunk.status != 200:
                raise DownloadHTTPError(f"{path}: {chunk.status} {chunk.error}", chunk.status)
            if chunk.offset == offset:
                return chunk

    def _body(
        self,
        client: mqtt.Client,
        transfer: str,
        path: str,
        first: Chunk,
        inbox: queue.Queue[Chunk],
        guard: TransferGuard,
    ) -> Iterator[bytes]:
        """Yield bytes in order, keeping up to ``window`` requests in flight."""
        try:
            total = first.total
            buffered: dict[int, bytes] = {first.offset: first.data}
            position = first.offset  # next byte to yield
            asked = first.offset + len(first.data)  # next offset to request
            in_flight: set[int] = set()
            silent = 0
            while True:
                while position in buffered:
                    data = buffered.pop(position)
                    if not data:  # an empty answer marks the end
                        return
                    position += len(data)
                    guard.observe(len(data))
                    yield data
                if position >= total:
                    return
                while len(in_flight) < self._window and asked < total:
                    self._send(client, transfer, path, asked)
                    in_flight.add(asked)
                    asked += self._chunk_bytes
                chunk = self._wait(inbox, guard)
                if chunk is None:
                    silent += 1
                    if silent >= _SILENT_ROUNDS:
                        raise DownloadError(f"{path}: MQTT answers stopped at byte {position}")
                    for missing in sorted(in_flight):
                        self._send(client, transfer, path, missing)
                    continue
                silent = 0
                if chunk.status == 503:
                    guard.observe(0)
                    time.sleep(0.05)
                    self._send(client, transfer, path, chunk.offset)
                    continue
                if chunk.status != 200:
                    raise DownloadError(f"{path}: MQTT answer {chunk.status} {chunk.error}")
                if chunk.offset not in in_flight:
                    continue  # a duplicate of an answer already taken
                in_flight.discard(chunk.offset)
                buffered[chunk.offset] = chunk.data
        finally:
            self._inboxes.pop(transfer, None)


def mqtt_url(base_url: str, url: str) -> str:
    """Map an HTTP repository URL under ``base_url`` to its MQTT twin (for ``auto``)."""
    if not url.startswith(base_url):
        raise DownloadError(f"{url!r} is not under the repository URL {base_url!r}")
    return URL_PREFIX + url[len(base_url) :]
