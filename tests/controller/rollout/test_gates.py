"""Gate parsing and evaluation: pure functions of the policy and a stage's evidence."""

from __future__ import annotations

import pytest

from controller.base.errors import UsageError
from controller.rollout.gates import (
    DEFAULT_GATES,
    Evidence,
    Gate,
    Incident,
    Sample,
    evaluate_gates,
    gates_from_cli,
    parse_gates,
)

POLICY = parse_gates(DEFAULT_GATES)
VALID = (
    "error_rate, p99_ratio, failed_installs, rollbacks, shadow_agreement, shadow_latency_ratio, "
    "drift, min_devices, min_requests"
)


def test_parse_gates() -> None:
    assert POLICY.limits == (
        Gate("error_rate", 0.01),
        Gate("p99_ratio", 1.5),
        Gate("failed_installs", 0.02),
    )
    assert (POLICY.min_devices, POLICY.min_requests) == (3, 0)
    assert parse_gates(POLICY.to_text()) == POLICY
    assert parse_gates("rollbacks<0.5, min_requests=200").min_requests == 200
    assert parse_gates("").limits == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("latency<2", "unknown metric 'latency'"),
        ("min_hosts=3", "unknown setting 'min_hosts'"),
        ("error_rate<lots", "expected a number"),
        ("error_rate<2", "share within"),
        ("min_devices=2.5", "whole number"),
        ("error_rate", "expected metric<limit"),
        ("p99_ratio<0", "must be > 0"),
    ],
)
def test_parse_gates_refuses_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_gates(text)


def test_gates_from_cli_keeps_the_defaults_it_does_not_name() -> None:
    """Issue 20 item 1: ``--gate min_devices=1`` used to drop every other gate."""
    assert gates_from_cli(None) == POLICY
    assert gates_from_cli("") == POLICY
    one = gates_from_cli("min_devices=1")
    assert one.limits == POLICY.limits and one.min_devices == 1
    assert one.to_text() == "error_rate<0.01,p99_ratio<1.5,failed_installs<0.02,min_devices=1"
    looser = gates_from_cli(" p99_ratio<3 , min_requests=50")
    assert looser.limits == (
        Gate("error_rate", 0.01),
        Gate("p99_ratio", 3.0),
        Gate("failed_installs", 0.02),
    )
    assert (looser.min_devices, looser.min_requests) == (3, 50)
    # An optional gate given is added to the defaults.
    assert gates_from_cli("rollbacks<0.5").limit("rollbacks") == 0.5
    assert gates_from_cli("rollbacks<0.5").limit("error_rate") == 0.01


def test_gates_from_cli_drops_a_gate_only_when_told_off() -> None:
    no_p99 = gates_from_cli("p99_ratio=off,min_devices=1")
    assert [g.metric for g in no_p99.limits] == ["error_rate", "failed_installs"]
    assert no_p99.min_devices == 1
    assert gates_from_cli("error_rate=OFF").limit("error_rate") is None
    assert gates_from_cli("min_devices=off").min_devices == 0
    none = gates_from_cli("error_rate=off,p99_ratio=off,failed_installs=off")
    assert none.limits == ()
    # The stored text is the full effective set and reads back as-is.
    for policy in (no_p99, none, gates_from_cli("min_devices=off,min_requests=10")):
        assert parse_gates(policy.to_text()) == policy


def test_stored_gates_still_parse_as_the_full_set() -> None:
    """A record written before overrides existed holds its full set: no defaults added."""
    stored = parse_gates("error_rate<0.01,failed_installs<0.02,min_devices=3")
    assert stored.limit("p99_ratio") is None
    assert [g.metric for g in stored.limits] == ["error_rate", "failed_installs"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("latency<2", f"unknown gate 'latency'.*valid gates: {VALID}"),
        ("min_hosts=off", "unknown gate 'min_hosts'.*valid gates"),
        ("error_rate<lots", "expected a number"),
        ("error_rate<2", "share within"),
        ("error_rate=0.02", "error_rate takes a limit"),
        ("min_devices<2", "min_devices takes a count"),
        ("min_devices=2.5", "whole number"),
        ("p99_ratio<0", "must be > 0"),
        ("error_rate<0.1,error_rate=off", "error_rate given twice"),
    ],
)
def test_gates_from_cli_refuses_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        gates_from_cli(text)


def _samples(version: str, devices: int, requests: int, errors: int, p99: float, prefix: str):
    return tuple(
        Sample(f"{prefix}{i}", 1.0, version, requests, errors, 0, p99) for i in range(devices)
    )


def test_healthy_stage_passes_with_its_figures() -> None:
    ev = Evidence(
        "2.0.0",
        "1.0.0",
        _samples("2.0.0", 4, 50, 0, 0.010, "n") + _samples("1.0.0", 4, 50, 0, 0.009, "o"),
    )
    report = evaluate_gates(POLICY, ev)
    assert report.healthy and not report.breaches
    assert report.reporting == ("n0", "n1", "n2", "n3") and report.served == 200
    assert report.p99_ratio == pytest.approx(0.010 / 0.009)


