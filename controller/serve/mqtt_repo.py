"""The repository over MQTT: answers devices' chunk requests for metadata and targets.

The contract is the agent's (``agent.contracts.chunks``, ``docs/protocol.md``): a request on
``edgefleet/v1/fleets/{fleet}/devices/{device}/repo/request`` is answered on the same
device's ``.../repo/response``. Files are resolved exactly as the HTTP side resolves
them (``controller.serve.http.resolve_static``): only regular files below ``metadata/`` and
``targets/``; anything else is a 404.

Flow control, so that a fleet cannot bury the controller: at most ``MAX_CHUNK_BYTES``
per answer whatever was asked, at most ``max_queued`` requests waiting overall and
``max_per_device`` per device; beyond that the answer is 503 (the device asks again).
Answers are computed by ``workers`` threads, never on paho's network thread.

Nothing here is trusted by devices: TUF verifies every byte, like over HTTP.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts.chunks import (
    MAX_CHUNK_BYTES,
    REQUEST_FILTER,
    Chunk,
    ChunkRequest,
    parse_request,
    parse_request_topic,
    response_topic,
)
from controller.serve.http import resolve_static

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponderLimits:
    workers: int = 4
    max_queued: int = 256
    max_per_device: int = 16


def answer(repo_dir: Path, request: ChunkRequest) -> Chunk:
    """The answer to one chunk request (pure apart from reading the file)."""
    directory, _, tail = request.path.partition("/")
    path = resolve_static(repo_dir / directory, tail)
    if path is None:
        return Chunk(request.transfer, 404, request.offset, error="not found")
    size = min(request.size, MAX_CHUNK_BYTES)
    try:
        with open(path, "rb") as f:
            total = f.seek(0, 2)
            f.seek(min(request.offset, total))
            data = f.read(size)
    except OSError as exc:
        logger.error("cannot read %s for an MQTT answer: %s", path, exc)
        return Chunk(request.transfer, 404, request.offset, error="unreadable")
    return Chunk(request.transfer, 200, request.offset, total, data)


class RepoResponder:
    """Subscribes to every device's request topic and answers from ``repo_dir``."""

    def __init__(
        self,
        repo_dir: Path,
        host: str,
        port: int,
        client_id: str,
        keepalive_s: int = 30,
        limits: ResponderLimits | None = None,
        tls: ssl.SSLContext | None = None,
        shared_group: str = "",
    ) -> None:
        self._repo_dir = repo_dir
        # Several `edgectl serve` on one broker: a shared subscription, so each request is
        # answered by one of them, not by all.
        self._filter = f"$share/{shared_group}/{REQUEST_FILTER}" if shared_group else REQUEST_FILTER
        self._host, self._port, self._keepalive_s = host, port, keepalive_s
        self._limits = limits or ResponderLimits()
        self._queue: queue.Queue[tuple[str, ChunkRequest] | None] = queue.Queue(
            self._limits.max_queued
        )
        self._per_device: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self.answered = 0
        # Set once the broker acknowledged the subscription: requests reach us from then on.
        self.subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if tls is not None:  # controller.serve.mqtt_tls
            self._client.tls_set_context(tls)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self.subscribed.set()

    def start(self) -> None:
        """Start connecting in the background and the worker threads; never raises for an
        unreachable broker (paho retries)."""
        for i in range(self._limits.workers):
            worker = threading.Thread(target=self._work, name=f"mqtt-repo-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        for _ in self._workers:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break
        for worker in self._workers:
            worker.join(timeout=2)

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            logger.warning("MQTT broker refused the repository responder: %s", reason)
            return
        client.subscribe(self._filter, qos=1)
        logger.info("answering repository requests on %s", self._filter)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            fleet, device = parse_request_topic(message.topic)
            request = parse_request(bytes(message.payload))
        except ValueError as exc:
            logger.debug("ignoring a bad repository request on %s: %s", message.topic, exc)
            return
        reply_to = response_topic(fleet, device)
        with self._count_lock:
            busy = self._per_device[reply_to] >= self._limits.max_per_device
            if not busy:
                try:
                    self._queue.put_nowait((reply_to, request))
                    self._per_device[reply_to] += 1
                except queue.Full:
                    busy = True
        if busy:
            self._publish(reply_to, Chunk(request.transfer, 503, request.offset, error="busy"))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            reply_to, request = item
            try:
                self._publish(reply_to, answer(self._repo_dir, request))
            finally:
                with self._count_lock:
                    self._per_device[reply_to] -= 1
                    if self._per_device[reply_to] <= 0:
                        del self._per_device[reply_to]

    def _publish(self, topic: str, chunk: Chunk) -> None:
        info = self._client.publish(topic, chunk.to_bytes(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            logger.warning("cannot answer on %s: %s", topic, mqtt.error_string(info.rc))
        else:
            self.answered += 1
