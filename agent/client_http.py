"""The client's transport: blocking HTTP/1.1 to the agent over a Unix socket (or TCP).

One persistent connection on a raw socket, request heads built by hand, the body's
parts sent without copying when large (``sendmsg``), the response read into one buffer.
No chunked encoding, no redirects: the agent's server answers with Content-Length.

Invariants:
- A kept-alive connection the server closed before answering is reopened once and the
  request sent again; never more than once.
- When the server answers early and closes while the request is still being sent (403,
  503, 431), that answer is read and returned rather than the send error.
- Errors leave as the agent's tree: nothing listening (or no permission) →
  ``AgentUnreachableError``, any other socket failure or a malformed response →
  ``InferenceError``. The HTTP status is not interpreted here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from agent.errors import AgentUnreachableError, InferenceError

_SEND_JOINED_BELOW: Final = 64 * 1024


class _Stale(Exception):
    """The server closed a kept-alive connection before answering: retry once."""


class UnixHTTPConnection:
    """Minimal blocking HTTP/1.1 over AF_UNIX (or TCP when ``address`` is a
    ``(host, port)`` pair): ``request`` sends one request and reads its response through
    ``exchange``, reconnecting once when the kept-alive connection went stale."""

    def __init__(self, address: Path | tuple[str, int], timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        if isinstance(self.address, tuple):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(
                self.address if isinstance(self.address, tuple) else os.fspath(self.address)
            )
        except OSError:
            sock.close()
            raise
        self.sock = sock
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(
        self,
        method: str,
        path: str,
        parts: Sequence[bytes | memoryview] = (),
        extra: bytes = b"",
    ) -> tuple[int, dict[bytes, bytes], bytearray]:
        """Send ``method path`` with ``parts`` as the body and ``extra`` header lines (each
        ending in CRLF); return the status, the headers (lower-case names) and the body.

        Raises AgentUnreachableError when nothing listens, the peer may not connect, or
        the server closed the connection twice; InferenceError for other failures.
        """
        length = sum(len(p) for p in parts)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n".encode()
            + extra
            + b"\r\n"
        )
        for attempt in (1, 2):
            try:
                return self.exchange(head, parts)
            except _Stale:
                if attempt == 2:
                    break
            except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
                self.close()
                raise AgentUnreachableError(
                    f"cannot connect to the agent at {self.address}: {exc}"
                ) from None
            except (BrokenPipeError, ConnectionResetError):
                self.close()
                break
            except OSError as exc:
                self.close()
                raise InferenceError(f"{method} {path} on {self.address} failed: {exc!r}") from None
        raise AgentUnreachableError(f"the agent at {self.address} closed the connection")

    def exchange(
        self, head: bytes, parts: Sequence[bytes | memoryview]
    ) -> tuple[int, dict[bytes, bytes], bytearray]:
        """Send one request (``head`` ends with the blank line); read its response.

        Raises _Stale when a reused connection was closed before any response byte,
        OSError for other socket failures, InferenceError for a malformed response.
        """
        reused = self.sock is not None
        sock = self.sock or self.connect()
        try:
            try:
                _send(sock, head, parts)
            except (BrokenPipeError, ConnectionResetError):
                # The server may have answered early (403, 503, 431) and closed: read it.
                sock.settimeout(min(self.timeout, 1.0))
                try:
                    status, headers, body = _receive(sock)
                except (OSError, _Stale, InferenceError):
                    raise BrokenPipeError from None
                self.close()
                return status, headers, body
            status, headers, body = _receive(sock)
        except (BrokenPipeError, ConnectionResetError, _Stale):
            self.close()
            if reused:
                raise _Stale from None
            raise
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body


def _send(sock: socket.socket, head: bytes, parts: Sequence[bytes | memoryview]) -> None:
    total = len(head) + sum(len(p) for p in parts)
    if total < _SEND_JOINED_BELOW:
        sock.sendall(b"".join((head, *parts)) if parts else head)
        return
    views = [memoryview(head), *(memoryview(p).cast("B") for p in parts if len(p))]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _receive(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytearray]:
    data = sock.recv(65536)
    if not data:
        raise _Stale
    while b"\r\n\r\n" not in data:
        if len(data) > 1024 * 1024:
            raise InferenceError("the agent answered an oversized response head")
        chunk = sock.recv(65536)
        if not chunk:
            raise InferenceError("the agent closed the connection in a response head")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
    except (IndexError, ValueError):
        raise InferenceError(f"the agent answered a malformed head: {head[:200]!r}") from None
    body = bytearray(length)
    have = min(len(rest), length)
    body[:have] = rest[:have]
    view = memoryview(body)
    while have < length:
        got = sock.recv_into(view[have:])
        if not got:
            raise InferenceError("the agent closed the connection in a response body")
        have += got
    return status, headers, body
