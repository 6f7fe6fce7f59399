"""A rollout whose device waits says why: a real agent, a private mosquitto, `edgectl
serve`, and the real `rollout status` and `fleet status` commands.

The device serves 1.0.0 on a long probation when a rollout of 2.0.0 starts: it does not
install 2.0.0 until that probation ends. Before, `rollout status` showed only "0
reporting" and the reason was in the agent's log; now the device's status message
carries it, and both commands print it ("probation").
"""

from __future__ import annotations

import json
from pathlib import Path

from agent.client import InferenceClient
from tests.e2e_support import (
    edgectl,
    served_version,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker, make_linear_model

FLEET = "lab"
MODEL = "linear"
DEVICE = "dev-01"


def _bundle(tmp: Path, version: str, seed: int) -> Path:
    out = tmp / f"{MODEL}-{version}.bundle"
    onnx_path = make_linear_model(tmp / f"v{seed}.onnx", seed=seed)
    edgectl("bundle", "build", onnx_path, "--name", MODEL, "--version", version, "-o", out,
            "--latency-runs", "0")  # fmt: skip
    return out


def test_a_device_waiting_for_probation_says_so_in_rollout_and_fleet_status(
    tmp_path: Path, broker: Broker
) -> None:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    v1, v2 = _bundle(tmp_path, "1.0.0", 1), _bundle(tmp_path, "2.0.0", 2)
    serve, url = start_serve(
        repo,
        broker.address,
        tmp_path / "serve.log",
        {"rollout_tick_interval_s": 0.5, "heartbeat_interval_s": 1.0},
    )
    config = write_agent_config(
        tmp_path / "device",
        device=DEVICE,
        fleet=FLEET,
        broker=broker.address,
        repo_url=url,
        root=repo / "metadata" / "root.json",
        poll_interval_s=2,  # a check every 2 s: the reason's time must stay across checks
    )
    with open(config, "a") as f:
        f.write("[telemetry]\nheartbeat_interval_s = 1.0\n[install]\nprobation_tick_s = 0.25\n")
    agent = start_agent(config)
    client = InferenceClient(tmp_path / "device" / "infer.sock")
    try:
        # 1.0.0 goes on probation for longer than the test runs.
        edgectl("release", v1, "--fleet", FLEET, "--repo", repo, "--probation-s", "600")
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 60, "1.0.0 served")
        edgectl(
            "rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo", repo,
            "--bundle", v2, "--stages", "100", "--wait", "60s", "--deadline", "600s",
            "--gate", "min_devices=1", "--probation-s", "1", "--no-shadow",
        )  # fmt: skip

        def rollout_says_why() -> str | None:
            out = edgectl("rollout", "status", "--repo", repo, "--model", MODEL).stdout
            return out if "waiting: 1 probation" in out else None

        status = wait_until(rollout_says_why, 30, "rollout status to say why the device waits")
        assert "0/1 devices" in status, status
        assert f"    {DEVICE} waits: probation for 2.0.0" in status, status
        assert "waits until probation of 1.0.0 ends (in " in status, status

        fleet = edgectl("fleet", "status", "--repo", repo, "--fleet", FLEET).stdout
        assert f"  {FLEET}/{DEVICE} {MODEL}: probation for 2.0.0" in fleet, fleet
        first = _waiting(repo)
        assert (first["code"], first["version"]) == ("probation", "2.0.0"), first
        # A later check gives the same reason with less time left; it waits since the same
        # moment (the time `rollout status` shows is how long it has waited).
        later = wait_until(
            lambda: (w := _waiting(repo))["detail"] != first["detail"] and w,
            30,
            "a later check's reason",
        )
        assert (later["code"], later["since"]) == ("probation", first["since"]), later
        assert served_version(client, MODEL) == "1.0.0"  # still waiting, as it said
    finally:
        agent.stop()
        serve.stop()


def _waiting(repo: Path) -> dict[str, str]:
    """The device's waiting reason for the model, as `fleet status --json` shows it."""
    (device,) = json.loads(
        edgectl("fleet", "status", "--repo", repo, "--fleet", FLEET, "--json").stdout
    )
    waiting: dict[str, str] = device["models"][MODEL]["waiting"]
    return waiting
