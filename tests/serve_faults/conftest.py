"""Fixtures of the serve fault cases and their tally.

Every case carries ``@pytest.mark.serve_fault(KEY)`` with a key of ``SERVE_FAULTS``; a
fault counts as recovered when its test passed. The tally is printed at the end of the
run: ``4/4 serve faults recovered``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.build.builder import build_bundle
from tests.helpers import Broker, make_linear_model, start_broker
from tests.serve_faults.harness import MODEL, VERSION
from tests.tally import counts, write_tally

# What each case does to `edgectl serve`'s surroundings (issue 19, section 3).
SERVE_FAULTS = {
    "postgres_restart": "PostgreSQL restarted mid-ingest and mid-rollout",
    "broker_restart": "the MQTT broker restarted",
    "store_disk_full": "the SQLite store's disk full",
    "key_unreadable": "the timestamp key file unreadable",
}
_outcomes: dict[str, list[bool]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "serve_fault(key): the test proves serve recovers from a fault of SERVE_FAULTS"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("serve_fault")
        if marker is not None:
            assert marker.args[0] in SERVE_FAULTS, marker.args[0]
            item.keywords[f"serve-fault-{marker.args[0]}"] = True


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not counts(report):
        return
    for keyword in report.keywords:
        if keyword.startswith("serve-fault-"):
            _outcomes.setdefault(keyword.removeprefix("serve-fault-"), []).append(report.passed)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _outcomes:
        return
    write_tally(terminalreporter, "serve faults (issue 19)", SERVE_FAULTS, _outcomes, "recovered")


@pytest.fixture(scope="session")
def rollout_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle the cases roll out (built once)."""
    folder = tmp_path_factory.mktemp("bundle")
    model = make_linear_model(folder / "model.onnx", seed=2)
    return build_bundle(model, MODEL, VERSION, folder / f"{MODEL}-{VERSION}.bundle", 4).path


@pytest.fixture
def restartable_broker(tmp_path: Path) -> Iterator[list[Broker]]:
    """A private mosquitto that keeps its sessions and queued messages across a restart;
    a test may replace the list's only item with the broker started again."""
    brokers = [start_broker(tmp_path / "broker", persistent=True)]
    try:
        yield brokers
    finally:
        brokers[0].stop()
