"""Deltas end to end, with real parts only (issue 22, part 2).

A private mosquitto, `edgectl serve` on 127.0.0.1, a real `edge-agent` process: the agent
serving v1 moves to v2 by the delta `edgectl release` published (the full bundle is
never requested; v1 is a format 1 bundle, v2 format 2, so the delta crosses formats);
then the stored delta to v3 is corrupted on the server, and the agent falls back to the
full v3 bundle, saying so once.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from agent.client import InferenceClient
from controller.build.builder import BuildOptions, build_bundle
from tests.e2e_support import (
    bundle_output,
    edgectl,
    paused,
    served_version,
    start_serve_and_agent,
    wait_until,
)
from tests.helpers import Broker, make_linear_model

FLEET = "lab"
MODEL = "linear"
# Shadows off: these tests judge other paths (tests/test_shadow_e2e.py judges shadows).
QUICK = ("--probation-s", "0.5", "--no-shadow")
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def test_agent_moves_by_delta_and_falls_back_to_the_full_bundle(
    tmp_path: Path, broker: Broker
) -> None:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    # Built in this process: three `edgectl bundle build` would cost seconds. v1 is a
    # format 1 bundle, v2 and v3 format 2 (zstd members): the delta 1 → 2 crosses formats.
    bundles = {
        version: build_bundle(
            make_linear_model(tmp_path / f"{seed}.onnx", seed=seed),
            MODEL,
            version,
            tmp_path / f"{version}.bundle",
            4,
            options=BuildOptions(latency_runs=0, bundle_format=1 if seed == 1 else 2),
        ).path
        for seed, version in enumerate(["1.0.0", "2.0.0", "3.0.0"], start=1)
    }
    edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
    serve, agent = start_serve_and_agent(tmp_path, repo, broker.address, FLEET)
    client = InferenceClient(tmp_path / "device" / "infer.sock")
    try:
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 30, "v1 to be served")

        out = edgectl("release", bundles["2.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
        assert re.search(r"delta from 1\.0\.0: \d+ bytes", out.stdout), out.stdout
        wait_until(lambda: served_version(client, MODEL) == "2.0.0", 30, "v2 to be served")
        assert f"rebuilt from bundles/{MODEL}/2.0.0.from-1.0.0.delta" in agent.text()
        assert f"installing {MODEL} 2.0.0 from bundles/{MODEL}/2.0.0.bundle" not in agent.text()
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundles["2.0.0"], X), rtol=1e-6
        )

        with paused(serve):  # the stored delta altered before the agent fetches it
            edgectl("release", bundles["3.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
            (stored,) = (repo / "targets" / "bundles" / MODEL).glob("*.3.0.0.from-2.0.0.delta")
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
        wait_until(lambda: served_version(client, MODEL) == "3.0.0", 30, "v3 to be served")
        text = agent.text()
        assert text.count(f"delta bundles/{MODEL}/3.0.0.from-2.0.0.delta not used") == 1, text
        assert "downloading the full bundle" in text
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundles["3.0.0"], X), rtol=1e-6
        )
    finally:
        agent.stop()
        serve.stop()
