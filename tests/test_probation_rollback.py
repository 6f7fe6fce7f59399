"""Probation on a real agent: a version that passes its golden vectors but misbehaves
under real requests is rolled back on the device, without the controller; so is one on
which the agent keeps crashing (a crash loop during probation)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.client import InferenceClient
from agent.errors import InferenceError
from agent.journal import Phase, parse_record
from tests.e2e_support import (
    Proc,
    edgectl,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker, make_linear_model, make_misbehaving_model

FLEET = "lab"
MODEL = "linear"
ONE = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
# Real traffic whose first feature is large: the "errors" model fails on it.
LARGE = np.array([[12.0, -1.0, 2.0, 0.25], [9.0, 1.0, 1.0, 1.0]], dtype=np.float32)


@dataclass
class Device:
    repo: Path
    folder: Path
    config: Path
    agent: Proc
    client: InferenceClient
    tmp: Path

    def journal(self) -> tuple[Phase, str | None, str]:
        record = parse_record(
            (self.folder / "state" / "models" / MODEL / "journal.json").read_bytes()
        )
        return record.phase, record.version, record.reason

    def served(self) -> str | None:
        return (
            str(self.client.model_metadata(MODEL)["versions"][0]) if self.client.ready() else None
        )

    def release(
        self, onnx_path: Path, version: str, *probation: str, quantize: str = "dynamic-matmul"
    ) -> None:
        bundle = self.tmp / f"{version}.bundle"
        edgectl(
            "bundle",
            "build",
            onnx_path,
            "--name",
            MODEL,
            "--version",
            version,
            "-o",
            bundle,
            "--quantize",
            quantize,
        )
        edgectl("release", bundle, "--fleet", FLEET, "--repo", self.repo, *probation)


@pytest.fixture
def device(tmp_path: Path, broker: Broker) -> Iterator[Device]:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    folder = tmp_path / "device"
    config = write_agent_config(
        folder,
        device="dev-1",
        fleet=FLEET,
        broker=broker.address,
        repo_url=url,
        root=repo / "metadata" / "root.json",
    )
    dev = Device(
        repo, folder, config, start_agent(config), InferenceClient(folder / "infer.sock"), tmp_path
    )
    dev.release(make_linear_model(tmp_path / "good.onnx", seed=1), "1.0.0", "--probation-s", "0.5")
    wait_until(lambda: dev.journal()[:2] == (Phase.COMMITTED, "1.0.0"), 60, "v1 committed")
    try:
        yield dev
    finally:
        dev.agent.stop()
        serve.stop()


def _requests(client: InferenceClient, x: np.ndarray, count: int) -> tuple[int, int]:
    ok = failed = 0
    for _ in range(count):
        try:
            client.infer(MODEL, {"x": x})
            ok += 1
        except InferenceError:
            failed += 1
    return ok, failed


def test_a_version_that_errors_on_real_requests_is_rolled_back(
    device: Device, broker: Broker
) -> None:
    statuses: list[dict[str, object]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda c, u, m: statuses.append(json.loads(m.payload))
    watcher.connect(broker.host, broker.port)
    watcher.subscribe(f"edgefleet/v1/fleets/{FLEET}/devices/dev-1/status", qos=1)
    watcher.loop_start()
    try:
        bad = make_misbehaving_model(device.tmp / "bad.onnx", seed=1, kind="errors")
        device.release(bad, "2.0.0", "--probation-s", "120")
        wait_until(lambda: device.served() == "2.0.0", 60, "v2 to go live")
        assert device.journal()[0] is Phase.ACTIVE
        assert _requests(device.client, ONE, 5) == (5, 0)  # what golden vectors saw: fine
        _, failed = _requests(device.client, LARGE, 30)  # real traffic, out of the build's range
        assert failed > 0
        wait_until(lambda: device.served() == "1.0.0", 30, "the rollback to v1")
        phase, version, reason = device.journal()
        assert (phase, version) == (Phase.ROLLED_BACK, "2.0.0")
        assert "error rate" in reason, reason
        assert _requests(device.client, LARGE, 5) == (5, 0)  # the old version serves again
        wait_until(
            lambda: any(
                s["models"].get(MODEL, {}).get("state") == "rolled_back"  # type: ignore[attr-defined]
                and "error rate" in s["models"][MODEL].get("reason", "")  # type: ignore[index]
                for s in statuses
            ),
            10,
            "the status to report the rollback and its reason",
        )
        # Not retried for the same rollout: a later check leaves v1 in place.
        edgectl("release", device.tmp / "2.0.0.bundle", "--fleet", FLEET, "--repo", device.repo)
        assert device.served() == "1.0.0"
    finally:
        watcher.loop_stop()
        watcher.disconnect()


def test_a_much_slower_version_is_rolled_back(device: Device) -> None:
    assert _requests(device.client, ONE, 150) == (150, 0)  # the baseline's p99
    slow = make_misbehaving_model(device.tmp / "slow.onnx", seed=1, kind="slow")
    # fp32: int8 would make the heavy branch fast enough to blur the point.
    device.release(
        slow, "2.0.0", "--probation-s", "120", "--probation-max-p99-ratio", "3", quantize="none"
    )
    wait_until(lambda: device.served() == "2.0.0", 60, "v2 to go live")
    assert _requests(device.client, ONE, 150) == (150, 0)  # right answers, slowly
    wait_until(lambda: device.served() == "1.0.0", 30, "the rollback to v1")
    phase, version, reason = device.journal()
    assert (phase, version) == (Phase.ROLLED_BACK, "2.0.0")
    assert "p99" in reason, reason


def test_a_crash_loop_during_probation_rolls_back(device: Device) -> None:
    good = make_linear_model(device.tmp / "good2.onnx", seed=2)
    device.release(good, "2.0.0", "--probation-s", "300")
    wait_until(lambda: device.served() == "2.0.0", 60, "v2 to go live")
    for restart in (1, 2, 3):
        device.agent.process.send_signal(signal.SIGKILL)
        device.agent.process.wait()
        device.agent = start_agent(device.config, log_name=f"agent-{restart}.log")
        wait_until(device.served, 60, f"the agent to serve after restart {restart}")
        if restart < 3:
            assert device.served() == "2.0.0"  # probation resumes
            assert device.journal()[0] is Phase.ACTIVE
    assert device.served() == "1.0.0"
    phase, version, reason = device.journal()
    assert (phase, version) == (Phase.ROLLED_BACK, "2.0.0")
    assert "crash loop" in reason
    assert threading.active_count() >= 1
