"""The TUF fetcher against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tuf.api.exceptions import DownloadError, DownloadHTTPError

from agent.fetcher import HttpxFetcher


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/ok":
            body = b"x" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/drip":
            # Under the read timeout per byte, forever (bounded: 40 bytes, 4 s at most).
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
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _fetcher(deadline_s: float = 30.0) -> HttpxFetcher:
    return HttpxFetcher(connect_timeout_s=2.0, read_timeout_s=1.0, deadline_s=deadline_s)


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


def test_unreachable_server_is_a_download_error() -> None:
    with pytest.raises(DownloadError, match="cannot fetch"):
        list(_fetcher().fetch("http://127.0.0.1:9/nothing"))
