"""The shadow gates (shadow_agreement>LIMIT, shadow_latency_ratio<LIMIT): parsing and
evaluation as pure functions of the policy and a stage's evidence."""

from __future__ import annotations

import pytest

from controller.base.errors import UsageError
from controller.rollout.gates import (
    DEFAULT_GATES,
    Evidence,
    Gate,
    RolledEvidence,
    ShadowSample,
    evaluate_gates,
    gates_from_cli,
    parse_gates,
)

SHADOW = gates_from_cli("shadow_agreement>0.98,shadow_latency_ratio<1.2,min_devices=1")


def test_the_shadow_gates_parse_and_print_with_their_signs() -> None:
    assert SHADOW.limit("shadow_agreement") == 0.98
    assert SHADOW.limit("shadow_latency_ratio") == 1.2
    text = SHADOW.to_text()
    assert "shadow_agreement>0.98" in text and "shadow_latency_ratio<1.2" in text
    assert parse_gates(text) == SHADOW
    assert Gate("error_rate", 0.01) in SHADOW.limits  # the defaults stay
    assert "shadow" not in DEFAULT_GATES  # optional


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shadow_agreement<0.98", "shadow_agreement is written shadow_agreement>LIMIT"),
        ("shadow_latency_ratio>1.2", "shadow_latency_ratio is written shadow_latency_ratio<LIMIT"),
        ("shadow_agreement>1", "share within [0, 1)"),
        ("shadow_latency_ratio<0", "must be > 0"),
        ("shadow_agreement", "takes a limit (shadow_agreement>LIMIT)"),
    ],
)
def test_a_wrong_shadow_gate_is_refused_naming_the_rule(text: str, message: str) -> None:
    with pytest.raises(UsageError) as refused:
        gates_from_cli(text)
    assert message in str(refused.value)


def test_off_drops_a_shadow_gate() -> None:
    assert gates_from_cli("shadow_agreement>0.9,min_devices=1").limit("shadow_agreement") == 0.9
    with pytest.raises(UsageError, match="given twice"):
        gates_from_cli("shadow_agreement>0.9,shadow_agreement=off")
    assert gates_from_cli("shadow_agreement=off").limit("shadow_agreement") is None


def _evidence(*shadows: ShadowSample) -> list[Evidence | RolledEvidence]:
    return [
        Evidence(version="3.0.0", previous="2.0.0", shadows=shadows),
        RolledEvidence(version="3.0.0", previous="2.0.0", shadows=shadows),
    ]


@pytest.mark.parametrize("evidence", _evidence(ShadowSample("canary", "failed", 20, 0.35, 1.0)))
def test_a_disagreeing_canary_breaks_shadow_agreement_with_no_request_served(
    evidence: Evidence | RolledEvidence,
) -> None:
    report = evaluate_gates(SHADOW, evidence)
    assert [b.gate for b in report.breaches] == ["shadow_agreement"]
    (breach,) = report.breaches
    assert breach.observed == 0.35 and breach.devices == {
        "canary": "top-1 agreement 0.35 over 20 requests"
    }
    assert "gate shadow_agreement>0.98 broke: 0.35" in breach.describe()
    assert report.served == 0 and report.errors == 0  # nothing answered a client
    assert report.summary()["shadow_agreement"] == 0.35 and report.shadowed == 1


def test_a_slow_candidate_breaks_the_latency_ratio_on_the_worst_device() -> None:
    report = evaluate_gates(
        SHADOW,
        Evidence(
            version="3.0.0",
            previous="2.0.0",
            shadows=(
                ShadowSample("a", "passed", 20, 1.0, 1.1),
                ShadowSample("b", "passed", 20, 1.0, 1.9),
            ),
        ),
    )
    assert [b.gate for b in report.breaches] == ["shadow_latency_ratio"]
    assert report.breaches[0].observed == 1.9 and list(report.breaches[0].devices) == ["b"]
    assert report.shadow_agreement == 1.0 and report.shadow_latency_ratio == 1.9


def test_only_verdicts_count_and_none_is_no_breach() -> None:
    running = ShadowSample("a", "running", 3, 0.33, 5.0)  # 1 of 3 rows: not a verdict
    cancelled = ShadowSample("b", "cancelled", 2, 0.0, None)
    no_classes = ShadowSample("c", "passed", 20, None, 1.0)
    report = evaluate_gates(
        SHADOW,
        Evidence(version="3.0.0", previous="2.0.0", shadows=(running, cancelled, no_classes)),
    )
    assert report.breaches == () and report.shadowed == 1
    assert report.shadow_agreement is None and report.shadow_latency_ratio == 1.0
    # Without the gates, reports are still summarised but judge nothing.
    plain = evaluate_gates(
        parse_gates(DEFAULT_GATES),
        Evidence(
            version="3.0.0",
            previous="2.0.0",
            shadows=(ShadowSample("a", "failed", 20, 0.1, 9.0),),
        ),
    )
    assert plain.breaches == () and plain.shadow_agreement == 0.1
