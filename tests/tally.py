"""The tallies that suites of proven cases print at the end of a run.

A suite (attacks, serve faults, ...) marks each case with a key, records whether every
report of that case passed, and prints one line per key and ``N/M <what> <verdict>``.
"""

from __future__ import annotations

from typing import Any

import pytest


def counts(report: pytest.TestReport) -> bool:
    """Whether this report decides a case: its call, or a setup or teardown that failed.

    A setup that failed or skipped leaves the case not proven; a passing setup or
    teardown says nothing yet.
    """
    return (
        report.when == "call"
        or (report.when == "setup" and not report.passed)
        or (report.when == "teardown" and report.failed)
    )


def write_tally(
    tr: Any, section: str, names: dict[Any, str], outcomes: dict[Any, list[bool]], verdict: str
) -> None:
    """Each case's state, then ``N/M <section's first words> <verdict>``."""
    tr.section(section)
    for key, name in names.items():
        results = outcomes.get(key)
        state = "not run" if not results else verdict if all(results) else f"NOT {verdict.upper()}"
        label = f"{key:>2}." if isinstance(key, int) else "-"
        tr.write_line(f"{label} {name}: {state}")
    done = sum(1 for results in outcomes.values() if results and all(results))
    what = section.split(" (")[0]
    tr.write_line(f"{done}/{len(names)} {what} {verdict}")
