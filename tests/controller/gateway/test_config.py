"""`edgectl gateway config`: what it renders, checked by the real nginx (``nginx -t``) and
the real mosquitto (started on the config, it listens), and the options it refuses."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from controller.base.errors import UsageError
from controller.gateway.config import (
    GatewayOptions,
    bridge_topics,
    parse_upstream,
    render_nginx_conf,
    write_gateway_config,
)
from tests.e2e_support import edgectl
from tests.gateway.servers import nginx_binary
from tests.helpers import free_port, mosquitto_binary, stop_process, wait_for_port

RUN_AS = "root" if os.geteuid() == 0 else ""


def options(**changes: object) -> GatewayOptions:
    base: dict[str, object] = {
        "site": "plant-7",
        "upstream": "http://127.0.0.1:8080",
        "central_broker": "127.0.0.1:1883",
        "listen": f"127.0.0.1:{free_port()}",
        "site_broker_port": free_port(),
        "site_broker_bind": "127.0.0.1",
        "run_as": RUN_AS,
    }
    return GatewayOptions(**{**base, **changes})  # type: ignore[arg-type]


def nginx_accepts(folder: Path) -> None:
    out = subprocess.run(
        [nginx_binary(), "-t", "-p", str(folder), "-c", str(folder / "nginx.conf"),
         "-e", str(folder / "logs" / "error.log")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr


def mosquitto_runs(folder: Path, port: int) -> None:
    log = open(folder / "mosquitto.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(folder / "mosquitto.conf")],
                            stdout=log, stderr=log)  # fmt: skip
    try:
        wait_for_port(port)
        assert proc.poll() is None
    finally:
        stop_process(proc)
        log.close()


@pytest.mark.parametrize(
    "upstream", ["http://127.0.0.1:8080", "https://localhost:8443/edgefleet/repo/"]
)
def test_nginx_accepts_the_mirror(tmp_path: Path, upstream: str) -> None:
    opts = options(upstream=upstream, cache_dir=tmp_path / "cache", cache_size="2g")
    write_gateway_config(tmp_path / "gw", opts)
    nginx_accepts(tmp_path / "gw")
    text = (tmp_path / "gw" / "nginx.conf").read_text()
    assert "proxy_cache_lock on;" in text
    assert f"proxy_cache_path {tmp_path / 'cache'} " in text and "max_size=2g" in text
    if upstream.startswith("https"):
        assert "rewrite ^(.*)$ /edgefleet/repo$1 break;" in text
        assert "proxy_set_header Host localhost:8443;" in text
        assert "proxy_ssl_server_name on;" in text


def test_cache_rules_per_path(tmp_path: Path) -> None:
    text = render_nginx_conf(tmp_path, options(), tmp_path / "cache")
    blocks = text.split("location ")
    (targets,) = [b for b in blocks if b.startswith("/targets/")]
    (versioned,) = [b for b in blocks if b.startswith('~ "^/metadata/')]
    (mutable,) = [b for b in blocks if b.startswith("/metadata/")]
    for block in (targets, versioned):
        assert "proxy_cache edgefleet;" in block and "proxy_cache_valid 200 90d;" in block
        assert "proxy_force_ranges on;" in block  # resumes answered from the cache
    assert "proxy_cache off;" in mutable  # timestamp.json: always upstream


def test_mosquitto_runs_the_site_broker_plain_and_with_tls(tmp_path: Path) -> None:
    opts = options(fleets=("north", "south"))
    write_gateway_config(tmp_path / "plain", opts)
    mosquitto_runs(tmp_path / "plain", opts.site_broker_port)

    repo = tmp_path / "repo"
    edgectl("init", repo)
    broker_dir = tmp_path / "broker"
    edgectl("broker", "config", "--repo", repo, "--host", "127.0.0.1", "-o", broker_dir)
    tls = options(
        site_tls_dir=broker_dir,
        central_cafile=str(broker_dir / "ca.crt"),
        central_certfile=str(broker_dir / "controller.crt"),
        central_keyfile=str(broker_dir / "controller.key"),
    )
    write_gateway_config(tmp_path / "tls", tls)
    text = (tmp_path / "tls" / "mosquitto.conf").read_text()
    assert "require_certificate true" in text and f"bridge_cafile {broker_dir / 'ca.crt'}" in text
    mosquitto_runs(tmp_path / "tls", tls.site_broker_port)


def test_bridge_topics_announcements_down_telemetry_up() -> None:
    lines = bridge_topics(("north",))
    assert "topic edgefleet/v1/fleets/north/announce in 1" in lines
    for kind in ("status", "telemetry", "events", "repo/request"):
        assert f"topic edgefleet/v1/fleets/north/devices/+/{kind} out 1" in lines
    assert "topic edgefleet/v1/fleets/north/devices/+/repo/response in 1" in lines
    assert bridge_topics(())[0] == "topic edgefleet/v1/fleets/+/announce in 1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"upstream": "ftp://controller"}, "--upstream expected the repository's URL"),
        ({"upstream": "http://controller:99999"}, "the port is not a number"),
        ({"upstream": "http://controller/a b"}, "cannot go into a config line"),
        ({"upstream": "http://c/?x=1"}, "no query"),
        ({"central_broker": "broker"}, "--central-broker expected HOST:PORT"),
        ({"listen": "0"}, "--listen expected HOST:PORT"),
        ({"cache_size": "lots"}, "--cache-size expected a size"),
        ({"site": "bad site"}, "--site/--fleet"),
        ({"fleets": ("no/slash",)}, "--site/--fleet"),
        ({"site_broker_port": 0}, "--site-broker-port expected 1-65535"),
        ({"central_certfile": "/etc/hostname"}, "go together"),
        ({"run_as": "root;"}, "--run-as"),
        ({"central_cafile": "/nonexistent/ca.crt"}, "no file at"),
        ({"site_tls_dir": Path("/nonexistent")}, "written by `edgectl broker config`"),
    ],
)
def test_bad_options_are_named(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("?", r"\?").replace("(", r"\(")):
        write_gateway_config(tmp_path / "gw", options(**change))
    assert not (tmp_path / "gw" / "nginx.conf").exists()


def test_cli_writes_both_and_refuses_with_exit_2(tmp_path: Path) -> None:
    out = edgectl("gateway", "config", "--site", "s1", "--upstream", "http://127.0.0.1:1",
                  "--central-broker", "127.0.0.1:1883", "-o", tmp_path / "gw")  # fmt: skip
    assert "nginx -p" in out.stdout and (tmp_path / "gw" / "mosquitto.conf").exists()
    args = ["--site", "s1", "--upstream", "controller:8080", "--central-broker", "127.0.0.1:1883"]
    bad = edgectl("gateway", "config", *args, "-o", tmp_path / "gw2", check=False)
    assert bad.returncode == 2, bad
    assert "--upstream expected the repository's URL" in bad.stderr
    assert parse_upstream("http://h:81/r/").prefix == "/r"
