"""The invariants of a chaos run, as pure functions of what was observed.

1. **Nothing unverified is served** (``judge_answer``): every answer names a version the
   repository signed for the device's fleet, and its outputs are exactly what that
   version's signed bundle computes for the input.
2. **No client-visible failure** (``classify_failure``) except while the device's own
   agent process is down (SIGKILLed and not yet listening again: counted apart), and the
   errors of the release built to fail real requests (counted apart: they are how its
   probation and the rollout's gates catch it) for ``BAD_RELEASE_GRACE_S`` at most: a
   device whose probation has not rolled it back by then fails its clients for nothing.
3. **Convergence** (``judge_convergence``): the device serves what its fleet's desired
   state names for it, or the version it documentedly went back to (it rolled back or
   failed that very rollout, ``agent.update.journal.should_skip``).
4. **No event lost** (``check_events``): the store holds every event the agent's outbox
   ever numbered, once, in the order of their numbers, with the kind the agent logged.
5. **Bounded memory** (``judge_rss``).

``Violations`` collects them thread-safely; every message names the seed, so the run
that found it can be repeated with ``EDGEFLEET_CHAOS_SEED``.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from agent.update.journal import JournalRecord, Phase, serving_version

UNVERIFIED = "nothing unverified is served"
CLIENT_FAILURE = "no client-visible failure"
CONVERGENCE = "convergence"
EVENTS = "no event lost"
RSS = "agent RSS bound"
AGENT_EXIT = "agents exit only when killed"
# Probation here lasts 2 s and rolls back once the error rate is certain to exceed its
# limit (a few errors): a bad release failing requests on one device for longer than this
# (the agent's downtime included, at most a few seconds) has a probation that is not working.
BAD_RELEASE_GRACE_S = 20.0


class Violations:
    """Every violation found, thread-safe; the first few per (invariant, device) kept whole."""

    KEEP = 5

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()
        self._kept: list[str] = []

    def add(self, invariant: str, device: str, message: str) -> None:
        with self._lock:
            self._counts[(invariant, device)] += 1
            if self._counts[(invariant, device)] <= self.KEEP:
                self._kept.append(f"seed {self.seed}: [{invariant}] {device}: {message}")

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def by_invariant(self) -> dict[str, int]:
        with self._lock:
            out: Counter[str] = Counter()
            for (invariant, _), n in self._counts.items():
                out[invariant] += n
            return dict(out)

    def report(self) -> str:
        with self._lock:
            more = sum(n - min(n, self.KEEP) for n in self._counts.values())
            tail = [f"... and {more} more of the same invariants and devices"] if more else []
            return "\n".join(self._kept + tail)


# ---------------------------------------------------------------------------- 1. served


def judge_answer(
    fleet: str,
    signed_for_fleet: Iterable[str],
    expected: Mapping[str, np.ndarray],
    version: str,
    output: np.ndarray,
) -> str | None:
    """Why this answer breaks invariant 1, or None. ``expected``: per version, what its
    signed bundle computes for the input sent."""
    if version not in set(signed_for_fleet):
        return f"served version {version!r}, which the repository never signed for fleet {fleet}"
    want = expected.get(version)
    if want is None:
        return f"answered under version {version}, whose signed bundle has no answer for this input"
    if output.shape != want.shape or not np.allclose(output, want, rtol=1e-5, atol=1e-6):
        return (
            f"served outputs under version {version} that its signed bundle does not compute: "
            f"got {output.tolist()}, expected {want.tolist()}"
        )
    return None


# ---------------------------------------------------------------------------- 2. failures


@dataclass
class DownWindow:
    """From just before a SIGKILL until the restarted agent listened again (None: not yet)."""

    start: float
    end: float | None = None

    def overlaps(self, started: float, ended: float) -> bool:
        return started <= (self.end if self.end is not None else float("inf")) and (
            ended >= self.start
        )


def classify_failure(
    message: str,
    *,
    large_input: bool,
    model: str,
    bad_versions: Iterable[str],
    windows: Sequence[DownWindow],
    started: float,
    ended: float,
    bad_streak_s: float = 0.0,
) -> str | None:
    """Why a failure is excused ("agent down", "bad release"), or None: a violation.

    A failure is the bad release's when the input is one its model fails on and the
    agent's message names a bad version's run failing, and the device has been failing
    so (with no answer from a good version between) for ``bad_streak_s`` ≤
    ``BAD_RELEASE_GRACE_S``; anything else while the agent process was up is a violation.
    """
    if any(w.overlaps(started, ended) for w in windows):
        return "agent down"
    if (
        large_input
        and is_bad_release_error(message, model, bad_versions)
        and bad_streak_s <= BAD_RELEASE_GRACE_S
    ):
        return "bad release"
    return None


def is_bad_release_error(message: str, model: str, bad_versions: Iterable[str]) -> bool:
    return any(f"model {model!r} {v} failed to run" in message for v in bad_versions)


# ---------------------------------------------------------------------------- 3. convergence


def judge_convergence(
    desired: tuple[str, str] | None,
    rollout_id: str,
    served: str | None,
    record: JournalRecord | None,
) -> str | None:
    """Why a device has not converged, or None when it has.

    ``desired``: (version, target) its fleet's desired state resolves to for it (None:
    nothing). Converged: it serves that version; or its journal says it rolled back or
    failed that version in this very rollout and it serves what it went back to (it will
    not retry until desired state names another rollout: docs/rollouts.md).
    """
    if desired is None:
        return None if served is None else f"serves {served} where desired state names none"
    version = desired[0]
    if served == version:
        return None
    if (
        record is not None
        and record.version == version
        and record.rollout_id == rollout_id
        and record.phase in (Phase.ROLLED_BACK, Phase.FAILED)
        and served == serving_version(record)
    ):
        return None
    return f"serves {served} ({describe_journal(record)}), desired {version}"


def describe_journal(record: JournalRecord | None) -> str:
    """ "journal PHASE VERSION since TIME" (the device's own wall clock), for reports."""
    if record is None:
        return "no journal"
    since = datetime.fromtimestamp(record.entered_at, UTC).strftime("%H:%M:%S")
    return f"journal {record.phase.value} {record.version} since {since} on its clock"


# ---------------------------------------------------------------------------- 4. events


@dataclass(frozen=True)
class Ledger:
    """What an agent's outbox says it produced: every seq from 1 to ``last_seq`` of
    ``stream``, minus ``dropped`` ones it gave up when full (by design, and counted)."""

    stream: str
    last_seq: int
    dropped: int
    pending: int


@dataclass(frozen=True)
class StoredEvent:
    id: int
    stream: str
    seq: int
    kind: str


def check_events(
    ledger: Ledger, stored: Sequence[StoredEvent], logged: Mapping[int, str]
) -> list[str]:
    """The ways the store breaks invariant 4 for one device (empty: none).

    ``logged``: seq → kind, from the agent's log lines ``event N: KIND ...``.
    """
    problems = []
    if ledger.dropped:
        problems.append(f"the outbox dropped {ledger.dropped} event(s) (full)")
    ours = [e for e in stored if e.stream == ledger.stream]
    others = sorted({e.stream for e in stored} - {ledger.stream})
    if others:
        problems.append(f"events of streams the outbox never had: {others}")
    seqs = [e.seq for e in sorted(ours, key=lambda e: e.id)]
    want = list(range(1, ledger.last_seq + 1))
    missing = sorted(set(want) - set(seqs))
    if missing:
        problems.append(f"missing seq {_ranges(missing)} of 1..{ledger.last_seq}")
    extra = sorted(set(seqs) - set(want))
    if extra:
        problems.append(f"seq {_ranges(extra)} stored but never produced")
    if len(seqs) != len(set(seqs)):
        dupes = sorted(s for s, n in Counter(seqs).items() if n > 1)
        problems.append(f"stored more than once: seq {_ranges(dupes)}")
    disorder = [(a, b) for a, b in itertools.pairwise(seqs) if b < a]
    if disorder:
        problems.append(f"stored out of order: {disorder[:5]}")
    kinds = {e.seq: e.kind for e in ours}
    wrong = [(s, k, kinds[s]) for s, k in sorted(logged.items()) if s in kinds and kinds[s] != k]
    if wrong:
        problems.append(f"stored with another kind than logged (seq, logged, stored): {wrong[:5]}")
    return problems


def _ranges(values: Sequence[int]) -> str:
    """[1, 2, 3, 7] → "1-3, 7"."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


# ---------------------------------------------------------------------------- 5. memory


def judge_rss(rss_bytes: int, bound_bytes: int) -> str | None:
    if rss_bytes <= bound_bytes:
        return None
    return f"RSS {rss_bytes / 2**20:.0f} MiB over the bound of {bound_bytes / 2**20:.0f} MiB"
