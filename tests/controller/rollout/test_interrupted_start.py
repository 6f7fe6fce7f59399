"""An interrupted ``rollout start`` never moves a fleet backwards (issue 19, defect 2).

``start_rollout`` saves its record before it publishes the first stage. A start that dies
in between (SIGKILL, a missing key, a full disk) leaves a record desired state never
named. The rule: a record is either published with its desired state or discarded, and
desired state moves backwards only on an explicit operator command. So after such a
start, a newer release stays where it is whatever runs next (the scheduled tick, an
operator's rollout command), and ``releases retire`` cannot be undone by the leftover.

Everything runs for real: ``edgectl`` (in process through ``controller.cli.main``, or as a
subprocess for the kill), a real repository, and what a device verifies with python-tuf
from its first root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.build.builder import build_bundle
from controller.cli import main
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from controller.rollout.service import RolloutService
from controller.rollout.stages import RolloutState
from controller.rollout.store import RolloutStore
from tests.controller.conftest import MODEL
from tests.controller.device_view import device_desired, device_entry
from tests.helpers import make_linear_model

FLEET = "lab"

# ``edgectl`` killed (SIGKILL: no handler, no cleanup runs) right around its Nth save of
# a rollout record: "after" the save is durable, or "before" it starts.
KILLED_EDGECTL = """
import os, signal, sys
from controller.rollout import store

N, WHEN = int(sys.argv[1]), sys.argv[2]
real_save = store.RolloutStore.save
calls = 0

def save(self, rollout):
    global calls
    calls += 1
    if calls == N and WHEN == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(self, rollout)
    if calls == N and WHEN == "after":
        os.kill(os.getpid(), signal.SIGKILL)

store.RolloutStore.save = save
from controller.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    s = open_store(str(tmp_path / "telemetry.sqlite"))
    yield s
    s.close()


@pytest.fixture
def repo_dir(tmp_path: Path, bundles: dict[str, Path]) -> Path:
    """A repository whose fleet runs 1.0.0; 2.0.0 and 3.0.0 are bundles not sent yet."""
    path = tmp_path / "repo"
    assert main(["init", str(path)]) == 0
    assert main(["release", str(bundles["v1"]), "--fleet", FLEET, "--repo", str(path)]) == 0
    v3 = make_linear_model(tmp_path / "models" / "v3.onnx", seed=4)
    bundles["v3"] = build_bundle(v3, MODEL, "3.0.0", tmp_path / "v3.bundle", 4).path
    return path


def _start_args(repo_dir: Path, bundle: Path) -> list[str]:
    return [
        "rollout",
        "start",
        MODEL,
        "2.0.0",
        "--fleet",
        FLEET,
        "--repo",
        str(repo_dir),
        "--bundle",
        str(bundle),
        "--stages",
        "5,50,100",
        "--wait",
        "60s",
    ]


