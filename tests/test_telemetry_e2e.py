"""Fleet telemetry end to end: real agents, a real `edgectl serve`, a private mosquitto.

Heartbeats, events and status reach the store and `edgectl fleet status` / `device show`
/ `/metrics` show them; a device that goes silent is stale while the broker still calls
it online; its last will makes it offline. The slow tests stop the broker for 30 s while
an agent installs releases, and start an agent on a state disk filled to the last byte
(a real tmpfs), and check that every event produced arrives, in order.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from agent.client import InferenceClient
from tests.controller.fleet.test_ingest import start_persistent_broker
from tests.e2e_support import (
    Proc,
    edgectl,
    edgectl_bundles,
    paused,
    served_version,
    start_agent,
    start_serve,
    wait_until,
)
from tests.e2e_support import write_agent_config as _write_agent_config
from tests.helpers import Broker

if TYPE_CHECKING:
    from tests.chaos.fleet import StateDisk

FLEET = "lab"
MODEL = "linear"
# Shadows off: these tests judge other paths (tests/test_shadow_e2e.py judges shadows).
QUICK = ("--probation-s", "0.5", "--no-shadow")
INSTALL_KINDS = [
    "install_started",
    "verified",
    "unpacked",
    "smoke_tested",
    "activated",
    "committed",
]


def write_agent_config(folder: Path, poll_interval_s: float = 3600.0, **kw: Any) -> Path:
    config = _write_agent_config(folder, poll_interval_s=poll_interval_s, **kw)
    with config.open("a") as out:
        out.write("[telemetry]\nheartbeat_interval_s = 1\nevent_ack_timeout_s = 2\n")
    text = config.read_text().replace("[mqtt]\n", "[mqtt]\nreconnect_max_s = 2\n")
    config.write_text(text)
    return config


def fleet_status(repo: Path, *args: str) -> list[dict[str, Any]]:
    out = edgectl("fleet", "status", "--repo", repo, "--json", *args)
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def device_show(repo: Path, device: str) -> dict[str, Any]:
    out = edgectl("device", "show", device, "--repo", repo, "--json", "--events", "1000")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[list[Broker]]:
    """A restartable broker: the test may replace the list's only item."""
    brokers = [start_persistent_broker(tmp_path / "broker")]
    yield brokers
    brokers[0].stop()


def _kinds(repo: Path, device: str) -> list[str]:
    return [e["kind"] for e in device_show(repo, device)["events"]]


def test_heartbeats_events_and_status_reach_fleet_status(
    tmp_path: Path, persistent_broker: list[Broker]
) -> None:
    broker = persistent_broker[0]
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = edgectl_bundles(tmp_path, MODEL, ["1.0.0"])
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    agents: list[Proc] = []
    try:
        for device in ("dev-1", "dev-2"):
            config = write_agent_config(
                tmp_path / device,
                device=device,
                fleet=FLEET,
                broker=broker.address,
                repo_url=url,
                root=repo / "metadata" / "root.json",
            )
            agents.append(start_agent(config))
        edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)

        for device in ("dev-1", "dev-2"):
            wait_until(
                lambda d=device: _kinds(repo, d) == ["agent_started", *INSTALL_KINDS],  # type: ignore[misc]
                60,
                f"{device}'s install events",
            )

        def both_committed() -> list[dict[str, Any]] | None:
            rows = fleet_status(repo, "--fleet", FLEET, "--model", MODEL)
            ok = len(rows) == 2 and all(
                r["health"] == "online"
                and r["models"].get(MODEL, {}).get("version") == "1.0.0"
                and r["models"][MODEL]["state"] == "committed"
                and r["system"].get("memory_total_bytes")
                for r in rows
            )
            return rows if ok else None

        wait_until(both_committed, 30, "fleet status to show both devices on 1.0.0")
        table = edgectl("fleet", "status", "--repo", repo).stdout
        assert re.search(r"lab\s+dev-1\s+online\s+linear\s+1\.0\.0\s+committed", table), table
        shown = device_show(repo, "dev-1")
        assert shown["heartbeats"] and shown["heartbeats"][-1]["schema"] == "edgefleet.telemetry/1"
        assert [e["seq"] for e in shown["events"]] == list(range(1, 8))
        assert fleet_status(repo, "--model", "other") == []

        metrics = httpx.get(f"{url}/metrics").text
        assert 'edgefleet_devices{fleet="lab",health="online"} 2' in metrics
        assert 'state="committed"} 2' in metrics
        assert 'edgefleet_events_total{fleet="lab",kind="committed"} 2' in metrics

        # Silent but connected (SIGSTOP keeps the TCP connection): stale, not online.
        with paused(agents[0]):
            wait_until(lambda: _health(repo, "dev-1") == "stale", 20, "dev-1 to be shown stale")
        wait_until(lambda: _health(repo, "dev-1") == "online", 20, "dev-1 to be back")

        # Killed without a goodbye: the broker's last will makes it offline, versions kept.
        agents[1].process.kill()
        agents[1].process.wait()
        wait_until(lambda: _health(repo, "dev-2") == "offline", 60, "dev-2's last will")
        (row,) = fleet_status(repo, "--fleet", FLEET, "--model", MODEL)[1:]
        assert row["models"][MODEL]["version"] == "1.0.0"
    finally:
        for proc in agents:
            proc.stop()
        serve.stop()


