"""A real `edge-agent run` that cannot reach its broker says why in its log and in
`edge-agent status` (issue 20, item 3): before, a wrong port logged nothing at all and
the agent exposed nothing about its broker connection."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from agent.client import InferenceClient
from tests.agent._serving import short_socket_dir
from tests.e2e_support import BIN, start_agent, wait_until
from tests.helpers import free_port


def _edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edge-agent"), *args], capture_output=True, text=True, timeout=60
    )


def test_a_wrong_port_is_logged_with_its_cause_and_shown_by_edge_agent_status(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens there
    socket_dir = short_socket_dir()
    config = tmp_path / "agent.toml"
    (tmp_path / "root.json").write_text("{}")
    config.write_text(
        'device_id = "dev-1"\nfleet = "lab"\n'
        f'state_dir = "{tmp_path / "state"}"\ntrusted_root = "{tmp_path / "root.json"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_min_s = 1\nreconnect_max_s = 1\n'
        '[repository]\nurl = "http://127.0.0.1:1/"\npoll_interval_s = 3600\n'
        f'[inference]\nsocket_path = "{socket_dir / "infer.sock"}"\n'
    )
    agent = start_agent(config)
    try:
        with InferenceClient(socket_dir / "infer.sock", timeout_s=5) as client:
            wait_until(
                lambda: client.agent_status()["broker"]["failed_attempts"] >= 4 or None,
                60,
                "four failed connection attempts in the agent's status",
            )
        shown = _edge_agent("status", "--config", str(config))
        as_json = _edge_agent("status", "--config", str(config), "--json")
    finally:
        agent.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
    address = f"127.0.0.1:{port}"
    assert shown.returncode == 0, shown.stderr
    assert f"broker {address} (client id edge-agent-dev-1): NOT connected since" in shown.stdout
    assert "failed connection attempts since" in shown.stdout
    assert f"connection refused: nothing listens on {address}" in shown.stdout
    doc = json.loads(as_json.stdout)
    assert doc["live"] is True and doc["device"] == "dev-1"
    broker = doc["broker"]
    assert broker["address"] == address and broker["connected"] is False
    assert broker["last_error"]["cause"].startswith("connection refused")
    said = [line for line in agent.text().splitlines() if "cannot connect to the broker" in line]
    assert said, agent.text()
    assert "WARNING" in said[0] and f"connection refused: nothing listens on {address}" in said[0]
    assert len(said) < broker["failed_attempts"], "a line per attempt: not rate-limited"


def test_status_without_an_agent_names_the_socket_it_tried(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    out = _edge_agent("status", "--socket", str(missing))
    assert out.returncode == 1
    assert f"tried {missing}: given with --socket; nothing is there" in out.stderr
