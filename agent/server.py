"""Local inference: Open Inference Protocol v2 (REST, JSON tensors) over a Unix socket.

The stack is deliberately lean for per-request latency: asyncio's Unix server, one
``asyncio.Protocol`` per connection, httptools (llhttp) as the HTTP/1.1 parser,
precomputed response heads, no framework. ONNX Runtime (and the JSON codec of an infer
request) runs in a bounded thread pool, so a slow model never stalls health checks.

Invariants:
- Responses on a connection leave in the order the requests came (HTTP/1.1 pipelining):
  a connection handles one request at a time and queues the rest.
- An infer request takes its reference to the live ``LoadedModel`` once, when it is
  dispatched, and finishes on it; a hot swap never fails a request.
- Bad input never gets a 5xx and never crashes the server: ``InvalidRequestError`` → 400,
  ``ModelNotFoundError`` → 404, ``NotReadyError`` → 503, an oversized body → 413 (and
  the connection closes), a malformed request → 400 (and the connection closes). Only
  an unexpected exception gives 500, with its traceback logged.
- The socket is created with ``socket_mode`` before it listens, so no client can connect
  through a wider mode, and ``stop`` removes the socket file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

import httptools

import agent
from agent.errors import (
    ConfigError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.oip import build_infer_response, error_body, model_metadata, parse_infer_request
from agent.runtime import LoadedModel, ModelRegistry
from agent.stats import Outcome, RequestStats

logger = logging.getLogger(__name__)

_REASONS: Final = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_HEADS: Final = {
    status: (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: "
    ).encode()
    for status, reason in _REASONS.items()
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_HEAD_BYTES: Final = 64 * 1024  # request line and headers together
_MAX_QUEUED: Final = 32  # pipelined requests per connection before reading pauses
_UNIX_PATH_MAX: Final = 107
_LIVE_BODY: Final = b'{"live":true}'
_READY_BODY: Final = b'{"ready":true}'
_NOT_READY_BODY: Final = b'{"ready":false}'


class _Response:
    __slots__ = ("body", "close", "extra", "status")

    def __init__(self, status: int, body: bytes, *, close: bool = False, extra: bytes = b""):
        self.status = status
        self.body = body
        self.close = close
        self.extra = extra  # extra header lines, each ending in CRLF


def _error(status: int, message: str, *, close: bool = False, extra: bytes = b"") -> _Response:
    return _Response(status, error_body(message), close=close, extra=extra)


class _Request:
    __slots__ = ("body", "http_1_0", "keep_alive", "method", "url")

    def __init__(
        self, method: bytes, url: bytes, body: bytes, keep_alive: bool, http_1_0: bool
    ) -> None:
        self.method = method
        self.url = url
        self.body = body
        self.keep_alive = keep_alive
        self.http_1_0 = http_1_0


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing an oversized request head."""


