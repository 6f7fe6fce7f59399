"""TUF fetchers: untrusted transports with their own deadline and progress rule.

python-tuf verifies everything it is given; a fetcher only moves bytes and maps failures
the way the client needs them. Every fetcher here is a ``ResumableFetcher``:

- "not found" → ``DownloadHTTPError(..., 404)`` so a probe for the next root version
  means "not found", not "failed" (HTTP 403 and 410 count as not found too);
- any other refusal → ``DownloadHTTPError`` with its status;
- a transport error, raised when connecting or while iterating the body →
  ``DownloadError`` (python-tuf does not wrap errors raised during iteration);
- a transfer that runs past its overall deadline, or that moves fewer than
  ``min_bytes_per_s`` over any ``progress_window_s`` → ``DownloadError``. python-tuf
  has no overall deadline: a drip just under the read timeout would run on until the
  hash check. ``TransferGuard`` is the rule, as a pure function of byte counts and a
  clock.
- every body is closed when its download ends, however it ends (``download_file``):
  python-tuf's own loop leaves the body behind when it refuses one (too long, or a disk
  that refused the temporary file), and a body left to the garbage collector closes at
  a random moment; in httpcore 1.0.x that moment can fall while the same thread holds
  its connection pool's (non-reentrant) lock, and the update check then waits on itself
  forever (encode/httpcore#990, #996).
- ``fetch_from(url, offset)`` resumes a target download (HTTP ``Range``); it returns the
  offset the body really starts at (0 when the server ignored the range), so the caller
  appends or starts over. The hash is always checked on the whole file by the caller.

Lengths come from signed metadata, never from what a server says.
"""

from __future__ import annotations

import abc
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import httpx
from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError
from tuf.ngclient.fetcher import FetcherInterface

import agent

logger = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")
# Statuses that mean "this file is not there" to the TUF client.
_NOT_FOUND = frozenset({403, 404, 410})


