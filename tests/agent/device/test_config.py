"""The agent's config: defaults, overrides from the environment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.base.errors import ConfigError
from agent.device.config import load_config
from tests.agent.device.config_files import MINIMAL, write_config


def test_minimal_config_gets_defaults_and_resolves_relative_paths(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, MINIMAL), environ={})
    assert config.device_id == "dev-1"
    assert config.mqtt.port == 1883
    assert config.repository.poll_interval_s == 300.0
    assert config.trusted_root == tmp_path.resolve() / "root.json"
    assert config.inference.socket_path == Path("/run/edge-agent/infer.sock")


def test_environment_overrides_file(tmp_path: Path) -> None:
    env = {
        "EDGE_AGENT_MQTT_PORT": "1884",
        "EDGE_AGENT_FLEET": "prod",
        "EDGE_AGENT_LOG_LEVEL": "DEBUG",
    }
    config = load_config(write_config(tmp_path, MINIMAL), environ=env)
    assert (config.mqtt.port, config.fleet, config.log_level) == (1884, "prod", "DEBUG")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL.replace('fleet = "lab"', ""), "'fleet' is required"),
        (MINIMAL.replace('"lab"', '"../x"'), "invalid fleet name"),
        (MINIMAL + "\n[mqtt]\nport = 'x'\n", r"'mqtt.port': expected int, got 'x'"),
        (MINIMAL + "\n[mqtt]\nprot = 1\n", "unknown config key 'mqtt.prot'"),
        (MINIMAL.replace("http://", "ftp://"), "expected an http:// or https:// URL"),
        (MINIMAL + "\n[repository.x]\n", "unknown config key"),
        ("device_id = [", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, text), environ={})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", environ={})
