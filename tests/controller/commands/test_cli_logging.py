"""``edgectl`` keeps library chatter out of the operator's log unless ``-v`` (issue 20,
item 11): APScheduler logged two INFO lines per job run, every 5 s under ``serve``, and
``device show`` said "enrolled, enrolled"."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from controller.cli import main
from controller.fleet.stores import open_store


def _run_one_job() -> None:
    ran = threading.Event()
    scheduler = BackgroundScheduler()
    # An interval job whose first run is now: a one-off job removes itself while the
    # scheduler shuts down, which APScheduler reports from its thread.
    scheduler.add_job(ran.set, "interval", seconds=3600, next_run_time=datetime.now(UTC))
    scheduler.start()
    try:
        assert ran.wait(10)
    finally:
        scheduler.shutdown(wait=True)


def _scheduler_info(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("apscheduler") and r.levelno == logging.INFO
    ]


@pytest.mark.parametrize("verbose", [False, True])
def test_apscheduler_info_lines_only_with_v(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, verbose: bool
) -> None:
    assert main([*(["-v"] if verbose else []), "init", str(tmp_path / "repo")]) == 0
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        _run_one_job()
    lines = _scheduler_info(caplog)
    if verbose:
        assert any("Running job" in line for line in lines), lines
    else:
        assert lines == []


def test_device_show_says_active_not_enrolled_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    out = tmp_path / "dev-1.tar"
    add = ["device", "add", "dev-1", "--fleet", "lab", "--repo", str(repo), "-o", str(out)]
    assert main([*add, "--repository-url", "http://127.0.0.1:1/", "--broker", "127.0.0.1:1"]) == 0
    capsys.readouterr()
    store = tmp_path / "telemetry.sqlite"
    open_store(str(store)).close()
    main(["device", "show", "dev-1", "--repo", str(repo), "--store", str(store)])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "certificates (registry): fleet lab, active, enrolled " in text, text
