"""Request statistics: counts by outcome, percentiles over a bounded window."""

from __future__ import annotations

import pytest

from agent.runtime.stats import Outcome, RequestStats


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
