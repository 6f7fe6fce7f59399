"""The failover suite's summary line (issue 24): printed at the end of the run as
``failover: leader killed, next promotion after X s, promotions duplicated 0`` (and one
line for the stopped leader), from what each case recorded in ``RESULTS``."""

from __future__ import annotations

from typing import Any

# Filled by the cases: "killed" (seconds from SIGKILL to the next promotion, duplicates)
# and "stopped" (the same, and actions the old leader took after it lost the lease).
RESULTS: dict[str, dict[str, float]] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("controllers that fail over (issue 24)")
    killed = RESULTS.get("killed")
    if killed is not None:
        tr.write_line(
            f"failover: leader killed, next promotion after {killed['after_s']:.1f} s, "
            f"promotions duplicated {int(killed['duplicated'])}"
        )
    stopped = RESULTS.get("stopped")
    if stopped is not None:
        tr.write_line(
            f"failover: leader stopped past its lease, next promotion after "
            f"{stopped['after_s']:.1f} s, promotions duplicated {int(stopped['duplicated'])}, "
            f"acts of the old leader after it lost the lease {int(stopped['stale_acts'])}"
        )
