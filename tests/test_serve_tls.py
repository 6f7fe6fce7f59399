"""`edgectl serve` against the TLS broker `edgectl broker config` writes (a real mosquitto).

The controller connects with its own client certificate (the ``[serve] mqtt_tls`` keys,
their paths defaulting to the broker folder), announces to a device connected with a
device certificate and ingests that device's status; a CA that does not verify the
broker is a start-up error naming the key and the file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contracts import announce_topic, device_topic, status_payload
from controller.base.errors import UsageError
from controller.build.builder import build_bundle
from controller.fleet.stores import open_store
from controller.identity.broker import BrokerOptions, write_broker_config
from controller.repository.release import release_bundle
from controller.repository.repo import init_repository
from controller.serve.config import ServeConfig, load_serve_config
from tests import test_broker_acl
from tests.e2e_support import wait_until
from tests.helpers import make_linear_model, stop_process
from tests.test_broker_acl import Client, Setup

BIN = Path(sys.executable).parent
# The fixture: a real TLS mosquitto from `edgectl broker config`, three enrolled devices.
setup = test_broker_acl.setup


def _serve(repo: Path, port: int, tmp_path: Path, extra: str = "") -> subprocess.Popen[str]:
    """`edgectl serve` over TLS; ``extra`` lines go to its ``[serve]`` table."""
    config = tmp_path / "controller.toml"
    config.write_text(
        f'[serve]\nrepo = "{repo}"\nlisten = "127.0.0.1:0"\nmqtt = "localhost:{port}"\n'
        f"mqtt_tls = true\nannounce_interval_s = 0.2\ningest_flush_s = 0.05\n{extra}"
    )
    return subprocess.Popen(
        [str(BIN / "edgectl"), "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "serve.log", "w"),
        text=True,
    )


def _start_up_error(s: Setup, tmp_path: Path, extra: str) -> str:
    """Start ``edgectl serve`` with ``extra`` in its config, which must make it exit with
    2 at start-up; its log."""
    serve = _serve(s.repo, s.port, tmp_path, extra)
    try:
        assert serve.wait(30) == 2
    finally:
        stop_process(serve)
    return (tmp_path / "serve.log").read_text()


@pytest.fixture
def released(setup: tuple[Setup, subprocess.Popen[bytes]], tmp_path: Path) -> Iterator[Setup]:
    """The broker set-up with a release for fleet north (so there is something to announce)."""
    s, _ = setup
    model = make_linear_model(tmp_path / "lin.onnx", seed=1)
    bundle = build_bundle(model, "lin", "1.0.0", tmp_path / "lin.bundle", 4).path
    release_bundle(bundle, "north", s.repo)
    yield s


def test_serve_connects_with_the_controllers_certificate(released: Setup, tmp_path: Path) -> None:
    s = released
    cam1 = Client("cam-1", s.port, s.ca, s.devices["cam-1"])
    serve = _serve(s.repo, s.port, tmp_path)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert re.match(r"edgectl serve: listening on http://", line), (
            line + (tmp_path / "serve.log").read_text()
        )
        assert cam1.connect(), cam1.connect_reason
        cam1.subscribe(announce_topic("north"))

        def announced() -> bool:
            return any(t == announce_topic("north") for t, _ in cam1.messages)

        wait_until(announced, 15, "the controller's retained announcement over TLS")
        payload = json.loads(dict(cam1.messages)[announce_topic("north")])
        assert payload["fleet"] == "north"

        status = status_payload(
            "cam-1", "north", True, {"lin": {"version": "1.0.0"}}, "0.1.0", "2025-01-01T00:00:00Z"
        )
        assert cam1.publish(device_topic("north", "cam-1", "status"), status, retain=True) == 0

        def ingested() -> bool:
            store = open_store(str(s.repo / "telemetry.sqlite"))
            try:
                return any(row.device == "cam-1" for row in store.devices())
            finally:
                store.close()

        wait_until(ingested, 15, "the controller to ingest cam-1's status over TLS")
    finally:
        cam1.close()
        stop_process(serve)
    log = (tmp_path / "serve.log").read_text()
    assert "refused" not in log and "unreachable" not in log, log


def test_a_ca_that_does_not_verify_the_broker_is_a_start_up_error(
    setup: tuple[Setup, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    s, _ = setup
    other_repo = tmp_path / "other-repo"
    init_repository(other_repo)
    write_broker_config(other_repo, tmp_path / "other-broker", BrokerOptions(hosts=("localhost",)))
    wrong_ca = tmp_path / "other-broker" / "ca.crt"
    log = _start_up_error(s, tmp_path, f'mqtt_ca_file = "{wrong_ca}"\n')
    assert "[serve] mqtt_ca_file" in log and str(wrong_ca) in log, log
    assert "does not verify" in log, log


def test_a_missing_ca_file_is_a_start_up_error(
    setup: tuple[Setup, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    s, _ = setup
    missing = tmp_path / "nowhere" / "ca.crt"
    log = _start_up_error(s, tmp_path, f'mqtt_ca_file = "{missing}"\n')
    assert f"[serve] mqtt_ca_file: cannot load the CA certificate {missing}" in log, log


def test_tls_paths_default_to_the_broker_folder_and_bad_keys_are_named(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repository(repo)
    plain = load_serve_config(None, {}, {"repo": str(repo)})
    assert not plain.mqtt_tls and plain.mqtt_ca_file is None

    def tls_config(**extra: object) -> ServeConfig:
        return load_serve_config(None, {}, {"repo": str(repo), "mqtt_tls": True, **extra})  # type: ignore[dict-item]

    with pytest.raises(UsageError, match=r"\[serve\] mqtt_ca_file not set .*broker config"):
        tls_config()
    write_broker_config(repo, tmp_path / "broker", BrokerOptions(hosts=("localhost",)))
    folder = (tmp_path / "broker").resolve()
    config = tls_config()
    assert (config.mqtt_ca_file, config.mqtt_cert_file, config.mqtt_key_file) == (
        folder / "ca.crt",
        folder / "controller.crt",
        folder / "controller.key",
    )
    assert tls_config(mqtt_key_file="/etc/k.pem").mqtt_key_file == Path("/etc/k.pem")
    with pytest.raises(UsageError, match=r"\[serve\] mqtt_tls expected true or false"):
        tls_config(mqtt_tls="yes")
    with pytest.raises(UsageError, match=r"\[serve\] mqtt_cert_file is set but mqtt_tls is false"):
        load_serve_config(None, {}, {"repo": str(repo), "mqtt_cert_file": "/c.pem"})
