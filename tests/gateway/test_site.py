"""A site gateway in front of a controller, with 50 devices behind it (issue 24, part 2).

Central: a mosquitto, `edgectl serve` (repository over HTTP, announcer, telemetry ingest
into its SQLite store) and, in front of its HTTP port, an nginx that caches nothing and
logs every request: the access log is how the test counts the bytes the controller's
repository served (`edgectl serve` keeps no access log).

Site: what `edgectl gateway config` writes, run by the real servers: nginx as the caching
mirror of the central repository URL, and mosquitto as the site broker, bridged to the
central one. Every device talks only to the site: 10 real agents (3 `edge-agent run`
processes and 7 more in one `tests.fleet_agents` process) and 40 simulated ones (the
fleet benchmark's worker: the agent's own update service, model loading skipped).

A new ~1 MB bundle is released: every device learns of it through the bridge (the real
ones poll hourly; the simulated ones never poll) and installs it through the mirror; the
central repository served the bundle's bytes exactly once; the retained announcement is
on the site broker; each real device's status and heartbeats, published to the site
broker, are in the central store (`edgectl fleet status`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.e2e_support import (
    BIN,
    Proc,
    _spawn,
    edgectl,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.gateway.servers import start_counting_proxy, start_gateway_nginx
from tests.helpers import Broker, free_port, make_linear_model, mosquitto_binary, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
FLEET = "bench"  # the simulated devices' fleet and model (bench/fleet_rollout.py)
MODEL = "big"
QUICK = ("--probation-s", "0.5", "--no-shadow", "--delta-from", "0")
OWN_PROCESSES = 3
IN_ONE_PROCESS = 7
SIMULATED = 40
AGENT_TAIL = "[telemetry]\nheartbeat_interval_s = 1.0\n[install]\nprobation_tick_s = 0.25\n"


def build(folder: Path, version: str, seed: int) -> Path:
    model = make_linear_model(folder / f"m{seed}.onnx", seed=seed, in_features=256,
                              out_features=1000)  # fmt: skip
    out = folder / f"{MODEL}-{version}.bundle"
    edgectl("bundle", "build", model, "--name", MODEL, "--version", version, "--quantize",
            "none", "--latency-runs", "0", "-o", out)  # fmt: skip
    return out


class Simulated:
    """The fleet benchmark's worker process: ``count`` simulated devices."""

    def __init__(self, work: Path, broker: str, url: str, root: Path, count: int) -> None:
        self.committed: dict[str, set[str]] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "fleet_rollout.py"), "--worker",
             "--first", "0", "--count", str(count), "--broker", broker, "--url", url,
             "--root", str(root), "--state", str(work), "--threads", "8", "--lifetime", "300"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if "error" in doc:
                    self.errors.append(f"{doc['device']}: {doc['error']}")
                elif "version" in doc:
                    self.committed.setdefault(doc["version"], set()).add(doc["device"])

    def count(self, version: str) -> int:
        with self._lock:
            return len(self.committed.get(version, ()))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def retained_announcement(broker: str) -> tuple[bytes, bool] | None:
    """The retained announcement of FLEET on ``broker`` (payload, retain flag), or None."""
    got: list[tuple[bytes, bool]] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2)

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        got.append((msg.payload, bool(msg.retain)))
        done.set()

    client.on_message = on_message
    host, port = broker.rsplit(":", 1)
    client.connect(host, int(port))
    client.subscribe(f"edgefleet/v1/fleets/{FLEET}/announce", qos=1)
    client.loop_start()
    done.wait(3)
    client.loop_stop()
    client.disconnect()
    return got[0] if got else None


def fleet_status(repo: Path) -> list[dict[str, Any]]:
    out = edgectl("fleet", "status", "--repo", repo, "--json", "--fleet", FLEET)
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


