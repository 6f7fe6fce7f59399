"""Faults at every boundary while releases keep coming; the fleet keeps its promises.

A real `edgectl serve`, a real mosquitto, six real agents (two fleets), a client calling
each agent's socket all along. Between the agents and the repository and broker sit
fault-injecting proxies (``tests.chaos.proxy``); the plan (``tests.chaos.schedule``) adds
SIGKILLs of agents and of serve, broker restarts, a full tmpfs state folder and a stepped
clock; the operator ships good releases, staged rollouts and a bad release meanwhile.
The invariants (``tests.chaos.invariants``) are checked during and after the run.

``EDGEFLEET_CHAOS_SEED`` replays a run's plan (random and printed when unset);
``EDGEFLEET_CHAOS_MINUTES`` sets how long the faults last (default 2.5: the whole test
stays under five minutes). See tests/chaos/README.md.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.chaos.fleet import StateDisk
from tests.chaos.run import CONVERGE_S, ChaosRun

DEFAULT_MINUTES = 2.5
MINUTES = float(os.environ.get("EDGEFLEET_CHAOS_MINUTES", DEFAULT_MINUTES))
# The goal for a CI run, scaled down for a shorter one.
FAULTS_GOAL = round(500 * min(1.0, MINUTES / DEFAULT_MINUTES))
KINDS_GOAL = 10


def _seed() -> int:
    raw = os.environ.get("EDGEFLEET_CHAOS_SEED", "")
    return int(raw) if raw else secrets.randbelow(10**6)


@pytest.mark.slow
@pytest.mark.timeout(MINUTES * 60 + CONVERGE_S + 240)
def test_the_fleet_keeps_its_promises_under_faults(
    tmp_path: Path, state_disk: StateDisk, faketime: Path, chaos_tally: list[str]
) -> None:
    seed = _seed()
    run = ChaosRun(tmp_path, seed, MINUTES * 60, state_disk, faketime)
    try:
        run.setup()
        run.run_faults()
        run.converge()
        run.drain_and_stop()
    finally:
        run.close()
        run.outcome.faults = run.faults.snapshot()
        chaos_tally.append(run.outcome.tally(run.violations.total))
        print(f"\nseed {seed}; faults by kind: {dict(sorted(run.faults.snapshot().items()))}")
        print("\n".join(run.summary()))
        print(f"fault log: {tmp_path / 'faults.log'}")
    faults = run.outcome.faults
    assert run.violations.total == 0, (
        f"seed {seed}: {run.violations.total} invariant violation(s) "
        f"{run.violations.by_invariant()} (replay: EDGEFLEET_CHAOS_SEED={seed}):\n"
        + run.violations.report()
    )
    assert sum(faults.values()) >= FAULTS_GOAL and len(faults) >= KINDS_GOAL, (
        f"seed {seed}: only {sum(faults.values())} faults of {len(faults)} kinds "
        f"(goal: {FAULTS_GOAL} of {KINDS_GOAL}): {faults}"
    )
