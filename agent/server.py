"""Local inference: the Open Inference Protocol v2 (REST) over a Unix socket.

The stack is deliberately lean for per-request latency: asyncio's servers, one
``asyncio.Protocol`` per connection, httptools (llhttp) as the HTTP/1.1 parser,
precomputed response heads, no framework. Endpoints: health, server and model metadata,
infer (JSON, binary tensor and system shared-memory extensions), shared-memory
registration, and ``/metrics``.

Where a request runs: parsing, ONNX Runtime and encoding run in a bounded thread pool,
so a slow model never stalls health checks; but the hop to a thread and back costs
~100-200 µs on a small device, more than a tiny model's whole run. So the server times
every run per model version and runs a version *inline* on the event loop once its
recent runs (parse + run + encode, an EWMA over at least ``_INLINE_SAMPLES``) take at
most ``inline_max_run_s`` and the request body is small. One run slower than four times
the bound sends the version back to the pool at once: the loop stalls at most one
such run.

Invariants:
- Responses on a connection leave in the order the requests came (HTTP/1.1 pipelining):
  a connection handles one request at a time and queues the rest.
- An infer request takes its reference to the live ``LoadedModel`` once, when it is
  dispatched, and finishes on it; a hot swap never fails a request.
- Bad input never gets a 5xx and never crashes the server: ``InvalidRequestError`` → 400,
  a peer outside the allow-list → 403, ``ModelNotFoundError`` → 404, a slow sender
  → 408, an oversized body → 413, an oversized head → 431, ``NotReadyError``, a full
  queue, a passed deadline or too many connections → 503 with Retry-After. Errors that
  leave the byte stream unparseable close the connection. Only an unexpected exception
  gives 500, with its traceback logged.
- At most ``max_concurrency`` requests run in the pool and at most ``max_queue`` wait
  for it; a request still waiting at its deadline never runs.
- The socket is created with its mode (and group) before it listens, so no client can
  connect through a wider mode, and ``stop`` removes the socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import grp
import json
import logging
import os
import pwd
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final

import httptools

import agent
from agent.errors import (
    ConfigError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.metrics import InferenceMetrics
from agent.oip import (
    EXTENSIONS,
    encode_infer_response,
    error_body,
    model_metadata,
    parse_infer_request,
)
from agent.runtime import LoadedModel, ModelRegistry
from agent.shm import SharedMemoryDenied, SharedMemoryRegistry
from agent.stats import Outcome, RequestStats

if TYPE_CHECKING:
    from agent.config import InferenceConfig

logger = logging.getLogger(__name__)

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_STATUS_LINES: Final = {s: f"HTTP/1.1 {s} {r}\r\n".encode() for s, r in _REASONS.items()}
_JSON: Final = b"application/json"
_BINARY: Final = b"application/octet-stream"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_HEAD_BYTES: Final = 64 * 1024  # request line and headers together
_MAX_QUEUED: Final = 32  # pipelined requests per connection before reading pauses
_UNIX_PATH_MAX: Final = 107
_JOIN_BELOW: Final = 64 * 1024  # smaller responses go out in one write
_INLINE_SAMPLES: Final = 8
_INLINE_MAX_BODY: Final = 64 * 1024
_RETRY_AFTER: Final = b"Retry-After: 1\r\n"
_LIVE_BODY: Final = b'{"live":true}'
_READY_BODY: Final = b'{"ready":true}'
_NOT_READY_BODY: Final = b'{"ready":false}'
_PEERCRED: Final = struct.Struct("3i")


class _Response:
    __slots__ = ("body", "close", "content_type", "extra", "status")

    def __init__(
        self,
        status: int,
        body: bytes | Sequence[bytes | memoryview],
        *,
        close: bool = False,
        extra: bytes = b"",
        content_type: bytes = _JSON,
    ) -> None:
        self.status = status
        self.body = body
        self.close = close
        self.extra = extra  # extra header lines, each ending in CRLF
        self.content_type = content_type


def _error(status: int, message: str, *, close: bool = False, extra: bytes = b"") -> _Response:
    return _Response(status, error_body(message), close=close, extra=extra)


class _Request:
    __slots__ = (
        "body",
        "header_length",
        "http_1_0",
        "keep_alive",
        "method",
        "peer_uid",
        "received",
        "url",
    )

    def __init__(
        self,
        method: bytes,
        url: bytes,
        body: bytes,
        keep_alive: bool,
        http_1_0: bool,
        header_length: int | None,
        peer_uid: int | None,
        received: float,
    ) -> None:
        self.method = method
        self.url = url
        self.body = body
        self.keep_alive = keep_alive
        self.http_1_0 = http_1_0
        self.header_length = header_length
        self.peer_uid = peer_uid  # None on TCP: no SO_PEERCRED there
        self.received = received  # loop time when the request was complete


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing an oversized request head."""


