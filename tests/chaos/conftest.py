"""Fixtures of the fault-injection run and its tally.

The run appends its tally line (``faults injected: N (K kinds); invariant violations: V;
converged in S s; seed X``) through the ``chaos_tally`` fixture, before it asserts, so
the line is printed at the end of the session also when the run failed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.fleet import StateDisk, faketime_library, have_root

_TALLY = pytest.StashKey[list[str]]()


def skip_or_fail(reason: str) -> None:
    """Skip, saying why; under CI (EDGEFLEET_REQUIRE_SYSTEM_TEST=1) fail instead."""
    if os.environ.get("EDGEFLEET_REQUIRE_SYSTEM_TEST") == "1":
        pytest.fail(f"the chaos run must run here (EDGEFLEET_REQUIRE_SYSTEM_TEST=1): {reason}")
    pytest.skip(reason)


@pytest.fixture
def chaos_tally(request: pytest.FixtureRequest) -> list[str]:
    return request.config.stash.setdefault(_TALLY, [])


@pytest.fixture
def state_disk(tmp_path: Path) -> Iterator[StateDisk]:
    """A 16 MiB tmpfs for one agent's state folder, unmounted after the test."""
    if not have_root():
        skip_or_fail("needs root to mount a tmpfs for the state folder that fills up")
    try:
        disk = StateDisk(tmp_path / "statefs")
    except Exception as exc:  # mount refused (a container without CAP_SYS_ADMIN)
        skip_or_fail(f"cannot mount a tmpfs here: {exc}")
        raise
    try:
        yield disk
    finally:
        disk.unmount()


@pytest.fixture
def faketime() -> Path:
    """libfaketime's preload library (make system-deps installs the faketime package)."""
    library = faketime_library()
    if library is None:
        skip_or_fail("libfaketime is not installed (make system-deps installs `faketime`)")
        raise AssertionError("unreachable")
    return library


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(_TALLY, [])
    if not lines:
        return
    terminalreporter.section("fault injection (issue 18)")
    for line in lines:
        terminalreporter.write_line(line)
