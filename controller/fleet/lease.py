"""Which ``edgectl serve`` leads: a lease row in the telemetry store, with a fencing epoch.

Several ``serve`` processes share one store (PostgreSQL; SQLite behaves the same for one
process). All of them serve the repository over HTTP, ``/metrics`` and ingest; only the
leader runs what signs or decides: the rollout job's promotions, announcements,
re-signing, pruning. The leader is the holder of the row ``leader_lease`` named
``controller``: its ``deadline`` is set by the DATABASE clock (``now()`` + ``lease_s``)
at every renewal, and its ``epoch`` grows by one at every takeover
(``TelemetryStore.lease_claim``). A lease row, not an advisory lock: a stopped
(SIGSTOP) or hung leader keeps its connection, and so an advisory lock, forever; its row
simply expires.

Whether this process may act now is decided locally, without the database, on the
monotonic clock (``holds``): only while ``monotonic_now - started < lease_s - margin``,
``started`` being when its last successful renewal was sent. The database set the
deadline at or after ``started`` (real time), so the holder gives leadership up locally
at least ``margin`` before anyone else can take the row. A renewal that fails or stalls
(database gone, process stopped) therefore loses leadership here first. CLOCK_MONOTONIC
keeps counting while a process is stopped, so after SIGCONT the old leader sees its
lease gone before it does anything, and its next renewal fails (the row has another
holder, or expired: a takeover gives a new epoch either way).

Fencing: callers check ``Leadership.token()`` immediately before each signing or
promotion, not only at the start of a tick; a promotion is also claimed in the store
(``TelemetryStore.claim_promotion``) by a statement that checks the lease row's holder,
epoch and deadline by the database clock, under a uniqueness constraint on
(rollout, stage).

Everything here but ``LeaseKeeper`` is pure (the clock is injected).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from controller.base.errors import ControllerError

logger = logging.getLogger(__name__)

LEASE_NAME: Final = "controller"
DEFAULT_LEASE_S: Final = 15.0


class NotLeaderError(ControllerError):
    """This process does not hold the lease now: it must not sign nor promote."""


class LeaseRow(NamedTuple):
    """The lease as the store holds it: who, which epoch, and the seconds left until its
    deadline by the database clock when read (negative: expired)."""

    holder: str
    epoch: int
    remaining_s: float


class LeaseToken(NamedTuple):
    """What a fenced action carries: the lease name, this holder and its epoch."""

    name: str
    holder: str
    epoch: int


def safety_margin(lease_s: float) -> float:
    """How much sooner than ``lease_s`` a holder stops acting: a fifth of it (covers the
    database's clock running a little faster, and the time between a check and a write)."""
    return lease_s / 5.0


def renew_interval(lease_s: float) -> float:
    """How often the lease is renewed (holder) or tried (others): a fifth of ``lease_s``,
    so a holder gets several tries before it gives up, and a free lease is taken within
    ``lease_s / 5`` of its deadline."""
    return lease_s / 5.0


def holds(started: float | None, now: float, lease_s: float, margin: float) -> bool:
    """The rule: a holder whose last successful renewal was sent at ``started``
    (monotonic) leads at ``now`` only while ``now - started < lease_s - margin``."""
    return started is not None and now - started < lease_s - margin


@dataclass
class _Term:
    epoch: int
    started: float


class Leadership:
    """This process's view of the lease: updated by each renewal's outcome, asked before
    each action. Thread-safe; ``clock`` is monotonic seconds (injected in tests)."""

    def __init__(
        self,
        instance: str,
        lease_s: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = LEASE_NAME,
    ) -> None:
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s!r}")
        self.instance = instance
        self.lease_s = lease_s
        self.margin = safety_margin(lease_s)
        self.name = name
        self.clock = clock
        self._lock = threading.Lock()
        self._term: _Term | None = None
        self._seen: LeaseRow | None = None
        self.takeovers = 0

    def renewed(self, started: float, row: LeaseRow) -> bool:
        """A renewal sent at ``started`` returned ``row``; True when this process gained
        the lease by it (a new epoch)."""
        with self._lock:
            self._seen = row
            if row.holder != self.instance or row.remaining_s <= 0:
                self._term = None
                return False
            gained = self._term is None or self._term.epoch != row.epoch
            if gained:
                self.takeovers += 1
            self._term = _Term(row.epoch, started)
            return gained

    def token(self) -> LeaseToken | None:
        """This holder's token while it leads by the rule (``holds``), else None."""
        with self._lock:
            term = self._term
        if term is None or not holds(term.started, self.clock(), self.lease_s, self.margin):
            return None
        return LeaseToken(self.name, self.instance, term.epoch)

    @property
    def is_leader(self) -> bool:
        return self.token() is not None

    def check(self, what: str) -> LeaseToken:
        """The token, or NotLeaderError naming ``what`` was not done."""
        token = self.token()
        if token is None:
            raise NotLeaderError(
                f"{self.instance} does not hold the controller lease now; {what} is left "
                "to the leader"
            )
        return token

    @property
    def seen(self) -> LeaseRow | None:
        """The lease as the last successful renewal read it (any holder)."""
        with self._lock:
            return self._seen

    @property
    def epoch(self) -> int:
        """The epoch last seen (0 before any renewal succeeded)."""
        seen = self.seen
        return seen.epoch if seen is not None else 0

    def give_up(self) -> LeaseToken | None:
        """Stop leading now (shutting down); the token held, for a release."""
        token = self.token()
        with self._lock:
            self._term = None
        return token


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_local_holder(holder: str, hostname: str, alive: Callable[[int], bool]) -> bool:
    """Whether ``holder`` names a process of this host (the default instance id,
    ``HOSTNAME-PID``) that no longer runs: its lease can be taken at once, not after it
    expires (a serve killed and started again on one host leads again at once). A reused
    pid only makes this say False: the lease then expires as usual."""
    host, sep, pid = holder.rpartition("-")
    return bool(sep) and host == hostname and pid.isdigit() and not alive(int(pid))


