"""The client's transport: blocking HTTP/1.1 to the agent over a Unix socket (or TCP).

One persistent connection on a raw socket, request heads built by the caller (or here,
for the generic ``request``), the body's parts sent without copying when large
(``sendmsg``), the response read through one reused scratch buffer. No chunked encoding,
no redirects: the agent's server answers with Content-Length. Built for per-call CPU:
the socket is in blocking mode with kernel send/receive timeouts (no ``poll`` before
each ``recv``), and a response head is read for three fields only (Content-Length,
Inference-Header-Content-Length, Connection), any order and case, the parse remembered
per distinct head; the last head read is recognised by comparing the next response's
first bytes with it, before any search, copy or hash.

Invariants:
- A kept-alive connection the server closed before answering is reopened once and the
  request sent again; never more than once.
- When the server answers early and closes while the request is still being sent (403,
  503, 431), that answer is read and returned rather than the send error.
- A returned body is a fresh ``bytearray`` the caller owns: never the scratch buffer.
- A remembered parse is used only for a head whose bytes, through the blank line, are
  exactly those it was made from, and only bytes read for this response are compared.
- Spinning on a response (``spin_s`` > 0, off by default) polls without blocking for at
  most ``spin_s`` seconds per response, then blocks as usual.
- Errors leave as the agent's tree: nothing listening (or no permission) →
  ``AgentUnreachableError``, any other socket failure (a timeout included) or a
  malformed response → ``InferenceError``. The HTTP status is not interpreted here.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from agent.base.errors import AgentUnreachableError, InferenceError
from agent.base.sockets import poll_recv_into, send_parts, set_timeout

_SEND_JOINED_BELOW: Final = 64 * 1024
_SCRATCH_BYTES: Final = 64 * 1024  # one recv's worth: a whole small response
_MAX_HEAD_BYTES: Final = 1024 * 1024
_EARLY_ANSWER_TIMEOUT_S: Final = 1.0  # waiting for an early answer after a failed send
_HEAD_END: Final = b"\r\n\r\n"
_CONTENT_LENGTH: Final = b"\r\ncontent-length:"
_HEADER_LENGTH: Final = b"\r\ninference-header-content-length:"
_CONNECTION: Final = b"\r\nconnection:"
_MAX_HEADS_REMEMBERED: Final = 64
_PEERCRED: Final = struct.Struct("3i")  # pid, uid, gid
_NO_HEAD: Final = bytes(_SCRATCH_BYTES + 1)  # longer than any first read: starts none

# (status, Content-Length, Inference-Header-Content-Length or None, Connection: close)
Head = tuple[int, int, int | None, bool]
# (status, Inference-Header-Content-Length or None, body)
Answer = tuple[int, int | None, bytearray]


class _Stale(Exception):
    """The server closed a kept-alive connection before answering: retry once."""


class UnixHTTPConnection:
    """Minimal blocking HTTP/1.1 over AF_UNIX (or TCP when ``address`` is a
    ``(host, port)`` pair). ``send`` sends one prepared request and reads its response,
    reconnecting once when the kept-alive connection went stale; ``request`` builds the
    head first. Not thread-safe (one scratch buffer, one socket)."""

    def __init__(
        self, address: Path | tuple[str, int], timeout: float = 30.0, *, spin_s: float = 0.0
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.spin_s = spin_s
        self.sock: socket.socket | None = None
        self._sized = 0  # the largest request the socket's send buffer was sized for
        self._scratch = bytearray(_SCRATCH_BYTES)
        self._heads: dict[bytes, Head] = {}
        # The last head read, through its blank line, and its parse: the next response
        # usually starts with the very same bytes.
        self._last_head: tuple[bytes, Head] = (_NO_HEAD, (0, 0, None, False))

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
            # Blocking mode with kernel timeouts: Python's own timeout polls before
            # every recv and send, a syscall per call that shows at this scale.
            sock.settimeout(None)
            _set_kernel_timeouts(sock, self.timeout)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._sized = 0
        return sock

    def peer_uid(self) -> int | None:
        """The uid of the process serving the Unix socket (SO_PEERCRED: the agent's
        user), connecting first if needed; None over TCP.

        Raises AgentUnreachableError when nothing listens or the kernel cannot say."""
        if isinstance(self.address, tuple):
            return None
        try:
            sock = self.sock if self.sock is not None else self.connect()
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        except OSError as exc:
            self.close()
            raise AgentUnreachableError(
                f"cannot connect to the agent at {self.address}: {exc}"
            ) from None
        return int(_PEERCRED.unpack(raw)[1])

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
    ) -> Answer:
        """Send ``method path`` with ``parts`` as the body and ``extra`` header lines (each
        ending in CRLF); return the status, the Inference-Header-Content-Length (None
        when absent) and the body. Raises as ``send``."""
        length = sum(len(p) for p in parts)
        return self.send(request_head(method, path, length, extra), parts)

    def send(self, head: bytes, parts: Sequence[bytes | memoryview] = ()) -> Answer:
        """Send ``head`` (the request line and headers through the blank line, possibly
        followed by the whole body) and then ``parts`` (byte-sized buffers); return the
        status, the Inference-Header-Content-Length (None when absent) and the body.

        Raises AgentUnreachableError when nothing listens, the peer may not connect, or
        the server closed the connection twice; InferenceError for other failures.
        """
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
            except BlockingIOError:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
                self.close()
                raise InferenceError(
                    f"{_request_line(head)} on {self.address} failed: no progress within "
                    f"the timeout of {self.timeout} s"
                ) from None
            except OSError as exc:
                self.close()
                raise InferenceError(
                    f"{_request_line(head)} on {self.address} failed: {exc!r}"
                ) from None
        raise AgentUnreachableError(f"the agent at {self.address} closed the connection")

    def exchange(self, head: bytes, parts: Sequence[bytes | memoryview]) -> Answer:
        """Send one request; read its response.

        Raises _Stale when a reused connection was closed before any response byte,
        OSError for other socket failures, InferenceError for a malformed response.
        """
        reused = self.sock is not None
        sock = self.sock or self.connect()
        try:
            try:
                self._sized = _send(sock, head, parts, self._sized)
            except (BrokenPipeError, ConnectionResetError):
                # The server may have answered early (403, 503, 431) and closed: read it.
                _set_kernel_timeouts(sock, min(self.timeout, _EARLY_ANSWER_TIMEOUT_S))
                try:
                    status, _, header_length, body = self._receive(sock, 0.0)
                except (OSError, _Stale, InferenceError):
                    raise BrokenPipeError from None
                self.close()
                return status, header_length, body
            status, close, header_length, body = self._receive(sock, self.spin_s)
        except (BrokenPipeError, ConnectionResetError, _Stale):
            self.close()
            if reused:
                raise _Stale from None
            raise
        if close:
            self.close()
        return status, header_length, body

    def _receive(
        self, sock: socket.socket, spin_s: float
    ) -> tuple[int, bool, int | None, bytearray]:
        """One response: (status, Connection: close, Inference-Header-Content-Length,
        body). Raises _Stale when the peer closed before any byte."""
        scratch = self._scratch
        got = _spin_recv(sock, scratch, spin_s) if spin_s > 0 else sock.recv_into(scratch)
        if not got:
            raise _Stale
        data, filled = scratch, got
        last, parsed = self._last_head
        if scratch.startswith(last, 0, got):  # the last head again, through its blank line
            start = len(last)
        else:
            end = scratch.find(_HEAD_END, 0, got)
            if end < 0:
                data, filled, end = _read_head(sock, scratch, got)
            key = bytes(memoryview(data)[:end])
            found = self._heads.get(key)
            if found is None:
                found = parse_head(key)
                if len(self._heads) >= _MAX_HEADS_REMEMBERED:
                    self._heads.clear()
                self._heads[key] = found
            parsed = found
            start = end + len(_HEAD_END)
            self._last_head = (key + _HEAD_END, parsed)
        status, length, header_length, close = parsed
        have = min(filled - start, length)
        if have == length:
            return status, close, header_length, data[start : start + length]
        body = bytearray(length)
        body[:have] = memoryview(data)[start : start + have]
        _recv_exactly(sock, memoryview(body)[have:])
        return status, close, header_length, body


def request_head(method: str, path: str, length: int, extra: bytes = b"") -> bytes:
    """A request's line and headers through the blank line; ``extra`` header lines each
    end in CRLF."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n".encode()
        + extra
        + b"\r\n"
    )


