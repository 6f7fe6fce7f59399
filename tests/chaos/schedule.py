"""The plan of a chaos run: a pure function of the seed and the run's length.

Decided before anything starts, so the same seed gives the same plan:

- process and environment faults (``Step``): SIGKILL of an agent and its restart, SIGKILL
  of `edgectl serve` and its restart, a broker stopped and started again, the tmpfs
  state folder of one agent filled up and freed, steps of one agent's clock;
- the operator's releases (``Release``): per cycle, a staged rollout of a good version,
  a staged rollout of a bad one (its model fails real requests) and a plain release in
  the first fleet; plain releases in the second.

Connection faults are not here: each proxy draws them, request by request, from its own
generator seeded with the same seed (``tests.chaos.proxy``). What cannot be replayed is
the interleaving with the processes' own timing; what faults happen, in what order, to
whom, and when (to the scheduler's precision) is replayed.

Invariants: steps are sorted by time and lie within ``[0, duration_s)``; a target's
episodes (down → up, full → freed) never overlap and always close before the end, so
when the plan is over every process runs and the disk has room again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Process and environment faults, as counted in the tally.
AGENT_SIGKILL = "agent.sigkill"
SERVE_SIGKILL = "serve.sigkill"
BROKER_RESTART = "broker.restart"
DISK_FULL = "disk.full"
CLOCK_STEP = "clock.step"
# The step that ends an episode (not a fault).
AGENT_START = "agent.start"
SERVE_START = "serve.start"
BROKER_START = "broker.start"
DISK_FREE = "disk.free"

HOUR_S = 3600.0
# Offsets the stepped clock moves between. Within the timestamp role's lifetime (one
# day) in both directions, so a stepped device can still judge metadata fresh.
CLOCK_OFFSETS_S = tuple(h * HOUR_S for h in (-6, -3, -1, 0, 1, 3, 6))


@dataclass(frozen=True)
class Step:
    at_s: float
    action: str
    target: str = ""
    # The clock's new offset from real time (s), for CLOCK_STEP.
    offset_s: float = 0.0


@dataclass(frozen=True)
class Release:
    """One operator command: ``how`` is "rollout" (staged, `edgectl rollout start`) or
    "release" (`edgectl release`, the whole fleet at once)."""

    at_s: float
    fleet: str
    version: str
    how: str
    bad: bool = False


@dataclass(frozen=True)
class Plan:
    seed: int
    duration_s: float
    steps: tuple[Step, ...]
    releases: tuple[Release, ...]


@dataclass(frozen=True)
class Rates:
    """Mean seconds between episodes, and how long an episode lasts (min, max)."""

    agent_kill_gap_s: float = 60.0  # per device
    agent_down_s: tuple[float, float] = (0.3, 4.0)
    serve_kill_gap_s: float = 35.0
    serve_down_s: tuple[float, float] = (0.3, 3.0)
    broker_gap_s: float = 40.0
    broker_down_s: tuple[float, float] = (0.5, 3.0)
    disk_gap_s: float = 25.0
    disk_full_s: tuple[float, float] = (3.0, 12.0)
    clock_gap_s: float = 20.0
    cycle_s: float = 75.0


def make_plan(
    seed: int,
    duration_s: float,
    devices: list[str],
    *,
    disk_device: str,
    clock_device: str,
    fleets: tuple[str, str],
    rates: Rates | None = None,
) -> Plan:
    """The whole plan of a run of ``duration_s`` seconds of faults."""
    rates = rates or Rates()
    rng = random.Random(f"{seed}:plan")
    steps: list[Step] = []
    for device in devices:
        for start, end in _episodes(rng, duration_s, rates.agent_kill_gap_s, rates.agent_down_s):
            steps += [Step(start, AGENT_SIGKILL, device), Step(end, AGENT_START, device)]
    for start, end in _episodes(rng, duration_s, rates.serve_kill_gap_s, rates.serve_down_s):
        steps += [Step(start, SERVE_SIGKILL), Step(end, SERVE_START)]
    for start, end in _episodes(rng, duration_s, rates.broker_gap_s, rates.broker_down_s):
        steps += [Step(start, BROKER_RESTART), Step(end, BROKER_START)]
    for start, end in _episodes(rng, duration_s, rates.disk_gap_s, rates.disk_full_s):
        steps += [Step(start, DISK_FULL, disk_device), Step(end, DISK_FREE, disk_device)]
    steps += _clock_steps(rng, duration_s, rates.clock_gap_s, clock_device)
    steps.sort(key=lambda s: s.at_s)
    return Plan(seed, duration_s, tuple(steps), _releases(duration_s, rates.cycle_s, fleets))


def _episodes(
    rng: random.Random, duration_s: float, mean_gap_s: float, length_s: tuple[float, float]
) -> list[tuple[float, float]]:
    """Non-overlapping (start, end) episodes, exponential gaps, all ended 1 s before the
    end; at least one when the run is long enough for one, so every kind is exercised."""
    out = []
    t = rng.expovariate(1 / mean_gap_s)
    while True:
        end = t + rng.uniform(*length_s)
        if end >= duration_s - 1.0:
            break
        out.append((round(t, 3), round(end, 3)))
        t = end + rng.expovariate(1 / mean_gap_s)
    latest = duration_s - 1.0 - length_s[1]
    if not out and latest > 0:
        start = rng.uniform(0, latest)
        out.append((round(start, 3), round(start + rng.uniform(*length_s), 3)))
    return out


def _clock_steps(
    rng: random.Random, duration_s: float, mean_gap_s: float, device: str
) -> list[Step]:
    steps, offset = [], 0.0
    t = min(rng.expovariate(1 / mean_gap_s), rng.uniform(0, duration_s - 1.0))
    while t < duration_s - 1.0:
        offset = rng.choice([o for o in CLOCK_OFFSETS_S if o != offset])
        steps.append(Step(round(t, 3), CLOCK_STEP, device, offset))
        t += rng.expovariate(1 / mean_gap_s)
    return steps


def _releases(duration_s: float, cycle_s: float, fleets: tuple[str, str]) -> tuple[Release, ...]:
    """Per cycle: in ``fleets[0]`` a good staged rollout, a bad staged rollout and a good
    release; in ``fleets[1]`` two releases. Versions count up from the initial ones
    (``initial_version``), which the run releases before the faults start."""
    staged, plain = fleets
    cycles = max(1, round(duration_s / cycle_s))
    length = duration_s / cycles
    out: list[Release] = []
    n = {staged: 0, plain: 0}

    def add(cycle: int, fraction: float, fleet: str, how: str, bad: bool = False) -> None:
        n[fleet] += 1
        version = f"{_major(fleets, fleet)}.{n[fleet]}.0"
        at_s = round((cycle + fraction) * length, 3)
        out.append(Release(at_s, fleet, version, how, bad))

    for c in range(cycles):
        add(c, 0.03, staged, "rollout")
        add(c, 0.15, plain, "release")
        add(c, 0.40, staged, "rollout", bad=True)
        add(c, 0.55, plain, "release")
        add(c, 0.75, staged, "release")
    return tuple(sorted(out, key=lambda r: r.at_s))


def _major(fleets: tuple[str, str], fleet: str) -> int:
    """Each fleet has its own versions (1.x.0, 2.x.0), so a device serving the other
    fleet's release is caught."""
    return fleets.index(fleet) + 1


def initial_version(fleets: tuple[str, str], fleet: str) -> str:
    return f"{_major(fleets, fleet)}.0.0"


def final_version(plan: Plan, fleets: tuple[str, str], fleet: str) -> str:
    """The release sent once the faults stop: one past the plan's last for ``fleet``."""
    count = sum(1 for r in plan.releases if r.fleet == fleet)
    return f"{_major(fleets, fleet)}.{count + 1}.0"
