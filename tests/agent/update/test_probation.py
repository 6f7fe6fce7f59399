"""The probation verdict: every rule, its boundaries, no baseline, too few samples.

Pure: snapshots are built by hand or through a real RequestStats; elapsed time is a
number, and ``ProbationClock`` (what the lifecycle counts it with) takes the monotonic
clock's readings, whatever the wall clock does meanwhile.
"""

from __future__ import annotations

import math

import pytest

from agent.contracts import ProbationPolicy
from agent.runtime.stats import Outcome, RequestStats, StatsSnapshot
from agent.update.probation import (
    MIN_LATENCY_SAMPLES,
    MIN_REQUESTS_TO_JUDGE,
    ProbationClock,
    ProbationDecision,
    Verdict,
    evaluate_probation,
)

POLICY = ProbationPolicy(duration_s=60.0, min_requests=0, max_error_rate=0.05, max_p99_ratio=2.0)


def snap(
    requests: int,
    errors: int = 0,
    client_errors: int = 0,
    p99_s: float | None = None,
    window: int | None = None,
) -> StatsSnapshot:
    ok = requests - errors - client_errors
    samples = ok if window is None else window
    return StatsSnapshot(
        requests=requests,
        errors=errors,
        client_errors=client_errors,
        p50_s=p99_s,
        p95_s=p99_s,
        p99_s=p99_s if samples else None,
        window=samples,
    )


BASELINE = snap(5000, p99_s=0.010, window=4096)


def decide(
    new: StatsSnapshot,
    *,
    elapsed: float = 10.0,
    policy: ProbationPolicy = POLICY,
    baseline: StatsSnapshot | None = BASELINE,
) -> ProbationDecision:
    return evaluate_probation(policy, elapsed, new, baseline)


# ---------------------------------------------------------------------------- error rate


def test_healthy_version_continues_then_commits() -> None:
    new = snap(500, errors=1, p99_s=0.011)
    during = decide(new, elapsed=59.9)
    assert during.verdict is Verdict.CONTINUE
    assert during.reason == "on probation: 59.9s of 60s, 500 requests"
    done = decide(new, elapsed=60.0)  # the boundary: duration reached is enough
    assert done.verdict is Verdict.COMMIT
    assert done.reason.startswith("probation passed: 500 requests")
    assert done.figures["requests"] == 500 and done.figures["errors"] == 1


def test_error_rate_over_the_max_rolls_back_before_the_duration() -> None:
    decision = decide(snap(120, errors=37), elapsed=5.0)
    assert decision.verdict is Verdict.ROLL_BACK
    assert decision.reason == "error rate 0.308 > max 0.05 over 120 requests (37 errors)"
    assert decision.figures["error_rate"] == pytest.approx(37 / 120)


def test_error_rate_boundary_is_exclusive() -> None:
    at_max = snap(100, errors=5)  # exactly 0.05
    assert decide(at_max).verdict is Verdict.CONTINUE
    assert decide(at_max, elapsed=60).verdict is Verdict.COMMIT
    assert decide(snap(100, errors=6)).verdict is Verdict.ROLL_BACK


def test_one_error_in_two_requests_is_not_enough_evidence() -> None:
    assert decide(snap(2, errors=1)).verdict is Verdict.CONTINUE
    # ...but 19 served with one error, below the floor, still waits.
    assert decide(snap(MIN_REQUESTS_TO_JUDGE - 1, errors=1)).verdict is Verdict.CONTINUE


def test_a_certain_breach_rolls_back_before_the_floor() -> None:
    # 2 errors: at 20 requests the rate would be >= 0.1 whatever follows.
    decision = decide(snap(2, errors=2))
    assert decision.verdict is Verdict.ROLL_BACK
    assert "certain to exceed max 0.05: 2 errors in the first 2 requests" in decision.reason


