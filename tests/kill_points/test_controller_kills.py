"""Interrupt every controller command at every durable step (issue 19, section 2).

Each command that writes the repository or the device CA is SIGKILLed right after each
of its durable steps (``EDGEFLEET_TEST_KILL_AT_WRITE``, ``controller.base.fsio``); then a
device verifies the repository with python-tuf, ``edgectl serve``'s start-up passes run,
the command (or its natural next one) completes, and no fleet's desired state went
backwards. ``tests/kill_points/harness.py`` says how, step by step.

``KNOWN`` lists kill points that fail on a defect a change in flight is fixing: those
points are expected failures (``xfail``) while they fail, and the test fails once they
all recover, so the entry is dropped with the fix. It is empty: every point recovers.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.kill_points.harness import SERVE_ENV, SPECS, Outcome, Runner, Spec

pytestmark = pytest.mark.slow

# spec name -> (why, the written paths of the kill points that fail on it)
KNOWN: dict[str, tuple[str, str]] = {}


@pytest.mark.parametrize(
    "spec", SPECS, ids=[s.name.replace(", ", "-").replace(" ", "-") for s in SPECS]
)
def test_every_kill_point_recovers(
    spec: Spec, kill_runner: Runner, kill_tally: list[Outcome]
) -> None:
    ref = kill_runner.reference(spec)
    assert ref.steps, f"{spec.name} made no durable step"
    every = os.environ.get(SERVE_ENV) == "every"
    middle = (len(ref.steps) + 1) // 2  # the real `edgectl serve` runs here (or everywhere)
    outcomes = [
        kill_runner.kill_point(spec, ref, k, real_serve=every or k == middle)
        for k in range(1, len(ref.steps) + 1)
    ]
    why, known_paths = KNOWN.get(spec.name, ("", r"(?!)"))
    for o in outcomes:
        if not o.recovered and re.search(known_paths, o.path):
            o.known = why.split(":")[0]
    kill_tally.extend(outcomes)
    failed = [o for o in outcomes if not o.recovered and not o.known]
    assert not failed, "\n".join(f"step {o.step} ({o.path}): {o.problem}" for o in failed)
    known = [o for o in outcomes if not o.recovered]
    assert not why or known, f"every kill point recovers now: drop KNOWN[{spec.name!r}]"
    if known:
        pytest.xfail(f"step(s) {', '.join(str(o.step) for o in known)}: {why}")
