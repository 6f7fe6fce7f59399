"""``edgectl fleet status --fleet NAME`` tells a fleet nobody knows from a fleet with no
devices reporting (issue 20, item 6): a typo used to print an empty table and exit 0."""

from __future__ import annotations

import json
import time
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


def test_revoked_devices_are_marked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 20, item 2: `fleet status` and `device show` mark a device the registry says
    is revoked (it may still be connected, or its row lingers until forgotten)."""
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    for device in ("d1", "d2"):
        enroll = ["device", "add", device, "--fleet", "lab", "--repo", str(repo), "-o"]
        assert (
            main(
                [
                    *enroll,
                    str(tmp_path / f"{device}.tar"),
                    "--broker",
                    "mq:8883",
                    "--repository-url",
                    "https://u.example/",
                ]
            )
            == 0
        )
    assert main(["device", "revoke", "d2", "--repo", str(repo)]) == 0
    store = open_store(str(repo / "telemetry.sqlite"))
    try:
        beats = [(beat(d, 7), time.time()) for d in ("d1", "d2")]
        store.write(IngestBatch(heartbeats=beats))
    finally:
        store.close()
    capsys.readouterr()

    assert main(["fleet", "status", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("lab ")}
    d1, d2 = lines["d1"], lines["d2"]
    assert "online [revoked]" in d2 and "revoked" not in d1
    assert "2 device(s): 2 online, 0 stale, 0 offline; 1 revoked" in out
    assert main(["fleet", "status", "--repo", str(repo), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {d["device"]: d["revoked"] for d in doc} == {"d1": False, "d2": True}
    assert main(["device", "show", "d2", "--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device d2 (fleet lab): online [revoked], last seen")
    # Without the repository there is no registry to ask: nothing marked, null in JSON.
    assert main(["fleet", "status", "--store", str(repo / "telemetry.sqlite"), "--json"]) == 0
    assert {d["revoked"] for d in json.loads(capsys.readouterr().out)} == {None}


def test_an_identity_conflict_is_marked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 20, item 7: what ingest found (two agents on one identity) is marked in
    `fleet status` for a day, and said in full by `device show`."""
    path = str(tmp_path / "telemetry.sqlite")
    store = open_store(path)
    now = time.time()
    what = "identity conflict? events of streams a and b alternate (...)"
    try:
        store.write(
            IngestBatch(
                heartbeats=[(beat("d1", 7), now), (beat("d2", 7), now)],
                conflicts=[("lab", "d1", what, now - 60), ("lab", "d2", what, now - 2 * 86400)],
            )
        )
    finally:
        store.close()
    assert main(["fleet", "status", "--store", path]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if "[identity conflict?]" in line] == [
        "d1"
    ]
    assert out.rstrip().endswith("; 1 identity conflict?")
    assert main(["device", "show", "d1", "--store", path]) == 0
    out = capsys.readouterr().out
    assert "online [identity conflict?]" in out and f"  {what} (last seen 60s ago)" in out
    assert main(["device", "show", "d2", "--store", path, "--json"]) == 0
    (d2,) = json.loads(capsys.readouterr().out)["devices"]
    assert d2["identity_conflict"]["what"] == what
