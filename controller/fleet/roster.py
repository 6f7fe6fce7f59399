"""Who may report what: each enrolled device's fleet, as ingestion checks every message.

The broker's ACL (``controller.identity.broker``) confines a device to its own topics in
its own fleet, but only once mosquitto has reloaded it, and only on a broker configured
by ``edgectl broker config``. Ingestion checks again against the device registry
(``REPO_DIR/ca/devices.json``): a message whose device is not enrolled, is revoked, or
is enrolled in another fleet than its topic names is refused (``RefusedMessage``),
counted by reason and never stored. So no device steers another fleet's rollout, and a
revoked device still connected (its connection outlives the CRL until the broker cuts
it) stops counting as soon as the registry says so.

The registry belongs to ``controller.identity``, which this package may not import: the
composition root (``controller.app``) hands ``RosterReader`` a loader of
(device, fleet, revoked) entries.

Invariants:
- Without a registry file (devices not enrolled by ``edgectl device add``: an anonymous
  test broker, the demo) there is no roster and every well-formed message is admitted;
  with one, a device it does not list is refused.
- ``Roster.refusal`` is one dict lookup: it runs for every message on ingestion's hot path.
- ``RosterReader.current`` parses the registry again only after the file changed
  (``controller.base.filememo``), and looks at the file at most every
  ``check_interval_s``: a revocation or an enrollment is seen within about that long.
- A registry that cannot be read keeps the last roster read (logged); ``load`` raises,
  so ``edgectl serve`` refuses to start on a damaged registry instead of admitting all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.contracts import PayloadError
from controller.base.errors import ControllerError
from controller.base.filememo import FileMemo

logger = logging.getLogger(__name__)

# Why a message was refused: the labels of ``edgefleet_ingest_refused_total``.
UNENROLLED: Final = "unenrolled"
OTHER_FLEET: Final = "other_fleet"
REVOKED: Final = "revoked"
IMPLAUSIBLE: Final = "implausible"
# Not the roster's: a message the store refused for what it holds (controller.fleet.ingest).
POISON: Final = "poison"
REFUSAL_REASONS: Final = (UNENROLLED, OTHER_FLEET, REVOKED, IMPLAUSIBLE, POISON)

# (device id, fleet, revoked) of every device the registry lists.
RosterEntry = tuple[str, str, bool]


class RefusedMessage(PayloadError):
    """A well-formed message its sender may not send: ``reason`` is one of
    ``REFUSAL_REASONS``. Refused for good (acknowledged, never stored)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Roster:
    """The fleet of each enrolled, unrevoked device, and the revoked ones."""

    fleets: Mapping[str, str]
    revoked: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: Iterable[RosterEntry]) -> Roster:
        fleets: dict[str, str] = {}
        revoked = set()
        for device, fleet, is_revoked in entries:
            if is_revoked:
                revoked.add(device)
            else:
                fleets[device] = fleet
        return cls(fleets, frozenset(revoked))

    def refusal(self, fleet: str, device: str) -> str | None:
        """Why ``device`` may not report on ``fleet``'s topics, or None when it may."""
        own = self.fleets.get(device)
        if own == fleet:
            return None
        if own is not None:
            return OTHER_FLEET
        return REVOKED if device in self.revoked else UNENROLLED

    def check(self, fleet: str, device: str) -> None:
        """Raise RefusedMessage when ``device`` may not report on ``fleet``'s topics."""
        reason = self.refusal(fleet, device)
        if reason is not None:
            own = self.fleets.get(device)
            raise RefusedMessage(
                reason,
                f"device {device!r} "
                + (
                    f"is enrolled in fleet {own!r}, not {fleet!r}"
                    if own is not None
                    else ("is revoked" if reason == REVOKED else "is not enrolled")
                ),
            )


class RosterReader:
    """The roster as the registry file is now (see the module's invariants)."""

    _WARN_EVERY_S: Final = 60.0

    def __init__(
        self,
        path: Path,
        load: Callable[[], Iterable[RosterEntry]],
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._load = load
        self._memo: FileMemo[Roster | None] = FileMemo(path, self._read)
        self._check_interval_s = check_interval_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._roster: Roster | None = None
        self._checked_at: float | None = None
        self._warned_at = -self._WARN_EVERY_S

    def _read(self) -> Roster | None:
        if not self.path.exists():
            return None
        return Roster.of(self._load())

    def load(self) -> Roster | None:
        """Read the registry now; raise what reading it raises (ControllerError, OSError,
        ValueError). None when there is no registry file."""
        with self._lock:
            self._roster = self._memo.get(self._wall_clock())
            self._checked_at = self._clock()
            return self._roster

    def current(self) -> Roster | None:
        """The roster, read again when the file changed (at most every
        ``check_interval_s``); the last one read when reading fails. Never raises."""
        with self._lock:
            now = self._clock()
            if self._checked_at is not None and now - self._checked_at < self._check_interval_s:
                return self._roster
            self._checked_at = now
            try:
                self._roster = self._memo.get(self._wall_clock())
            except (ControllerError, OSError, ValueError) as exc:
                if now - self._warned_at >= self._WARN_EVERY_S:
                    self._warned_at = now
                    logger.error(
                        "ingest: cannot read the device registry %s (%s); checking messages "
                        "against the last one read",
                        self.path,
                        exc,
                    )
            return self._roster
