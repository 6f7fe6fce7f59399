"""The repository folder on a plain static web server (nginx), for real agents.

nginx serves ``metadata/`` and ``targets/`` exactly as `edgectl release` writes them (the
server block of docs/operations.md); no `edgectl serve` anywhere, a private mosquitto only
for the agents' MQTT link (nothing announces: the agents poll). Two real `edge-agent`
processes install v1 and then v2. One is SIGKILLed halfway through v1's bundle (nginx
throttles each transfer so there is a halfway): restarted, it resumes with a Range request,
which nginx's access log shows as a 206 for the bytes that were missing, and the install
verifies and serves.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from tests.e2e_support import (
    Proc,
    bundle_output,
    edgectl,
    served_version,
    start_agent,
    wait_until,
    write_agent_config,
)
from tests.gateway.servers import start_static_repository
from tests.helpers import Broker, make_linear_model

FLEET = "lab"
MODEL = "wide"
QUICK = ("--probation-s", "0.5", "--no-shadow")
# 256 x 1000 float32 weights of random values (zstd cannot shrink them): a ~1 MB bundle,
# about 4 s at the throttled rate, so an agent can be killed halfway through.
IN, OUT = 256, 1000
RATE = "256k"
X = np.ones((1, IN), dtype=np.float32)


def build(folder: Path, version: str, seed: int) -> Path:
    model = make_linear_model(folder / f"m{seed}.onnx", seed=seed, in_features=IN, out_features=OUT)
    out = folder / f"{MODEL}-{version}.bundle"
    edgectl("bundle", "build", model, "--name", MODEL, "--version", version, "--quantize",
            "none", "--latency-runs", "0", "-o", out)  # fmt: skip
    return out


@pytest.mark.slow
def test_agents_install_from_nginx_and_resume_with_range(tmp_path: Path, broker: Broker) -> None:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    v1, v2 = build(tmp_path, "1.0.0", 1), build(tmp_path, "2.0.0", 2)
    edgectl("release", v1, "--fleet", FLEET, "--repo", repo, *QUICK)
    (target,) = (repo / "targets" / "bundles" / MODEL).glob("*.1.0.0.bundle")
    length = target.stat().st_size
    nginx = start_static_repository(tmp_path / "nginx", repo, limit_rate=RATE)
    procs: list[Proc] = []
    try:
        configs = [
            write_agent_config(tmp_path / f"dev-{i}", device=f"dev-{i}", fleet=FLEET,
                               broker=broker.address, repo_url=nginx.url + "/",
                               root=repo / "metadata" / "root.json", poll_interval_s=2.0)
            for i in (1, 2)
        ]  # fmt: skip
        procs += [start_agent(c) for c in configs]
        killed = procs[0]

        # dev-1 is SIGKILLed with part of v1's bundle on disk.
        staging = tmp_path / "dev-1" / "state" / "staging"

        def part_size() -> int | None:
            parts = list(staging.glob("*.part")) if staging.exists() else []
            size = parts[0].stat().st_size if parts else 0
            return size if length // 4 <= size < length else None

        wait_until(part_size, 60, "dev-1 to have a quarter of the bundle")
        killed.process.kill()
        killed.process.wait()
        (part,) = staging.glob("*.part")
        have = part.stat().st_size
        assert 0 < have < length
        time.sleep(0.5)  # nginx logs the cut transfer when it notices the closed socket

        procs[0] = start_agent(configs[0], log_name="agent-restarted.log")
        clients = [InferenceClient(tmp_path / f"dev-{i}" / "infer.sock") for i in (1, 2)]
        for client in clients:
            wait_until(lambda c=client: served_version(c, MODEL) == "1.0.0", 90, "v1 served")
        np.testing.assert_allclose(
            clients[0].infer(MODEL, {"x": X})["y"], bundle_output(v1, X), rtol=1e-5
        )

        # The access log: dev-1's first transfer cut short, then a 206 from where it stopped.
        path = f"/targets/bundles/{MODEL}/{target.name}"
        transfers = [r for r in nginx.requests() if r.path == path]
        resumed = [r for r in transfers if r.status == 206]
        assert len(resumed) == 1, transfers
        start = int(resumed[0].range.removeprefix("bytes=").removesuffix("-"))
        assert start >= have  # the part may have grown between the size read and the kill
        assert resumed[0].bytes == length - start
        whole = [r for r in transfers if r.status == 200]
        assert any(r.bytes == length for r in whole), transfers  # dev-2, in one piece
        assert any(r.bytes < length for r in whole), transfers  # dev-1, cut by the kill
        assert f"resuming at byte {start} of {length}" in procs[0].text()

        # v2 through the poll: timestamp.json is not cached, the new release is seen.
        edgectl("release", v2, "--fleet", FLEET, "--repo", repo, *QUICK)
        for client in clients:
            wait_until(lambda c=client: served_version(c, MODEL) == "2.0.0", 90, "v2 served")
        np.testing.assert_allclose(
            clients[1].infer(MODEL, {"x": X})["y"], bundle_output(v2, X), rtol=1e-5
        )
        # The server is only a file server: nothing but GETs of metadata and targets.
        assert {r.method for r in nginx.requests()} == {"GET"}
        assert all(r.path.startswith(("/metadata/", "/targets/")) for r in nginx.requests())
    finally:
        for proc in procs:
            proc.stop()
        nginx.stop()
