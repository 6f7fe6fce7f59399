"""The walking skeleton, end to end, with real parts only.

A private mosquitto, `edgectl serve` on 127.0.0.1, a real `edge-agent` process and a
small real ONNX model: the agent comes up serving v1; v2 reaches it through the MQTT
announcement (the poll is an hour away) without a restart; a tampered v3 is refused
and v2 keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.client import InferenceClient
from tests.e2e_support import (
    Proc,
    edgectl,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker, make_linear_model

FLEET = "lab"
MODEL = "linear"
# A short probation, so the next release does not wait a minute for this one's to end.
QUICK = ("--probation-s", "0.5")
X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)


def _in_process(bundle: Path) -> np.ndarray:
    """What the bundle's model computes in this process, for comparison."""
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("model.onnx")
        assert member is not None
        session = ort.InferenceSession(member.read(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": X})[0])


def _served_version(client: InferenceClient) -> str | None:
    meta = client.model_metadata(MODEL)
    return str(meta["versions"][0])


class StatusWatcher:
    """Subscribes to the device's retained status topic with a real MQTT client."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.messages: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{device}")
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"edgefleet/v1/fleets/{FLEET}/devices/{device}/status", qos=1)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(json.loads(msg.payload))

    def last(self) -> dict[str, object] | None:
        with self._lock:
            return self.messages[-1] if self.messages else None

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@pytest.fixture
def world(tmp_path: Path, broker: Broker) -> Iterator[dict[str, object]]:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0"), (3, "3.0.0")):
        onnx_path = make_linear_model(tmp_path / f"model-{seed}.onnx", seed=seed)
        bundles[version] = tmp_path / f"{MODEL}-{version}.bundle"
        edgectl(
            "bundle",
            "build",
            onnx_path,
            "--name",
            MODEL,
            "--version",
            version,
            "-o",
            bundles[version],
        )
    edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    config = write_agent_config(
        tmp_path / "device",
        device="dev-1",
        fleet=FLEET,
        broker=broker.address,
        repo_url=url,
        root=repo / "metadata" / "root.json",
    )
    agent = start_agent(config)
    procs: list[Proc] = [serve, agent]
    try:
        yield {
            "repo": repo,
            "bundles": bundles,
            "serve": serve,
            "agent": agent,
            "socket": tmp_path / "device" / "infer.sock",
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_release_reaches_the_device_and_serves(world: dict[str, object], broker: Broker) -> None:
    repo: Path = world["repo"]  # type: ignore[assignment]
    bundles: dict[str, Path] = world["bundles"]  # type: ignore[assignment]
    agent: Proc = world["agent"]  # type: ignore[assignment]
    serve: Proc = world["serve"]  # type: ignore[assignment]
    client = InferenceClient(world["socket"])  # type: ignore[arg-type]
    watcher = StatusWatcher(broker, "dev-1")
    try:
        # v1: served, and its outputs are what the model computes in-process.
        wait_until(lambda: _served_version(client) == "1.0.0", 60, "v1 to be served")
        assert client.live() and client.ready()
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], _in_process(bundles["1.0.0"]), rtol=1e-6
        )
        status = wait_until(watcher.last, 10, "a retained status message")
        assert status["online"] is True

        # v2: through the MQTT announcement (poll is an hour away), no restart.
        pid = agent.process.pid
        edgectl("release", bundles["2.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
        wait_until(lambda: _served_version(client) == "2.0.0", 60, "v2 to be served")
        assert agent.process.poll() is None and agent.process.pid == pid
        assert "announcement for fleet lab" in agent.text()
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], _in_process(bundles["2.0.0"]), rtol=1e-6
        )
        assert not np.allclose(_in_process(bundles["1.0.0"]), _in_process(bundles["2.0.0"]))
        wait_until(
            lambda: (s := watcher.last()) and s["models"][MODEL]["version"] == "2.0.0",
            10,
            "status to report v2",
        )

        # v3 released, then its bytes changed on the server before the agent fetches it.
        os.kill(serve.process.pid, signal.SIGSTOP)
        try:
            edgectl("release", bundles["3.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
            (stored,) = (repo / "targets" / "bundles" / MODEL).glob("*.3.0.0.bundle")
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
        finally:
            os.kill(serve.process.pid, signal.SIGCONT)
        refusal = f"refused target bundles/{MODEL}/3.0.0.bundle"
        wait_until(lambda: refusal in agent.text(), 60, "the agent to refuse the tampered bundle")
        lines = [line for line in agent.text().splitlines() if refusal in line]
        assert len(lines) == 1, lines
        assert "hash mismatch" in lines[0] and "still serving linear 2.0.0" in lines[0]
        assert _served_version(client) == "2.0.0"
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], _in_process(bundles["2.0.0"]), rtol=1e-6
        )

        # The last will: killed without a goodbye, the broker says offline.
        agent.process.kill()
        agent.process.wait()
        wait_until(lambda: (s := watcher.last()) and s["online"] is False, 30, "the last will")
    finally:
        watcher.close()
