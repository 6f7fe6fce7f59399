"""The pure core of rollouts: bucketing, desired-state resolution, the stage machine."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace

import pytest

from agent.contracts import (
    DesiredState,
    ModelRelease,
    ProbationPolicy,
    bundle_target_path,
    device_bucket,
    parse_desired_state,
    resolve_release,
)
from controller.base.errors import UsageError
from controller.rollout.gates import Evidence, Incident, Sample, evaluate_gates, parse_gates
from controller.rollout.stages import (
    IllegalTransitionError,
    OnFailure,
    Rollout,
    RolloutState,
    abort,
    advance,
    desired_release,
    new_rollout,
    parse_duration,
    parse_rollout,
    parse_stages,
    pause,
    promote,
    resume,
    stable_version,
    supersede,
)

T0 = 1_700_000_000.0
N_IDS = 100_000


# ---------------------------------------------------------------------------- bucketing


def test_bucket_is_stable_and_is_the_documented_hash() -> None:
    digest = hashlib.sha256(b"r-1\x00cam-0042").digest()
    expected = int.from_bytes(digest[:8], "big") / 2**64 * 100.0
    assert device_bucket("r-1", "cam-0042") == expected == device_bucket("r-1", "cam-0042")
    assert device_bucket("r-2", "cam-0042") != expected


def test_buckets_are_uniform_over_100k_ids() -> None:
    buckets = [device_bucket("lin-2.0.0-abcd1234", f"dev-{i}") for i in range(N_IDS)]
    assert all(0.0 <= b < 100.0 for b in buckets)
    deciles = Counter(int(b // 10) for b in buckets)
    # 10,000 expected per decile, sd ~95: 5 sd of tolerance.
    assert all(abs(deciles[d] - N_IDS / 10) < 500 for d in range(10)), deciles
    for percent in (1, 10, 50):
        share = sum(b < percent for b in buckets) / N_IDS * 100
        assert abs(share - percent) < 0.25 + percent * 0.02, (percent, share)


def test_buckets_of_two_rollouts_are_independent() -> None:
    ids = [f"dev-{i}" for i in range(N_IDS)]
    first = {d for d in ids if device_bucket("rollout-a", d) < 10}
    second = {d for d in ids if device_bucket("rollout-b", d) < 10}
    # Independent draws: ~1 % of devices are in both first 10 % stages, not 10 %.
    assert abs(len(first & second) / N_IDS - 0.01) < 0.002


def _release(percent: float, previous: str | None = "1.0.0", canaries: tuple[str, ...] = ()):
    return ModelRelease(
        version="2.0.0",
        target=bundle_target_path("lin", "2.0.0"),
        rollout_id="lin-2.0.0-x",
        percent=percent,
        previous=previous,
        previous_target=bundle_target_path("lin", previous) if previous else None,
        canaries=canaries,
    )


def test_resolution_grows_with_stages_and_never_moves_a_device_back() -> None:
    ids = [f"dev-{i}" for i in range(2000)]
    new_at: dict[float, set[str]] = {}
    for percent in (0, 1, 10, 50, 100):
        rel = _release(percent)
        new_at[percent] = {d for d in ids if resolve_release(rel, d) == ("2.0.0", rel.target)}
        others = {resolve_release(rel, d) for d in ids} - {("2.0.0", rel.target)}
        assert others <= {("1.0.0", bundle_target_path("lin", "1.0.0"))}
    assert new_at[0] == set() and new_at[100] == set(ids)
    assert new_at[1] <= new_at[10] <= new_at[50] <= new_at[100]


def test_canaries_take_every_stage_and_first_releases_have_no_fallback() -> None:
    rel = _release(0, canaries=("cam-1",))
    assert resolve_release(rel, "cam-1") == ("2.0.0", rel.target)
    assert resolve_release(rel, "cam-2") == ("1.0.0", bundle_target_path("lin", "1.0.0"))
    assert resolve_release(_release(0, previous=None), "cam-2") is None


def test_desired_state_size_does_not_grow_with_the_fleet() -> None:
    r = _rollout(canaries=("c1", "c2", "c3"))
    doc = DesiredState("lab", {"lin": desired_release(r)}).to_json_bytes()
    parsed = parse_desired_state(doc, "lab")
    assert parsed.models["lin"] == desired_release(r)
    # Nothing in it names a device except the canaries: ten or a million devices, same size.
    assert len(doc) < 1024


# ---------------------------------------------------------------------------- parsing


def test_stages_and_durations_parse_and_refuse_nonsense() -> None:
    assert parse_stages("1,10,50,100") == (1.0, 10.0, 50.0, 100.0)
    assert parse_stages("5%,100%") == (5.0, 100.0)
    for bad in ("", "10,5,100", "1,10,50", "0,100", "1,x,100", "50,50,100"):
        with pytest.raises(UsageError):
            parse_stages(bad)
    assert parse_duration("10m", "--wait") == 600
    assert parse_duration("90", "--wait") == 90
    assert parse_duration("1.5h", "--wait") == 5400
    with pytest.raises(UsageError, match="duration"):
        parse_duration("soon", "--wait")


# ---------------------------------------------------------------------------- the stage machine


def _rollout(**kw: object) -> Rollout:
    args: dict[str, object] = {
        "rollout_id": "lin-2.0.0-x",
        "fleet": "lab",
        "model": "lin",
        "version": "2.0.0",
        "previous": "1.0.0",
        "stages": (1, 10, 50, 100),
        "wait_s": 600.0,
        "deadline_s": 1800.0,
        "gates": parse_gates("error_rate<0.01,p99_ratio<1.5,failed_installs<0.02,min_devices=3"),
        "canaries": (),
        "on_failure": OnFailure.PAUSE,
        "probation": ProbationPolicy(duration_s=30),
        "now": T0,
    }
    args.update(kw)
    return new_rollout(**args)  # type: ignore[arg-type]


def _healthy(devices: int, at: float, requests: int = 100) -> Evidence:
    samples = tuple(
        Sample(f"d{i}", at, "2.0.0", requests, 0, 0, 0.010) for i in range(devices)
    ) + tuple(Sample(f"o{i}", at, "1.0.0", requests, 0, 0, 0.010) for i in range(devices))
    return Evidence("2.0.0", "1.0.0", samples)


def _report(evidence: Evidence, r: Rollout):
    return evaluate_gates(r.gates, evidence)


def test_a_healthy_rollout_walks_every_stage_on_the_clock() -> None:
    r = _rollout()
    now = T0
    seen = [r.percent]
    for _ in range(4):
        # Healthy but the wait is not over: nothing moves.
        same = advance(r, _report(_healthy(5, now), r), now + 599)
        assert (same.state, same.stage) == (r.state, r.stage)
        now = r.stage_started_at + 600
        r = advance(r, _report(_healthy(5, now), r), now)
        seen.append(r.percent)
    assert r.state is RolloutState.COMPLETED
    assert seen == [1, 10, 50, 100, 100]
    assert desired_release(r).percent == 100 and desired_release(r).canaries == ()
    assert set(r.passed) == {"0", "1", "2", "3"}


def test_a_broken_gate_halts_with_the_gate_devices_and_figures() -> None:
    r = _rollout()
    bad = Evidence(
        "2.0.0",
        "1.0.0",
        (
            Sample("cam-1", T0 + 5, "2.0.0", 40, 12, 0, 0.01),
            Sample("cam-2", T0 + 5, "2.0.0", 40, 0, 0, 0.01),
        ),
    )
    halted = advance(r, _report(bad, r), T0 + 10)  # long before the wait is over
    assert halted.state is RolloutState.PAUSED
    assert halted.halt is not None and halted.halt.kind == "gate"
    assert "error_rate<0.01" in halted.halt.reason and "cam-1 (12/40 errors)" in halted.halt.reason
    (breach,) = halted.halt.breaches
    assert breach["gate"] == "error_rate" and breach["observed"] == pytest.approx(12 / 80)
    assert list(breach["devices"]) == ["cam-1"]
    assert desired_release(halted).percent == 1  # paused: devices keep what they run

    aborting = replace(r, on_failure=OnFailure.ABORT)
    aborted = advance(aborting, _report(bad, r), T0 + 10)
    assert aborted.state is RolloutState.ABORTED
    assert desired_release(aborted).percent == 0 and desired_release(aborted).canaries == ()


def test_rollbacks_on_canaries_break_failed_installs() -> None:
    r = _rollout(canaries=("c1", "c2", "c3"))
    evidence = Evidence(
        "2.0.0",
        "1.0.0",
        incidents=(
            Incident("c1", T0 + 3, "install_started"),
            Incident("c1", T0 + 4, "rolled_back", "error rate 1 > max 0.05"),
            Incident("c2", T0 + 3, "install_started"),
        ),
    )
    halted = advance(r, _report(evidence, r), T0 + 5)
    assert halted.state is RolloutState.PAUSED
    assert halted.halt is not None
    assert "failed_installs<0.02" in halted.halt.reason
    assert "c1 (rolled_back: error rate 1 > max 0.05)" in halted.halt.reason


def test_too_few_devices_pauses_at_the_deadline_never_before() -> None:
    r = _rollout()
    thin = _healthy(2, T0 + 1)
    assert advance(r, _report(thin, r), T0 + 600).state is RolloutState.RUNNING
    assert advance(r, _report(thin, r), T0 + 1799).state is RolloutState.RUNNING
    paused = advance(r, _report(thin, r), T0 + 1800)
    assert paused.state is RolloutState.PAUSED
    assert paused.halt is not None and paused.halt.kind == "too_few_devices"
    assert "only 2 of min_devices=3" in paused.halt.reason
    # Enough devices late (after the wait, before the deadline) still passes.
    assert advance(r, _report(_healthy(3, T0), r), T0 + 1700).stage == 1


def test_operator_commands_and_the_transition_table() -> None:
    r = _rollout()
    paused = pause(r, T0 + 1, "looking")
    with pytest.raises(IllegalTransitionError, match="not running"):
        pause(paused, T0 + 2)
    # A paused rollout is not advanced by ticks.
    assert advance(paused, _report(_healthy(9, T0), r), T0 + 10_000) == paused
    resumed = resume(paused, T0 + 100)
    assert resumed.state is RolloutState.RUNNING and resumed.stage_started_at == T0 + 100
    assert resumed.halt is None
    with pytest.raises(IllegalTransitionError, match="not paused"):
        resume(resumed, T0 + 101)
    promoted = promote(resumed, T0 + 102)
    assert promoted.stage == 1 and promoted.stage_started_at == T0 + 102
    last = promote(promote(promoted, T0 + 103), T0 + 104)
    done = promote(last, T0 + 105)
    assert done.state is RolloutState.COMPLETED
    for command in (pause, resume, promote, abort):
        with pytest.raises(IllegalTransitionError):
            command(done, T0 + 106)  # type: ignore[operator]
    aborted = abort(promoted, T0 + 110, "bad smell")
    assert aborted.state is RolloutState.ABORTED and aborted.percent == 0
    with pytest.raises(IllegalTransitionError, match="cannot become superseded"):
        supersede(aborted, T0 + 111, "x")


def test_the_record_round_trips_through_json() -> None:
    r = _rollout(canaries=("c1",))
    halted = advance(
        r,
        _report(Evidence("2.0.0", "1.0.0", (Sample("c1", T0, "2.0.0", 30, 30, 0, 0.1),)), r),
        T0 + 1,
    )
    assert parse_rollout(halted.to_json_bytes()) == halted


def test_stable_version_of_an_entry() -> None:
    assert stable_version(None) is None
    assert stable_version(_release(100)) == "2.0.0"
    assert stable_version(_release(10)) == "1.0.0"
    assert stable_version(_release(0, previous=None)) is None


def test_new_rollout_refuses_what_cannot_work() -> None:
    with pytest.raises(UsageError, match="already runs"):
        _rollout(previous="2.0.0")
    with pytest.raises(UsageError, match="deadline"):
        _rollout(wait_s=600.0, deadline_s=60.0)