@pytest.mark.slow
def test_fifty_devices_behind_a_gateway(tmp_path: Path, broker: Broker) -> None:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    v1, v2 = build(tmp_path, "1.0.0", 1), build(tmp_path, "2.0.0", 2)
    edgectl("release", v1, "--fleet", FLEET, "--repo", repo, *QUICK)
    stoppers: list[Any] = []
    try:
        serve, serve_url = start_serve(repo, broker.address, tmp_path / "serve.log",
                                       {"heartbeat_interval_s": 1.0})  # fmt: skip
        stoppers.append(serve)
        central = start_counting_proxy(tmp_path / "central-nginx", serve_url)
        stoppers.append(central)

        # The site: both configs from `edgectl gateway config`, run by the real servers.
        gw = tmp_path / "gateway"
        http_port, mqtt_port = free_port(), free_port()
        edgectl("gateway", "config", "--site", "plant-7", "--upstream", central.url,
                "--central-broker", broker.address, "--listen", f"127.0.0.1:{http_port}",
                "--site-broker-port", str(mqtt_port), "--site-broker-bind", "127.0.0.1",
                "--fleet", FLEET, "-o", gw,
                *(["--run-as", "root"] if os.geteuid() == 0 else []))  # fmt: skip
        mirror = start_gateway_nginx(gw, http_port)
        stoppers.append(mirror)
        site_log = open(gw / "mosquitto.out", "wb")  # noqa: SIM115 - closed below
        site_broker = subprocess.Popen([mosquitto_binary(), "-c", str(gw / "mosquitto.conf")],
                                       stdout=site_log, stderr=site_log)  # fmt: skip
        stoppers.append(Proc(site_broker, gw / "mosquitto.out"))
        wait_for_port(mqtt_port)
        site = f"127.0.0.1:{mqtt_port}"
        # The bridge is up once the central retained announcement reached the site.
        wait_until(lambda: retained_announcement(site), 30, "v1's announcement at the site")

        root = repo / "metadata" / "root.json"
        devices = [f"dev-{i:02d}" for i in range(OWN_PROCESSES + IN_ONE_PROCESS)]
        configs = []
        for device in devices:
            config = write_agent_config(tmp_path / "devices" / device, device=device,
                                        fleet=FLEET, broker=site, repo_url=mirror.url + "/",
                                        root=root)  # fmt: skip
            with open(config, "a") as f:
                f.write(AGENT_TAIL)
            configs.append(config)
        real = [start_agent(c) for c in configs[:OWN_PROCESSES]]
        real.append(_spawn([str(BIN / "python"), "-m", "tests.fleet_agents",
                            *map(str, configs[OWN_PROCESSES:])],
                           tmp_path / "fleet-agents.log"))  # fmt: skip
        stoppers += real
        sims = Simulated(tmp_path / "sims", site, mirror.url + "/", root, SIMULATED)
        stoppers.append(sims)

        progress: dict[str, str] = {}

        def on(version: str) -> bool:
            rows = fleet_status(repo)
            real_on = [
                r["device"] for r in rows
                if r["health"] == "online" and r["models"].get(MODEL, {}).get("version") == version
                and r["models"][MODEL]["state"] == "committed"
            ]  # fmt: skip
            progress[version] = f"real {len(real_on)}, simulated {sims.count(version)}"
            return len(real_on) == len(devices) and sims.count(version) == SIMULATED

        def wait_on(version: str, what: str) -> None:
            try:
                wait_until(lambda: on(version), 90, what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {progress}, {sims.errors[:3]}") from None

        wait_on("1.0.0", "every device on 1.0.0")
        before = retained_announcement(site)
        edgectl("release", v2, "--fleet", FLEET, "--repo", repo, *QUICK)
        wait_on("2.0.0", "every device on 2.0.0, through the gateway")
        assert not sims.errors, sims.errors[:3]

        # The central repository served each bundle's bytes once, for 50 devices.
        for version in ("1.0.0", "2.0.0"):
            (target,) = (repo / "targets" / "bundles" / MODEL).glob(f"*.{version}.bundle")
            path = f"/targets/bundles/{MODEL}/{target.name}"
            upstream = [r for r in central.requests() if r.path == path]
            assert [(r.status, r.bytes) for r in upstream] == [(200, target.stat().st_size)]
            at_site = [r for r in mirror.requests() if r.path == path]
            assert len(at_site) >= len(devices) + SIMULATED  # every device fetched it there
            assert sum(r.cache == "MISS" for r in at_site) == 1
        # The announcement came down the bridge, retained, and changed with v2.
        after = retained_announcement(site)
        assert after is not None and after[1] is True and after != before
        assert after[0] == (retained_announcement(broker.address) or (b"", False))[0]
        for proc in real[:OWN_PROCESSES]:
            assert f"announcement for fleet {FLEET}" in proc.text()
        # Telemetry went up the bridge: the central store has each real device's heartbeats.
        for row in fleet_status(repo):
            assert row["system"].get("memory_total_bytes"), row
    finally:
        for proc in reversed(stoppers):
            proc.stop()
