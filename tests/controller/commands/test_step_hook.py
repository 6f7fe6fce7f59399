"""The test-only step hook of ``edgectl`` (``controller.base.fsio``): what
tests/kill_points uses to SIGKILL a command right after each of its durable steps."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.base import fsutil
from controller.base.errors import UsageError
from controller.base.fsio import install_step_hook_from_env
from tests.controller.conftest import edgectl_cmd


@pytest.fixture(autouse=True)
def no_hook_after() -> Iterator[None]:
    yield
    fsutil.set_step_hook(None)


def test_unset_it_installs_nothing() -> None:
    assert not install_step_hook_from_env({})
    assert fsutil._step_hook is None


def test_a_kill_without_the_log_or_a_bad_count_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs EDGEFLEET_TEST_WRITE_LOG"):
        install_step_hook_from_env({"EDGEFLEET_TEST_KILL_AT_WRITE": "1"})
    log = str(tmp_path / "log")
    for bad in ("0", "-1", "two"):
        env = {"EDGEFLEET_TEST_WRITE_LOG": log, "EDGEFLEET_TEST_KILL_AT_WRITE": bad}
        with pytest.raises(UsageError, match="expected a step number"):
            install_step_hook_from_env(env)
    assert fsutil._step_hook is None


def test_every_durable_step_is_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log"
    assert install_step_hook_from_env({"EDGEFLEET_TEST_WRITE_LOG": str(log)})
    assert "is set: logging durable steps for a test" in capsys.readouterr().err
    fsutil.atomic_write(tmp_path / "a", b"1")
    fsutil.durable_rename(tmp_path / "a", tmp_path / "b")
    assert fsutil.durable_unlink(tmp_path / "b")
    assert not fsutil.durable_unlink(tmp_path / "b")  # nothing removed: no step
    assert log.read_text().splitlines() == [
        f"1\t{tmp_path / 'a'}",
        f"2\t{tmp_path / 'b'}",
        f"3\t{tmp_path / 'b'}",
    ]


def test_edgectl_is_killed_right_after_the_step_asked_for(tmp_path: Path) -> None:
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_TEST_")}
    env |= {"EDGEFLEET_TEST_WRITE_LOG": str(log), "EDGEFLEET_TEST_KILL_AT_WRITE": "3"}
    done = subprocess.run(
        edgectl_cmd("init", tmp_path / "repo"), env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    assert "SIGKILL after step 3" in done.stderr
    written = [line.split("\t")[1] for line in log.read_text().splitlines()]
    assert [Path(p).name for p in written] == ["root.pem", "targets.pem", "snapshot.pem"]
    assert not (tmp_path / "repo" / "keys" / "timestamp.pem").exists()
