"""agent.update.shadow: the verdict on a candidate in shadow, as a pure function."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.contracts import ShadowPolicy
from agent.runtime.shadow import ShadowFigures
from agent.update.shadow import ShadowVerdict, evaluate_shadow

POLICY = ShadowPolicy(samples=20, max_duration_s=60.0)
GOOD = ShadowFigures(
    version="2.0.0",
    serving="1.0.0",
    samples=20,
    top1_rows=20,
    top1_agreed=20,
    cosine_min=0.999,
    max_abs=0.01,
    latency_ratio=1.1,
)


def test_enough_good_samples_pass_and_fewer_wait() -> None:
    d = evaluate_shadow(POLICY, GOOD, elapsed_s=5.0)
    assert d.verdict is ShadowVerdict.PASS and "20 requests compared" in d.reason
    assert evaluate_shadow(POLICY, replace(GOOD, samples=19), 5.0).verdict is ShadowVerdict.WAIT


def test_disagreement_fails_naming_the_rule_and_the_figures() -> None:
    d = evaluate_shadow(POLICY, replace(GOOD, top1_agreed=8), 5.0)
    assert d.verdict is ShadowVerdict.FAIL
    assert "top-1 agreement 0.400 below min_agreement 0.98" in d.reason
    assert "(8/20 rows)" in d.reason and "max abs diff 0.01" in d.reason


@pytest.mark.parametrize(
    ("policy", "figures", "rule"),
    [
        (replace(POLICY, min_cosine=0.9999), GOOD, "cosine 0.9990 below min_cosine 0.9999"),
        (replace(POLICY, max_abs_diff=0.001), GOOD, "max abs diff 0.01 over max_abs_diff 0.001"),
        (POLICY, replace(GOOD, latency_ratio=3.5), "latency ratio 3.50 over max_latency_ratio 3"),
    ],
)
def test_each_threshold_fails_by_name(
    policy: ShadowPolicy, figures: ShadowFigures, rule: str
) -> None:
    d = evaluate_shadow(policy, figures, 5.0)
    assert d.verdict is ShadowVerdict.FAIL and rule in d.reason


def test_errors_fail_at_once_even_before_enough_samples() -> None:
    f = replace(GOOD, samples=1, errors=1, last_error="InferenceError: boom")
    d = evaluate_shadow(POLICY, f, 1.0)
    assert d.verdict is ShadowVerdict.FAIL
    assert "1 candidate runs failed" in d.reason and "boom" in d.reason
    assert evaluate_shadow(replace(POLICY, max_errors=1), f, 1.0).verdict is ShadowVerdict.WAIT


def test_at_the_time_limit_the_rules_apply_to_what_was_compared() -> None:
    few = replace(GOOD, samples=3, top1_rows=3, top1_agreed=3)
    d = evaluate_shadow(POLICY, few, 60.0)
    assert d.verdict is ShadowVerdict.PASS and "only 3 of 20 samples" in d.reason
    bad = replace(few, top1_agreed=1)
    assert evaluate_shadow(POLICY, bad, 60.0).verdict is ShadowVerdict.FAIL


def test_no_traffic_at_all_passes_on_the_golden_vectors_at_the_time_limit() -> None:
    none = ShadowFigures(version="2.0.0", serving="1.0.0")
    assert evaluate_shadow(POLICY, none, 59.0).verdict is ShadowVerdict.WAIT
    d = evaluate_shadow(POLICY, none, 60.0)
    assert d.verdict is ShadowVerdict.PASS and "no request to compare" in d.reason


def test_outputs_without_class_scores_are_judged_on_the_other_rules() -> None:
    f = replace(GOOD, top1_rows=0, top1_agreed=0)
    assert f.agreement is None
    d = evaluate_shadow(POLICY, f, 5.0)
    assert d.verdict is ShadowVerdict.PASS and "no class-score output" in d.reason