def leader_json(row: LeaseRow | None) -> dict[str, object]:
    """The lease as ``edgectl fleet leader --json`` prints it: the holder, its epoch and
    the seconds until the lease expires (``leader`` null when none holds it now)."""
    if row is None:
        return {"leader": None, "epoch": 0, "expires_in_s": None}
    live = row.remaining_s > 0
    return {
        "leader": row.holder if live else None,
        "epoch": row.epoch,
        "expires_in_s": round(row.remaining_s, 1) if live else None,
        "last_holder": row.holder,
    }


def leader_line(row: LeaseRow | None) -> str:
    """The lease in one line, for ``edgectl fleet status`` and ``fleet leader``."""
    if row is None:
        return "leader: none (no edgectl serve has taken the controller lease in this store)"
    if row.remaining_s <= 0:
        return (
            f"leader: none (the lease of {row.holder}, epoch {row.epoch}, expired "
            f"{-row.remaining_s:.0f} s ago: is any edgectl serve running on this store?)"
        )
    return f"leader: {row.holder} (epoch {row.epoch}, lease expires in {row.remaining_s:.1f} s)"


class LeaseStore(Protocol):
    """What the keeper needs of the telemetry store."""

    def lease_claim(self, name: str, holder: str, lease_s: float) -> LeaseRow: ...

    def lease_release(self, name: str, holder: str, epoch: int) -> None: ...

    def lease_take_from(self, name: str, dead: str, holder: str, lease_s: float) -> LeaseRow: ...


class LeaseKeeper:
    """A thread that renews (or tries to take) the lease every ``renew_interval``."""

    def __init__(
        self,
        store: LeaseStore,
        leadership: Leadership,
        on_gained: Callable[[LeaseToken], None] | None = None,
    ) -> None:
        self.store = store
        self.leadership = leadership
        self.on_gained = on_gained
        self.interval_s = renew_interval(leadership.lease_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._leading = False
        self._follows: tuple[str, int] | None = None
        hostname = socket.gethostname()
        self._dead: Callable[[str], bool] = lambda h: dead_local_holder(h, hostname, pid_alive)

    def renew_once(self) -> None:
        """One renewal; its outcome goes to ``leadership`` (a failure changes nothing:
        leadership then runs out by the clock). Logs each change of leader it sees."""
        lead = self.leadership
        started = lead.clock()
        try:
            row = self.store.lease_claim(lead.name, lead.instance, lead.lease_s)
        except Exception as exc:  # the store unreachable: leadership runs out by the clock
            if not self._failing:
                logger.error("cannot renew the controller lease: %s", exc)
            self._failing = True
            self._note(None)
            return
        if self._failing:
            logger.info("the controller lease can be renewed again")
        self._failing = False
        if row.holder != lead.instance and row.remaining_s > 0 and self._dead(row.holder):
            logger.warning(
                "the controller lease is held by %s, a process of this host that no longer "
                "runs: taking it over now",
                row.holder,
            )
            started = lead.clock()
            try:
                row = self.store.lease_take_from(lead.name, row.holder, lead.instance, lead.lease_s)
            except Exception as exc:  # it expires by itself
                logger.error("cannot take over the controller lease: %s", exc)
        gained = lead.renewed(started, row)
        self._note(row, gained)

    def _note(self, row: LeaseRow | None, gained: bool = False) -> None:
        lead = self.leadership
        token = lead.token()
        if token is not None and (gained or not self._leading):
            logger.warning(
                "%s leads now (epoch %d): rollouts, announcements and signing run here",
                lead.instance,
                token.epoch,
            )
            if self.on_gained is not None:
                self.on_gained(token)
        elif token is None and self._leading:
            logger.warning(
                "%s lost the controller lease: it no longer signs nor promotes", lead.instance
            )
        if row is not None and token is None and (row.holder, row.epoch) != self._follows:
            logger.info(
                "the controller lease is held by %s (epoch %d); %s follows",
                row.holder,
                row.epoch,
                lead.instance,
            )
            self._follows = (row.holder, row.epoch)
        self._leading = token is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.renew_once()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop renewing; with ``release``, give the lease up in the store so another
        process takes it at its next try instead of after ``lease_s``."""
        self._stop.set()
        token = self.leadership.give_up()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 10.0)
        if release and token is not None:
            try:
                self.store.lease_release(token.name, token.holder, token.epoch)
                logger.info("released the controller lease (epoch %d)", token.epoch)
            except Exception as exc:  # it expires by itself
                logger.warning("cannot release the controller lease: %s", exc)
