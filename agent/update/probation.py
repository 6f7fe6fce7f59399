"""The probation verdict: after activation, does a new version stay, go, or wait?

A pure function of the policy (from desired state), the probation's elapsed time and
two request-statistics snapshots: ``new`` (the new version since it went live) and
``baseline`` (the previous version's figures just before the swap, or None when nothing
served before). It never reads a clock, a file or a socket; the orchestrator calls it on
a schedule and acts on the verdict.

Elapsed time is counted on the monotonic clock (``ProbationClock``), never as the wall
clock's "now minus the recorded start": a wall clock that steps back (NTP at boot) would
make the elapsed time negative for hours, one that steps forward would end the probation
at once, with none of the evidence it exists to gather. The wall-clock start in the
journal only carries elapsed time across a restart (``agent.update.journal.recover``).

Rules, checked in this order on every evaluation:

1. **Error rate.** ``served`` is requests minus client errors (a 4xx is the caller's
   fault, never the version's). With ``served >= judge_n``, where
   ``judge_n = max(policy.min_requests, MIN_REQUESTS_TO_JUDGE)``, the version is rolled
   back as soon as ``errors / served > max_error_rate``. Before that, it is rolled back
   only when the breach is already certain: ``errors > max_error_rate * judge_n``, i.e.
   the rate would exceed the maximum at ``judge_n`` requests even if every remaining one
   succeeded. So 1 error in 2 requests does not trigger (too little evidence), but a
   version failing every request goes after a couple of them, whatever ``min_requests``.
2. **Latency.** Rolled back when ``new.p99 > max_p99_ratio * baseline.p99``, judged only
   when both snapshots hold at least ``judge_samples = max(policy.min_requests,
   MIN_LATENCY_SAMPLES)`` latency samples (the baseline needs ``MIN_LATENCY_SAMPLES``):
   below ~100 samples a p99 is the maximum of a handful, and one GC pause would roll
   back a good version. Without a baseline (first install) there is nothing to compare.
3. **Duration.** Until ``duration_s`` has elapsed: CONTINUE. Then:
   COMMIT. With ``served >= min_requests`` the reason is "probation passed"; with fewer
   the version is still committed, and the reason says so:
   "probation passed with only N requests (policy min M)".

Why commit, not roll back or wait, when too few requests arrived: the device rolls back
on evidence of harm, never on the absence of evidence. A quiet device (a camera at night)
that rolled back would record the release as failed here and never retry it until a new
release, pinning itself to the old version for no fault of the new one; waiting for
traffic instead would leave the install "in progress" with no bound, the failure this
project exists to avoid. The previous version has no more evidence in its favour than the
new one. Fleet-level evidence is the controller's job: it sums requests across devices
and sees the "only N requests" reason in telemetry before it promotes a rollout.

Raises ValueError on a policy out of range or a negative elapsed time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final

from agent.contracts import ProbationPolicy
from agent.runtime.stats import StatsSnapshot

# Fewest served requests before an error rate is judged (unless the breach is certain).
MIN_REQUESTS_TO_JUDGE: Final = 20
# Fewest latency samples on each side before p99s are compared.
MIN_LATENCY_SAMPLES: Final = 100


class Verdict(Enum):
    CONTINUE = "continue"
    COMMIT = "commit"
    ROLL_BACK = "roll_back"


@dataclass(frozen=True)
class ProbationDecision:
    """What to do with the version on probation, why, and the figures behind it.

    ``reason`` is one line for logs and telemetry that names the rule and its figures.
    """

    verdict: Verdict
    reason: str
    figures: Mapping[str, float | int | None]


def check_policy(policy: ProbationPolicy) -> None:
    """Raise ValueError naming the field when ``policy`` cannot be applied."""
    if not policy.duration_s >= 0:  # also refuses NaN
        raise ValueError(f"probation.duration_s expected >= 0, got {policy.duration_s}")
    if policy.min_requests < 0:
        raise ValueError(f"probation.min_requests expected >= 0, got {policy.min_requests}")
    if not 0 <= policy.max_error_rate <= 1:
        raise ValueError(
            f"probation.max_error_rate expected within [0, 1], got {policy.max_error_rate}"
        )
    if not policy.max_p99_ratio > 0:
        raise ValueError(f"probation.max_p99_ratio expected > 0, got {policy.max_p99_ratio}")


@dataclass(frozen=True)
class ProbationClock:
    """The elapsed probation of ``version`` in one process, on the monotonic clock.

    ``carried_s`` elapsed before this process took it over (0 at activation; what the
    journal vouches for after a restart), ``since`` is the monotonic reading when it did.
    """

    version: str
    carried_s: float
    since: float

    def elapsed_s(self, monotonic_now: float) -> float:
        """Never less than ``carried_s``, whatever the wall clock does."""
        return self.carried_s + max(0.0, monotonic_now - self.since)


def evaluate_probation(
    policy: ProbationPolicy,
    elapsed_s: float,
    new: StatsSnapshot,
    baseline: StatsSnapshot | None,
) -> ProbationDecision:
    """The verdict on the version on probation for ``elapsed_s`` so far.

    See the module docstring for the rules. Raises ValueError when the policy is out of
    range or ``elapsed_s`` is negative (or NaN).
    """
    check_policy(policy)
    if not elapsed_s >= 0:
        raise ValueError(f"elapsed probation expected >= 0 s, got {elapsed_s}")
    elapsed = elapsed_s
    served = new.requests - new.client_errors
    figures: dict[str, float | int | None] = {
        "elapsed_s": elapsed,
        "requests": new.requests,
        "served": served,
        "errors": new.errors,
        "error_rate": new.error_rate,
        "p99_s": new.p99_s,
        "latency_samples": new.window,
        "baseline_p99_s": baseline.p99_s if baseline else None,
        "baseline_latency_samples": baseline.window if baseline else None,
    }
    broken = _error_rule(policy, new, served) or _latency_rule(policy, new, baseline)
    if broken is not None:
        return ProbationDecision(Verdict.ROLL_BACK, broken, figures)
    if elapsed < policy.duration_s:
        return ProbationDecision(
            Verdict.CONTINUE,
            f"on probation: {elapsed:.1f}s of {policy.duration_s:g}s, {served} requests",
            figures,
        )
    if served < policy.min_requests:
        return ProbationDecision(
            Verdict.COMMIT,
            f"probation passed with only {served} requests (policy min {policy.min_requests})"
            f" after {elapsed:.0f}s",
            figures,
        )
    return ProbationDecision(
        Verdict.COMMIT,
        f"probation passed: {served} requests, error rate {new.error_rate:.3g} "
        f"after {elapsed:.0f}s",
        figures,
    )


def _error_rule(policy: ProbationPolicy, new: StatsSnapshot, served: int) -> str | None:
    """The reason the error rate breaks the policy, or None."""
    judge_n = max(policy.min_requests, MIN_REQUESTS_TO_JUDGE)
    limit = policy.max_error_rate
    if served >= judge_n and new.error_rate > limit:
        return (
            f"error rate {new.error_rate:.3g} > max {limit:g} over {served} requests "
            f"({new.errors} errors)"
        )
    if served < judge_n and new.errors > limit * judge_n:
        return (
            f"error rate certain to exceed max {limit:g}: {new.errors} errors in the first "
            f"{served} requests, over {limit * judge_n:g} allowed in {judge_n}"
        )
    return None


def _latency_rule(
    policy: ProbationPolicy, new: StatsSnapshot, baseline: StatsSnapshot | None
) -> str | None:
    """The reason p99 latency breaks the policy against the baseline, or None."""
    if baseline is None or baseline.p99_s is None or new.p99_s is None:
        return None
    if baseline.window < MIN_LATENCY_SAMPLES:
        return None
    if new.window < max(policy.min_requests, MIN_LATENCY_SAMPLES):
        return None
    limit = policy.max_p99_ratio * baseline.p99_s
    if new.p99_s > limit:
        return (
            f"p99 latency {new.p99_s * 1000:.3g} ms > {policy.max_p99_ratio:g} x baseline "
            f"p99 {baseline.p99_s * 1000:.3g} ms over {new.window} requests"
        )
    return None