class _Phase(enum.Enum):
    IDLE = "idle"  # between requests
    HEAD = "head"  # reading a request line and headers
    BODY = "body"  # reading a body


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and writes responses in order."""

    def __init__(self, server: InferenceServer, *, unix: bool) -> None:
        self._server = server
        self._unix = unix
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Request | _Response] = deque()
        self._busy = False
        self._paused = False
        self._broken = False  # the byte stream can no longer be parsed: answer and close
        self._draining = False  # the server stops: close once the current request is done
        self._eof = False  # the client half-closed: close once every request is answered
        self._task: asyncio.Task[None] | None = None
        self.peer_uid: int | None = None
        self.phase = _Phase.IDLE
        self.since = 0.0  # loop time the phase (or the idle time) began
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._too_large = False
        self._expect_continue = False
        self._header_length: int | None = None
        self._bad_header: str | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        self.since = server._now()
        server._connections.add(self)
        server.metrics.connections.set(len(server._connections))
        if len(server._connections) > server.max_connections:
            message = f"too many connections (at most {server.max_connections})"
            self._fail(_error(503, message, close=True, extra=_RETRY_AFTER))
            return
        if self._unix:
            refusal = self._check_peer(transport)
            if refusal is not None:
                logger.warning("refused a connection: %s", refusal)
                self._fail(_error(403, refusal, close=True))

    def _check_peer(self, transport: asyncio.Transport) -> str | None:
        sock = transport.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, gid = _PEERCRED.unpack(raw)
        except (OSError, AttributeError):
            return "cannot read the peer's credentials" if self._server.has_allow_list else None
        self.peer_uid = uid
        return self._server._refusal(pid, uid, gid)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        server._connections.discard(self)
        server.metrics.connections.set(len(server._connections))
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it sent, then close (True keeps it open)."""
        self._eof = True
        if self._busy or self._queue:
            return True
        return None

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_error(400, "protocol upgrades are not supported", close=True))
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                message = f"request line and headers exceed {_MAX_HEAD_BYTES} bytes"
                self._fail(_error(431, message, close=True))
            else:
                self._fail(_error(400, f"malformed HTTP request: {exc}", close=True))

    # -- httptools callbacks (they must not raise, except to stop parsing)

    def on_message_begin(self) -> None:
        self._reset()
        self.phase, self.since = _Phase.HEAD, self._server._now()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        lower = name.lower()
        if lower == b"content-length":
            try:
                too_large = int(value) > self._server.max_body_bytes
            except ValueError:
                return  # llhttp rejects a bad Content-Length itself
            self._too_large = self._too_large or too_large
        elif lower == b"inference-header-content-length":
            try:
                self._header_length = int(value)
            except ValueError:
                self._bad_header = (
                    f"Inference-Header-Content-Length expected an integer, got {value!r}"
                )
        elif lower == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        self.phase, self.since = _Phase.BODY, self._server._now()
        # Only when nothing is queued: an interim response must not overtake a final one.
        if self._expect_continue and not self._too_large and not self._busy and not self._queue:
            assert self._transport is not None
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return  # read and drop, so the client can read the 413
        self._body_bytes += len(body)
        if self._body_bytes > self._server.max_body_bytes:
            self._too_large = True
            self._body.clear()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        now = self._server._now()
        self.phase, self.since = _Phase.IDLE, now
        if self._too_large:
            limit = self._server.max_body_bytes
            self._enqueue(
                _error(413, f"request body exceeds the limit of {limit} bytes", close=True)
            )
            self._broken = True
            return
        if self._bad_header is not None:
            self._enqueue(_error(400, self._bad_header))
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        request = _Request(
            self._parser.get_method(),
            self._url,
            body,
            self._parser.should_keep_alive(),
            self._parser.get_http_version() == "1.0",
            self._header_length,
            self.peer_uid,
            now,
        )
        self._enqueue(request)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLarge

    # -- timeouts (the server's sweeper calls this)

    def check_timeouts(self, now: float) -> None:
        server = self._server
        if self._broken or self._transport is None or self._transport.is_closing():
            return
        if self.phase is _Phase.HEAD and now - self.since > server.header_timeout_s:
            self._fail(
                _error(
                    408,
                    f"request head not received within {server.header_timeout_s:g} s",
                    close=True,
                )
            )
        elif self.phase is _Phase.BODY and now - self.since > server.body_timeout_s:
            self._fail(
                _error(
                    408, f"request body not received within {server.body_timeout_s:g} s", close=True
                )
            )
        elif (
            self.phase is _Phase.IDLE
            and not self._busy
            and not self._queue
            and now - self.since > server.idle_timeout_s
        ):
            self._transport.close()

    # -- ordered processing

    def _fail(self, response: _Response) -> None:
        self._broken = True
        self._enqueue(response)

    def _enqueue(self, item: _Request | _Response) -> None:
        self._queue.append(item)
        if len(self._queue) > _MAX_QUEUED and not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._drain()

    def _drain(self) -> None:
        transport = self._transport
        if transport is None:
            return
        while self._queue and not self._busy and not transport.is_closing():
            item = self._queue.popleft()
            if isinstance(item, _Response):
                self._write(item, keep_alive=False, http_1_0=False)
                continue
            outcome = self._server._dispatch(item)
            if isinstance(outcome, _Response):
                self._write(outcome, item.keep_alive, item.http_1_0)
                continue
            self._busy = True
            self._task = asyncio.get_running_loop().create_task(self._finish(item, outcome))
        if self._paused and len(self._queue) <= _MAX_QUEUED // 2 and not transport.is_closing():
            transport.resume_reading()
            self._paused = False
        if not self._busy:
            self.since = self._server._now()
        idle = not self._busy and not transport.is_closing()
        if idle and (self._draining or (self._eof and not self._queue)):
            transport.close()

    async def _finish(self, request: _Request, pending: Awaitable[_Response]) -> None:
        response = await pending
        self._busy = False
        self._task = None
        self._write(response, request.keep_alive, request.http_1_0)
        self._drain()

    def _write(self, response: _Response, keep_alive: bool, http_1_0: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        close = (
            response.close or not keep_alive or self._draining or (self._eof and not self._queue)
        )
        if close:
            connection = b"Connection: close\r\n"
        elif http_1_0:
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        body = response.body
        parts: Sequence[bytes | memoryview] = (body,) if isinstance(body, bytes) else body
        length = sum(len(p) for p in parts)
        head = b"".join(
            (
                _STATUS_LINES[response.status],
                b"Content-Type: ",
                response.content_type,
                b"\r\nContent-Length: ",
                str(length).encode(),
                b"\r\n",
                connection,
                response.extra,
                b"\r\n",
            )
        )
        if length < _JOIN_BELOW:
            transport.write(b"".join((head, *parts)))
        else:
            transport.write(head)
            for part in parts:
                transport.write(part)
        if close:
            self._queue.clear()
            transport.close()

    def shut_down(self) -> None:
        """Close once the request in progress (if any) has been answered."""
        self._draining = True
        self._drain()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _DeadlineExceeded(NotReadyError):
    """The request waited past its deadline for a slot; it did not run."""


class _Overloaded(NotReadyError):
    """Every slot is busy and the queue is full."""


class _Forbidden(InvalidRequestError):
    """The peer may not do this."""


class _MethodNotAllowed(InvalidRequestError):
    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(f"method {method} not allowed here; use {allowed}")
        self.allowed = allowed


class _RunTimes:
    """Recent run times of one model version (an EWMA), to decide where it runs."""

    __slots__ = ("ewma_s", "samples", "version")

    def __init__(self, version: str) -> None:
        self.version = version
        self.samples = 0
        self.ewma_s = 0.0

    def add(self, seconds: float, slow_s: float) -> None:
        if self.samples == 0 or seconds > slow_s:
            self.ewma_s = seconds  # one slow run demotes at once
        else:
            self.ewma_s = 0.8 * self.ewma_s + 0.2 * seconds
        self.samples += 1


def _execute(
    model: LoadedModel,
    request: _Request,
    shm: SharedMemoryRegistry | None,
    deadline: float | None,
) -> tuple[_Response, float]:
    """Parse, run and encode one infer request; return the response and its cost (s).

    Runs in a worker thread, or inline on the loop for fast models. Raises
    _DeadlineExceeded when the request waited past ``deadline`` (monotonic time).
    """
    started = time.perf_counter()
    if deadline is not None and time.monotonic() > deadline:
        raise _DeadlineExceeded("the request waited past its deadline for a free slot")
    shared = shm if request.peer_uid is not None else None
    parsed = parse_infer_request(
        request.body, model.manifest, header_length=request.header_length, shm=shared
    )
    outputs = model.infer(parsed.inputs, parsed.output_names)
    parts, header_length = encode_infer_response(model.name, model.version, outputs, parsed, shared)
    if header_length is None:
        response = _Response(200, parts)
    else:
        response = _Response(
            200,
            parts,
            content_type=_BINARY,
            extra=b"Inference-Header-Content-Length: %d\r\n" % header_length,
        )
    return response, time.perf_counter() - started


class InferenceServer:
    """OIP v2 over a Unix socket (and optionally loopback TCP), serving the live models of
    a ``ModelRegistry``.

    ``is_ready`` says whether the agent as a whole may serve (default: at least one
    model is live); when it returns False, health/ready answers 503 and infer requests
    get 503. Every infer request is recorded in ``stats`` (when given) under the version
    that served it, and in ``metrics``. ``from_config`` builds one from ``[inference]``.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        socket_path: Path,
        *,
        socket_mode: int = 0o660,
        socket_group: str = "",
        max_body_bytes: int = 64 * 1024 * 1024,
        max_concurrency: int = 4,
        max_queue: int = 32,
        max_connections: int = 256,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        request_deadline_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        inline_max_run_s: float = 0.001,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        tcp_port: int = 0,
        tcp_host: str = "127.0.0.1",
        shared_memory: bool = True,
        is_ready: Callable[[], bool] | None = None,
        stats: RequestStats | None = None,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        positive = {
            "max_body_bytes": max_body_bytes,
            "max_concurrency": max_concurrency,
            "max_connections": max_connections,
            "header_timeout_s": header_timeout_s,
            "body_timeout_s": body_timeout_s,
            "request_deadline_s": request_deadline_s,
            "idle_timeout_s": idle_timeout_s,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} expected > 0, got {value}")
        if max_queue < 0 or inline_max_run_s < 0:
            raise ConfigError(
                f"max_queue and inline_max_run_s expected >= 0, got {max_queue}, {inline_max_run_s}"
            )
        self.registry = registry
        self.stats = stats
        self.metrics = metrics if metrics is not None else InferenceMetrics()
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.request_deadline_s = request_deadline_s
        self.idle_timeout_s = idle_timeout_s
        self.inline_max_run_s = inline_max_run_s
        self.allowed_uids = frozenset(allowed_uids)
        self.allowed_gids = frozenset(allowed_gids)
        self.tcp_port = tcp_port
        self.tcp_host = tcp_host
        self.shm = SharedMemoryRegistry() if shared_memory else None
        self._is_ready = is_ready or (lambda: len(registry) > 0)
        self._servers: list[asyncio.AbstractServer] = []
        self._executor: ThreadPoolExecutor | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_Connection] = set()
        self._admitted = 0  # requests running in the pool or waiting for it
        self._run_times: dict[str, _RunTimes] = {}
        self._stopping = False
        extensions = [e for e in EXTENSIONS if shared_memory or e != "system_shared_memory"]
        self._server_metadata = json.dumps(
            {"name": "edge-agent", "version": agent.__version__, "extensions": extensions}
        ).encode()

    @classmethod
    def from_config(
        cls,
        registry: ModelRegistry,
        config: InferenceConfig,
        *,
        is_ready: Callable[[], bool] | None = None,
        stats: RequestStats | None = None,
        metrics: InferenceMetrics | None = None,
    ) -> InferenceServer:
        """A server with every limit and listener taken from the ``[inference]`` section."""
        return cls(
            registry,
            config.socket_path,
            socket_mode=config.socket_mode,
            socket_group=config.socket_group,
            max_body_bytes=config.max_body_bytes,
            max_concurrency=config.max_concurrency,
            max_queue=config.max_queue,
            max_connections=config.max_connections,
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
            request_deadline_s=config.request_deadline_s,
            idle_timeout_s=config.idle_timeout_s,
            inline_max_run_s=config.inline_max_run_s,
            allowed_uids=_ids(config.allowed_users, "user"),
            allowed_gids=_ids(config.allowed_groups, "group"),
            tcp_port=config.tcp_port,
            tcp_host=config.tcp_host,
            shared_memory=config.shared_memory,
            is_ready=is_ready,
            stats=stats,
            metrics=metrics,
        )

    @property
    def has_allow_list(self) -> bool:
        return bool(self.allowed_uids or self.allowed_gids)

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- lifecycle

    async def start(self) -> None:
        """Listen on the socket: remove a stale socket file, bind, chmod/chown, listen;
        then on loopback TCP when ``tcp_port`` is set.

        Raises ConfigError when the path is too long, its directory is missing, it holds
        something other than a socket, another process is listening on it, the group
        does not exist or cannot be set, or the TCP port cannot be bound.
        """
        path = self.socket_path
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ConfigError(
                f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes (a Unix socket limit)"
            )
        if not path.parent.is_dir():
            raise ConfigError(f"socket directory {path.parent} does not exist")
        gid = self._group_id()
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            # Before listen(): no connection sees a wider mode or another group.
            if gid is not None:
                os.chown(path, -1, gid)
            os.chmod(path, self.socket_mode)
        except OSError as exc:
            sock.close()
            path.unlink(missing_ok=True)
            raise ConfigError(f"cannot create socket {path}: {exc}") from None
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix="edge-agent-infer"
        )
        self._servers.append(
            await self._loop.create_unix_server(
                lambda: _Connection(self, unix=True), sock=sock, backlog=1024
            )
        )
        logger.info("serving OIP v2 on %s (mode %o)", path, self.socket_mode)
        if self.tcp_port:
            try:
                self._servers.append(
                    await self._loop.create_server(
                        lambda: _Connection(self, unix=False),
                        host=self.tcp_host,
                        port=self.tcp_port,
                        backlog=1024,
                    )
                )
            except OSError as exc:
                await self.stop(grace_s=0)
                raise ConfigError(
                    f"cannot listen on {self.tcp_host}:{self.tcp_port}: {exc}"
                ) from None
            logger.info("serving OIP v2 on http://%s:%d", self.tcp_host, self.tcp_port)
        self._sweeper = self._loop.create_task(self._sweep(), name="inference-timeouts")

    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP (host, port), or None when TCP is off."""
        for server in self._servers:
            assert isinstance(server, asyncio.Server)
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    host, port = sock.getsockname()[:2]
                    return str(host), int(port)
        return None

    def _group_id(self) -> int | None:
        if not self.socket_group:
            return None
        if self.socket_group.isdigit():
            return int(self.socket_group)
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(
                f"socket group {self.socket_group!r} does not exist; create it "
                f"(groupadd --system {self.socket_group}) or change [inference] socket_group"
            ) from None

    def _remove_stale_socket(self) -> None:
        path = self.socket_path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            logger.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise ConfigError(f"another process is already serving on {path}")
        finally:
            probe.close()

    async def _sweep(self) -> None:
        """Enforce header, body and idle timeouts (resolution: a quarter of the shortest)."""
        shortest = min(self.header_timeout_s, self.body_timeout_s, self.idle_timeout_s)
        period = min(max(shortest / 4, 0.01), 1.0)
        while True:
            await asyncio.sleep(period)
            now = self._now()
            for connection in list(self._connections):
                connection.check_timeouts(now)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, answer the requests in progress (up to ``grace_s``), close
        every connection, unmap shared memory and remove the socket file."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            connection.shut_down()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self.shm is not None:
            self.shm.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        logger.info("stopped serving on %s", self.socket_path)

    # -- peers

    def _refusal(self, pid: int, uid: int, gid: int) -> str | None:
        """Why a Unix peer is refused, or None when it may connect."""
        if not self.has_allow_list or uid in self.allowed_uids or gid in self.allowed_gids:
            return None
        if self.allowed_gids and not self.allowed_gids.isdisjoint(_supplementary_groups(pid)):
            return None
        return (
            f"peer uid {uid} gid {gid} is not in the allow-list "
            f"([inference] allowed_uids / allowed_gids)"
        )

    # -- routing

    def _dispatch(self, request: _Request) -> _Response | Awaitable[_Response]:
        try:
            return self._route(request)
        except InferenceError as exc:
            return _error_response(exc)
        except Exception:
            logger.exception("unexpected error serving %r %r", request.method, request.url)
            return _error(500, "internal error (see the agent's log)")

    def _route(self, request: _Request) -> _Response | Awaitable[_Response]:
        path = request.url.split(b"?", 1)[0].decode("latin-1")
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        if path == "/metrics":
            _require(request.method, b"GET")
            return _Response(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE.encode())
        parts = path.split("/")
        if len(parts) < 2 or parts[0] or parts[1] != "v2":
            raise ModelNotFoundError(f"no such endpoint: {path}")
        rest = parts[2:]
        method = request.method
        if not rest:
            _require(method, b"GET")
            return _Response(200, self._server_metadata)
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            _require(method, b"GET")
            if rest[1] == "live":
                return _Response(200, _LIVE_BODY)
            if not self._stopping and self._is_ready():
                return _Response(200, _READY_BODY)
            return _Response(503, _NOT_READY_BODY)
        if rest[0] == "models" and len(rest) >= 2:
            return self._route_model(request, rest[1], rest[2:])
        if rest[0] == "systemsharedmemory" and self.shm is not None:
            return self._route_shm(request, rest[1:])
        raise ModelNotFoundError(f"no such endpoint: {path}")

    def _route_model(
        self, request: _Request, name: str, rest: list[str]
    ) -> _Response | Awaitable[_Response]:
        version: str | None = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if len(rest) > 1 or (rest and rest[0] not in ("ready", "infer")):
            raise ModelNotFoundError(
                f"no such endpoint: /{'/'.join(['v2', 'models', name, *rest])}"
            )
        action = rest[0] if rest else "metadata"
        _require(request.method, b"POST" if action == "infer" else b"GET")
        model = self._resolve(name, version)  # the one reference this request uses
        if action == "metadata":
            return _Response(200, json.dumps(model_metadata(model.manifest)).encode())
        if action == "ready":
            return _Response(200, json.dumps({"name": model.name, "ready": True}).encode())
        return self._infer(model, request)

    def _resolve(self, name: str, version: str | None) -> LoadedModel:
        model = self.registry.get(name)
        if model is None:
            served = sorted(self.registry.snapshot())
            raise ModelNotFoundError(f"unknown model {name!r} (serving: {served})")
        if version is not None and version != model.version:
            raise ModelNotFoundError(
                f"model {name!r} version {version!r} is not served (serving {model.version})"
            )
        return model

    def _route_shm(self, request: _Request, rest: list[str]) -> _Response:
        """``[/region/<name>]/status`` (GET), ``/region/<name>/register`` (POST),
        ``[/region/<name>]/unregister`` (POST)."""
        shm = self.shm
        assert shm is not None
        name: str | None = None
        if len(rest) == 3 and rest[0] == "region":
            name, rest = rest[1], rest[2:]
        if len(rest) != 1 or rest[0] not in ("status", "register", "unregister"):
            raise ModelNotFoundError(f"no such endpoint: /v2/systemsharedmemory/{'/'.join(rest)}")
        action = rest[0]
        _require(request.method, b"GET" if action == "status" else b"POST")
        if action == "status":
            return _Response(200, json.dumps(shm.status(name)).encode())
        if request.peer_uid is None:
            raise _Forbidden("shared memory is only available on the Unix socket")
        if action == "register":
            if name is None:
                raise ModelNotFoundError(
                    "register needs a region: /v2/systemsharedmemory/region/<name>/register"
                )
            try:
                doc = json.loads(request.body)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise InvalidRequestError(f"register body is not valid JSON: {exc}") from None
            shm.register(name, doc, request.peer_uid)
        else:
            shm.unregister(name)
        return _Response(200, b"{}")

    # -- infer

    def _infer(self, model: LoadedModel, request: _Request) -> _Response | Awaitable[_Response]:
        if self._stopping or not self._is_ready():
            self.metrics.record_error(model.name, model.version, "not_ready")
            raise NotReadyError("the agent is not ready to serve (starting, stopping or draining)")
        if self._runs_inline(model, len(request.body)):
            try:
                response, cost = _execute(model, request, self.shm, None)
            except Exception as exc:
                return self._failed(model, request, exc)
            self._timed(model, cost)
            return self._succeeded(model, request, response)
        if self._admitted >= self.max_concurrency + self.max_queue:
            self.metrics.record_error(model.name, model.version, "overloaded")
            raise _Overloaded(
                f"overloaded: {self.max_concurrency} requests running and {self.max_queue} "
                f"waiting; retry later"
            )
        return self._run_in_pool(model, request)

    def _runs_inline(self, model: LoadedModel, body_bytes: int) -> bool:
        if self.inline_max_run_s <= 0 or body_bytes > _INLINE_MAX_BODY:
            return False
        times = self._run_times.get(model.name)
        return (
            times is not None
            and times.version == model.version
            and times.samples >= _INLINE_SAMPLES
            and times.ewma_s <= self.inline_max_run_s
        )

    def _timed(self, model: LoadedModel, cost_s: float) -> None:
        times = self._run_times.get(model.name)
        if times is None or times.version != model.version:
            times = self._run_times[model.name] = _RunTimes(model.version)
        times.add(cost_s, 4 * self.inline_max_run_s)

    async def _run_in_pool(self, model: LoadedModel, request: _Request) -> _Response:
        loop = self._loop
        assert self._executor is not None and loop is not None
        self._admitted += 1
        self._update_gauges()
        # time.monotonic is the loop's clock too (asyncio's default).
        deadline = request.received + self.request_deadline_s
        future = loop.run_in_executor(self._executor, _execute, model, request, self.shm, deadline)
        waiter = loop.create_future()

        def wake(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        future.add_done_callback(self._released)
        future.add_done_callback(wake)
        timer = loop.call_at(deadline, wake)
        try:
            await waiter
        finally:
            timer.cancel()
        if not future.done():  # still running or waiting: answer now, the slot frees later
            self.metrics.record_error(model.name, model.version, "deadline")
            return _error_response(
                _DeadlineExceeded(
                    f"no answer within the request deadline of {self.request_deadline_s:g} s"
                )
            )
        try:
            response, cost = future.result()
        except RuntimeError as exc:  # the executor was shut down by stop()
            if self._stopping:
                return _error_response(NotReadyError(f"the agent is stopping: {exc}"))
            return self._failed(model, request, exc)
        except Exception as exc:
            return self._failed(model, request, exc)
        self._timed(model, cost)
        return self._succeeded(model, request, response)

    def _released(self, _future: object) -> None:
        self._admitted -= 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.in_flight.set(min(self._admitted, self.max_concurrency))
        self.metrics.queue_depth.set(max(self._admitted - self.max_concurrency, 0))

    def _succeeded(self, model: LoadedModel, request: _Request, response: _Response) -> _Response:
        latency = self._now() - request.received
        self.metrics.record_request(model.name, model.version, latency)
        if self.stats is not None:
            self.stats.record(model.name, model.version, latency, Outcome.OK)
        return response

    def _failed(self, model: LoadedModel, request: _Request, exc: BaseException) -> _Response:
        latency = self._now() - request.received
        if isinstance(exc, _DeadlineExceeded):
            self.metrics.record_error(model.name, model.version, "deadline")
            return _error_response(exc)
        if isinstance(exc, InvalidRequestError):
            outcome, kind = Outcome.CLIENT_ERROR, "client_error"
            response = _error_response(exc)
        elif isinstance(exc, InferenceError):
            outcome, kind = Outcome.ERROR, "model_error"
            response = _error_response(exc)
        else:
            logger.error("unexpected error running %s %s", model.name, model.version, exc_info=exc)
            outcome, kind = Outcome.ERROR, "model_error"
            response = _error(500, "internal error (see the agent's log)")
        self.metrics.record_request(model.name, model.version, None)
        self.metrics.record_error(model.name, model.version, kind)
        if self.stats is not None:
            self.stats.record(model.name, model.version, latency, outcome)
        return response


def _require(method: bytes, allowed: bytes) -> None:
    if method != allowed:
        raise _MethodNotAllowed(method.decode("latin-1"), allowed.decode("latin-1"))


def _ids(names: str, kind: str) -> list[int]:
    """Numeric ids of a comma-separated list of user or group names (or numbers).

    Raises ConfigError naming an unknown name.
    """
    ids: list[int] = []
    for raw in names.split(","):
        name = raw.strip()
        if not name:
            continue
        if name.isdigit():
            ids.append(int(name))
            continue
        try:
            ids.append(pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid)
        except KeyError:
            key = "allowed_users" if kind == "user" else "allowed_groups"
            raise ConfigError(f"[inference] {key}: no {kind} named {name!r}") from None
    return ids


def _supplementary_groups(pid: int) -> set[int]:
    """The peer process's supplementary groups (empty when /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


def _error_response(exc: InferenceError) -> _Response:
    """Map an error to its HTTP status: the only place that chooses a status code."""
    if isinstance(exc, _MethodNotAllowed):
        return _error(405, str(exc), extra=f"Allow: {exc.allowed}\r\n".encode())
    if isinstance(exc, _Forbidden | SharedMemoryDenied):
        return _error(403, str(exc))
    if isinstance(exc, InvalidRequestError):
        return _error(400, str(exc))
    if isinstance(exc, ModelNotFoundError):
        return _error(404, str(exc))
    if isinstance(exc, NotReadyError):
        return _error(503, str(exc), extra=_RETRY_AFTER)
    logger.error("inference failed: %s", exc)
    return _error(500, str(exc))
