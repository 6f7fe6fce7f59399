"""The inference server's HTTP/1.1 transport: one thread per connection, blocking socket.

Why threads and not an event loop: on a small device the hop from an event loop to a
worker thread and back costs four wake-ups (two threads, the GIL handed over each way),
measured at ~220 µs for a no-op on a 2-core VM: more than a tiny model's whole run and
~10 % of a CNN's. A connection served on its own thread reads a request, runs the model
and writes the answer with no hop; ONNX Runtime releases the GIL while it runs, so a slow
model never stalls other connections (health checks included).

httptools (llhttp) parses each request line and headers; a body with Content-Length is
then read straight into its own buffer with ``recv_into`` (no intermediate copies; large
buffers are reused across requests of a connection once nothing refers to them). A
chunked body goes through the parser, and the connection closes after answering it (the
parser may have consumed bytes of a following request). No framework. The request and
response it passes to and from ``dispatch`` are ``agent.serving.http_messages``'s.

Memory: a large body (``_LARGE`` bytes or more) is charged to the server's body quota
(``Host.body_quota``: a total, and a share per client) before anything is allocated,
and read into an anonymous private mapping whose pages the kernel provides only as the
bytes land in them, so a head that announces 64 MiB and sends nothing costs no memory.
The charge goes back when the buffer is freed (the last view of it dropped), so the
quota counts exactly the large buffers alive, a connection's kept buffer included. A
chunked body is charged as its chunks arrive. Not charged: a body under ``_LARGE``,
or one that came whole with its head (into the connection's 128 KiB head buffer), so a
connection holds at most about twice its head buffer uncharged.

Invariants:
- Responses leave in the order requests came (HTTP/1.1 pipelining): the thread handles
  one request at a time and reads the next only after answering.
- Errors found here never reach ``dispatch``: a malformed request or a protocol upgrade
  → 400, a slow sender → 408, an oversized body → 413, a body the quota cannot hold now
  → 503 with Retry-After (both answered at once; the rest of the body is drained for a
  bounded time so the client can read the answer), an oversized head → 431. Errors that
  leave the byte stream unparseable answer and then close.
- A bad ``Inference-Header-Content-Length`` is a 400, and a compressed body
  (``Content-Encoding`` other than ``identity``) a 415, answered after the body is read,
  on a connection that stays usable.
- ``100 Continue`` is sent before reading a body the limits and the quota accept, and
  only then.
- Between requests, a connection whose client came back within ``busy_poll_s`` last
  time polls for that long before blocking (a blocked thread's wake-up costs tens of
  µs and cold caches on a small VM), when the host says a core is free for it; any
  other connection blocks at once.
- Timeouts: the head must arrive within ``header_timeout_s`` of its first byte, the body
  within ``body_timeout_s`` of the head, the next request within ``idle_timeout_s``;
  a response must be taken by the client within ``body_timeout_s``.
- A connection closes after answering when the client asks (``Connection: close``,
  HTTP/1.0 without keep-alive), after an unparseable request, after a chunked one, when
  the server shuts it down, or when the client closes its side.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import socket
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Final, Protocol

import httptools

from agent.base.sockets import poll_recv_into, send_parts, set_timeout
from agent.serving.http_messages import AFTER_RESPONSE, RETRY_AFTER, Dispatch, Request, Response
from agent.serving.quota import Quota, Refusal

logger = logging.getLogger(__name__)

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_HEAD_BYTES: Final = 64 * 1024  # request line and headers together
_READ_SIZE: Final = 64 * 1024  # bytes asked of the kernel per read of a head
_JOIN_BELOW: Final = 64 * 1024  # smaller responses go out in one buffer
_LARGE: Final = 64 * 1024  # bodies this large are charged to the quota and mapped
_REUSE_AT_MOST: Final = 16 * 1024 * 1024  # large buffers up to this are kept per connection
_HEADS_REMEMBERED: Final = 16  # distinct request heads remembered per connection
_DRAIN_S: Final = 2.0  # how long a refused body is drained after its 413 or 503
_END_OF_HEAD: Final = b"\r\n\r\n"


class Host(Protocol):
    """What a connection needs from the server that accepted it."""

    max_body_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    busy_poll_s: float
    body_quota: Quota  # large request bodies in memory, per client and in all

    def connection_closed(self, connection: Connection) -> None:
        """Forget a connection that has closed."""
        ...

    def may_busy_poll(self) -> bool:
        """Whether a connection may poll for its client's next request now (a core is
        free: polling would not take CPU from a model run or from the client)."""
        ...


class _Closed(Exception):
    """The connection is done: the client closed, timed out or sent an unparseable stream
    (already answered)."""


class _Head:
    """httptools callbacks collecting one request head (and a chunked body). Read-only
    once parsed, except a chunked request's body fields: a connection reuses the
    ``_Head`` of a repeated non-chunked head."""

    __slots__ = (
        "bad_header",
        "bad_status",
        "body",
        "body_bytes",
        "charge",
        "charged",
        "chunked",
        "complete",
        "content_length",
        "expect_continue",
        "header_length",
        "http_1_0",
        "keep_alive",
        "max_body_bytes",
        "method",
        "over_quota",
        "parser",
        "too_large",
        "url",
    )

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self.url = b""
        self.content_length: int | None = None
        self.header_length: int | None = None
        self.bad_header: str | None = None
        self.bad_status = 400
        self.expect_continue = False
        self.chunked = False
        self.too_large = False
        self.complete = False
        self.method = b""
        self.keep_alive = True
        self.http_1_0 = False
        self.parser: httptools.HttpRequestParser | None = None
        self.body: list[bytes] = []
        self.body_bytes = 0
        # Chunked bodies: takes bytes from the body quota (a refusal: none taken), how
        # much it took for this body so far, and the refusal that stopped it.
        self.charge: Callable[[int], Refusal | None] | None = None
        self.charged = 0
        self.over_quota: Refusal | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-length":
            try:
                self.content_length = int(value)
            except ValueError:
                return  # llhttp rejects a bad Content-Length itself
        elif lower == b"inference-header-content-length":
            try:
                self.header_length = int(value)
            except ValueError:
                self.bad_status = 400
                self.bad_header = (
                    f"Inference-Header-Content-Length expected an integer, got {value!r}"
                )
        elif lower == b"expect" and value.lower() == b"100-continue":
            self.expect_continue = True
        elif lower == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True
        elif lower == b"content-encoding" and value.strip().lower() != b"identity":
            self.bad_status = 415
            self.bad_header = (
                f"request bodies are read uncompressed, got Content-Encoding "
                f"{value.decode('latin-1')!r}: send the body as it is (tritonclient: "
                "leave request_compression_algorithm unset)"
            )

    def on_headers_complete(self) -> None:
        # Asked now: llhttp resets what "Connection: close" set once the message is
        # complete, and a request without a body is complete with its head.
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:  # chunked bodies only
        if self.too_large or self.over_quota is not None:
            return
        self.body_bytes += len(body)
        if self.body_bytes > self.max_body_bytes:
            self.too_large = True
            self.body.clear()
            return
        if self.charge is not None:
            self.over_quota = self.charge(len(body))
            if self.over_quota is not None:
                self.body.clear()
                return
            self.charged += len(body)
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Connection:
    """One client connection, served by ``serve`` on its own thread until it closes."""

    def __init__(
        self,
        sock: socket.socket,
        host: Host,
        dispatch: Dispatch,
        *,
        peer_uid: int | None,
        peer_key: Hashable,
    ) -> None:
        self.sock = sock
        self.peer_uid = peer_uid  # from SO_PEERCRED; None on TCP
        self.peer_key = peer_key  # whose share of the server's quotas this connection uses
        self._host = host
        self._dispatch = dispatch
        self._buffer = bytearray(_MAX_HEAD_BYTES + _READ_SIZE)
        self._view = memoryview(self._buffer)
        self._start = 0  # unread bytes are _buffer[_start:_end]
        self._end = 0
        self._spare: mmap.mmap | None = None  # a large body buffer to reuse (charged)
        self._charged = 0  # of the body quota, by the chunked body being answered
        self._sized = 0  # the largest response the send buffer was sized for (send_parts)
        self._heads: dict[bytes, _Head] = {}  # heads parsed before (never chunked ones)
        self._memo: dict[bytes, Any] = {}  # what routing keeps between requests (Request.memo)
        self._answered = 0.0  # time.monotonic() when the last answer was written
        self._gap_s = float("inf")  # from the last answer to the next request's first byte
        # Kernel timeouts on a blocking socket: Python's own would poll() before every
        # recv and send, a syscall each (costly on a small VM's cold path).
        sock.settimeout(None)
        set_timeout(sock, socket.SO_SNDTIMEO, host.body_timeout_s)
        self._timeout = -1.0  # the SO_RCVTIMEO in force
        self._lock = threading.Lock()
        self._busy = False  # answering a request (shut_down waits for it)
        self._draining = False  # the server stops: close after the current request
        self._closed = False

    # -- the connection's thread

    def serve(self) -> None:
        """Read requests and answer them until the connection closes. Never raises."""
        try:
            # _draining read after _serve_one cleared _busy: see shut_down.
            while self._serve_one() and not self._draining:
                pass
        except (_Closed, OSError):
            pass
        except Exception:  # a bug here must cost one connection, never the server
            logger.exception("connection failed unexpectedly; closing it")
        finally:
            with self._lock:
                self._closed = True
            self.sock.close()
            self._spare = None  # its charge goes back now (or when its last view goes)
            self._host.connection_closed(self)

    def _serve_one(self) -> bool:
        """Read, dispatch and answer one request; False when the connection should close."""
        head_end = self._read_head()
        self._busy = True  # then _draining is read: see shut_down
        try:
            if self._draining:
                return False
            parsed = self._parse_head(head_end)
            if parsed.chunked:
                body: bytes | bytearray | memoryview = self._read_chunked(parsed)
            else:
                body = self._read_body(parsed)
            received = time.monotonic()
            if parsed.bad_header is not None:
                response = Response.error(parsed.bad_status, parsed.bad_header)
            else:
                response = self._dispatch(
                    Request(
                        parsed.method,
                        parsed.url,
                        body,
                        parsed.keep_alive,
                        parsed.http_1_0,
                        parsed.header_length,
                        self.peer_uid,
                        received,
                        self._memo,
                    )
                )
            del body  # the last reference: a reusable body buffer is free again
            close = response.close or not parsed.keep_alive or parsed.chunked or self._draining
            self._write(response, close=close, http_1_0=parsed.http_1_0)
            after = self._memo.pop(AFTER_RESPONSE, None)
            if after is not None:  # routing's bookkeeping, off the client's path
                self._run_after(after)
            return not close
        finally:
            self._busy = False
            if self._charged:
                self._host.body_quota.give(self.peer_key, self._charged)
                self._charged = 0

    def _run_after(self, work: Callable[[], None]) -> None:
        """Run what routing left for after the response (http_messages.after_response);
        a failure there is logged, never the connection's end."""
        try:
            work()
        except Exception:
            logger.exception("bookkeeping after a response failed")

    def _recv_into(self, view: memoryview, timeout: float) -> int:
        """``recv_into`` waiting at most ``timeout`` s (raises TimeoutError)."""
        if timeout <= 0:
            raise TimeoutError
        if timeout != self._timeout:
            set_timeout(self.sock, socket.SO_RCVTIMEO, timeout)
            self._timeout = timeout
        try:
            return self.sock.recv_into(view)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise TimeoutError from None

    def _read_head(self) -> int:
        """Read until a whole request head is buffered; return the index of its CRLFCRLF.

        Raises _Closed when the client closes or idles out between requests, after
        answering 408 (head too slow) or 431 (head too large).
        """
        host = self._host
        searched = self._start
        head_started = time.monotonic() if self._end > self._start else None
        while True:
            found = self._buffer.find(_END_OF_HEAD, searched, self._end)
            pending = self._end - self._start
            if 0 <= found <= self._start + _MAX_HEAD_BYTES:
                return found
            if pending >= _MAX_HEAD_BYTES:
                message = f"request line and headers exceed {_MAX_HEAD_BYTES} bytes"
                self._fail(Response.error(431, message, close=True))
            if self._start and self._end + _READ_SIZE > len(self._buffer):
                self._view[:pending] = self._view[self._start : self._end]
                self._start, self._end = 0, pending
            searched = max(self._start, self._end - 3)
            if head_started is None:
                timeout = host.idle_timeout_s
            else:
                timeout = head_started + host.header_timeout_s - time.monotonic()
            try:
                got = None
                if (
                    head_started is None
                    and self._gap_s <= host.busy_poll_s
                    and host.may_busy_poll()
                ):
                    got = poll_recv_into(self.sock, self._view[self._end :], host.busy_poll_s)
                if got is None:
                    got = self._recv_into(self._view[self._end :], timeout)
            except TimeoutError:
                if head_started is None:
                    raise _Closed from None  # idle: close quietly
                message = f"request head not received within {host.header_timeout_s:g} s"
                self._fail(Response.error(408, message, close=True))
            if not got:
                raise _Closed
            if head_started is None:
                head_started = time.monotonic()
                self._gap_s = head_started - self._answered
            self._end += got

    def _parse_head(self, head_end: int) -> _Head:
        """Parse the buffered head ending at ``head_end``; consume it from the buffer.

        A client repeats the same head byte for byte (same path, lengths, headers), so a
        head llhttp accepted once is remembered with what it said (not for chunked
        bodies, whose parser carries state): a repeat skips the parser.
        """
        stop = head_end + len(_END_OF_HEAD)
        head = bytes(self._view[self._start : stop])
        self._start = stop
        known = self._heads.get(head)
        if known is not None:
            return known
        parsed = _Head(self._host.max_body_bytes)
        parser = httptools.HttpRequestParser(parsed)
        parsed.parser = parser  # for on_headers_complete; kept for a chunked body only
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._fail(Response.error(400, "protocol upgrades are not supported", close=True))
        except httptools.HttpParserError as exc:
            self._fail(Response.error(400, f"malformed HTTP request: {exc}", close=True))
        parsed.method = parser.get_method()
        parsed.http_1_0 = parser.get_http_version() == "1.0"
        if not parsed.chunked:
            parsed.parser = None
            if len(self._heads) >= _HEADS_REMEMBERED:
                self._heads.clear()
            self._heads[head] = parsed
        return parsed

    def _read_body(self, parsed: _Head) -> bytes | bytearray | memoryview:
        """Read a Content-Length body (empty without one)."""
        length = parsed.content_length or 0
        if length > self._host.max_body_bytes:
            message = f"request body exceeds the limit of {self._host.max_body_bytes} bytes"
            self._refuse_body(Response.error(413, message, close=True), length)
        have = self._end - self._start
        if have >= length:
            body = bytes(self._view[self._start : self._start + length])
            self._start += length
            if self._start == self._end:
                self._start = self._end = 0
            return body
        body_view = self._body_buffer(length)
        if parsed.expect_continue:
            self.sock.sendall(_CONTINUE)
        body_view[:have] = self._view[self._start : self._end]
        self._start = self._end = 0
        deadline = time.monotonic() + self._host.body_timeout_s
        try:
            while have < length:
                got = self._recv_into(body_view[have:], deadline - time.monotonic())
                if not got:
                    raise _Closed
                have += got
        except TimeoutError:
            body_view.release()
            message = f"request body not received within {self._host.body_timeout_s:g} s"
            self._fail(Response.error(408, message, close=True))
        return body_view

    def _body_buffer(self, length: int) -> memoryview:
        """A buffer of ``length`` bytes for a body. A large one reuses the connection's
        kept buffer when nothing refers to it any more (no page faults per request);
        else it is charged to the body quota and mapped (answers 503 and closes, raising
        _Closed, when the quota cannot hold it)."""
        if length < _LARGE:
            return memoryview(bytearray(length))
        spare = self._spare
        if spare is not None and length <= len(spare) <= 2 * length and _unexported(spare):
            return memoryview(spare)[:length]
        self._spare = spare = None  # its charge goes back once its last view is gone
        quota = self._host.body_quota
        refusal = quota.take(self.peer_key, length)
        if refusal is not None:
            message = f"request body of {length} bytes refused now: " + quota.explain(
                refusal, self.peer_key
            )
            refused = Response.error(503, message, close=True, extra=RETRY_AFTER)
            self._refuse_body(refused, length)
        try:
            buffer = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except BaseException:
            quota.give(self.peer_key, length)
            raise
        weakref.finalize(buffer, quota.give, self.peer_key, length)
        if length <= _REUSE_AT_MOST:
            self._spare = buffer
        return memoryview(buffer)

    def _read_chunked(self, parsed: _Head) -> bytes:
        """Feed the rest of the stream to the parser until the chunked body is complete,
        charging the body quota as chunks arrive (given back once answered)."""
        quota = self._host.body_quota
        parsed.charge = lambda amount: quota.take(self.peer_key, amount)
        try:
            return self._parse_chunks(parsed)
        finally:
            self._charged = parsed.charged  # the body is alive until answered
            parsed.charge = None

    def _parse_chunks(self, parsed: _Head) -> bytes:
        deadline = time.monotonic() + self._host.body_timeout_s
        pending = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        while True:
            if pending:
                assert parsed.parser is not None
                try:
                    parsed.parser.feed_data(pending)
                except httptools.HttpParserError as exc:
                    self._fail(Response.error(400, f"malformed HTTP request: {exc}", close=True))
            if parsed.complete:
                break
            try:
                got = self._recv_into(self._view, deadline - time.monotonic())
            except TimeoutError:
                message = f"request body not received within {self._host.body_timeout_s:g} s"
                self._fail(Response.error(408, message, close=True))
            if not got:
                raise _Closed
            pending = bytes(self._view[:got])
        if parsed.too_large:
            message = f"request body exceeds the limit of {self._host.max_body_bytes} bytes"
            self._fail(Response.error(413, message, close=True))
        if parsed.over_quota is not None:
            quota = self._host.body_quota
            message = "chunked request body refused now: " + quota.explain(
                parsed.over_quota, self.peer_key
            )
            self._fail(Response.error(503, message, close=True, extra=RETRY_AFTER))
        body = b"".join(parsed.body)
        parsed.body.clear()
        return body

    def _refuse_body(self, response: Response, length: int) -> None:
        """Answer ``response`` (413, 503) at once, then drain the body for a bounded time
        so the client can read the answer (closing with unread data would reset a TCP
        connection). Raises _Closed."""
        self._write(response, close=True, http_1_0=False)
        left = length - (self._end - self._start)
        deadline = time.monotonic() + min(_DRAIN_S, self._host.body_timeout_s)
        try:
            while left > 0:
                got = self._recv_into(self._view, deadline - time.monotonic())
                if not got:
                    break
                left -= got
        except (TimeoutError, OSError):
            pass
        raise _Closed

    # -- writing

    def _fail(self, response: Response) -> None:
        """Answer an error that ends the connection, then close it (raises _Closed)."""
        with contextlib.suppress(OSError):
            self._write(response, close=True, http_1_0=False)
        raise _Closed

    def _write(self, response: Response, *, close: bool, http_1_0: bool) -> None:
        if close:
            connection = b"Connection: close\r\n"
        elif http_1_0:
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        head, parts = response.encode_head(connection)  # SO_SNDTIMEO: body_timeout_s
        if len(head) + sum(len(p) for p in parts) < _JOIN_BELOW:
            self.sock.sendall(b"".join((head, *parts)))
        else:
            self._sized = send_parts(self.sock, [head, *parts], self._sized)
        self._answered = time.monotonic()

    # -- the server's thread

    def shut_down(self) -> None:
        """Close once the request in progress (if any) has been answered.

        No lock against the connection's thread (three per request cost ~15 µs after a
        model run has flushed the caches): each side writes its own flag, then reads
        the other's (``_draining`` here; ``_busy`` there, set before a request and
        cleared after it), and the GIL orders those steps, so at least one side sees
        the other. Either the thread sees ``_draining`` and closes (before a request,
        or after it instead of reading the next), or this sees it idle and shuts the
        socket, which wakes its ``recv``. The lock only keeps the socket from being
        shut after the thread closed it (its descriptor may be another's by then)."""
        self._draining = True
        with self._lock:
            if self._busy or self._closed:
                return
            self._shutdown_socket()

    def abort(self) -> None:
        """Close now, even in the middle of a request."""
        with self._lock:
            if not self._closed:
                self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv


def _unexported(buffer: mmap.mmap) -> bool:
    """True when no view (memoryview, numpy array) of ``buffer`` is alive: a mapping
    with exports refuses to resize (here, to its own size: an ``mremap`` that moves
    nothing)."""
    try:
        buffer.resize(len(buffer))
    except (BufferError, OSError, ValueError, SystemError):
        return False
    return True
