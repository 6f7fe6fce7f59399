"""The TUF fetcher over HTTP (httpx): an untrusted transport with its own deadline.

python-tuf verifies everything it is given; this layer only moves bytes and maps
failures the way the client needs them:

- HTTP 404 (and 403/410) → ``DownloadHTTPError(..., status)`` so a probe for the next
  root version means "not found", not "failed";
- any other HTTP error → ``DownloadHTTPError`` with its status;
- a transport error, raised when connecting or while iterating the body →
  ``DownloadError`` (python-tuf does not wrap errors raised during iteration);
- a download that runs past its overall deadline → ``DownloadError`` (python-tuf has no
  overall deadline: a drip just under the read timeout would otherwise run on).

Lengths come from signed metadata, never from the server's headers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import httpx
from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

import agent

logger = logging.getLogger(__name__)


class HttpxFetcher(FetcherInterface):
    """Fetches metadata and targets with one pooled ``httpx.Client``."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        deadline_s: float,
    ) -> None:
        self._deadline_s = deadline_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            headers={"User-Agent": f"edge-agent/{agent.__version__}"},
            follow_redirects=False,
        )

    def close(self) -> None:
        self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        started = time.monotonic()
        try:
            request = self._client.build_request("GET", url)
            response = self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise DownloadError(f"cannot fetch {url}: {exc}") from exc
        if response.status_code != 200:
            response.close()
            status = response.status_code
            if status in (403, 410):
                status = 404
            raise DownloadHTTPError(f"{url}: HTTP {response.status_code}", status)
        return self._body(url, response, started)

    def _body(self, url: str, response: httpx.Response, started: float) -> Iterator[bytes]:
        try:
            # No chunk size: httpx would buffer up to it, and the deadline must be checked
            # after every read from the network, however small.
            for chunk in response.iter_bytes():
                if time.monotonic() - started > self._deadline_s:
                    raise DownloadError(
                        f"{url}: download exceeded its deadline of {self._deadline_s:.0f}s"
                    )
                yield chunk
        except httpx.HTTPError as exc:
            raise DownloadError(f"{url}: transfer failed: {exc}") from exc
        finally:
            response.close()
