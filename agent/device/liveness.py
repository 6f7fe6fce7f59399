"""Liveness of the agent's long-lived loops: what decides whether the watchdog is fed.

The agent is healthy only while every loop it depends on works: the update loop, the
probation judge, the telemetry heartbeat, the MQTT link and the inference acceptor. A
loop is *watched* with a probe that says whether its task or thread still runs. A loop
that works in passes (one update check, one probation tick, one heartbeat) also reports
each pass: its start, with that pass's own deadline, and its end; a loop that must pass
regularly is watched with the longest it may stay between passes (``idle_s``).

``judge`` is the rule, a pure function of the loops' states and ``now``: healthy when
every watched loop is alive (its task or thread has not ended), none is stuck (no pass
running past its deadline) and none is late (idle past its ``idle_s``: a loop whose task
runs but whose passes stopped coming, as a schedule kept on a wall clock that stepped
back did); otherwise it names each problem. The orchestrator
(``agent.app``) feeds systemd's watchdog only while the verdict is healthy, so a dead or
hung loop gets the agent killed and restarted instead of running on, deaf to its fleet.

Invariants: ``judge`` touches no clock, thread or I/O. ``Liveness`` is safe to call from
any thread; its times come from one monotonic clock (injected for tests); a loop has at
most one pass at a time (``begin`` while a pass runs starts it again, ``renew`` restarts
its clock only if one runs); a loop must be watched before it begins or ends a pass; a
loop is idle from when it is watched, and again from the end of each pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LoopState:
    """One watched loop as sampled: alive, and the pass it is in (if any)."""

    name: str
    alive: bool
    pass_started_at: float | None = None
    pass_deadline_s: float | None = None
    # Between passes: since when, and the longest it may stay so (None: no cadence).
    idle_since: float | None = None
    idle_s: float | None = None


@dataclass(frozen=True)
class Verdict:
    """Healthy when there is no problem; each problem is one line naming the loop."""

    problems: tuple[str, ...] = ()

    @property
    def is_healthy(self) -> bool:
        return not self.problems


def judge(loops: Iterable[LoopState], now: float) -> Verdict:
    """Whether every loop is alive, within its pass deadline and not late, as of ``now``."""
    problems = []
    for loop in loops:
        if not loop.alive:
            problems.append(f"{loop.name} loop has ended")
        elif loop.pass_started_at is not None and loop.pass_deadline_s is not None:
            running_s = now - loop.pass_started_at
            if running_s > loop.pass_deadline_s:
                problems.append(
                    f"{loop.name} loop is stuck: one pass has run {running_s:.0f}s, "
                    f"past its deadline of {loop.pass_deadline_s:g}s"
                )
        elif loop.idle_since is not None and loop.idle_s is not None:
            idle_s = now - loop.idle_since
            if idle_s > loop.idle_s:
                problems.append(
                    f"{loop.name} loop is late: no pass for {idle_s:.0f}s, "
                    f"expected one within {loop.idle_s:g}s"
                )
    return Verdict(tuple(problems))


@dataclass
class _Watched:
    is_alive: Callable[[], bool]
    idle_since: float
    idle_s: float | None
    started_at: float | None = None
    deadline_s: float | None = None

    def pass_and_idle(self) -> tuple[float | None, float | None, float, float | None]:
        return self.started_at, self.deadline_s, self.idle_since, self.idle_s


class Liveness:
    """The registry of watched loops (thread-safe); ``verdict`` applies ``judge``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._loops: dict[str, _Watched] = {}

    def watch(self, name: str, is_alive: Callable[[], bool], idle_s: float | None = None) -> None:
        """Watch loop ``name``; ``is_alive`` must be cheap and never block. ``idle_s``: the
        longest the loop may go without a pass (from now, then from each pass's end)."""
        with self._lock:
            self._loops[name] = _Watched(is_alive, self._clock(), idle_s)

    def begin(self, name: str, deadline_s: float) -> None:
        """Loop ``name`` starts a pass that must end within ``deadline_s``.

        Raises KeyError naming the loop when it is not watched.
        """
        with self._lock:
            loop = self._watched(name)
            loop.started_at = self._clock()
            loop.deadline_s = deadline_s

    def renew(self, name: str) -> None:
        """The pass of ``name`` made progress: its deadline counts from now (no-op between
        passes, and for a loop not watched yet: progress may be reported from code that
        also runs before the loops start)."""
        with self._lock:
            loop = self._loops.get(name)
            if loop is not None and loop.started_at is not None:
                loop.started_at = self._clock()

    def end(self, name: str) -> None:
        """Loop ``name`` finished its pass (however it ended)."""
        with self._lock:
            loop = self._watched(name)
            loop.started_at = None
            loop.deadline_s = None
            loop.idle_since = self._clock()

    @contextmanager
    def passing(self, name: str, deadline_s: float) -> Iterator[None]:
        """``begin`` and, on the way out (an exception included), ``end``."""
        self.begin(name, deadline_s)
        try:
            yield
        finally:
            self.end(name)

    def states(self) -> list[LoopState]:
        """Every watched loop as it is now (calls each probe), sorted by name."""
        with self._lock:
            taken = [
                (loop.is_alive, LoopState(name, True, *loop.pass_and_idle()))
                for name, loop in sorted(self._loops.items())
            ]
        # Probes run outside the lock: a probe may take its own locks.
        return [replace(state, alive=probe()) for probe, state in taken]

    def verdict(self) -> Verdict:
        return judge(self.states(), self._clock())

    def _watched(self, name: str) -> _Watched:
        try:
            return self._loops[name]
        except KeyError:
            watched = sorted(self._loops)
            raise KeyError(f"loop {name!r} is not watched (watched: {watched})") from None