class _Connection(asyncio.Protocol):
    """One client connection: parses requests and writes responses in order."""

    def __init__(self, server: InferenceServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Request | _Response] = deque()
        self._busy = False
        self._paused = False
        self._broken = False  # the byte stream can no longer be parsed: answer and close
        self._draining = False  # the server stops: close once the current request is done
        self._task: asyncio.Task[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._too_large = False
        self._expect_continue = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()

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
        elif lower == b"expect" and value.lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
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
        if self._too_large:
            limit = self._server.max_body_bytes
            self._enqueue(
                _error(413, f"request body exceeds the limit of {limit} bytes", close=True)
            )
            self._broken = True
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = _Request(
            self._parser.get_method(),
            self._url,
            body,
            self._parser.should_keep_alive(),
            self._parser.get_http_version() == "1.0",
        )
        self._enqueue(request)

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLarge

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
        if self._draining and not self._busy and not transport.is_closing():
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
        close = response.close or not keep_alive or self._draining
        if close:
            connection = b"Connection: close\r\n"
        elif http_1_0:
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        transport.write(
            b"".join(
                (
                    _HEADS[response.status],
                    str(len(response.body)).encode(),
                    b"\r\n",
                    connection,
                    response.extra,
                    b"\r\n",
                    response.body,
                )
            )
        )
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


def _run_infer(model: LoadedModel, body: bytes) -> bytes:
    """Parse, run and encode one infer request (in a worker thread)."""
    request = parse_infer_request(body, model.manifest)
    outputs = model.infer(request.inputs, request.output_names)
    return build_infer_response(model.name, model.version, outputs, request.id)


class InferenceServer:
    """OIP v2 over a Unix socket, serving the live models of a ``ModelRegistry``.

    ``is_ready`` says whether the agent as a whole may serve (default: at least one
    model is live); when it returns False, health/ready answers 503 and infer requests
    get 503. ``max_concurrency`` bounds the ONNX Runtime runs in flight. Every infer
    request is recorded in ``stats`` (when given) under the version that served it.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        socket_path: Path,
        *,
        socket_mode: int = 0o660,
        max_body_bytes: int = 64 * 1024 * 1024,
        max_concurrency: int = 4,
        is_ready: Callable[[], bool] | None = None,
        stats: RequestStats | None = None,
    ) -> None:
        if max_body_bytes < 1 or max_concurrency < 1:
            raise ConfigError(
                f"max_body_bytes and max_concurrency expected >= 1, "
                f"got {max_body_bytes} and {max_concurrency}"
            )
        self.registry = registry
        self.stats = stats
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency
        self._is_ready = is_ready or (lambda: len(registry) > 0)
        self._server: asyncio.AbstractServer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._server_metadata = json.dumps(
            {"name": "edge-agent", "version": agent.__version__, "extensions": []}
        ).encode()

    # -- lifecycle

    async def start(self) -> None:
        """Listen on the socket: remove a stale socket file, bind, chmod, listen.

        Raises ConfigError when the path is too long, its directory is missing, it holds
        something other than a socket, or another process is listening on it.
        """
        path = self.socket_path
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise ConfigError(
                f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes (a Unix socket limit)"
            )
        if not path.parent.is_dir():
            raise ConfigError(f"socket directory {path.parent} does not exist")
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            os.chmod(path, self.socket_mode)  # before listen(): no connection sees a wider mode
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot create socket {path}: {exc}") from None
        self._stopping = False
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_concurrency, thread_name_prefix="edge-agent-infer"
        )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _Connection(self), sock=sock, backlog=1024
        )
        logger.info("serving OIP v2 on %s (mode %o)", path, self.socket_mode)

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

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, answer the requests in progress (up to ``grace_s``), close
        every connection and remove the socket file."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.shut_down()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._connections and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        logger.info("stopped serving on %s", self.socket_path)

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
        parts = path.split("/")
        if len(parts) < 2 or parts[0] or parts[1] != "v2":
            raise ModelNotFoundError(f"no such endpoint: {path}")
        rest = parts[2:]
        method = request.method
        if not rest:
            self._require(method, b"GET")
            return _Response(200, self._server_metadata)
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            self._require(method, b"GET")
            if rest[1] == "live":
                return _Response(200, _LIVE_BODY)
            if not self._stopping and self._is_ready():
                return _Response(200, _READY_BODY)
            return _Response(503, _NOT_READY_BODY)
        if rest[0] == "models" and len(rest) >= 2:
            return self._route_model(request, rest[1], rest[2:])
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
        self._require(request.method, b"POST" if action == "infer" else b"GET")
        model = self._resolve(name, version)  # the one reference this request uses
        if action == "metadata":
            return _Response(200, json.dumps(model_metadata(model.manifest)).encode())
        if action == "ready":
            return _Response(200, json.dumps({"name": model.name, "ready": True}).encode())
        if self._stopping or not self._is_ready():
            raise NotReadyError("the agent is not ready to serve (starting, stopping or draining)")
        return self._infer(model, request.body)

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

    @staticmethod
    def _require(method: bytes, allowed: bytes) -> None:
        if method != allowed:
            raise _MethodNotAllowed(method.decode("latin-1"), allowed.decode("latin-1"))

    async def _infer(self, model: LoadedModel, body: bytes) -> _Response:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            payload = await loop.run_in_executor(self._executor, _run_infer, model, body)
        except InferenceError as exc:
            outcome = (
                Outcome.CLIENT_ERROR if isinstance(exc, InvalidRequestError) else Outcome.ERROR
            )
            self._record(model, started, outcome)
            return _error_response(exc)
        except RuntimeError as exc:  # the executor was shut down by stop()
            if self._stopping:
                return _error_response(NotReadyError(f"the agent is stopping: {exc}"))
            logger.exception("unexpected error running %s %s", model.name, model.version)
            return _error(500, "internal error (see the agent's log)")
        except Exception:
            logger.exception("unexpected error running %s %s", model.name, model.version)
            self._record(model, started, Outcome.ERROR)
            return _error(500, "internal error (see the agent's log)")
        self._record(model, started, Outcome.OK)
        return _Response(200, payload)

    def _record(self, model: LoadedModel, started: float, outcome: Outcome) -> None:
        if self.stats is not None:
            self.stats.record(model.name, model.version, time.perf_counter() - started, outcome)


class _MethodNotAllowed(InvalidRequestError):
    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(f"method {method} not allowed here; use {allowed}")
        self.allowed = allowed


def _error_response(exc: InferenceError) -> _Response:
    """Map an error to its HTTP status: the only place that chooses a status code."""
    if isinstance(exc, _MethodNotAllowed):
        return _error(405, str(exc), extra=f"Allow: {exc.allowed}\r\n".encode())
    if isinstance(exc, InvalidRequestError):
        return _error(400, str(exc))
    if isinstance(exc, ModelNotFoundError):
        return _error(404, str(exc))
    if isinstance(exc, NotReadyError):
        return _error(503, str(exc))
    logger.error("inference failed: %s", exc)
    return _error(500, str(exc))
