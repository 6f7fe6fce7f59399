"""A real ``edge-agent`` process whose only way to the repository is the broker.

A private mosquitto and a real ``edgectl serve``: the agent's config has no HTTP URL
(``transport = "mqtt"``); it installs 1.0.0, then 2.0.0 on the MQTT announcement, every
byte of metadata and bundles arriving as MQTT chunks, and serves it on its socket.
"""

from __future__ import annotations

from pathlib import Path

from agent.client import InferenceClient
from tests.e2e_support import (
    edgectl,
    edgectl_bundles,
    served_version,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker

MODEL = "linear"


def test_a_real_agent_installs_and_updates_over_mqtt_only(tmp_path: Path, broker: Broker) -> None:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = edgectl_bundles(tmp_path, MODEL, ["1.0.0", "2.0.0"])
    edgectl("release", bundles["1.0.0"], "--fleet", "lab", "--repo", repo, "--probation-s", "0.5")
    serve, _url = start_serve(repo, broker.address, tmp_path / "serve.log")
    config = write_agent_config(
        tmp_path / "device",
        device="dev-1",
        fleet="lab",
        broker=broker.address,
        repo_url="",
        root=repo / "metadata" / "root.json",
    )
    text = config.read_text().replace("[repository]\n", '[repository]\ntransport = "mqtt"\n')
    config.write_text(text)
    agent = start_agent(config)
    client = InferenceClient(tmp_path / "device" / "infer.sock")

    def served() -> str | None:
        return served_version(client, MODEL)

    try:
        wait_until(lambda: served() == "1.0.0", 60, "1.0.0 over MQTT")
        edgectl(
            "release",
            bundles["2.0.0"],
            "--fleet",
            "lab",
            "--repo",
            repo,
            "--probation-s",
            "0.5",
            "--no-shadow",
        )
        wait_until(lambda: served() == "2.0.0", 60, "2.0.0 over MQTT")
        assert "http://" not in agent.text()  # no URL was ever used
        assert "answering repository requests" in serve.text()
    finally:
        agent.stop()
        serve.stop()