def test_min_requests_raises_the_evidence_needed() -> None:
    policy = ProbationPolicy(duration_s=60, min_requests=200, max_error_rate=0.05)
    # 10% errors over 100 requests: judged only at 200, and 10 <= 0.05 * 200 is not certain.
    assert decide(snap(100, errors=10), policy=policy).verdict is Verdict.CONTINUE
    # 11 errors are more than 200 requests may hold.
    assert decide(snap(100, errors=11), policy=policy).verdict is Verdict.ROLL_BACK
    assert decide(snap(200, errors=11), policy=policy).verdict is Verdict.ROLL_BACK


def test_client_errors_never_count_against_the_version() -> None:
    new = snap(1000, errors=0, client_errors=900)
    decision = decide(new, elapsed=61)
    assert decision.verdict is Verdict.COMMIT
    assert decision.figures["served"] == 100 and decision.figures["error_rate"] == 0.0


def test_zero_max_error_rate_rolls_back_on_the_first_error() -> None:
    policy = ProbationPolicy(duration_s=60, max_error_rate=0.0)
    assert decide(snap(1, errors=1), policy=policy).verdict is Verdict.ROLL_BACK
    assert decide(snap(1000), policy=policy, elapsed=60).verdict is Verdict.COMMIT


# ---------------------------------------------------------------------------- latency


def test_p99_over_the_ratio_rolls_back() -> None:
    decision = decide(snap(300, p99_s=0.0201))
    assert decision.verdict is Verdict.ROLL_BACK
    assert decision.reason == "p99 latency 20.1 ms > 2 x baseline p99 10 ms over 300 requests"
    assert decision.figures["baseline_p99_s"] == 0.010


def test_p99_boundary_is_exclusive() -> None:
    assert decide(snap(300, p99_s=0.020)).verdict is Verdict.CONTINUE


def test_latency_needs_enough_samples_on_both_sides() -> None:
    slow = snap(MIN_LATENCY_SAMPLES - 1, p99_s=1.0)
    assert decide(slow).verdict is Verdict.CONTINUE
    assert decide(snap(MIN_LATENCY_SAMPLES, p99_s=1.0)).verdict is Verdict.ROLL_BACK
    thin_baseline = snap(50, p99_s=0.010)
    assert decide(snap(500, p99_s=1.0), baseline=thin_baseline).verdict is Verdict.CONTINUE
    # min_requests raises the samples the new side needs.
    policy = ProbationPolicy(duration_s=60, min_requests=400)
    assert decide(snap(300, p99_s=1.0), policy=policy).verdict is Verdict.CONTINUE
    assert decide(snap(400, p99_s=1.0), policy=policy).verdict is Verdict.ROLL_BACK


def test_no_baseline_judges_errors_but_not_latency() -> None:
    slow = snap(500, p99_s=5.0)
    decision = decide(slow, baseline=None, elapsed=60)
    assert decision.verdict is Verdict.COMMIT
    assert decision.figures["baseline_p99_s"] is None
    assert decide(snap(500, errors=100), baseline=None).verdict is Verdict.ROLL_BACK


def test_a_baseline_that_served_nothing_is_no_baseline() -> None:
    empty = snap(0)
    assert empty.p99_s is None
    assert decide(snap(500, p99_s=5.0), baseline=empty).verdict is Verdict.CONTINUE


def test_errors_are_judged_before_latency() -> None:
    decision = decide(snap(500, errors=100, p99_s=5.0))
    assert decision.reason.startswith("error rate")


# ---------------------------------------------------------------------------- duration


def test_too_few_requests_at_the_deadline_commits_and_says_so() -> None:
    policy = ProbationPolicy(duration_s=60, min_requests=100)
    decision = decide(snap(7), policy=policy, elapsed=60)
    assert decision.verdict is Verdict.COMMIT
    assert decision.reason == "probation passed with only 7 requests (policy min 100) after 60s"


def test_no_traffic_at_all_commits_after_the_duration() -> None:
    assert decide(snap(0), elapsed=59).verdict is Verdict.CONTINUE
    decision = decide(snap(0), elapsed=60)
    assert decision.verdict is Verdict.COMMIT
    assert decision.figures["p99_s"] is None


