"""The inference server's HTTP/1.1 transport: one ``asyncio.Protocol`` per connection.

httptools (llhttp) parses; response heads are built from precomputed status lines; no
framework. A connection knows nothing of models: it hands each complete ``Request`` to
the ``dispatch`` callable it was given and writes the ``Response`` that comes back (at
once, or when the awaitable finishes). What it needs from the server that accepted it
(limits, admission, forgetting a closed connection) is the ``Host`` protocol.

Invariants:
- Responses on a connection leave in the order the requests came (HTTP/1.1 pipelining):
  a connection handles one request at a time and queues the rest; past ``_MAX_QUEUED``
  queued requests it stops reading until the queue halves.
- Errors found here never reach ``dispatch``: a malformed request or a protocol upgrade
  → 400, a slow sender → 408, an oversized body → 413 (the body is read and dropped so
  the client can read the answer), an oversized head → 431. Errors that leave the byte
  stream unparseable answer and then close the connection.
- ``100 Continue`` is sent only when nothing is queued: an interim response never
  overtakes a final one.
- A connection closes once every request it read is answered when the client
  half-closes, when the server shuts it down, or after ``idle_timeout_s`` with nothing
  to do.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol

import httptools

from agent.oip import error_body

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
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_HEAD_BYTES: Final = 64 * 1024  # request line and headers together
_MAX_QUEUED: Final = 32  # pipelined requests per connection before reading pauses
_JOIN_BELOW: Final = 64 * 1024  # smaller responses go out in one write
RETRY_AFTER: Final = b"Retry-After: 1\r\n"


class Response:
    """A response to write: status, body (bytes or parts), extra header lines."""

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

    @classmethod
    def error(
        cls, status: int, message: str, *, close: bool = False, extra: bytes = b""
    ) -> Response:
        """An error response with the JSON body ``{"error": message}``."""
        return cls(status, error_body(message), close=close, extra=extra)


class Request:
    """One complete request, as the connection hands it to ``dispatch``."""

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
        self.header_length = header_length  # Inference-Header-Content-Length
        self.peer_uid = peer_uid  # None on TCP: no SO_PEERCRED there
        self.received = received  # loop time when the request was complete


Dispatch = Callable[[Request], Response | Awaitable[Response]]


class Host(Protocol):
    """What a connection needs from the server that accepted it."""

    max_body_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float

    def connection_opened(
        self, connection: Connection, transport: asyncio.Transport
    ) -> Response | None:
        """Count a new connection; return the response that refuses it, or None."""
        ...

    def connection_closed(self, connection: Connection) -> None:
        """Forget a connection that has closed."""
        ...


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing an oversized request head."""


class _Phase(enum.Enum):
    IDLE = "idle"  # between requests
    HEAD = "head"  # reading a request line and headers
    BODY = "body"  # reading a body


class Connection(asyncio.Protocol):
    """One client connection: parses requests and writes responses in order.

    Create it inside the event loop (a protocol factory is): its clock is the loop's.
    """

    def __init__(self, host: Host, dispatch: Dispatch, *, unix: bool) -> None:
        self.unix = unix
        self._host = host
        self._dispatch = dispatch
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | Response] = deque()
        self._busy = False
        self._paused = False
        self._broken = False  # the byte stream can no longer be parsed: answer and close
        self._draining = False  # the server stops: close once the current request is done
        self._eof = False  # the client half-closed: close once every request is answered
        self._task: asyncio.Task[None] | None = None
        self.peer_uid: int | None = None  # the host sets it from SO_PEERCRED
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
        self.since = self._loop.time()
        refusal = self._host.connection_opened(self, transport)
        if refusal is not None:
            self._fail(refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        self._host.connection_closed(self)
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
            self._fail(Response.error(400, "protocol upgrades are not supported", close=True))
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                message = f"request line and headers exceed {_MAX_HEAD_BYTES} bytes"
                self._fail(Response.error(431, message, close=True))
            else:
                self._fail(Response.error(400, f"malformed HTTP request: {exc}", close=True))

    # -- httptools callbacks (they must not raise, except to stop parsing)

    def on_message_begin(self) -> None:
        self._reset()
        self.phase, self.since = _Phase.HEAD, self._loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        lower = name.lower()
        if lower == b"content-length":
            try:
                too_large = int(value) > self._host.max_body_bytes
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
        self.phase, self.since = _Phase.BODY, self._loop.time()
        # Only when nothing is queued: an interim response must not overtake a final one.
        if self._expect_continue and not self._too_large and not self._busy and not self._queue:
            assert self._transport is not None
            self._transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return  # read and drop, so the client can read the 413
        self._body_bytes += len(body)
        if self._body_bytes > self._host.max_body_bytes:
            self._too_large = True
            self._body.clear()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        now = self._loop.time()
        self.phase, self.since = _Phase.IDLE, now
        if self._too_large:
            message = f"request body exceeds the limit of {self._host.max_body_bytes} bytes"
            self._enqueue(Response.error(413, message, close=True))
            self._broken = True
            return
        if self._bad_header is not None:
            self._enqueue(Response.error(400, self._bad_header))
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        request = Request(
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
        host = self._host
        if self._broken or self._transport is None or self._transport.is_closing():
            return
        if self.phase is _Phase.HEAD and now - self.since > host.header_timeout_s:
            message = f"request head not received within {host.header_timeout_s:g} s"
            self._fail(Response.error(408, message, close=True))
        elif self.phase is _Phase.BODY and now - self.since > host.body_timeout_s:
            message = f"request body not received within {host.body_timeout_s:g} s"
            self._fail(Response.error(408, message, close=True))
        elif (
            self.phase is _Phase.IDLE
            and not self._busy
            and not self._queue
            and now - self.since > host.idle_timeout_s
        ):
            self._transport.close()

    # -- ordered processing

    def _fail(self, response: Response) -> None:
        self._broken = True
        self._enqueue(response)

    def _enqueue(self, item: Request | Response) -> None:
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
            if isinstance(item, Response):
                self._write(item, keep_alive=False, http_1_0=False)
                continue
            outcome = self._dispatch(item)
            if isinstance(outcome, Response):
                self._write(outcome, item.keep_alive, item.http_1_0)
                continue
            self._busy = True
            self._task = self._loop.create_task(self._finish(item, outcome))
        if self._paused and len(self._queue) <= _MAX_QUEUED // 2 and not transport.is_closing():
            transport.resume_reading()
            self._paused = False
        if not self._busy:
            self.since = self._loop.time()
        idle = not self._busy and not transport.is_closing()
        if idle and (self._draining or (self._eof and not self._queue)):
            transport.close()

    async def _finish(self, request: Request, pending: Awaitable[Response]) -> None:
        response = await pending
        self._busy = False
        self._task = None
        self._write(response, request.keep_alive, request.http_1_0)
        self._drain()

    def _write(self, response: Response, keep_alive: bool, http_1_0: bool) -> None:
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
