"""The verdict on a candidate in shadow: pure rules over its figures and the time it spent.

``evaluate_shadow`` applies a ``ShadowPolicy`` (agent.contracts) to ``ShadowFigures``
(agent.runtime.shadow) and the shadow's elapsed time on the monotonic clock:

- ``fail`` at once when more candidate runs failed than ``max_errors`` allows;
- once ``samples`` requests were compared, or at ``max_duration_s`` with at least one:
  ``fail`` naming the first rule broken (top-1 agreement, cosine, largest difference,
  run-time ratio) with the figures, ``pass`` otherwise;
- at ``max_duration_s`` with nothing compared (no request for the model reached the
  device): ``pass`` on the golden vectors alone, as without a shadow; the probation that
  follows judges the version on live traffic;
- ``wait`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.contracts import ShadowPolicy
from agent.runtime.shadow import ShadowFigures


class ShadowVerdict(StrEnum):
    WAIT = "wait"
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True)
class ShadowDecision:
    verdict: ShadowVerdict
    reason: str


def describe(f: ShadowFigures) -> str:
    """The figures in one line, as events and reasons carry them."""
    agreement = (
        f"top-1 agreement {f.agreement:.3f} ({f.top1_agreed}/{f.top1_rows} rows)"
        if f.agreement is not None
        else "no class-score output"
    )
    parts = [
        f"{f.samples} requests compared",
        agreement,
        f"cosine min {f.cosine_min:.4f}" if f.cosine_min is not None else "",
        f"max abs diff {f.max_abs:.4g}" if f.max_abs is not None else "",
        f"latency ratio {f.latency_ratio:.2f}" if f.latency_ratio is not None else "",
        f"{f.errors} errors",
        f"{f.dropped} dropped",
    ]
    return ", ".join(p for p in parts if p)


def evaluate_shadow(
    policy: ShadowPolicy, figures: ShadowFigures, elapsed_s: float
) -> ShadowDecision:
    """The verdict on ``figures`` after ``elapsed_s`` of shadow (see the module docstring)."""
    f = figures
    if f.errors > policy.max_errors:
        why = f": {f.last_error}" if f.last_error else ""
        return ShadowDecision(
            ShadowVerdict.FAIL,
            f"shadow: {f.errors} candidate runs failed on live requests, over max_errors "
            f"{policy.max_errors}{why} ({describe(f)})",
        )
    timed_out = elapsed_s >= policy.max_duration_s
    if f.samples < policy.samples and not timed_out:
        return ShadowDecision(
            ShadowVerdict.WAIT, f"shadow: {f.samples}/{policy.samples} requests compared"
        )
    if f.samples == 0:
        return ShadowDecision(
            ShadowVerdict.PASS,
            f"shadow: no request to compare in {elapsed_s:.0f}s (max_duration_s "
            f"{policy.max_duration_s:g}); passing on the golden vectors, probation judges "
            "live traffic",
        )
    short = (
        f" (only {f.samples} of {policy.samples} samples by max_duration_s "
        f"{policy.max_duration_s:g})"
        if f.samples < policy.samples
        else ""
    )
    broken = _broken_rule(policy, f)
    if broken:
        return ShadowDecision(ShadowVerdict.FAIL, f"shadow: {broken}{short} ({describe(f)})")
    return ShadowDecision(ShadowVerdict.PASS, f"shadow passed{short}: {describe(f)}")


def _broken_rule(policy: ShadowPolicy, f: ShadowFigures) -> str:
    if f.agreement is not None and f.agreement < policy.min_agreement:
        return f"top-1 agreement {f.agreement:.3f} below min_agreement {policy.min_agreement:g}"
    if (
        policy.min_cosine is not None
        and f.cosine_min is not None
        and f.cosine_min < policy.min_cosine
    ):
        return f"cosine {f.cosine_min:.4f} below min_cosine {policy.min_cosine:g}"
    if (
        policy.max_abs_diff is not None
        and f.max_abs is not None
        and f.max_abs > policy.max_abs_diff
    ):
        return f"max abs diff {f.max_abs:.4g} over max_abs_diff {policy.max_abs_diff:g}"
    if f.latency_ratio is not None and f.latency_ratio > policy.max_latency_ratio:
        return (
            f"latency ratio {f.latency_ratio:.2f} over max_latency_ratio "
            f"{policy.max_latency_ratio:g}"
        )
    return ""
