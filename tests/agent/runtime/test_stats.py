"""Request statistics: counts by outcome, percentiles over a bounded window."""

from __future__ import annotations

import pytest

from agent.runtime.stats import Execution, Outcome, Phases, RequestStats


def test_counts_and_percentiles_per_version() -> None:
    stats = RequestStats(window=1000)
    for i in range(100):
        stats.record("m", "1.0.0", (i + 1) / 1000, Outcome.OK)
    stats.record("m", "1.0.0", 0.5, Outcome.ERROR)
    stats.record("m", "1.0.0", 0.001, Outcome.CLIENT_ERROR)
    stats.record("m", "2.0.0", 0.2, Outcome.OK)
    one = stats.snapshot("m", "1.0.0")
    assert (one.requests, one.errors, one.client_errors, one.window) == (102, 1, 1, 100)
    assert one.p50_s == pytest.approx(0.0505)
    assert one.p99_s == pytest.approx(0.09901)
    assert one.error_rate == pytest.approx(1 / 101)
    assert stats.snapshot("m", "2.0.0").requests == 1
    assert stats.snapshot("m", "9.9.9").requests == 0


def test_window_is_bounded_and_forget_drops_versions() -> None:
    stats = RequestStats(window=10)
    for i in range(1000):
        stats.record("m", "1.0.0", float(i), Outcome.OK)
    snap = stats.snapshot("m", "1.0.0")
    assert snap.requests == 1000 and snap.window == 10 and snap.p50_s == pytest.approx(994.5)
    stats.forget("m", keep_versions=set())
    assert stats.snapshot("m", "1.0.0").requests == 0


def test_triton_figures_count_successes_failures_and_phases() -> None:
    stats = RequestStats()
    assert stats.execution("m", "1.0.0") == Execution()
    phases = Phases()
    phases.queue_ns, phases.input_ns, phases.infer_ns, phases.output_ns = 10, 20, 300, 40
    stats.record("m", "1.0.0", 0.001, Outcome.OK, phases)
    stats.record("m", "1.0.0", 0.002, Outcome.OK, phases)
    stats.record("m", "1.0.0", 0.004, Outcome.CLIENT_ERROR)
    stats.record("m", "1.0.0", 0.008, Outcome.ERROR)
    stats.record_refused("m", "1.0.0", 0.016)  # a full queue: not the version's fault
    e = stats.execution("m", "1.0.0")
    assert (e.success, e.success_ns, e.fail, e.fail_ns) == (2, 3_000_000, 3, 28_000_000)
    assert (e.timed, e.queue_ns, e.input_ns, e.infer_ns, e.output_ns) == (2, 20, 40, 600, 80)
    assert e.last_inference_ms > 0
    # A refusal says nothing of the version's health: probation does not see it.
    assert stats.snapshot("m", "1.0.0").requests == 4
    assert stats.versions() == [("m", "1.0.0")]
    stats.forget("m", keep_versions=set())
    assert stats.versions() == [] and stats.execution("m", "1.0.0") == Execution()
