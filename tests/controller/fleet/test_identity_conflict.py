"""Two real agents with one identity (a copied configuration) against a private TLS
mosquitto and a real `edgectl serve` (issue 20, item 7): each agent's MQTT link and
outbox, as the agent runs them, take the client id from each other and report their own
event streams; ingest flags the device, and `fleet status` marks it. A device whose
agent is reinstalled (a new stream after it reconnects) is not flagged."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.device.config import AgentConfig, load_config
from agent.device.enroll import enroll_from_file
from agent.telemetry.mqtt import MqttLink
from agent.telemetry.outbox import Outbox
from agent.telemetry.reporter import IntervalStats, TelemetryReporter
from controller.cli import main
from tests.e2e_support import wait_until
from tests.helpers import stop_process
from tests.test_broker_acl import tls_broker
from tests.test_serve_tls import _serve

pytestmark = pytest.mark.slow


@contextmanager
def agent(config: AgentConfig, state: Path) -> Iterator[TelemetryReporter]:
    """One agent's telemetry side: its outbox in ``state``, its MQTT link, its reporter."""
    outbox = Outbox(state / "outbox.sqlite", max_events=1000)
    link = MqttLink(config, lambda _v: None, lambda: {}, outbox)
    reporter = TelemetryReporter(
        device=config.device_id,
        fleet=config.fleet,
        interval_s=10.0,
        stats=IntervalStats(),
        outbox=outbox,
        models_status=lambda: {},
        publish_heartbeat=link.publish_heartbeat,
        disk_path=state,
    )
    link.start()
    try:
        yield reporter
    finally:
        link.stop()
        outbox.close()


def conflicts(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^edgefleet_device_identity_conflicts_total (\d+)$", text, re.M)
    assert found, text
    return int(found.group(1))


def events_stored(store: Path, device: str) -> list[tuple[str, int]]:
    from controller.fleet.stores import open_store

    s = open_store(str(store))
    try:
        return [(e.stream, e.seq) for e in s.events(device=device, limit=1000)]
    finally:
        s.close()


def test_two_agents_on_one_identity_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tls_broker(tmp_path, {"cam-1": "north", "cam-2": "north"}) as (setup, _broker):
        configs = {}
        for device in ("cam-1", "cam-2"):
            etc = tmp_path / f"etc-{device}"
            enroll_from_file(setup.archives[device], etc)
            configs[device] = load_config(etc / "agent.toml", environ={})
        serve = _serve(setup.repo, setup.port, tmp_path)
        try:
            assert serve.stdout is not None
            line = serve.stdout.readline()
            match = re.fullmatch(r"edgectl serve: listening on (http://\S+)\n", line)
            assert match, line + (tmp_path / "serve.log").read_text()
            metrics = f"{match.group(1)}/metrics"
            store = setup.repo / "telemetry.sqlite"

            # cam-2: one agent, then reinstalled (a new outbox: a new stream) and started
            # again. Not a conflict.
            with agent(configs["cam-2"], tmp_path / "state-cam-2") as first:
                first.agent_started({})
                first.agent_started({})
                wait_until(lambda: len(events_stored(store, "cam-2")) == 2, 20, "cam-2's events")
            with agent(configs["cam-2"], tmp_path / "state-cam-2-reinstalled") as again:
                again.agent_started({})
                wait_until(lambda: len(events_stored(store, "cam-2")) == 3, 20, "the third")
            assert len({stream for stream, _ in events_stored(store, "cam-2")}) == 2
            assert conflicts(metrics) == 0

            # cam-1: the same configuration on two machines, each with its own state.
            with (
                agent(configs["cam-1"], tmp_path / "state-a") as a,
                agent(configs["cam-1"], tmp_path / "state-b") as b,
            ):

                def flagged() -> bool:
                    a.agent_started({})
                    b.agent_started({})
                    time.sleep(0.5)
                    return conflicts(metrics) > 0

                wait_until(flagged, 60, "serve to flag cam-1's two agents")
            streams = {stream for stream, _ in events_stored(store, "cam-1")}
            assert len(streams) == 2, streams
        finally:
            stop_process(serve)
        log = (tmp_path / "serve.log").read_text()
        warnings = [line for line in log.splitlines() if "identity conflict?" in line]
        assert len(warnings) == 1, warnings  # once per device, however many times it is seen
        assert "device cam-1 (fleet north)" in warnings[0] and "WARNING" in warnings[0]
        capsys.readouterr()
        assert main(["fleet", "status", "--repo", str(setup.repo)]) == 0
        out = capsys.readouterr().out
        marked = [line.split()[1] for line in out.splitlines() if "[identity conflict?]" in line]
        assert marked == ["cam-1"], out
        assert main(["device", "show", "cam-1", "--repo", str(setup.repo)]) == 0
        assert "identity conflict? events of streams" in capsys.readouterr().out
