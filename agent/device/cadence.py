"""The cadence of the agent's periodic loops (the repository poll, the probation judge, the
heartbeat): when each pass is due, on the monotonic clock.

``Cadence`` is the rule, pure: passes are due on a grid ``first + k * interval_s``, each
moved by its own jitter within ``±jitter_s`` (so a fleet does not poll in step); a pass
that overruns the next grid points skips them (no burst to catch up). ``run_every`` is
the asyncio loop that follows it: it sleeps until the next pass is due, runs one pass at
a time, logs a pass that raises and goes on.

Why the monotonic clock: a device's wall clock steps (NTP correcting it at boot, an
operator setting it, a dead RTC battery), by hours, in either direction. A schedule kept
on wall time stalls for as long as a backward step (APScheduler 3 waits until the wall
clock reaches the next fire time again: measured, a job every 0.25 s stopped for the
whole 6 h of a -6 h step, and a later +12 h step did not wake it, since its timer was
already armed on the event loop's monotonic clock for 6 h), and a forward step makes it
compute every missed fire time at once on the event loop (86,400 of them for a 6 h step
of that job, about 0.15 s here). Periodic work means "every N seconds of real time", which is what
``asyncio``'s clock (``time.monotonic``) measures; wall time is only for what is shown
or sent as a date.

Invariants: ``Cadence`` reads no clock; ``run_every`` reads only the event loop's
monotonic clock, never ends on an exception of a pass (only on cancellation), and never
runs two passes of one loop at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Draws a pass's jitter within [-jitter_s, +jitter_s] (``random.uniform``; tests inject).
Draw = Callable[[float, float], float]


@dataclass(frozen=True)
class Cadence:
    """Passes every ``interval_s`` seconds, each moved by at most ``jitter_s`` either way."""

    interval_s: float
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"a cadence's interval_s expected > 0, got {self.interval_s}")
        if not (math.isfinite(self.jitter_s) and self.jitter_s >= 0):
            raise ValueError(f"a cadence's jitter_s expected >= 0, got {self.jitter_s}")

    def next_due(self, due: float, now: float) -> float:
        """The grid point after ``due`` that a pass is due at next, as of ``now``: the
        next one, or, when ``now`` is already past it (the last pass overran), the first
        one after ``now``: missed passes are skipped, not run in a burst."""
        missed = math.floor((now - due) / self.interval_s) if now > due else 0
        return due + (max(missed, 0) + 1) * self.interval_s

    def wait_s(self, due: float, now: float, jitter: float) -> float:
        """How long to sleep, at ``now``, before the pass due at ``due`` moved by
        ``jitter`` (clamped to ``±jitter_s``); never negative."""
        moved = min(max(jitter, -self.jitter_s), self.jitter_s)
        return max(0.0, due + moved - now)

    def draw_jitter(self, draw: Draw) -> float:
        return draw(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0

    @property
    def longest_gap_s(self) -> float:
        """The longest time between the ends of two passes that do not overrun: an
        interval, plus the jitter of both (one early, the next late)."""
        return self.interval_s + 2 * self.jitter_s


async def run_every(
    cadence: Cadence,
    work: Callable[[], Awaitable[object]],
    what: str,
    draw: Draw = random.uniform,
) -> None:
    """Run ``work`` one pass at a time, the first one interval after the start, until
    cancelled. A pass that raises is logged with its traceback; the next runs on time."""
    loop = asyncio.get_running_loop()
    due = loop.time() + cadence.interval_s
    while True:
        await asyncio.sleep(cadence.wait_s(due, loop.time(), cadence.draw_jitter(draw)))
        try:
            await work()
        except Exception:
            # A bug in one pass must not end the loop (the liveness rule would then stop
            # the watchdog): log it, and keep the cadence.
            logger.exception("%s failed; the next pass runs on schedule", what)
        due = cadence.next_due(due, loop.time())
