"""Issue 20 item 4: every controller.toml key is checked for type and range, a key
outside [serve] is an error, and an error names the file and the key, or the
environment variable that set it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from controller.base.errors import UsageError
from controller.serve.config import load_serve_config, load_view_config
from tests.controller.conftest import edgectl_cmd

ROOT = Path(__file__).resolve().parents[3]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[serve]\nrepo = "r"\nmqtt = "h:188830"\n', r"\[serve\] mqtt: port expected 1-65535"),
        ('[serve]\nrepo = "r"\nlisten = "h:70000"\n', r"\[serve\] listen: port expected"),
        ('[serve]\nrepo = "r"\nmqtt = 1883\n', r"\[serve\] mqtt expected a HOST:PORT string"),
        ("[serve]\nrepo = 5\n", r"\[serve\] repo expected a string, got 5"),
        ('[serve]\nrepo = "r"\nmqtt_tls = "yes"\n', r"\[serve\] mqtt_tls expected true or false"),
        ('[serve]\nrepo = "r"\nmqtt_keepalive_s = 70000\n', r"mqtt_keepalive_s expected 1..65535"),
        ('[serve]\nrepo = "r"\nmqtt_keepalive_s = 1.5\n', r"mqtt_keepalive_s expected an integer"),
        ('[serve]\nrepo = "r"\ningest_flush_s = -1\n', r"\[serve\] ingest_flush_s expected > 0"),
        ('[serve]\nrepo = "r"\ningest_flush_s = nan\n', r"\[serve\] ingest_flush_s expected > 0"),
        ('[serve]\nrepo = "r"\nevent_max_per_device = true\n', r"expected an integer, got True"),
        ('[serve]\nrepo = "r"\nmqtt_prot = 1\n', r"unknown key \[serve\] mqtt_prot"),
        ('[serve]\nrepo = "r"\nanounce_interval_s = 1\n', r"did you mean announce_interval_s\?"),
        (
            'mqtt_tls = true\n[serve]\nrepo = "r"\n',
            r"key 'mqtt_tls' is outside the \[serve\] table.*did you mean \[serve\] mqtt_tls\?",
        ),
        ('colour = 1\n[serve]\nrepo = "r"\n', r"unknown top-level key 'colour'"),
        ('[server]\nrepo = "r"\n', r"unknown top-level key 'server'"),
    ],
)
def test_bad_value_names_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UsageError, match=message) as exc:
        load_serve_config(path, {}, {})
    assert str(exc.value).startswith(f"{path}: "), exc.value


def test_views_read_the_file_with_the_same_rules(tmp_path: Path) -> None:
    path = _write(tmp_path, 'store = "x.sqlite"\n[serve]\nrepo = "r"\n')
    with pytest.raises(UsageError, match=r"did you mean \[serve\] store\?"):
        load_view_config(path, {}, {})


def test_environment_override_out_of_range_names_the_variable(tmp_path: Path) -> None:
    path = _write(tmp_path, '[serve]\nrepo = "r"\n')
    with pytest.raises(UsageError) as exc:
        load_serve_config(path, {"EDGECTL_MQTT": "broker:188830"}, {})
    assert str(exc.value) == (
        "environment variable EDGECTL_MQTT=broker:188830: port expected 1-65535, got 188830"
    )
    with pytest.raises(UsageError, match=r"^--listen: port expected 1-65535"):
        load_serve_config(path, {}, {"listen": "h:65536"})


def test_typo_in_an_environment_variable_names_the_closest_one(tmp_path: Path) -> None:
    path = _write(tmp_path, '[serve]\nrepo = "r"\n')
    with pytest.raises(
        UsageError, match=r"EDGECTL_MQT=b:1: no such setting; did you mean EDGECTL_MQTT\?"
    ):
        load_serve_config(path, {"EDGECTL_MQT": "b:1"}, {})
    # A valid file, variables and flags still load.
    config = load_serve_config(path, {"EDGECTL_MQTT": "b:1884"}, {"listen": "127.0.0.1:0"})
    assert (config.mqtt_host, config.mqtt_port, config.listen_port) == ("b", 1884, 0)


def test_the_real_cli_reports_it_without_a_traceback(tmp_path: Path) -> None:
    path = _write(tmp_path, f'mqtt_tls = true\n[serve]\nrepo = "{tmp_path / "repo"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECTL_")}
    run = subprocess.run(
        edgectl_cmd("serve", "--config", path),
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert f"{path}: key 'mqtt_tls' is outside the [serve] table" in run.stderr
    assert "did you mean [serve] mqtt_tls?" in run.stderr and "Traceback" not in run.stderr
    path.write_text(f'[serve]\nrepo = "{tmp_path / "repo"}"\n')
    run = subprocess.run(
        edgectl_cmd("serve", "--config", path),
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT), "EDGECTL_MQTT": "localhost:188830"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "EDGECTL_MQTT=localhost:188830: port expected 1-65535" in run.stderr
    assert "Traceback" not in run.stderr
