"""The walking skeleton, end to end, with real parts only.

A private mosquitto, `edgectl serve` on 127.0.0.1, a real `edge-agent` process and a
small real ONNX model: the agent comes up serving v1; v2 reaches it through the MQTT
announcement (the poll is an hour away) without a restart; a tampered v3 is refused
and v2 keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from tests.e2e_support import (
    Proc,
    StatusWatcher,
    bundle_output,
    edgectl,
    edgectl_bundles,
    paused,
    served_version,
    start_serve_and_agent,
    tamper_stored_bundle,
    wait_until,
)
from tests.helpers import Broker

FLEET = "lab"
MODEL = "linear"
# A short probation, so the next release does not wait a minute for this one's to end.
# Shadows off: these tests judge other paths (tests/test_shadow_e2e.py judges shadows).
QUICK = ("--probation-s", "0.5", "--no-shadow")
X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)


@pytest.fixture
def world(tmp_path: Path, broker: Broker) -> Iterator[dict[str, object]]:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = edgectl_bundles(tmp_path, MODEL, ["1.0.0", "2.0.0", "3.0.0"])
    edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
    serve, agent = start_serve_and_agent(tmp_path, repo, broker.address, FLEET)
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
    watcher = StatusWatcher(broker, FLEET, "dev-1")
    try:
        # v1: served, and its outputs are what the model computes in-process.
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 60, "v1 to be served")
        assert client.live() and client.ready()
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundles["1.0.0"], X), rtol=1e-6
        )
        status = wait_until(watcher.last, 10, "a retained status message")
        assert status["online"] is True

        # v2: through the MQTT announcement (poll is an hour away), no restart.
        pid = agent.process.pid
        edgectl("release", bundles["2.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
        wait_until(lambda: served_version(client, MODEL) == "2.0.0", 60, "v2 to be served")
        assert agent.process.poll() is None and agent.process.pid == pid
        assert "announcement for fleet lab" in agent.text()
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundles["2.0.0"], X), rtol=1e-6
        )
        v1, v2 = bundle_output(bundles["1.0.0"], X), bundle_output(bundles["2.0.0"], X)
        assert not np.allclose(v1, v2)
        wait_until(
            lambda: (s := watcher.last()) and s["models"][MODEL]["version"] == "2.0.0",
            10,
            "status to report v2",
        )

        # v3 released, then its bytes changed on the server before the agent fetches it.
        announced = f"announcement for fleet {FLEET}"
        announcements_before = agent.text().count(announced)
        with paused(serve):
            # The full bundle is what is tampered with: no delta to use instead.
            edgectl("release", bundles["3.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK,
                    "--delta-from", "0")  # fmt: skip
            tamper_stored_bundle(repo, MODEL, "3.0.0")
        refusal = f"refused target bundles/{MODEL}/3.0.0.bundle"
        wait_until(lambda: refusal in agent.text(), 60, "the agent to refuse the tampered bundle")
        text = agent.text()
        lines = [line for line in text.splitlines() if refusal in line]
        # Once per check, never retried on its own: a check comes with an announcement
        # (the poll is an hour away), and serve may announce one release twice (once
        # when it resumes), each a check that fetches and refuses again.
        assert 1 <= len(lines) <= max(1, text.count(announced) - announcements_before), lines
        assert all("hash mismatch" in line for line in lines), lines
        assert "still serving linear 2.0.0" in lines[0]
        assert served_version(client, MODEL) == "2.0.0"
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundles["2.0.0"], X), rtol=1e-6
        )

        # The last will: killed without a goodbye, the broker says offline.
        agent.process.kill()
        agent.process.wait()
        wait_until(lambda: (s := watcher.last()) and s["online"] is False, 30, "the last will")
    finally:
        watcher.close()
