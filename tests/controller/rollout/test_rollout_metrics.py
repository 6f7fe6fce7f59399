"""The rollout gauges of ``/metrics`` (controller.rollout.metrics), pure."""

from __future__ import annotations

from dataclasses import replace

from agent.contracts import ProbationPolicy
from controller.rollout.gates import parse_gates
from controller.rollout.metrics import latest_rollouts, render_rollouts
from controller.rollout.stages import (
    Halt,
    OnFailure,
    Rollout,
    RolloutState,
    abandon,
    abort,
    new_rollout,
    pause,
    promote,
)

T0 = 1_700_000_000.0


def _rollout(rollout_id: str, version: str, now: float, model: str = "lin") -> Rollout:
    return new_rollout(
        rollout_id=rollout_id, fleet="lab", model=model, version=version, previous="1.0.0",
        stages=(1, 10, 50, 100), wait_s=60.0, deadline_s=600.0,
        gates=parse_gates("error_rate<0.01,min_devices=3"), canaries=(),
        on_failure=OnFailure.PAUSE, probation=ProbationPolicy(duration_s=30), now=now,
    )  # fmt: skip


def _samples(text: str, name: str) -> dict[str, str]:
    return {
        line.split(" ")[0]: line.split(" ")[1]
        for line in text.splitlines()
        if line.startswith(name + "{")
    }


def test_no_rollout_keeps_help_and_type_lines() -> None:
    text = render_rollouts([])
    for name in ("stage", "percent", "state", "halted"):
        assert f"# TYPE edgefleet_rollout_{name} gauge" in text
    assert "{" not in text


def test_a_running_rollout_is_at_its_stage_and_not_halted() -> None:
    r = promote(_rollout("r1", "2.0.0", T0), T0 + 70)
    text = render_rollouts([r])
    labels = '{fleet="lab",model="lin",version="2.0.0"}'
    assert _samples(text, "edgefleet_rollout_stage") == {f"edgefleet_rollout_stage{labels}": "2"}
    assert _samples(text, "edgefleet_rollout_percent") == {
        f"edgefleet_rollout_percent{labels}": "10.0"
    }
    assert _samples(text, "edgefleet_rollout_halted") == {f"edgefleet_rollout_halted{labels}": "0"}
    states = _samples(text, "edgefleet_rollout_state")
    running = 'edgefleet_rollout_state{fleet="lab",model="lin",version="2.0.0",state="running"}'
    assert states[running] == "1"
    assert sum(map(int, states.values())) == 1 and len(states) == 5  # abandoned is never shown


def test_halted_only_by_a_gate_or_a_deadline_not_by_the_operator() -> None:
    r = _rollout("r1", "2.0.0", T0)
    gate = Halt(at=T0 + 5, stage=0, percent=1.0, kind="gate", reason="error_rate")
    halted = replace(r, state=RolloutState.PAUSED, halt=gate)
    deadline = replace(halted, halt=replace(gate, kind="too_few_devices"))
    aborted_by_gate = replace(halted, state=RolloutState.ABORTED)
    for record, expected in (
        (halted, "1"),
        (deadline, "1"),
        (aborted_by_gate, "1"),
        (pause(r, T0 + 5), "0"),
        (abort(r, T0 + 5), "0"),
        (r, "0"),
    ):
        (value,) = _samples(render_rollouts([record]), "edgefleet_rollout_halted").values()
        assert value == expected, record


def test_only_the_latest_published_rollout_of_each_model_is_shown() -> None:
    old = replace(_rollout("r1", "2.0.0", T0), state=RolloutState.COMPLETED)
    new = _rollout("r2", "3.0.0", T0 + 100)
    never_published = abandon(_rollout("r3", "4.0.0", T0 + 200), T0 + 201, "interrupted")
    other = _rollout("r4", "9.0.0", T0 + 50, model="other")
    latest = latest_rollouts([new, never_published, old, other])
    assert [r.id for r in latest] == ["r2", "r4"]
    text = render_rollouts([old, new, never_published, other])
    assert set(_samples(text, "edgefleet_rollout_halted")) == {
        'edgefleet_rollout_halted{fleet="lab",model="lin",version="3.0.0"}',
        'edgefleet_rollout_halted{fleet="lab",model="other",version="9.0.0"}',
    }


def test_label_values_are_escaped() -> None:
    r = replace(_rollout("r1", "2.0.0", T0), fleet='a"b\\c')
    assert 'fleet="a\\"b\\\\c"' in render_rollouts([r])