def parse_head(head: bytes) -> Head:
    """(status, Content-Length (0 when absent), Inference-Header-Content-Length (None
    when absent), whether Connection is close) of a response head without its blank
    line. Names match in any case and order; a repeated field counts its last value.

    Raises InferenceError for a malformed status line or a non-integer length.
    """
    lower = head.lower()
    line_end = lower.find(b"\r\n")
    try:
        status = int((head if line_end < 0 else head[:line_end]).split(b" ", 2)[1])
        length = _field(lower, _CONTENT_LENGTH)
        header_length = _field(lower, _HEADER_LENGTH)
        return (
            status,
            0 if length is None else int(length),
            None if header_length is None else int(header_length),
            _field(lower, _CONNECTION) == b"close",
        )
    except (IndexError, ValueError):
        raise InferenceError(f"the agent answered a malformed head: {head[:200]!r}") from None


def _field(lower: bytes, prefix: bytes) -> bytes | None:
    """The stripped value of the last header line starting with ``prefix`` (CRLF, the
    lower-case name and the colon), or None."""
    start = lower.rfind(prefix)
    if start < 0:
        return None
    start += len(prefix)
    end = lower.find(b"\r\n", start)
    return (lower[start:] if end < 0 else lower[start:end]).strip()


def _request_line(head: bytes) -> str:
    """``METHOD /path`` of a request head, for error messages."""
    return b" ".join(head.split(b" ", 2)[:2]).decode("latin-1")


