from __future__ import annotations

import json
import queue
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.contracts import ANNOUNCE_SCHEMA, announce_topic
from controller.app import ingest_settings
from controller.base.errors import UsageError
from controller.repository.release import release_bundle
from controller.repository.repo import Repository, needs_resign, resign_expiring
from controller.serve.config import load_serve_config
from tests.controller.conftest import Served, edgectl_cmd
from tests.helpers import Broker

FLEET = "lab"


def _subscribe(broker: Broker, topic: str) -> tuple[mqtt.Client, queue.Queue[dict[str, Any]]]:
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = lambda _c, _u, msg: got.put(
        {"retain": msg.retain, **json.loads(msg.payload)}
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client, got


def _wait_for_version(got: queue.Queue[dict[str, Any]], version: int) -> dict[str, Any]:
    seen = []
    while True:
        try:
            message = got.get(timeout=10)
        except queue.Empty:
            raise AssertionError(f"no announce with version {version}; saw {seen}") from None
        seen.append(message)
        if message["timestamp_version"] == version:
            return message


def test_release_is_announced_retained(
    repo: Repository,
    bundles: dict[str, Path],
    broker: Broker,
    start_serve: Callable[..., Served],
) -> None:
    released = release_bundle(bundles["v1"], FLEET, repo.path)
    served = start_serve(repo.path, broker.address)
    client, got = _subscribe(broker, announce_topic(FLEET))
    try:
        first = _wait_for_version(got, released.versions["timestamp"])
        assert first["schema"] == ANNOUNCE_SCHEMA and first["fleet"] == FLEET
        result = release_bundle(bundles["v2"], FLEET, repo.path)
        _wait_for_version(got, result.versions["timestamp"])
    finally:
        client.loop_stop()
        client.disconnect()
    # Retained: a subscriber that arrives later gets the latest announcement at once.
    late, late_got = _subscribe(broker, announce_topic(FLEET))
    try:
        message = _wait_for_version(late_got, result.versions["timestamp"])
        assert message["retain"] is True
    finally:
        late.loop_stop()
        late.disconnect()
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=10) == 0


def test_serve_keeps_serving_http_without_a_broker(
    repo: Repository, start_serve: Callable[..., Served]
) -> None:
    served = start_serve(repo.path, "127.0.0.1:1")
    import urllib.request

    with urllib.request.urlopen(f"{served.url}/metadata/root.json", timeout=5) as resp:
        assert resp.status == 200
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=10) == 0
    assert "unreachable" in served.stderr.read_text()


def test_resign_only_when_half_the_lifetime_is_gone(repo: Repository) -> None:
    now = datetime.now(UTC)
    assert resign_expiring(repo, now) == {}
    before = repo.versions()
    changed = resign_expiring(repo, now + timedelta(hours=13))
    assert list(changed) == ["timestamp"] and changed["timestamp"] > before["timestamp"]
    assert changed == {"timestamp": repo.versions()["timestamp"]}
    changed = resign_expiring(repo, now + timedelta(days=4))
    assert sorted(changed) == ["snapshot", "timestamp"]
    changed = resign_expiring(repo, now + timedelta(days=16))
    assert sorted(changed) == ["rollout", "snapshot", "timestamp"]
    after = repo.versions()
    assert all(after[role] == changed[role] > before[role] for role in changed)
    assert repo.load("timestamp").signed.expires > now + timedelta(days=16)
    assert not needs_resign(now + timedelta(days=1), timedelta(days=1), now)


def test_config_precedence(tmp_path: Path) -> None:
    toml = tmp_path / "controller.toml"
    toml.write_text(
        '[serve]\nrepo = "/srv/repo"\nlisten = "0.0.0.0:9000"\nmqtt = "broker:1884"\n'
        "announce_interval_s = 2\ningest_store_retry_max_s = 3\ningest_qos0_backlog_max = 500\n"
    )
    config = load_serve_config(toml, {"EDGECTL_MQTT": "env:1885"}, {"listen": "127.0.0.1:0"})
    assert (config.ingest_store_retry_max_s, config.ingest_stop_timeout_s) == (3.0, 30.0)
    assert ingest_settings(config).qos0_backlog_max == 500  # what the Ingestor gets
    assert load_serve_config(None, {}, {"repo": "r"}).ingest_qos0_backlog_max == 100_000
    assert config.repo_dir == Path("/srv/repo")
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 0)
    assert (config.mqtt_host, config.mqtt_port) == ("env", 1885)
    assert config.announce_interval_s == 2.0
    assert load_serve_config(toml, {}, {"mqtt": ""}).mqtt_host is None
    toml.write_text('[serve]\nrepo = "r"\nlisten_port = 1\n')
    with pytest.raises(UsageError, match=r"toml: unknown key \[serve\] listen_port"):
        load_serve_config(toml, {}, {})
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        load_serve_config(None, {}, {"repo": "r", "mqtt": "nohost"})


def test_retention_and_the_count_bound_are_serve_keys(tmp_path: Path) -> None:
    toml = tmp_path / "controller.toml"
    toml.write_text(
        '[serve]\nrepo = "r"\nevent_retention_s = 3600\nevent_max_per_device = 50\n'
        "max_requests_per_s = 2000\n"
    )
    config = load_serve_config(toml, {}, {})
    assert (config.event_retention_s, config.event_max_per_device) == (3600.0, 50)
    assert ingest_settings(config).max_requests_per_s == 2000.0
    default = load_serve_config(None, {}, {"repo": "r"})
    assert (default.event_retention_s, default.event_max_per_device) == (90 * 86400.0, 1000)
    toml.write_text('[serve]\nrepo = "r"\nevent_max_per_device = 0\n')
    with pytest.raises(UsageError, match=r"\[serve\] event_max_per_device expected > 0"):
        load_serve_config(toml, {}, {})


def test_a_damaged_device_registry_stops_serve_at_start_up(
    repo: Repository, tmp_path: Path
) -> None:
    """Ingestion checks every sender against the registry: rather than admit everyone (or
    no one), serve refuses to start, naming the file."""
    registry = repo.path / "ca" / "devices.json"
    registry.parent.mkdir(mode=0o700, exist_ok=True)
    registry.write_text("{not json")
    done = subprocess.run(
        edgectl_cmd(
            "serve", "--repo", repo.path, "--mqtt", "127.0.0.1:1", "--listen", "127.0.0.1:0"
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot read the device registry {registry}" in done.stderr