def _health(repo: Path, device: str) -> str | None:
    rows = [r for r in fleet_status(repo) if r["device"] == device]
    return rows[0]["health"] if rows else None


def _produced(agent: Proc) -> list[int]:
    return [int(m) for m in re.findall(r"agent\.telemetry\.reporter: event (\d+):", agent.text())]


@pytest.mark.slow
def test_every_event_produced_during_a_30s_broker_outage_arrives_in_order(
    tmp_path: Path, persistent_broker: list[Broker]
) -> None:
    broker = persistent_broker[0]
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = edgectl_bundles(tmp_path, MODEL, ["1.0.0", "2.0.0", "3.0.0"])
    edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    config = write_agent_config(
        tmp_path / "dev-1",
        poll_interval_s=2.0,  # no announcements during the outage: the poll finds releases
        device="dev-1",
        fleet=FLEET,
        broker=broker.address,
        repo_url=url,
        root=repo / "metadata" / "root.json",
    )
    agent = start_agent(config)
    try:
        wait_until(lambda: "committed" in _kinds(repo, "dev-1"), 60, "v1 committed")
        before = len(_produced(agent))

        broker.stop()
        stopped_at = time.monotonic()
        edgectl("release", bundles["2.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
        wait_until(lambda: "committed 2.0.0" in agent.text().replace("linear ", ""), 25, "v2")
        edgectl("release", bundles["3.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
        wait_until(lambda: "committed 3.0.0" in agent.text().replace("linear ", ""), 25, "v3")
        time.sleep(max(0.0, 30.0 - (time.monotonic() - stopped_at)))
        produced = _produced(agent)
        during = produced[before:]
        assert len(during) >= 2 * len(INSTALL_KINDS), agent.text()[-3000:]

        persistent_broker[0] = start_persistent_broker(tmp_path / "broker", port=broker.port)
        wait_until(
            lambda: len(device_show(repo, "dev-1")["events"]) >= len(produced),
            90,
            "every event to be stored",
        )
        stored = [e["seq"] for e in device_show(repo, "dev-1")["events"]]
        assert stored == produced, (stored, produced)
        kinds = _kinds(repo, "dev-1")
        assert kinds[-2 * len(INSTALL_KINDS) :] == INSTALL_KINDS * 2
    finally:
        agent.stop()
        serve.stop()


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["stopped", "killed"])
def test_an_agent_started_on_a_full_state_disk_serves_and_delivers_its_events_later(
    tmp_path: Path, persistent_broker: list[Broker], small_disk: StateDisk, stop: str
) -> None:
    """Stopped cleanly (SQLite removed its -shm file, which a full disk cannot give back)
    or killed, then started again on a state disk full to the last byte: the agent serves
    its last good version, keeps following the fleet, holds its agent_started event in
    memory, and once the disk has room installs the release it could not fetch and every
    event reaches the store, once, in order."""
    broker = persistent_broker[0]
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = edgectl_bundles(tmp_path, MODEL, ["1.0.0", "2.0.0"])
    edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    folder = tmp_path / "dev-1"
    config = write_agent_config(
        folder,
        poll_interval_s=2.0,
        device="dev-1",
        fleet=FLEET,
        broker=broker.address,
        repo_url=url,
        root=repo / "metadata" / "root.json",
    )
    config.write_text(config.read_text().replace(str(folder / "state"), str(small_disk.state_dir)))
    client = InferenceClient(folder / "infer.sock")
    agents = [start_agent(config)]
    try:
        wait_until(lambda: _kinds(repo, "dev-1") == ["agent_started", *INSTALL_KINDS], 60, "v1")
        if stop == "killed":
            agents[0].process.kill()
            agents[0].process.wait()
        else:
            agents[0].stop()
        small_disk.fill()

        agents.append(start_agent(config, log_name="agent-2.log"))
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 30, "v1 served again")
        assert "agent_started (held in memory: the disk refuses it)" in agents[1].text()
        # Its update checks fail (the TUF cache cannot be written) and are retried.
        edgectl("release", bundles["2.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
        wait_until(
            lambda: agents[1].text().count("update check failed, will retry") >= 2,
            30,
            "update checks on the full disk",
        )
        assert agents[1].process.poll() is None, agents[1].text()[-3000:]
        assert served_version(client, MODEL) == "1.0.0"
        assert len(_kinds(repo, "dev-1")) == 1 + len(INSTALL_KINDS)  # nothing new sent

        small_disk.free()
        wait_until(lambda: _kinds(repo, "dev-1").count("committed") == 2, 60, "v2 committed")
        assert served_version(client, MODEL) == "2.0.0"
        produced = _produced(agents[0]) + _produced(agents[1])
        stored = [e["seq"] for e in device_show(repo, "dev-1")["events"]]
        assert stored == produced == list(range(1, len(produced) + 1))
        kinds = _kinds(repo, "dev-1")
        assert kinds == ["agent_started", *INSTALL_KINDS] * 2, kinds
        assert agents[1].process.poll() is None
    finally:
        for agent in agents:
            agent.stop()
        serve.stop()