def _set_kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO both ``timeout_s``."""
    set_timeout(sock, socket.SO_RCVTIMEO, timeout_s)
    set_timeout(sock, socket.SO_SNDTIMEO, timeout_s)


def _spin_recv(sock: socket.socket, scratch: bytearray, spin_s: float) -> int:
    """``recv_into`` polled without blocking for up to ``spin_s``, then blocking."""
    got = poll_recv_into(sock, scratch, spin_s)
    return sock.recv_into(scratch) if got is None else got


def _read_head(sock: socket.socket, scratch: bytearray, got: int) -> tuple[bytearray, int, int]:
    """A head split across reads: (buffer, bytes in it, offset of the blank line)."""
    data = bytearray(memoryview(scratch)[:got])
    while True:
        if len(data) > _MAX_HEAD_BYTES:
            raise InferenceError("the agent answered an oversized response head")
        got = sock.recv_into(scratch)
        if not got:
            raise InferenceError("the agent closed the connection in a response head")
        searched_from = max(0, len(data) - len(_HEAD_END) + 1)
        data += memoryview(scratch)[:got]
        end = data.find(_HEAD_END, searched_from)
        if end >= 0:
            return data, len(data), end


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    have, length = 0, len(view)
    while have < length:
        got = sock.recv_into(view[have:])
        if not got:
            raise InferenceError("the agent closed the connection in a response body")
        have += got


def _send(sock: socket.socket, head: bytes, parts: Sequence[bytes | memoryview], sized: int) -> int:
    """Send a request; return what ``send_parts`` says the send buffer is sized for
    (``sized``: what it said last time on this socket)."""
    if not parts:
        sock.sendall(head)
        return sized
    total = len(head) + sum(len(p) for p in parts)
    if total < _SEND_JOINED_BELOW:
        sock.sendall(b"".join((head, *parts)))
        return sized
    return send_parts(sock, [head, *parts], sized)
