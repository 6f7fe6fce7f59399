"""The TUF fetchers against a real HTTP server on 127.0.0.1, and the transfer rules as
pure functions of byte counts and an injected clock."""

from __future__ import annotations

import gc
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError

from agent.update.fetcher import (
    FallbackFetcher,
    HttpxFetcher,
    ResumableFetcher,
    TransferGuard,
    TransferLimits,
)
from tests.helpers import ManualClock

BODY = bytes(range(256)) * 40  # 10,240 bytes


class _Handler(BaseHTTPRequestHandler):
    ranges_seen: ClassVar[list[str]] = []
    # Set when a client closed the connection of /endless before its end.
    closed_early: ClassVar[threading.Event] = threading.Event()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send_body(self, body: bytes) -> None:
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/ok":
            self.send_response(200)
            self._send_body(b"x" * 1000)
        elif self.path in ("/ranged", "/no-range", "/wrong-range"):
            header = self.headers.get("Range")
            _Handler.ranges_seen.append(header or "")
            if header and self.path != "/no-range":
                start = int(header.removeprefix("bytes=").rstrip("-"))
                if start >= len(BODY):
                    self.send_error(416)
                    return
                if self.path == "/wrong-range":
                    start = 0
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
                self._send_body(BODY[start:])
            else:
                self.send_response(200)
                self._send_body(BODY)
        elif self.path == "/drip":
            # Under the read timeout per byte (bounded: 40 bytes, 4 s at most).
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):
                try:
                    self.wfile.write(b"d")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
        elif self.path == "/endless":
            # 4 MiB, far more than a client that stops reading leaves in the buffers;
            # a write blocked for 10 s ends it (bounded).
            self.connection.settimeout(10)
            self.send_response(200)
            self.send_header("Content-Length", str(4 * 2**20))
            self.end_headers()
            try:
                for _ in range(256):
                    self.wfile.write(b"e" * 2**14)
            except (BrokenPipeError, ConnectionResetError):
                _Handler.closed_early.set()
            except OSError:
                return
        elif self.path == "/gone":
            self.send_error(410)
        elif self.path == "/broken":
            self.send_error(500)
        else:
            self.send_error(404)


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False  # a drip still writing must not hold up the teardown
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.ranges_seen = []
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _fetcher(deadline_s: float = 30.0, **rules: float) -> HttpxFetcher:
    return HttpxFetcher(
        TransferLimits(connect_timeout_s=2.0, read_timeout_s=1.0, deadline_s=deadline_s, **rules)
    )


def test_fetches_a_body(server: str) -> None:
    assert b"".join(_fetcher().fetch(f"{server}/ok")) == b"x" * 1000


@pytest.mark.parametrize(("path", "status"), [("/missing", 404), ("/gone", 404), ("/broken", 500)])
def test_http_errors_carry_the_status_tuf_needs(server: str, path: str, status: int) -> None:
    with pytest.raises(DownloadHTTPError) as info:
        list(_fetcher().fetch(f"{server}{path}"))
    assert info.value.status_code == status


def test_a_drip_under_the_read_timeout_hits_the_deadline(server: str) -> None:
    with pytest.raises(DownloadError, match="exceeded its deadline of 1s"):
        list(_fetcher(deadline_s=1.0).fetch(f"{server}/drip"))


def test_a_drip_breaks_the_minimum_progress_rule_long_before_the_deadline(server: str) -> None:
    fetcher = _fetcher(deadline_s=600.0, min_bytes_per_s=100.0, progress_window_s=0.5)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="below the minimum progress of 100 bytes/s"):
        list(fetcher.fetch(f"{server}/drip"))
    assert time.monotonic() - started < 3.0


def test_a_body_refused_for_its_length_is_closed_then_not_by_the_garbage_collector(
    server: str,
) -> None:
    """python-tuf refuses a body longer than it may be halfway through; the fetcher closes
    the body then. Left to the garbage collector, it would close at a random moment, in
    httpcore 1.0.x possibly inside its pool's lock on the same thread: the update check
    deadlocked that way in the chaos test (encode/httpcore#990). With the collector off
    and the error kept, the server sees the connection closed only if the fetcher closed it."""
    _Handler.closed_early = threading.Event()
    fetcher = _fetcher()
    gc.disable()
    try:
        # The error is kept, as the agent keeps it (``raise ... from``, logged, wrapped):
        # its traceback holds python-tuf's frame, and that frame the body.
        with pytest.raises(DownloadLengthMismatchError) as kept:
            fetcher.download_bytes(f"{server}/endless", 1000)
        assert _Handler.closed_early.wait(8), "the refused body's connection stayed open"
        del kept
        assert fetcher.download_bytes(f"{server}/ok", 1000) == b"x" * 1000
    finally:
        gc.enable()
        fetcher.close()


def test_python_tuf_downloads_through_download_file_or_download_bytes_only() -> None:
    """The closing above lives in ``download_file`` (``download_bytes`` calls it): were
    python-tuf's Updater to iterate ``fetch`` itself, the fix would lapse silently."""
    import inspect

    from tuf.ngclient import updater

    calls = set(re.findall(r"self\._fetcher\.(\w+)\(", inspect.getsource(updater)))
    assert calls <= {"download_file", "download_bytes"}, calls