def test_error_rate_needs_evidence_unless_the_breach_is_certain() -> None:
    def one(requests: int, errors: int) -> Evidence:
        return Evidence("2.0.0", "1.0.0", (Sample("a", 1.0, "2.0.0", requests, errors, 0, None),))

    # A 1% limit is judged at 300 requests: one or two early errors are no verdict...
    assert not evaluate_gates(POLICY, one(3, 1)).breaches
    assert not evaluate_gates(POLICY, one(250, 2)).breaches
    # ...three are (certain: 3 errors are already 1% of 300).
    (certain,) = evaluate_gates(POLICY, one(3, 3)).breaches
    assert certain.detail.startswith("certain") and certain.devices == {"a": "3/3 errors"}
    # Past the floor the rate decides, in either direction.
    assert not evaluate_gates(POLICY, one(1000, 9)).breaches
    (breach,) = evaluate_gates(POLICY, one(1000, 10)).breaches
    assert breach.gate == "error_rate" and breach.observed == pytest.approx(0.01)
    lenient = parse_gates("error_rate<0.2")  # judged at 20 requests
    assert not evaluate_gates(lenient, one(19, 3)).breaches
    assert evaluate_gates(lenient, one(20, 4)).breaches


def test_one_devices_volume_cannot_hide_anothers_errors() -> None:
    """Issue 18: summed over devices, one device reporting a million clean requests
    diluted three others failing 5 % of theirs below the 1 % limit. Each device now
    weighs at most judge_n (300) requests."""
    failing = _samples("2.0.0", 3, 400, 20, 0.01, "n")
    flood = (Sample("evil", 1.0, "2.0.0", 1_000_000, 0, 0, 0.01),)
    report = evaluate_gates(POLICY, Evidence("2.0.0", None, failing + flood))
    (breach,) = report.breaches
    assert breach.gate == "error_rate" and set(breach.devices) == {"n0", "n1", "n2"}
    # 3 x 300 weighted requests with 15 errors each, and evil's 300 clean ones.
    assert breach.observed == pytest.approx(45 / 1200)
    assert breach.detail == "60 errors in 1001200 requests, each device counted up to 300"
    assert (report.served, report.errors) == (1_001_200, 60)  # what devices reported
    # Below judge_n per device the weighting changes nothing.
    small = evaluate_gates(POLICY, Evidence("2.0.0", None, _samples("2.0.0", 4, 250, 1, 0.01, "s")))
    assert small.error_rate == pytest.approx(4 / 1000) and not small.breaches


def test_client_errors_are_not_the_versions_fault() -> None:
    ev = Evidence("2.0.0", None, (Sample("a", 1.0, "2.0.0", 100, 0, 60, 0.01),))
    report = evaluate_gates(POLICY, ev)
    assert report.served == 40 and not report.breaches


def test_p99_ratio_against_devices_still_on_the_previous_version() -> None:
    ev = Evidence(
        "2.0.0",
        "1.0.0",
        _samples("2.0.0", 3, 60, 0, 0.050, "n") + _samples("1.0.0", 3, 60, 0, 0.010, "o"),
    )
    (breach,) = evaluate_gates(POLICY, ev).breaches
    assert breach.gate == "p99_ratio" and breach.observed == pytest.approx(5.0)
    assert breach.device_count == 3 and "p99 50 ms" in breach.devices["n0"]
    assert "p99_ratio<1.5 broke: 5" in breach.describe()


def test_p99_ratio_needs_100_requests_and_falls_back_to_the_recorded_baseline() -> None:
    few = Evidence("2.0.0", "1.0.0", _samples("2.0.0", 3, 30, 0, 0.05, "n"), baseline_p99_s=0.01)
    assert not evaluate_gates(POLICY, few).breaches
    enough = Evidence("2.0.0", "1.0.0", _samples("2.0.0", 3, 40, 0, 0.05, "n"), baseline_p99_s=0.01)
    assert evaluate_gates(POLICY, enough).breaches[0].gate == "p99_ratio"
    no_baseline = Evidence("2.0.0", "1.0.0", _samples("2.0.0", 3, 40, 0, 0.05, "n"))
    assert evaluate_gates(POLICY, no_baseline).p99_ratio is None


def test_failed_installs_and_rollbacks_name_devices_and_reasons() -> None:
    incidents = (
        *tuple(Incident(f"d{i}", 1.0, "install_started") for i in range(10)),
        Incident("d3", 2.0, "install_failed", "golden vectors: output y differs by 0.3"),
    )
    ev = Evidence("2.0.0", "1.0.0", incidents=incidents)
    (breach,) = evaluate_gates(POLICY, ev).breaches
    assert breach.gate == "failed_installs" and breach.observed == pytest.approx(0.1)
    assert breach.devices == {"d3": "install_failed: golden vectors: output y differs by 0.3"}
    with_rollbacks = parse_gates("rollbacks<0.5")
    assert not evaluate_gates(with_rollbacks, ev).breaches  # a failure is not a rollback


def test_enough_devices_and_requests() -> None:
    policy = parse_gates("error_rate<0.01,min_devices=2,min_requests=100")
    one = evaluate_gates(policy, Evidence("2.0.0", None, _samples("2.0.0", 1, 500, 0, 0.01, "n")))
    assert not one.enough and "only 1 of min_devices=2" in one.shortfall()
    quiet = evaluate_gates(policy, Evidence("2.0.0", None, _samples("2.0.0", 2, 10, 0, 0.01, "n")))
    assert not quiet.enough and "only 20 of min_requests=100" in quiet.shortfall()
    busy = evaluate_gates(policy, Evidence("2.0.0", None, _samples("2.0.0", 2, 50, 0, 0.01, "n")))
    assert busy.healthy and busy.shortfall() == ""
