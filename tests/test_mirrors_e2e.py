"""Repository mirrors end to end (issue 24), with real parts only.

A private mosquitto, `edgectl serve` on 127.0.0.1 (the genuine repository), a tampering
mirror in front of it (a real HTTP server on 127.0.0.1 serving the same repository with a
byte of every bundle flipped) and a real `edge-agent` process configured with
``mirrors = [tampering mirror]`` before ``url = serve``: each release is refused on the
mirror and installed from the repository in the same check; the agent serves the genuine
models and says which source failed, and why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from tests.e2e_support import (
    bundle_output,
    edgectl,
    edgectl_bundles,
    served_version,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker
from tests.security.simulator import HostileMirror

FLEET = "lab"
MODEL = "linear"
QUICK = ("--probation-s", "0.5", "--no-shadow", "--delta-from", "0")
X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)


@pytest.mark.slow
def test_an_agent_behind_a_tampering_mirror_installs_the_genuine_releases(
    tmp_path: Path, broker: Broker
) -> None:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = edgectl_bundles(tmp_path, MODEL, ["1.0.0", "2.0.0"])
    edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
    mirror = HostileMirror(repo)
    mirror.tamper_prefix = "/targets/bundles/"
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    procs = [serve]
    try:
        config = write_agent_config(
            tmp_path / "device",
            device="dev-1",
            fleet=FLEET,
            broker=broker.address,
            repo_url=url,
            root=repo / "metadata" / "root.json",
            mirrors=[mirror.url],
        )
        agent = start_agent(config)
        procs.append(agent)
        client = InferenceClient(tmp_path / "device" / "infer.sock")

        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 60, "v1 to be served")
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundles["1.0.0"], X), rtol=1e-6
        )
        bundle_requests = [p for p, _ in mirror.requests if p.startswith("/targets/bundles/")]
        assert len(bundle_requests) == 1, mirror.requests  # asked once, refused
        refused = f"repository {mirror.url}/ failed"
        assert refused in agent.text() and "length or hash mismatch" in agent.text()
        status = client.agent_status()["repository"]
        assert status["sources"] == [mirror.url + "/", url.rstrip("/") + "/"], status
        # Empty when a later check (an announcement) found nothing to install: the
        # mirror's metadata is genuine, only its bundles are altered.
        for failure in status["failed_last_check"]:
            assert failure.startswith(mirror.url) and "length or hash mismatch" in failure

        # v2 through the announcement: refused on the mirror again, served from serve.
        edgectl("release", bundles["2.0.0"], "--fleet", FLEET, "--repo", repo, *QUICK)
        wait_until(lambda: served_version(client, MODEL) == "2.0.0", 60, "v2 to be served")
        np.testing.assert_allclose(
            client.infer(MODEL, {"x": X})["y"], bundle_output(bundles["2.0.0"], X), rtol=1e-6
        )
        assert agent.text().count(refused) >= 2
        assert agent.process.poll() is None
        client.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
        mirror.close()
