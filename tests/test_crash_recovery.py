"""SIGKILL a real agent at every install phase, three times each, and restart it.

Every time it must come back serving a version whose outputs are those of a bundle it
verified (so its golden vectors passed), with a journal that agrees with what it serves,
and then finish installing the release. Real parts: a private mosquitto, `edgectl serve`,
the `edge-agent` process, ONNX Runtime. The agent pauses at a named phase through its
test-only hook (EDGEFLEET_TEST_PAUSE_AT), right after it persisted that phase.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np

from agent.client import InferenceClient
from agent.contracts import ProbationPolicy, ShadowPolicy
from agent.update.journal import Phase, parse_record, serving_version
from controller.build.builder import build_bundle
from controller.repository.release import release_bundle
from controller.repository.repo import init_repository
from tests.e2e_support import (
    Proc,
    bundle_output,
    served_version,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker, make_linear_model

FLEET = "lab"
MODEL = "linear"
PHASES = ["downloading", "verified", "staged", "smoke_tested", "active", "committed"]
ROUNDS = 3
X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
QUICK = ProbationPolicy(duration_s=0.5, min_requests=0)
NO_SHADOW = ShadowPolicy(enabled=False)  # (tests/test_shadow_e2e.py judges shadows)


def _journal(device: Path) -> dict[str, object]:
    record = parse_record((device / "state" / "models" / MODEL / "journal.json").read_bytes())
    return {"phase": record.phase, "serving": serving_version(record), "version": record.version}


def _check_an_answer(client: InferenceClient, expected: dict[str, np.ndarray]) -> None:
    """An answer is exactly the output of the version said to serve around it.

    The restarted agent may finish an install and swap between two calls, so a request
    counts only when the version served before and after it agree (bounded retries).
    """
    for _ in range(50):
        first = served_version(client, MODEL)
        answer = client.infer(MODEL, {"x": X})["y"]
        if first is not None and served_version(client, MODEL) == first:
            np.testing.assert_allclose(answer, expected[first], rtol=1e-6)
            return
        time.sleep(0.1)
    raise AssertionError("the served version kept changing around every request")


def test_sigkill_at_every_phase_recovers(tmp_path: Path, broker: Broker) -> None:
    repo = tmp_path / "repo"
    init_repository(repo)
    models = [make_linear_model(tmp_path / f"m{s}.onnx", seed=s) for s in (1, 2)]
    expected: dict[str, np.ndarray] = {}

    def release(n: int) -> str:
        version = f"1.0.{n}"
        bundle = tmp_path / f"{version}.bundle"
        build_bundle(models[n % 2], MODEL, version, bundle)
        expected[version] = bundle_output(bundle, X)
        release_bundle(bundle, FLEET, repo, probation=QUICK, shadow=NO_SHADOW)
        return version

    release(0)
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    device = tmp_path / "device"
    config = write_agent_config(
        device,
        device="dev-1",
        fleet=FLEET,
        broker=broker.address,
        repo_url=url,
        root=repo / "metadata" / "root.json",
    )
    client = InferenceClient(device / "infer.sock")

    def serving() -> str | None:
        return served_version(client, MODEL)

    agent: Proc = start_agent(config, log_name="agent-0.log")
    procs = [serve]
    recovered, tally, n = 0, [], 0
    try:
        wait_until(lambda: _journal(device)["phase"] is Phase.COMMITTED, 60, "v1.0.0 committed")
        for phase in PHASES:
            for _ in range(ROUNDS):
                n += 1
                agent.stop()
                marker = device / "state" / f"paused-at-{phase}"
                marker.unlink(missing_ok=True)
                agent = start_agent(
                    config,
                    env={"EDGEFLEET_TEST_PAUSE_AT": phase},
                    log_name=f"agent-{n}-paused.log",
                )
                wait_until(serving, 60, "the agent to serve before the release")
                before = serving()
                version = release(n)
                wait_until(marker.exists, 60, f"the agent to pause at {phase}")
                agent.process.send_signal(signal.SIGKILL)
                agent.process.wait()

                agent = start_agent(config, log_name=f"agent-{n}-restarted.log")
                served = wait_until(serving, 60, "the restarted agent to serve")
                assert served in (before, version), (phase, served)
                _check_an_answer(client, expected)
                # The restarted agent may already be re-installing; whatever phase its
                # journal is in, the version it says serves is the one that serves.
                wait_until(
                    lambda: _journal(device)["serving"] == serving(),
                    10,
                    f"the journal to agree with what serves after a kill at {phase}",
                )
                wait_until(
                    lambda v=version: (
                        _journal(device) == {"phase": Phase.COMMITTED, "serving": v, "version": v}
                    ),
                    60,
                    f"{version} to be committed after the restart",
                )
                recovered += 1
                tally.append(f"{phase}: served {served} after kill, then committed {version}")
    finally:
        agent.stop()
        for proc in procs:
            proc.stop()
        print("\n".join(tally))
        print(f"{recovered}/{len(PHASES) * ROUNDS} kill points recovered")
    assert recovered == len(PHASES) * ROUNDS
    assert json.loads((device / "state" / "models" / MODEL / "journal.json").read_bytes())
