"""What the operator must renew before it expires, read from the repository for ``/metrics``.

Four things stop the fleet when they expire: the TUF metadata of each role (root and
targets are signed offline; ``edgectl serve`` re-signs snapshot, timestamp and rollout),
the device CA's CRL (``REPO_DIR/ca/crl.pem``: OpenSSL refuses every client once it is
past its next update), the device CA certificate, and each device's client certificate
(``REPO_DIR/ca/devices.json``). ``ExpiryReader.read`` gathers their expiry times as Unix
seconds into an ``Expiries`` value; ``controller.serve.metrics.render_metrics`` renders it.

Invariants:
- ``read`` never raises for a missing or unreadable source: that source's fields stay
  ``None`` (its series is left out) and a warning is logged at most once per source per
  ``warn_interval_s``.
- A repository without a device CA (neither ``ca.key`` nor ``ca.crt`` in ``REPO_DIR/ca``:
  no device was ever enrolled) has no CA, CRL or device-certificate values, and that is
  not a warning.
- No private key is read: TUF metadata comes from ``Repository.load`` (the path
  ``edgectl keys list`` takes, without its key lookup), the CA certificate and CRL from
  ``controller.identity.ca.read_ca_certificate`` / ``read_crl``.
- Device certificates are summarised, never listed (fleets have 100,000 devices): the
  earliest not-after among unrevoked devices and how many end within
  ``DEVICE_CERT_WINDOW_S``. An unrevoked device whose certificate already ended counts
  as expiring: it cannot connect, and only ``edgectl device revoke`` or a re-enrollment
  clears it.
- The registry and the CRL are parsed again only when their file changed
  (``controller.base.filememo``: keyed by its stat, re-read after an atomic replace, an
  in-place rewrite, a removal or a creation). What is kept is time-independent (the
  sorted not-afters, the CRL's next update); the window count is taken at each ``read``
  from ``now_s``, so a certificate crossing into the window is counted without a write.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from controller.base.errors import ControllerError
from controller.base.filememo import FileMemo
from controller.identity.ca import creation_pending, read_ca_certificate, read_crl
from controller.identity.devices import REGISTRY_FILE, DeviceRecord, ca_dir, load_registry
from controller.repository.repo import ALL_ROLES, Repository

logger = logging.getLogger(__name__)

DEVICE_CERT_WINDOW_DAYS: Final = 30
DEVICE_CERT_WINDOW_S: Final = DEVICE_CERT_WINDOW_DAYS * 86400
WARN_INTERVAL_S: Final = 3600.0
# What reading a source may raise when it is missing, damaged or half-written
# (``Repository.load`` raises RepositoryError, a ControllerError, for its files).
_READ_ERRORS: Final = (ControllerError, OSError, ValueError)

T = TypeVar("T")


@dataclass(frozen=True)
class DeviceCertSummary:
    """Unrevoked devices' certificates, summarised.

    ``earliest_not_after_s`` is None when no device is enrolled and unrevoked;
    ``expiring`` counts those whose certificate ends before now + the window (or ended).
    """

    earliest_not_after_s: int | None
    expiring: int


@dataclass(frozen=True)
class Expiries:
    """Expiry times as Unix seconds; None (or a missing role) where the source is absent
    or unreadable."""

    roles_s: dict[str, int]
    ca_not_after_s: int | None = None
    crl_next_update_s: int | None = None
    device_certs: DeviceCertSummary | None = None


def summarize_device_certs(
    records: Iterable[DeviceRecord], now_s: float, window_s: float = DEVICE_CERT_WINDOW_S
) -> DeviceCertSummary:
    """Earliest not-after and the count ending before ``now_s + window_s``, over unrevoked
    records. Raises ValueError naming the device when a ``not_after`` is not ISO 8601
    with a time zone."""
    return summarize_not_afters(device_cert_not_afters(records), now_s, window_s)


def device_cert_not_afters(records: Iterable[DeviceRecord]) -> tuple[int, ...]:
    """The not-after (Unix seconds) of every unrevoked record's certificate, ascending:
    what the summary needs from the registry, independent of the time. Raises
    ValueError naming the device when a ``not_after`` is not ISO 8601 with a time zone."""
    not_afters = []
    for record in records:
        if record.is_revoked:
            continue
        not_after = dt.datetime.fromisoformat(record.not_after)
        if not_after.tzinfo is None:
            raise ValueError(
                f"device {record.device_id}: not_after {record.not_after!r} has no zone"
            )
        not_afters.append(int(not_after.timestamp()))
    return tuple(sorted(not_afters))


def summarize_not_afters(
    not_afters: Sequence[int], now_s: float, window_s: float = DEVICE_CERT_WINDOW_S
) -> DeviceCertSummary:
    """The summary of ascending not-afters (``device_cert_not_afters``) at ``now_s``."""
    earliest = not_afters[0] if not_afters else None
    return DeviceCertSummary(earliest, bisect.bisect_left(not_afters, now_s + window_s))


def has_device_ca(repo_dir: Path) -> bool:
    """True once a device CA was created (``edgectl device add`` or ``broker config``),
    not while its creation is unfinished (``controller.identity.ca.creation_pending``)."""
    folder = ca_dir(repo_dir)
    if creation_pending(folder):
        return False
    return (folder / "ca.key").exists() or (folder / "ca.crt").exists()


class ExpiryReader:
    """Reads ``Expiries`` from a repository directory on each call; rate-limits warnings.

    Thread-safe: ``/metrics`` renders in worker threads, possibly two at once.
    """

    def __init__(
        self,
        repo_dir: Path,
        *,
        warn_interval_s: float = WARN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repo_dir = repo_dir
        self.warn_interval_s = warn_interval_s
        self._clock = clock
        self._last_warned: dict[str, float] = {}
        self._lock = threading.Lock()
        folder = ca_dir(repo_dir)
        self._device_not_afters = FileMemo(folder / REGISTRY_FILE, self._parse_registry)
        self._crl_next_update = FileMemo(
            folder / "crl.pem", functools.partial(_crl_next_update_s, folder)
        )

    def read(self, now_s: float) -> Expiries:
        """Every expiry that can be read now; never raises for a bad source."""
        roles = self._read_roles()
        if not has_device_ca(self.repo_dir):
            return Expiries(roles)
        folder = ca_dir(self.repo_dir)
        ca_not_after = self._attempt(
            "ca", lambda: int(read_ca_certificate(folder).not_valid_after_utc.timestamp())
        )
        crl_next_update = self._attempt("crl", lambda: self._crl_next_update.get(now_s))
        device_certs = self._attempt(
            "devices",
            lambda: summarize_not_afters(self._device_not_afters.get(now_s), now_s),
        )
        return Expiries(roles, ca_not_after, crl_next_update, device_certs)

    def _parse_registry(self) -> tuple[int, ...]:
        # The module's load_registry looked up at each call: tests count parses by
        # wrapping it.
        return device_cert_not_afters(load_registry(self.repo_dir).values())

    def _read_roles(self) -> dict[str, int]:
        repo = self._attempt("repository", lambda: Repository.open(self.repo_dir))
        if repo is None:
            return {}

        def expires_s(opened: Repository, role: str) -> int:
            return int(opened.load(role).signed.expires.timestamp())

        roles: dict[str, int] = {}
        for role in ALL_ROLES:
            expires = self._attempt(f"role {role}", functools.partial(expires_s, repo, role))
            if expires is not None:
                roles[role] = expires
        return roles

    def _attempt(self, source: str, read: Callable[[], T]) -> T | None:
        try:
            return read()
        except _READ_ERRORS as exc:
            self._warn(source, exc)
            return None

    def _warn(self, source: str, exc: BaseException) -> None:
        now = self._clock()
        with self._lock:
            last = self._last_warned.get(source)
            if last is not None and now - last < self.warn_interval_s:
                return
            self._last_warned[source] = now
        logger.warning(
            "/metrics leaves out the %s expiry: %s (repeated at most every %.0f s)",
            source,
            exc,
            self.warn_interval_s,
        )


def _crl_next_update_s(folder: Path) -> int:
    next_update = read_crl(folder).next_update_utc
    if next_update is None:
        raise ValueError(f"the CRL in {folder} has no next update")
    return int(next_update.timestamp())
