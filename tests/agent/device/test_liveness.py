"""The watchdog's rule (``agent.device.liveness``): pure, with an injected clock."""

from __future__ import annotations

import pytest

from agent.device.liveness import Liveness, LoopState, judge
from tests.helpers import ManualClock


def test_every_loop_alive_and_idle_is_healthy() -> None:
    verdict = judge([LoopState("update", True), LoopState("mqtt", True)], now=5.0)
    assert verdict.is_healthy
    assert verdict.problems == ()
    assert judge([], now=0.0).is_healthy  # nothing watched yet (before start-up ends)


def test_an_ended_loop_is_named() -> None:
    verdict = judge([LoopState("update", False), LoopState("mqtt", True)], now=5.0)
    assert not verdict.is_healthy
    assert verdict.problems == ("update loop has ended",)


def test_a_pass_is_judged_against_its_own_deadline() -> None:
    within = LoopState("probation", True, pass_started_at=100.0, pass_deadline_s=30.0)
    assert judge([within], now=130.0).is_healthy  # at the deadline: still fine
    (problem,) = judge([within], now=130.5).problems
    assert problem == ("probation loop is stuck: one pass has run 30s, past its deadline of 30s")


def test_a_dead_loop_is_reported_as_dead_even_in_a_pass() -> None:
    dead = LoopState("update", False, pass_started_at=0.0, pass_deadline_s=1.0)
    assert judge([dead], now=100.0).problems == ("update loop has ended",)


def test_the_registry_follows_passes_with_its_clock() -> None:
    clock = ManualClock()
    alive = {"update": True, "telemetry": True}
    liveness = Liveness(clock)
    for name in alive:
        liveness.watch(name, lambda name=name: alive[name])
    assert liveness.verdict().is_healthy

    liveness.begin("update", deadline_s=60.0)
    clock.now += 59.0
    assert liveness.verdict().is_healthy
    liveness.renew("update")  # progress: the deadline counts from now
    clock.now += 59.0
    assert liveness.verdict().is_healthy
    clock.now += 2.0
    assert liveness.verdict().problems == (
        "update loop is stuck: one pass has run 61s, past its deadline of 60s",
    )
    liveness.end("update")
    assert liveness.verdict().is_healthy

    alive["telemetry"] = False
    assert liveness.verdict().problems == ("telemetry loop has ended",)


def test_renew_between_passes_or_before_watching_starts_nothing() -> None:
    clock = ManualClock()
    liveness = Liveness(clock)
    liveness.renew("update")  # e.g. a journal record persisted while restoring
    liveness.watch("update", lambda: True)
    liveness.renew("update")
    (state,) = liveness.states()
    assert state.pass_started_at is None


def test_a_pass_ends_even_when_its_work_raises() -> None:
    clock = ManualClock()
    liveness = Liveness(clock)
    liveness.watch("update", lambda: True)
    with pytest.raises(RuntimeError), liveness.passing("update", deadline_s=1.0):
        raise RuntimeError("boom")
    clock.now += 100.0
    assert liveness.verdict().is_healthy


def test_a_pass_of_an_unwatched_loop_is_refused_naming_it() -> None:
    liveness = Liveness(ManualClock())
    liveness.watch("update", lambda: True)
    with pytest.raises(KeyError, match=r"'probation' is not watched \(watched: \['update'\]\)"):
        liveness.begin("probation", deadline_s=1.0)


# ---------------------------------------------------------------------------- late loops


def test_an_idle_loop_is_judged_against_its_cadence() -> None:
    idle = LoopState("probation", True, idle_since=100.0, idle_s=61.0)
    assert judge([idle], now=161.0).is_healthy  # at the bound: still fine
    assert judge([idle], now=161.5).problems == (
        "probation loop is late: no pass for 62s, expected one within 61s",
    )
    # A loop without a cadence (the MQTT link) is never late; one in a pass is judged by
    # the pass's deadline instead.
    assert judge([LoopState("mqtt", True, idle_since=0.0)], now=1e9).is_healthy
    in_pass = LoopState("probation", True, 1e9 - 1, 30.0, idle_since=0.0, idle_s=61.0)
    assert judge([in_pass], now=1e9).is_healthy


def test_a_loop_whose_passes_stop_coming_is_late_until_one_comes() -> None:
    """What a schedule kept on a wall clock that stepped back looked like: the task runs,
    its job is scheduled, and no pass begins for as long as the step."""
    clock = ManualClock()
    liveness = Liveness(clock)
    liveness.watch("telemetry", lambda: True, idle_s=70.0)  # idle from now
    liveness.watch("mqtt", lambda: True)
    clock.now += 70.0
    assert liveness.verdict().is_healthy
    with liveness.passing("telemetry", deadline_s=60.0):
        clock.now += 50.0  # a long pass is no gap: its deadline judges it
        assert liveness.verdict().is_healthy
    clock.now += 70.0  # idle from the pass's end
    assert liveness.verdict().is_healthy
    clock.now += 1.0
    assert liveness.verdict().problems == (
        "telemetry loop is late: no pass for 71s, expected one within 70s",
    )
    liveness.begin("telemetry", deadline_s=60.0)  # a pass comes: forgiven
    assert liveness.verdict().is_healthy
