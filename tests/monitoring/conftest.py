"""The tally of the monitoring check (issue 24, part 3).

``test_real_prometheus`` records, through the ``monitoring_tally`` fixture, whether each
dashboard query and each alert rule's series returned a series, and which alerts were
active on the healthy system, before it asserts; the end of the session prints each
failing one and ``N/N dashboard queries return series``,
``N/N alert rules' series return series`` and ``N/N alerts silent on a healthy system``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest

_TALLY = pytest.StashKey["MonitoringTally"]()


@dataclass
class MonitoringTally:
    """Each check's name and whether it held, in the order checked, per kind."""

    checks: dict[str, dict[str, bool]] = field(default_factory=dict)

    def record(self, kind: str, name: str, held: bool) -> None:
        self.checks.setdefault(kind, {})[name] = held


def skip_or_fail(reason: str) -> None:
    """Skip, saying why; under CI (EDGEFLEET_REQUIRE_SYSTEM_TEST=1) fail instead."""
    if os.environ.get("EDGEFLEET_REQUIRE_SYSTEM_TEST") == "1":
        pytest.fail(
            f"the monitoring check must run here (EDGEFLEET_REQUIRE_SYSTEM_TEST=1): {reason}"
        )
    pytest.skip(reason)


@pytest.fixture
def monitoring_tally(request: pytest.FixtureRequest) -> MonitoringTally:
    return request.config.stash.setdefault(_TALLY, MonitoringTally())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    tally = config.stash.get(_TALLY, None)
    if tally is None or not tally.checks:
        return
    terminalreporter.section("monitoring against a real Prometheus (issue 24)")
    for kind, checks in tally.checks.items():
        for name, held in checks.items():
            if not held:
                terminalreporter.write_line(f"- NOT: {name}")
        done = sum(checks.values())
        terminalreporter.write_line(f"{done}/{len(checks)} {kind}")