def test_a_body_closed_before_its_first_read_frees_its_connection(server: str) -> None:
    """A caller that cannot start on a body (its part file refused) closes it: that
    closes the connection too, not only a body that was read from."""
    _Handler.closed_early = threading.Event()
    fetcher = _fetcher()
    try:
        start, body = fetcher.fetch_from(f"{server}/endless", 0)
        assert start == 0
        close = body.close
        close()
        assert _Handler.closed_early.wait(8), "the unread body's connection stayed open"
        with pytest.raises(DownloadError, match="after the body was closed"):
            next(iter(body))
    finally:
        fetcher.close()


def test_unreachable_server_is_a_download_error() -> None:
    with pytest.raises(DownloadError, match="cannot fetch"):
        list(_fetcher().fetch("http://127.0.0.1:9/nothing"))


def test_resume_asks_for_a_range_and_gets_the_rest(server: str) -> None:
    start, body = _fetcher().fetch_from(f"{server}/ranged", 4000)
    assert start == 4000
    assert b"".join(body) == BODY[4000:]
    assert _Handler.ranges_seen == ["bytes=4000-"]


def test_a_server_that_ignores_ranges_starts_over(server: str) -> None:
    start, body = _fetcher().fetch_from(f"{server}/no-range", 4000)
    assert start == 0
    assert b"".join(body) == BODY


def test_a_range_past_the_end_starts_over(server: str) -> None:
    start, body = _fetcher().fetch_from(f"{server}/ranged", len(BODY) + 10)
    assert (start, b"".join(body)) == (0, BODY)
    assert _Handler.ranges_seen == [f"bytes={len(BODY) + 10}-", ""]


def test_a_range_answered_from_elsewhere_is_refused(server: str) -> None:
    with pytest.raises(DownloadError, match="asked for bytes from 4000, the server answered"):
        _fetcher().fetch_from(f"{server}/wrong-range", 4000)


# ---------------------------------------------------------------------------- pure rules


def test_guard_deadline() -> None:
    clock = ManualClock()
    guard = TransferGuard("f", TransferLimits(deadline_s=10.0), clock)
    clock.now += 9.9
    guard.observe(1)
    clock.now += 0.2
    with pytest.raises(DownloadError, match=r"exceeded its deadline of 10s \(2 bytes received\)"):
        guard.observe(1)


def test_guard_minimum_progress_is_judged_per_window() -> None:
    clock = ManualClock()
    limits = TransferLimits(deadline_s=1e6, min_bytes_per_s=10.0, progress_window_s=5.0)
    guard = TransferGuard("f", limits, clock)
    for _ in range(5):  # 50 bytes in 5 s: exactly the minimum, the window starts over
        clock.now += 1.0
        guard.observe(10)
    clock.now += 4.9
    guard.observe(0)  # the window is not over yet: nothing judged
    clock.now += 0.2
    with pytest.raises(DownloadError, match=r"minimum progress of 10 bytes/s: 0 bytes in 5\.1s"):
        guard.observe(0)


def test_guard_reports_progress_at_the_start_and_for_data_only() -> None:
    """What renews the update check's watchdog deadline: a transfer starting and bytes
    arriving; a transfer that only waits (``observe(0)``) reports nothing."""
    reports: list[int] = []
    limits = TransferLimits(deadline_s=10.0, on_progress=lambda: reports.append(1))
    guard = TransferGuard("x", limits, clock=ManualClock())
    assert len(reports) == 1
    guard.observe(0)
    guard.observe(0)
    assert len(reports) == 1
    guard.observe(512)
    assert len(reports) == 2


def test_guard_without_a_progress_rule_only_has_the_deadline() -> None:
    clock = ManualClock()
    guard = TransferGuard("f", TransferLimits(deadline_s=100.0, min_bytes_per_s=0), clock)
    clock.now += 99
    guard.observe(0)


class _Scripted(ResumableFetcher):
    def __init__(self, outcome: Exception | None) -> None:
        self.outcome = outcome
        self.urls: list[str] = []

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        self.urls.append(url)
        if self.outcome is not None:
            raise self.outcome
        return offset, iter([b"ok"])


def test_fallback_only_on_an_unreachable_primary_and_retries_it_later() -> None:
    clock = ManualClock()
    down = _Scripted(DownloadError("cannot fetch"))
    mqtt = _Scripted(None)
    fetcher = FallbackFetcher(down, mqtt, lambda u: "mqtt://repository/" + u, 60.0, clock)
    assert b"".join(fetcher.fetch("a")) == b"ok"
    assert b"".join(fetcher.fetch("b")) == b"ok"
    assert down.urls == ["a"]  # not asked again while it is known down
    assert mqtt.urls == ["mqtt://repository/a", "mqtt://repository/b"]
    clock.now += 61
    fetcher.fetch("c")
    assert down.urls == ["a", "c"]


def test_fallback_passes_a_not_found_through() -> None:
    missing = _Scripted(DownloadHTTPError("nope", 404))
    mqtt = _Scripted(None)
    fetcher = FallbackFetcher(missing, mqtt, lambda u: u, 60.0)
    with pytest.raises(DownloadHTTPError):
        fetcher.fetch("2.root.json")
    assert mqtt.urls == []
