"""The rollout's drift gate (issue 23): pure, on both kinds of evidence; no drift evidence
is no pass, never a silent one."""

from __future__ import annotations

import pytest

from controller.base.errors import UsageError
from controller.fleet.rollup import DeviceTotals
from controller.rollout.gates import (
    Evidence,
    RolledEvidence,
    Sample,
    evaluate_gates,
    gates_from_cli,
    parse_gates,
)

POLICY = gates_from_cli("drift<0.2,min_devices=2")
HEALTHY = tuple(Sample(f"d{i}", 1.0, "2.0.0", 50, 0, 0, 0.01) for i in range(3))


def test_the_drift_gate_parses_and_is_off_by_default() -> None:
    assert POLICY.limit("drift") == 0.2 and "drift<0.2" in POLICY.to_text()
    assert parse_gates(POLICY.to_text()) == POLICY  # as a rollout stores it
    assert gates_from_cli(None).limit("drift") is None
    with pytest.raises(UsageError, match="drift is a PSI > 0"):
        gates_from_cli("drift<0")


def test_low_drift_passes_and_high_drift_halts_naming_the_devices() -> None:
    calm = evaluate_gates(
        POLICY, Evidence("2.0.0", "1.0.0", HEALTHY, drift={"d0": 0.02, "d1": 0.05})
    )
    assert calm.healthy and calm.drift == 0.05 and calm.drift_devices == 2
    moved = evaluate_gates(
        POLICY, Evidence("2.0.0", "1.0.0", HEALTHY, drift={"d0": 0.02, "d1": 0.41, "d2": 0.3})
    )
    (breach,) = moved.breaches
    assert breach.gate == "drift" and breach.observed == 0.41
    assert list(breach.devices) == ["d1", "d2"]  # worst first
    assert "gate drift<0.2 broke: 0.41" in breach.describe()


def test_without_drift_evidence_the_stage_does_not_pass_and_says_why() -> None:
    report = evaluate_gates(POLICY, Evidence("2.0.0", "1.0.0", HEALTHY))
    assert not report.breaches and not report.enough and not report.healthy
    assert "no drift evidence" in report.shortfall()
    # Without the gate, drift is neither needed nor judged.
    plain = gates_from_cli("min_devices=2")
    assert evaluate_gates(plain, Evidence("2.0.0", "1.0.0", HEALTHY, drift={"d0": 9.0})).healthy


def test_rolled_evidence_is_judged_alike() -> None:
    devices = tuple(DeviceTotals(f"d{i}", 50, 0, 0, 0.01, 1) for i in range(3))
    rolled = RolledEvidence("2.0.0", "1.0.0", devices, drift={"d2": 0.5})
    assert [b.gate for b in evaluate_gates(POLICY, rolled).breaches] == ["drift"]
    assert not evaluate_gates(POLICY, RolledEvidence("2.0.0", "1.0.0", devices)).enough