@dataclass(frozen=True)
class TransferLimits:
    """Timeouts and progress rules of one transfer (one metadata file or one target).

    ``read_timeout_s`` bounds the silence between two pieces of data; ``deadline_s``
    bounds the whole transfer; ``min_bytes_per_s`` is the slowest average allowed over
    each ``progress_window_s`` (0 disables the progress rule).
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    deadline_s: float = 600.0
    min_bytes_per_s: float = 0.0
    progress_window_s: float = 30.0
    # Called when a transfer starts and after every piece of data it receives (not while
    # it only waits): the agent's watchdog counts an update check's deadline from there.
    on_progress: Callable[[], None] | None = None


class TransferGuard:
    """Enforces a transfer's overall deadline and minimum progress.

    Call ``observe(n)`` after every piece of ``n`` bytes (``n`` may be 0 for "still
    waiting"). Raises ``DownloadError`` naming the rule broken; never touches I/O. Reports
    progress to ``limits.on_progress`` at the start and for every piece of data.
    """

    def __init__(
        self, what: str, limits: TransferLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._what = what
        self._limits = limits
        self._clock = clock
        self._started = clock()
        self._window_started = self._started
        self._window_bytes = 0
        self.received = 0
        if limits.on_progress is not None:
            limits.on_progress()

    def remaining_s(self) -> float:
        """Seconds left before the overall deadline (may be negative)."""
        return self._limits.deadline_s - (self._clock() - self._started)

    def observe(self, n: int) -> None:
        now = self._clock()
        self.received += n
        self._window_bytes += n
        limits = self._limits
        if n and limits.on_progress is not None:
            limits.on_progress()
        if now - self._started > limits.deadline_s:
            raise DownloadError(
                f"{self._what}: download exceeded its deadline of {limits.deadline_s:g}s "
                f"({self.received} bytes received)"
            )
        elapsed = now - self._window_started
        if limits.min_bytes_per_s > 0 and elapsed >= limits.progress_window_s:
            needed = limits.min_bytes_per_s * elapsed
            if self._window_bytes < needed:
                raise DownloadError(
                    f"{self._what}: below the minimum progress of "
                    f"{limits.min_bytes_per_s:g} bytes/s: {self._window_bytes} bytes in "
                    f"{elapsed:.1f}s"
                )
            self._window_started = now
            self._window_bytes = 0


class ResumableFetcher(FetcherInterface):
    """A TUF fetcher that can also resume a target from an offset."""

    @abc.abstractmethod
    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """Fetch ``url`` from byte ``offset``; return (offset the body starts at, body).

        The returned offset is ``offset`` or 0 (the source cannot resume: start over).
        Raises ``DownloadHTTPError`` (not found: status 404) or ``DownloadError``, also
        while the body is iterated.
        """

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.fetch_from(url, 0)[1]

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """python-tuf's ``download_file`` (a temporary file of at most ``max_length``
        bytes), except that the body is closed before this returns or raises, whatever
        ended it (module docstring: a body left to the garbage collector can deadlock)."""
        with tempfile.TemporaryFile() as temp_file:
            chunks = self.fetch(url)
            try:
                received = 0
                for chunk in chunks:
                    received += len(chunk)
                    if received > max_length:
                        raise DownloadLengthMismatchError(
                            f"Downloaded {received} bytes exceeding the maximum allowed "
                            f"length of {max_length}"
                        )
                    temp_file.write(chunk)
            finally:
                close_body(chunks)
            temp_file.seek(0)
            yield temp_file

    def close(self) -> None:
        """Release connections."""


class HttpxFetcher(ResumableFetcher):
    """Fetches metadata and targets over HTTP with one pooled ``httpx.Client``."""

    def __init__(self, limits: TransferLimits) -> None:
        self._limits = limits
        self._client = httpx.Client(
            timeout=httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s),
            headers={"User-Agent": f"edge-agent/{agent.__version__}"},
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        guard = TransferGuard(url, self._limits)
        response = self._send(url, offset)
        if response.status_code == 416 and offset:
            # The range is past the server's end (a shorter or replaced file): start over.
            response.close()
            offset, response = 0, self._send(url, 0)
        status = response.status_code
        if status == 206 and offset:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                response.close()
                raise DownloadError(
                    f"{url}: asked for bytes from {offset}, the server answered from {start}"
                )
            return offset, _HttpBody(url, response, guard)
        if status == 200:
            return 0, _HttpBody(url, response, guard)
        response.close()
        raise DownloadHTTPError(f"{url}: HTTP {status}", 404 if status in _NOT_FOUND else status)

    def _send(self, url: str, offset: int) -> httpx.Response:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            request = self._client.build_request("GET", url, headers=headers)
            return self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise DownloadError(f"cannot fetch {url}: {exc}") from exc


class _HttpBody(Iterator[bytes]):
    """A response's body as a fetcher hands it out: the guard's rules checked after every
    read from the network, httpx's errors raised as ``DownloadError``, and ``close``
    closing the response whether or not reading began (a generator's ``close`` runs
    nothing before its first step: the connection would stay taken until the garbage
    collector, see the module docstring). It closes itself at its end or first error."""

    def __init__(self, url: str, response: httpx.Response, guard: TransferGuard) -> None:
        self._url = url
        self._response = response
        self._guard = guard
        self._chunks: Iterator[bytes] | None = None

    def __iter__(self) -> _HttpBody:
        return self

    def __next__(self) -> bytes:
        if self._response.is_closed:
            raise DownloadError(f"{self._url}: read after the body was closed")
        try:
            if self._chunks is None:
                # No chunk size: httpx would buffer up to it, and the rules must be
                # checked after every read from the network, however small.
                self._chunks = self._response.iter_bytes()
            chunk = next(self._chunks)
            self._guard.observe(len(chunk))
        except httpx.HTTPError as exc:
            self.close()
            raise DownloadError(f"{self._url}: transfer failed: {exc}") from exc
        except BaseException:  # StopIteration (the end), the guard's DownloadError, ...
            self.close()
            raise
        return chunk

    def close(self) -> None:
        self._response.close()


def close_body(body: Iterator[bytes]) -> None:
    """Close a body a fetcher handed out, however far it was read (module docstring: a
    body left to the garbage collector can deadlock the check)."""
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _range_start(content_range: str) -> int | None:
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    return int(match.group(1)) if match else None


class FallbackFetcher(ResumableFetcher):
    """HTTP first; when HTTP cannot be reached, the MQTT transport (``transport = auto``).

    Only a failure to reach the server falls back: an HTTP answer (404 included) is an
    answer. After a fallback, HTTP is retried once ``retry_primary_s`` have passed.
    URLs are given for the primary; ``translate`` maps one to the secondary's URL.
    """

    def __init__(
        self,
        primary: ResumableFetcher,
        secondary: ResumableFetcher,
        translate: Callable[[str], str],
        retry_primary_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._primary = primary
        self._secondary = secondary
        self._translate = translate
        self._retry_primary_s = retry_primary_s
        self._clock = clock
        self._primary_down_until = float("-inf")

    def close(self) -> None:
        self._primary.close()
        self._secondary.close()

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        if self._clock() >= self._primary_down_until:
            try:
                return self._primary.fetch_from(url, offset)
            except DownloadHTTPError:
                raise
            except DownloadError as exc:
                logger.warning("HTTP repository unreachable (%s); falling back to MQTT", exc)
                self._primary_down_until = self._clock() + self._retry_primary_s
        return self._secondary.fetch_from(self._translate(url), offset)
