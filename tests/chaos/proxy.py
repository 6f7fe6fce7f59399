"""Fault-injecting TCP proxies on loopback, between the agents and the repository and broker.

One asyncio loop on its own thread (``ProxyHub``) runs every proxy. A ``FaultProxy``
listens on 127.0.0.1 and forwards each connection to its upstream port (which may change:
a restarted `edgectl serve` listens elsewhere). While the shared ``Switch`` is on, it
injects faults drawn from its own ``random.Random`` seeded with the run's seed and its
name, so the n-th decision of a proxy is the same for the same seed.

``http`` proxies work request by request, at the byte level (the request head is read up
to its blank line, the upstream answer up to its Content-Length, on a fresh upstream
connection per request): with probability ``fault_rate`` a request gets one of

- ``http.reset``: RST (SO_LINGER 0), before the answer or part-way through it;
- ``http.truncate``: part of the answer, then FIN;
- ``http.garbage``: random bytes that are not HTTP, then FIN;
- ``http.stall``: part of the answer, a pause shorter than the read timeout, the rest;
- ``http.5xx``: a 500, 502, 503 or 504 made here, upstream never asked;
- ``http.corrupt_metadata`` / ``http.corrupt_target``: a 200 whose body (a file under
  ``/metadata/`` or ``/targets/``) is altered: a flipped byte, truncated JSON, a changed
  version number or junk JSON, with a Content-Length that matches, so only the
  verification can notice;
- ``http.oversize``: a 200 body with bytes appended (and a matching Content-Length).

``mqtt`` proxies pump bytes both ways; on each connection, after a random delay, one of
``mqtt.reset`` (RST), ``mqtt.truncate`` (the next chunk cut short, then FIN),
``mqtt.garbage`` (bytes led by 0x00, a reserved packet type in every MQTT version, sent
to one side, then the connection closed) or ``mqtt.stall`` (nothing forwarded either way
for less than the keepalive; then again later on the same connection).

A fault is counted (``FaultLog``) only when it was applied. An upstream that is down
(serve killed, broker restarting) closes the client's connection: the real outage, not a
fault of the proxy's, and not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.chaos import http_bytes as http

T = TypeVar("T")

HTTP_KINDS = (
    "http.reset",
    "http.truncate",
    "http.garbage",
    "http.stall",
    "http.5xx",
    "http.corrupt",  # → http.corrupt_metadata or http.corrupt_target by path
    "http.oversize",
)
HTTP_WEIGHTS = (14, 14, 8, 14, 16, 24, 10)
MQTT_KINDS = ("mqtt.reset", "mqtt.truncate", "mqtt.garbage", "mqtt.stall")
MQTT_WEIGHTS = (30, 25, 20, 25)
_UPSTREAM_TIMEOUT_S = 30.0


class FaultLog:
    """Every fault applied: counted by kind, and one line each in a file for the report."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._started = clock()
        self._file = path.open("a", buffering=1)
        self.counts: Counter[str] = Counter()

    def record(self, kind: str, where: str, detail: str = "") -> None:
        with self._lock:
            self.counts[kind] += 1
            self._file.write(f"{self._clock() - self._started:8.2f} {kind} {where} {detail}\n")

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Switch:
    """Faults on or off, for every proxy at once (thread-safe)."""

    def __init__(self) -> None:
        self._on = threading.Event()

    @property
    def on(self) -> bool:
        return self._on.is_set()

    def set(self, on: bool) -> None:
        if on:
            self._on.set()
        else:
            self._on.clear()


@dataclass(frozen=True)
class ProxySettings:
    # Requests that get a fault while the switch is on.
    http_fault_rate: float = 0.35
    # Stalls stay below the agent's read timeout (HTTP) or keepalive (MQTT).
    http_stall_max_s: float = 3.0
    mqtt_stall_max_s: float = 3.5
    # Seconds a healthy MQTT connection lives before its next fault (min, max).
    mqtt_fault_after_s: tuple[float, float] = (0.5, 6.0)
    # Only this kind (a name of HTTP_KINDS or MQTT_KINDS), to test one fault alone.
    only: str | None = None


