"""Issue 20 item 4: every agent.toml key is checked for type and range, and an error
names the file and the key, or the environment variable that set it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.base.errors import ConfigError
from agent.device.config import load_config
from tests.agent.device.config_files import MINIMAL, write_config

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[mqtt]\nport = 188830\n", r"'mqtt.port': expected 1..65535, got 188830"),
        ("[mqtt]\nport = 0\n", r"'mqtt.port': expected 1..65535, got 0"),
        ("[mqtt]\nkeepalive_s = 70000\n", r"'mqtt.keepalive_s': expected 1..65535"),
        ("[mqtt]\nreconnect_min_s = -1\n", r"'mqtt.reconnect_min_s': expected a positive"),
        ("[mqtt]\nreconnect_max_s = 0.5\n", r"'mqtt.reconnect_max_s': expected at least"),
        ("[mqtt]\ntls = 1\n", r"'mqtt.tls': expected bool, got 1"),
        ('[mqtt]\ntls = "maybe"\n', r"'mqtt.tls': expected bool"),
        ("[mqtt]\nport = true\n", r"'mqtt.port': expected int, got True"),
        ("[mqtt]\nport = 1883.5\n", r"'mqtt.port': expected int"),
        ("[mqtt]\nhost = 5\n", r"'mqtt.host': expected str, got 5"),
        ("[repository]\npoll_interval_s = nan\n", r"'repository.poll_interval_s': expected"),
        ("[repository]\nmax_bundle_bytes = 0\n", r"'repository.max_bundle_bytes': expected a pos"),
        ("[inference]\nmax_queue = -1\n", r"'inference.max_queue': expected a number >= 0"),
        ("[inference]\nsocket_mode = 0o17777\n", r"'inference.socket_mode': expected a file mode"),
        ("[inference]\ntcp_port = 70000\n", r"'inference.tcp_port': expected 0 \(off\)"),
        ("[telemetry]\noutbox_max_events = 0\n", r"'telemetry.outbox_max_events'"),
        ("[mqtt]\nprot = 1\n", r"unknown config key 'mqtt.prot'; did you mean 'mqtt.port'\?"),
        ("port = 1\n", r"unknown config key 'port'; did you mean \[mqtt\] port\?"),
        ("colour = 1\n", r"unknown config key 'colour'"),
    ],
)
def test_bad_value_names_the_file_and_the_key(tmp_path: Path, extra: str, message: str) -> None:
    # [repository] is in MINIMAL already: merge the extra lines into it.
    text = MINIMAL.replace("[repository]\n", extra + "\n[repository]\n", 1)
    if extra.startswith("[repository]"):
        text = MINIMAL + extra.replace("[repository]\n", "")
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(path, environ={})
    assert str(exc.value).startswith(f"{path}: "), exc.value


def test_environment_override_out_of_range_names_the_variable(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={"EDGE_AGENT_MQTT_PORT": "188830"})
    assert str(exc.value).startswith("environment variable EDGE_AGENT_MQTT_PORT=188830: ")
    assert "'mqtt.port': expected 1..65535" in str(exc.value)
    with pytest.raises(ConfigError, match=r"EDGE_AGENT_MQTT_TLS=sometimes: .*'mqtt\.tls'"):
        load_config(path, environ={"EDGE_AGENT_MQTT_TLS": "sometimes"})
    with pytest.raises(ConfigError, match=r"EDGE_AGENT_FLEET=\.\./x: config key 'fleet'"):
        load_config(path, environ={"EDGE_AGENT_FLEET": "../x"})


def test_typo_in_an_environment_variable_names_the_closest_one(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL)
    with pytest.raises(
        ConfigError,
        match="EDGE_AGENT_MQTT_PROT=1: no such config key; did you mean EDGE_AGENT_MQTT_PORT\\?",
    ):
        load_config(path, environ={"EDGE_AGENT_MQTT_PROT": "1"})
    # The valid ones keep working, top-level and in a section.
    config = load_config(
        path, environ={"EDGE_AGENT_STATE_DIR": "/tmp/s", "EDGE_AGENT_MQTT_TLS": "yes"}
    )
    assert (config.state_dir, config.mqtt.tls) == (Path("/tmp/s"), True)


def test_the_real_cli_reports_it_without_a_traceback(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, MINIMAL.replace("[repository]", "[mqtt]\nport = 188830\n\n[repository]")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert f"edge-agent: config error: {path}: config key 'mqtt.port'" in run.stderr
    assert "Traceback" not in run.stderr
    path.write_text(MINIMAL)
    run = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "EDGE_AGENT_MQTT_PROT": "1884"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "did you mean EDGE_AGENT_MQTT_PORT?" in run.stderr and "Traceback" not in run.stderr
