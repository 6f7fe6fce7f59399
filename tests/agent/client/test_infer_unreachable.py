"""``edge-agent infer`` that cannot reach the agent says which socket it tried, where that
path came from and what to check (issue 20, item 13), not only ``[Errno 2]``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from agent.cli import main


def _infer(capsys: pytest.CaptureFixture[str], tmp_path: Path, *where: str) -> str:
    request = tmp_path / "in.json"
    request.write_text("{}")
    assert main(["infer", "lin", "--input", str(request), *where]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_no_socket_there_names_the_path_its_source_and_the_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "missing.sock"
    err = _infer(capsys, tmp_path, "--socket", str(path))
    assert f"tried {path}: given with --socket; nothing is there" in err
    assert "systemctl status edge-agent" in err


def test_a_socket_nobody_listens_on_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "stale.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))  # bound, never listening, then closed: a stopped agent's socket
    left.close()
    err = _infer(capsys, tmp_path, "--socket", str(path))
    assert f"tried {path}: given with --socket; no agent answers there" in err


def test_the_path_from_a_config_names_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "from-config.sock"
    config = tmp_path / "agent.toml"
    (tmp_path / "root.json").write_text("{}")
    config.write_text(
        'device_id = "dev-1"\nfleet = "lab"\n'
        f'state_dir = "{tmp_path / "state"}"\ntrusted_root = "{tmp_path / "root.json"}"\n'
        '[mqtt]\nhost = "127.0.0.1"\n[repository]\nurl = "http://127.0.0.1:1/"\n'
        f'[inference]\nsocket_path = "{path}"\n'
    )
    err = _infer(capsys, tmp_path, "--config", str(config))
    assert f"tried {path}: [inference] socket_path in {config}" in err
