"""What the inference server's transport hands to routing and back: ``Request`` (one
complete request), ``Response`` (status, body parts, extra header lines) and how a
response's head is encoded; ``refuse`` answers a connection the server will not serve.

``agent.serving.http11`` reads requests and writes responses on a connection's thread;
``agent.serving.routes`` turns a ``Request`` into a ``Response``. Neither needs the other's
internals, only these types.

Invariants:
- A response's head names its exact body length (``Content-Length``); bodies are never
  chunked.
- ``refuse`` never blocks: it is called on the thread that accepts connections.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, Final

from agent.oip.documents import error_body

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
_STATUS_LINES: Final = {s: f"HTTP/1.1 {s} {r}\r\n".encode() for s, r in _REASONS.items()}
_JSON: Final = b"application/json"
RETRY_AFTER: Final = b"Retry-After: 1\r\n"


class Response:
    """A response to write: status, body (bytes or parts), extra header lines."""

    __slots__ = ("_encoded", "body", "close", "content_type", "extra", "status")

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
        self._encoded: tuple[bytes, bytes] | None = None  # (connection header, head)

    @classmethod
    def error(
        cls, status: int, message: str, *, close: bool = False, extra: bytes = b""
    ) -> Response:
        """An error response with the JSON body ``{"error": message}``."""
        return cls(status, error_body(message), close=close, extra=extra)

    def encode_head(self, connection_header: bytes) -> tuple[bytes, Sequence[bytes | memoryview]]:
        """The status line and headers (with ``connection_header``), and the body parts.
        A response is not changed once made, so its head is encoded once per connection
        header (a repeat's response is one object answered many times)."""
        body = self.body
        parts: Sequence[bytes | memoryview] = (body,) if isinstance(body, bytes) else body
        encoded = self._encoded
        if encoded is not None and encoded[0] == connection_header:
            return encoded[1], parts
        length = sum(len(p) for p in parts)
        head = b"".join(
            (
                _STATUS_LINES[self.status],
                b"Content-Type: ",
                self.content_type,
                b"\r\nContent-Length: ",
                str(length).encode(),
                b"\r\n",
                connection_header,
                self.extra,
                b"\r\n",
            )
        )
        self._encoded = (connection_header, head)
        return head, parts


class Request:
    """One complete request, as the connection hands it to ``dispatch``."""

    __slots__ = (
        "body",
        "header_length",
        "http_1_0",
        "keep_alive",
        "memo",
        "method",
        "peer_uid",
        "received",
        "url",
    )

    def __init__(
        self,
        method: bytes,
        url: bytes,
        body: bytes | bytearray | memoryview,
        keep_alive: bool,
        http_1_0: bool,
        header_length: int | None,
        peer_uid: int | None,
        received: float,
        memo: dict[bytes, Any] | None = None,
    ) -> None:
        self.method = method
        self.url = url
        self.body = body
        self.keep_alive = keep_alive
        self.http_1_0 = http_1_0
        self.header_length = header_length  # Inference-Header-Content-Length
        self.peer_uid = peer_uid  # None on TCP: no SO_PEERCRED there
        self.received = received  # time.monotonic() when the request was complete
        # The connection's own memo: what routing keeps between one connection's requests.
        self.memo: dict[bytes, Any] = {} if memo is None else memo


Dispatch = Callable[[Request], Response]

# The key of ``Request.memo`` under which routing leaves work to run once the response
# is written (a callable; the connection pops and runs it): bookkeeping off the
# client's path, such as counting a request in the version's drift sketch. Not a URL
# (URLs hold no NUL).
AFTER_RESPONSE: Final = b"\x00after"


def after_response(request: Request, work: Callable[[], None]) -> None:
    """Run ``work`` on the request's connection once its response is written (before the
    connection reads its next request)."""
    request.memo[AFTER_RESPONSE] = work


def refuse(sock: socket.socket, response: Response) -> None:
    """Answer a connection the server will not serve (403, 503) and close it, without
    blocking the thread that accepts connections."""
    head, parts = response.encode_head(b"Connection: close\r\n")
    try:
        sock.setblocking(False)
        sock.send(b"".join((head, *parts)))
    except OSError:
        pass
    finally:
        sock.close()