def test_zero_duration_commits_at_once_unless_a_rule_broke() -> None:
    policy = ProbationPolicy(duration_s=0)
    assert decide(snap(0), policy=policy, elapsed=0).verdict is Verdict.COMMIT
    assert decide(snap(50, errors=50), policy=policy, elapsed=0).verdict is Verdict.ROLL_BACK


# ---------------------------------------------------------------------------- guards


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (ProbationPolicy(duration_s=-1), "duration_s"),
        (ProbationPolicy(duration_s=math.nan), "duration_s"),
        (ProbationPolicy(min_requests=-1), "min_requests"),
        (ProbationPolicy(max_error_rate=1.5), "max_error_rate"),
        (ProbationPolicy(max_p99_ratio=0), "max_p99_ratio"),
    ],
)
def test_a_policy_out_of_range_raises_naming_the_field(policy: ProbationPolicy, field: str) -> None:
    with pytest.raises(ValueError, match=f"probation.{field} expected"):
        decide(snap(0), policy=policy)


@pytest.mark.parametrize("elapsed", [-1.0, math.nan])
def test_a_negative_elapsed_time_raises(elapsed: float) -> None:
    with pytest.raises(ValueError, match="elapsed probation expected >= 0 s, got"):
        evaluate_probation(POLICY, elapsed, snap(0), None)


# ---------------------------------------------------------------------------- elapsed time


WALL_T0 = 1_780_000_000.0  # the wall clock at activation, as the journal records it


def test_a_wall_clock_stepped_back_neither_stalls_nor_breaks_probation() -> None:
    clock = ProbationClock("2.0.0", carried_s=0.0, since=500.0)  # monotonic at activation
    wall_after_step = WALL_T0 + 10 - 6 * 3600  # 10 s in, NTP steps the wall clock back 6 h
    assert wall_after_step < WALL_T0  # "now - start" on the wall clock: negative for 6 h
    during = decide(snap(40), elapsed=clock.elapsed_s(510.0))
    assert during.verdict is Verdict.CONTINUE and during.figures["elapsed_s"] == 10.0
    done = decide(snap(40), elapsed=clock.elapsed_s(560.0))  # 60 s after activation
    assert done.verdict is Verdict.COMMIT and done.reason.endswith("after 60s")


def test_a_wall_clock_stepped_forward_does_not_end_probation_early() -> None:
    clock = ProbationClock("2.0.0", carried_s=0.0, since=500.0)
    wall_after_step = WALL_T0 + 10 + 6 * 3600  # 10 s in, the wall clock jumps 6 h ahead
    assert wall_after_step - WALL_T0 > POLICY.duration_s  # on wall time: committed at once
    assert decide(snap(40), elapsed=clock.elapsed_s(510.0)).verdict is Verdict.CONTINUE
    assert decide(snap(40), elapsed=clock.elapsed_s(559.9)).verdict is Verdict.CONTINUE
    assert decide(snap(40), elapsed=clock.elapsed_s(560.0)).verdict is Verdict.COMMIT


def test_a_resumed_probation_counts_on_from_what_it_carried() -> None:
    clock = ProbationClock("2.0.0", carried_s=45.0, since=7.0)  # after a restart
    assert clock.elapsed_s(7.0) == 45.0
    assert clock.elapsed_s(22.0) == 60.0
    assert clock.elapsed_s(6.0) == 45.0  # never less than carried


# ---------------------------------------------------------------------------- with real stats


def test_figures_from_the_servers_request_stats() -> None:
    stats = RequestStats()
    for _ in range(MIN_LATENCY_SAMPLES * 2):
        stats.record("m", "1.0.0", 0.004, Outcome.OK)
    for i in range(MIN_LATENCY_SAMPLES * 2):
        stats.record("m", "2.0.0", 0.004 if i % 10 else 0.050, Outcome.OK)
    decision = evaluate_probation(
        POLICY, 30.0, stats.snapshot("m", "2.0.0"), stats.snapshot("m", "1.0.0")
    )
    assert decision.verdict is Verdict.ROLL_BACK
    assert decision.reason == "p99 latency 50 ms > 2 x baseline p99 4 ms over 200 requests"
