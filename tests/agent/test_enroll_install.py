"""The agent refuses at start a key that is not its certificate's. Real archives from
the controller, real files, real keys.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from agent.config import load_config
from agent.enroll import request_enrollment
from agent.errors import ConfigError
from agent.mqtt import tls_context
from controller.devices import add_device, renew_device
from controller.repository import init_repository
from tests.controller.enroll_support import OPTIONS, archive_members

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Renewal:
    etc: Path
    archive: Path  # the renewal, with a new key
    old: dict[str, bytes]  # the enrollment installed in etc
    new: dict[str, bytes]


@pytest.fixture(params=["renewed", "new CA"])
def renewal(tmp_path: Path, request: pytest.FixtureRequest) -> Renewal:
    """An enrolled device and the next archive for it: a renewal, or (``new CA``) its
    enrollment in a new repository, as after the device CA was lost."""
    repo = tmp_path / "repo"
    init_repository(repo)
    etc = tmp_path / "etc-edge-agent"
    first = tmp_path / "enroll.tar"
    first.write_bytes(add_device(repo, "cam-7", "north", OPTIONS)[1])
    assert agent_main(["enroll", str(first), "--config-dir", str(etc)]) == 0
    archive = tmp_path / "next.tar"
    if request.param == "renewed":
        archive.write_bytes(renew_device(repo, "cam-7")[1])
    else:
        init_repository(tmp_path / "repo2")
        archive.write_bytes(add_device(tmp_path / "repo2", "cam-7", "north", OPTIONS)[1])
    old, new = archive_members(first.read_bytes()), archive_members(archive.read_bytes())
    assert old["device.key"] != new["device.key"] and old["device.crt"] != new["device.crt"]
    assert (old["ca.crt"] != new["ca.crt"]) == (request.param == "new CA")
    return Renewal(etc, archive, old, new)


def test_the_agent_refuses_a_key_that_is_not_its_certificates(renewal: Renewal) -> None:
    request_enrollment("cam-7", renewal.etc, force=True)  # a new key, no certificate for it
    config = load_config(renewal.etc / "agent.toml", environ={})
    with pytest.raises(ConfigError) as info:
        tls_context(config, {})
    message = str(info.value)
    assert f"the key {renewal.etc / 'device.key'} is not the key of the certificate" in message
    assert "edge-agent enroll" in message and "--reuse-key" in message


def test_edge_agent_run_exits_2_naming_the_mismatch(renewal: Renewal, tmp_path: Path) -> None:
    request_enrollment("cam-7", renewal.etc, force=True)
    env = {
        **os.environ,
        "EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
        "EDGE_AGENT_INFERENCE_SOCKET_PATH": str(tmp_path / "infer.sock"),
    }
    env.pop("CREDENTIALS_DIRECTORY", None)
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(renewal.etc / "agent.toml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2, run.stderr
    assert "config error" in run.stderr and "is not the key of the certificate" in run.stderr