class ProxyHub:
    """The event loop the proxies run on, in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="chaos-proxies")
        self._thread.daemon = True
        self._thread.start()
        self._proxies: list[FaultProxy] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def add(self, proxy: FaultProxy) -> FaultProxy:
        self.run(proxy.start())
        self._proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self._proxies:
            with contextlib.suppress(Exception):
                self.run(proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class FaultProxy:
    """One listening port on 127.0.0.1 forwarding to ``upstream_port``, with faults."""

    def __init__(
        self,
        name: str,
        protocol: str,
        upstream_port: int,
        *,
        seed: int,
        log: FaultLog,
        switch: Switch,
        settings: ProxySettings | None = None,
    ) -> None:
        if protocol not in ("http", "mqtt"):
            raise ValueError(f"protocol expected http or mqtt, got {protocol!r}")
        self.name = name
        self.protocol = protocol
        self.upstream_port = upstream_port
        self.port = 0
        self._rng = random.Random(f"{seed}:{name}")
        self._log = log
        self._switch = switch
        self._settings = settings or ProxySettings()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        handler = self._http_connection if self.protocol == "http" else self._mqtt_connection
        self._server = await asyncio.start_server(_tracked(handler, self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()

    # ------------------------------------------------------------------ HTTP

    async def _http_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                head = await http.read_head(reader)
                if head is None:
                    return
                request = head + await reader.readexactly(http.content_length(head) or 0)
                decision = self._http_decision()
                if not await self._answer(request, decision, writer):
                    return
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            _close(writer)

    def _http_decision(self) -> http.HttpDecision | None:
        """Drawn whole per request while faults are on, so the sequence of decisions
        depends on the seed only."""
        if not self._switch.on:
            return None
        rng = self._rng
        roll, kind = rng.random(), rng.choices(HTTP_KINDS, HTTP_WEIGHTS)[0]
        kind = self._settings.only or kind
        decision = http.HttpDecision(
            kind=kind,
            fraction=rng.random(),
            early=rng.random() < 0.5,
            stall_s=rng.uniform(0.2, self._settings.http_stall_max_s),
            status=rng.choice((500, 502, 503, 504)),
            variant=rng.choice(("flip", "truncate_json", "version", "junk")),
            extra=rng.choice((1, 64, 4096, 200_000)),
            garbage=rng.randbytes(rng.randint(8, 512)),
        )
        return decision if roll < self._settings.http_fault_rate else None

    async def _answer(
        self, request: bytes, d: http.HttpDecision | None, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request (faulty or not); False when the connection must end."""
        path = http.request_path(request)
        where = f"{self.name} {path}"
        # A fault is recorded before the client can see it.
        if d is not None and d.kind == "http.5xx":
            self._log.record("http.5xx", where, str(d.status))
            writer.write(http.status_response(d.status))
            await writer.drain()
            return True
        if d is not None and d.kind == "http.garbage":
            self._log.record("http.garbage", where, f"{len(d.garbage) + 1} bytes")
            writer.write(b"\x00" + d.garbage)
            await writer.drain()
            return False
        if d is not None and d.kind == "http.reset" and d.early:
            _reset(writer)
            self._log.record("http.reset", where, "before the answer")
            return False
        answer = await self._upstream(request)
        if answer is None:
            return False
        head, body = answer
        data = head + body
        if d is not None and d.kind in ("http.corrupt", "http.oversize"):
            altered = http.alter(path, head, body, d)
            if altered is not None:
                kind, data, detail = altered
                self._log.record(kind, where, detail)
        elif d is not None and d.kind in ("http.truncate", "http.reset", "http.stall"):
            # Truncation keeps at least one byte and drops at least one.
            cut = min(len(data) - 1, int(d.fraction * len(data)))
            cut = max(cut, 1) if d.kind == "http.truncate" else max(cut, 0)
            writer.write(data[:cut])
            if d.kind == "http.truncate":
                self._log.record("http.truncate", where, f"{cut} of {len(data)} bytes")
                await writer.drain()
                writer.close()
                return False
            await writer.drain()
            if d.kind == "http.reset":
                self._log.record("http.reset", where, f"after {cut} of {len(data)} bytes")
                _reset(writer)
                return False
            await asyncio.sleep(d.stall_s)
            self._log.record("http.stall", where, f"{d.stall_s:.1f}s after {cut} bytes")
            data = data[cut:]
        writer.write(data)
        await writer.drain()
        return not http.closes(head)

    async def _upstream(self, request: bytes) -> tuple[bytes, bytes] | None:
        """The upstream's answer to ``request`` on a fresh connection, or None when the
        upstream is down or failed."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 5.0
            )
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(http.read_head(reader), _UPSTREAM_TIMEOUT_S)
            if head is None:
                return None
            length = http.content_length(head)
            if length is None:
                body = await asyncio.wait_for(reader.read(), _UPSTREAM_TIMEOUT_S)
            else:
                body = await asyncio.wait_for(reader.readexactly(length), _UPSTREAM_TIMEOUT_S)
            return head, body
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            return None
        finally:
            _close(writer)

    # ------------------------------------------------------------------ MQTT

    async def _mqtt_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 5.0
            )
        except (OSError, TimeoutError):
            _close(writer)
            return
        pipe = _Pipe(writer, up_writer)
        tasks = [
            asyncio.create_task(self._pump(reader, up_writer, pipe, "to broker")),
            asyncio.create_task(self._pump(up_reader, writer, pipe, "to agent")),
            asyncio.create_task(self._mqtt_faults(pipe)),
        ]
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            _close(writer)
            _close(up_writer)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pipe: _Pipe,
        direction: str,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await source.read(65536)
                if not data:
                    return
                await pipe.flowing.wait()
                cut = pipe.take_cut()
                if cut is not None and self._switch.on:
                    kept = int(cut * len(data))
                    sink.write(data[:kept])
                    await sink.drain()
                    self._log.record(
                        "mqtt.truncate", self.name, f"{direction}: {kept} of {len(data)} bytes"
                    )
                    return
                sink.write(data)
                await sink.drain()

    async def _mqtt_faults(self, pipe: _Pipe) -> None:
        settings = self._settings
        while True:
            rng = self._rng
            after_s = rng.uniform(*settings.mqtt_fault_after_s)
            kind = settings.only or rng.choices(MQTT_KINDS, MQTT_WEIGHTS)[0]
            stall_s = rng.uniform(0.2, settings.mqtt_stall_max_s)
            fraction = rng.random()
            to_agent = rng.random() < 0.5
            garbage = rng.randbytes(rng.randint(4, 256))
            await asyncio.sleep(after_s)
            while not self._switch.on:
                await asyncio.sleep(0.2)
            if kind == "mqtt.stall":
                pipe.flowing.clear()
                await asyncio.sleep(stall_s)
                self._log.record(kind, self.name, f"{stall_s:.1f}s")
                pipe.flowing.set()
                continue
            if kind == "mqtt.reset":
                self._log.record(kind, self.name)
                _reset(pipe.agent)
                _close(pipe.broker)
                return
            if kind == "mqtt.garbage":
                target = pipe.agent if to_agent else pipe.broker
                side = "agent" if to_agent else "broker"
                self._log.record(kind, self.name, f"{len(garbage) + 1} bytes to the {side}")
                target.write(b"\x00" + garbage)
                await asyncio.sleep(1.0)
                _close(pipe.agent)
                _close(pipe.broker)
                return
            pipe.cut = fraction  # mqtt.truncate: the next chunk either way, counted there
            return


class _Pipe:
    def __init__(self, agent: asyncio.StreamWriter, broker: asyncio.StreamWriter) -> None:
        self.agent = agent
        self.broker = broker
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.cut: float | None = None

    def take_cut(self) -> float | None:
        cut, self.cut = self.cut, None
        return cut


def _tracked(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    proxy: FaultProxy,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        proxy._connections.add(task)
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            _close(writer)
        finally:
            proxy._connections.discard(task)

    return run


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN (SO_LINGER on, zero seconds)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
