"""``edgectl fleet status --fleet NAME`` tells a fleet nobody knows from a fleet with no
devices reporting (issue 20, item 6): a typo used to print an empty table and exit 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.cli import main
from controller.fleet.records import IngestBatch
from controller.fleet.stores import open_store
from tests.controller.fleet.test_store import beat


def _store_with_lab(tmp_path: Path) -> str:
    path = str(tmp_path / "telemetry.sqlite")
    store = open_store(path)
    try:
        store.write(IngestBatch(heartbeats=[(beat("d1", 7, fleet="lab"), 100.0)]))
    finally:
        store.close()
    return path


def test_an_unknown_fleet_names_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store_with_lab(tmp_path)
    assert main(["fleet", "status", "--store", store, "--fleet", "labb"]) == 1
    err = capsys.readouterr().err
    assert "no fleet 'labb'" in err and "the fleets known are lab" in err
    assert "Traceback" not in err


def test_a_fleet_known_to_the_repository_with_no_device_reporting_is_an_empty_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bundles: dict[str, Path]
) -> None:
    store = _store_with_lab(tmp_path)
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    assert main(["release", str(bundles["v1"]), "--fleet", "north", "--repo", str(repo)]) == 0
    capsys.readouterr()
    args = ["fleet", "status", "--store", store, "--repo", str(repo), "--fleet", "north"]
    assert main(args) == 0
    assert "no fleet" not in capsys.readouterr().err
    assert main([*args[:-1], "south"]) == 1
    assert "the fleets known are lab, north" in capsys.readouterr().err


def test_a_known_fleet_lists_its_devices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store_with_lab(tmp_path)
    assert main(["fleet", "status", "--store", store, "--fleet", "lab"]) == 0
    assert "d1" in capsys.readouterr().out