def _killed_start(repo_dir: Path, bundle: Path, save: int, when: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_EDGECTL, str(save), when, *_start_args(repo_dir, bundle)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _records(repo_dir: Path) -> list[tuple[str, str, bool]]:
    return [(r.version, r.state.value, r.published) for r in RolloutStore(repo_dir).all()]


def _release_v3(repo_dir: Path, bundles: dict[str, Path]) -> None:
    assert main(["release", str(bundles["v3"]), "--fleet", FLEET, "--repo", str(repo_dir)]) == 0


@pytest.mark.parametrize(
    "next_step",
    [
        ["tick"],
        ["rollout", "abort"],
        ["rollout", "pause"],
        ["rollout", "promote"],
        ["rollout", "resume"],
    ],
    ids=lambda s: "-".join(s),
)
def test_a_start_killed_after_saving_its_record_never_undoes_a_newer_release(
    tmp_path: Path,
    repo_dir: Path,
    bundles: dict[str, Path],
    store: TelemetryStore,
    next_step: list[str],
) -> None:
    _killed_start(repo_dir, bundles["v2"], save=1, when="after")
    assert _records(repo_dir) == [("2.0.0", "running", False)]
    device = tmp_path / "device"
    assert device_entry(repo_dir, device, FLEET, MODEL).version == "1.0.0"
    _release_v3(repo_dir, bundles)
    if next_step == ["tick"]:
        RolloutService(repo_dir, store).tick()
    else:
        code = main([*next_step, MODEL, "--fleet", FLEET, "--repo", str(repo_dir)])
        assert code == 2  # no running or paused rollout: the interrupted start never began
    for _ in range(2):  # and the tick after that
        entry = device_entry(repo_dir, device, FLEET, MODEL)
        assert (entry.version, entry.percent, entry.previous) == ("3.0.0", 100.0, "1.0.0")
        RolloutService(repo_dir, store).tick()
    assert _records(repo_dir) == [("2.0.0", "abandoned", False)]


def test_a_start_killed_after_saving_its_record_can_simply_be_run_again(
    tmp_path: Path, repo_dir: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _killed_start(repo_dir, bundles["v2"], save=1, when="after")
    capsys.readouterr()
    assert main(["rollout", "status", "--repo", str(repo_dir)]) == 0
    assert "not published: its start was interrupted" in capsys.readouterr().out
    assert main(_start_args(repo_dir, bundles["v2"])) == 0
    entry = device_entry(repo_dir, tmp_path / "device", FLEET, MODEL)
    assert (entry.version, entry.percent, entry.previous) == ("2.0.0", 5.0, "1.0.0")
    (abandoned, running) = RolloutStore(repo_dir).all()
    assert abandoned.state is RolloutState.ABANDONED and running.state is RolloutState.RUNNING
    assert entry.rollout_id == running.id
    capsys.readouterr()
    assert main(["rollout", "status", "--repo", str(repo_dir), "--all"]) == 0
    status = capsys.readouterr().out
    assert "ABANDONED at 0%" in status and "interrupted before it published" in status


def test_a_start_killed_after_publishing_its_first_stage_goes_on(
    tmp_path: Path, repo_dir: Path, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    """The other side of the rule: desired state names the record, so it was published
    (only the record's own ``published`` flag was not saved yet)."""
    _killed_start(repo_dir, bundles["v2"], save=2, when="before")
    assert _records(repo_dir) == [("2.0.0", "running", False)]
    (r,) = RolloutService(repo_dir, store).tick()
    assert r.state is RolloutState.RUNNING and r.published
    entry = device_entry(repo_dir, tmp_path / "device", FLEET, MODEL)
    assert (entry.version, entry.percent, entry.rollout_id) == ("2.0.0", 5.0, r.id)
    assert main(["rollout", "pause", MODEL, "--fleet", FLEET, "--repo", str(repo_dir)]) == 0


def test_a_start_that_cannot_sign_leaves_no_record_to_publish_later(
    tmp_path: Path,
    repo_dir: Path,
    bundles: dict[str, Path],
    store: TelemetryStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A key error after the record was saved: the command fails, and the record is
    discarded at once, before another command could take it for a running rollout."""
    key = repo_dir / "keys" / "rollout.pem"
    away = tmp_path / "rollout.pem"
    shutil.move(key, away)
    assert main(_start_args(repo_dir, bundles["v2"])) == 1
    assert "rollout role needs 1 signature(s)" in capsys.readouterr().err
    shutil.move(away, key)
    assert _records(repo_dir) == [("2.0.0", "abandoned", False)]
    _release_v3(repo_dir, bundles)
    RolloutService(repo_dir, store).tick()
    entry = device_entry(repo_dir, tmp_path / "device", FLEET, MODEL)
    assert (entry.version, entry.percent) == ("3.0.0", 100.0)


# ---------------------------------------------------------------------------- retire


def test_retiring_the_version_of_an_interrupted_start_stays_retired(
    tmp_path: Path, repo_dir: Path, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    _killed_start(repo_dir, bundles["v2"], save=1, when="after")
    assert main(["releases", "retire", MODEL, "2.0.0", "--repo", str(repo_dir)]) == 0
    RolloutService(repo_dir, store).tick()
    # The fleet is not pointed at the retired bundle; every bundle it names is signed.
    desired = device_desired(repo_dir, tmp_path / "device", FLEET)
    assert desired.models[MODEL].version == "1.0.0"
    assert _records(repo_dir) == [("2.0.0", "abandoned", False)]


def test_retire_refuses_the_versions_of_an_active_rollout(
    tmp_path: Path, repo_dir: Path, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_start_args(repo_dir, bundles["v2"])) == 0
    (r,) = RolloutStore(repo_dir).all()
    assert main(["rollout", "pause", MODEL, "--fleet", FLEET, "--repo", str(repo_dir)]) == 0
    for version in ("2.0.0", "1.0.0"):  # the new version, and the one an abort goes back to
        capsys.readouterr()
        assert main(["releases", "retire", MODEL, version, "--repo", str(repo_dir)]) == 2
        err = capsys.readouterr().err
        assert f"rollout {r.id}" in err and "paused" in err and "edgectl rollout abort" in err
    entry = device_entry(repo_dir, tmp_path / "device", FLEET, MODEL)
    assert (entry.version, entry.previous, entry.percent) == ("2.0.0", "1.0.0", 5.0)
    doc = json.loads((repo_dir / "rollouts" / f"{r.id}.json").read_text())
    assert doc["state"] == "paused"
