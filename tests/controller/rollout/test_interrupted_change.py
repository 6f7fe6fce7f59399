"""An operator's change to a published rollout, SIGKILLed after any durable step, is never
undone by what runs next (issue 19: desired state never moves backwards except by an
explicit operator command).

``rollout promote`` and ``rollout abort`` run as real ``edgectl`` processes with the
test-only write hook (``controller.base.fsio``): one run logs their durable steps, then a
copy of the repository is killed after each step in turn. After the kill, two ticks of
the rollout job run and a device (python-tuf from its first root) reads the fleet's
entry: it must be either what it was before the command, when the kill left the change
unpublished, or the command's result, and never the former once a device could have
seen the latter. On the old order (desired state first, then the record) the tick wrote
the record's stage back: a promote went from 50 % back to 5 %, an abort back to the
running stage.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contracts import ModelRelease
from controller.cli import main
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from controller.rollout.service import RolloutService
from controller.rollout.store import RolloutStore
from tests.controller.conftest import MODEL
from tests.controller.device_view import device_entry

FLEET = "lab"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TelemetryStore]:
    s = open_store(str(tmp_path / "telemetry.sqlite"))
    yield s
    s.close()


@pytest.fixture
def running(tmp_path: Path, bundles: dict[str, Path]) -> Path:
    """A repository whose fleet runs 1.0.0 and a rollout of 2.0.0 at its first stage (5 %)."""
    path = tmp_path / "template"
    assert main(["init", str(path)]) == 0
    assert main(["release", str(bundles["v1"]), "--fleet", FLEET, "--repo", str(path)]) == 0
    start = ["rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo", str(path)]
    assert (
        main([*start, "--bundle", str(bundles["v2"]), "--stages", "5,50,100", "--wait", "1h"]) == 0
    )
    return path


def _edgectl(repo: Path, action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "controller.cli", "rollout", action, MODEL, "--fleet", FLEET]
    return subprocess.run(
        [*argv, "--repo", str(repo)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=False,
    )


def _entry(repo: Path, device: Path) -> tuple[str, float, str | None]:
    e: ModelRelease = device_entry(repo, device, FLEET, MODEL)
    return (e.version, e.percent, e.previous)


@pytest.mark.parametrize("action", ["promote", "abort"])
def test_a_change_killed_after_any_step_is_finished_or_never_seen(
    tmp_path: Path, running: Path, store: TelemetryStore, action: str
) -> None:
    before = _entry(running, tmp_path / "device-before")
    assert before == ("2.0.0", 5.0, "1.0.0")

    reference = tmp_path / "reference"
    shutil.copytree(running, reference)
    log = tmp_path / "reference.log"
    done = _edgectl(reference, action, {"EDGEFLEET_TEST_WRITE_LOG": str(log)})
    assert done.returncode == 0, done.stderr
    result = _entry(reference, tmp_path / "device-reference")
    assert result != before
    steps = len(log.read_text().splitlines())
    assert steps >= 2, log.read_text()

    for k in range(1, steps + 1):
        repo = tmp_path / f"killed-{k}"
        shutil.copytree(running, repo)
        env = {"EDGEFLEET_TEST_WRITE_LOG": str(tmp_path / f"k{k}.log")}
        killed = _edgectl(repo, action, {**env, "EDGEFLEET_TEST_KILL_AT_WRITE": str(k)})
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr)
        device = tmp_path / f"device-{k}"
        seen = _entry(repo, device)
        assert seen in (before, result), (k, seen)
        for _ in range(2):  # the rollout job's next ticks
            RolloutService(repo, store).tick()
            now = _entry(repo, device)
            assert now in (before, result), (k, now)
            if seen == result:
                assert now == result, f"killed after step {k}: the {action} was undone: {now}"
        # Whatever the kill left, the records agree with desired state now and nothing
        # is left pending; running the command again (when it did not happen) completes.
        assert not any(r.pending for r in RolloutStore(repo).all()), k
        if now == before:
            again = _edgectl(repo, action, {})
            assert again.returncode == 0, (k, again.stderr)
            assert _entry(repo, device) == result, k
