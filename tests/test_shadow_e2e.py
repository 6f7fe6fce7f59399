"""Shadow evaluation end to end, with real parts only (issue 23, part 1).

A private mosquitto, `edgectl serve` on 127.0.0.1, a real `edge-agent` process and small
real ONNX models, and a client sending real requests over the agent's Unix socket:

- a candidate whose answers disagree with the serving version's is put in shadow, given
  copies of live requests and failed there; every answer a client got in the meantime
  is the serving version's (its outputs, computed here), and the controller stores the
  device's shadow report and its failure. An agent SIGKILLed in shadow comes back
  serving the old version and shadows again from the start;
- a candidate that agrees is promoted after its samples, then serves.

Verdicts come from counts of compared requests (``--shadow-samples``), never from timings.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.update.journal import JournalRecord, Phase, parse_record
from controller.fleet.stores import open_store
from tests.e2e_support import (
    Proc,
    bundle_output,
    edgectl,
    served_version,
    start_agent,
    start_serve,
    wait_until,
    write_agent_config,
)
from tests.helpers import Broker, make_linear_model

pytestmark = pytest.mark.slow

FLEET = "lab"
MODEL = "linear"
X = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 1.0, 1.0], [-2.0, 0.0, 1.5, -0.5]], np.float32)
SAMPLES = "15"
# Bounded traffic: at most this many requests per client loop, paced.
MAX_REQUESTS = 5000
PACE_S = 0.02


@dataclass
class World:
    tmp: Path
    repo: Path
    bundles: dict[str, Path]
    config: Path
    serve: Proc
    agent: Proc
    procs: list[Proc] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.tmp / "device" / "infer.sock"

    def record(self) -> JournalRecord:
        return parse_record(
            (self.tmp / "device" / "state" / "models" / MODEL / "journal.json").read_bytes()
        )

    def release(self, version: str, *extra: str) -> None:
        edgectl(
            "release", self.bundles[version], "--fleet", FLEET, "--repo", self.repo,
            "--probation-s", "0.5", "--shadow-samples", SAMPLES, *extra,
        )  # fmt: skip

    def restart_agent(self) -> None:
        self.agent = start_agent(self.config, log_name="agent-2.log")
        self.procs.append(self.agent)


class Traffic:
    """A client sending ``X`` in a loop (bounded, paced) on its own thread, keeping which
    version's outputs each answer carried."""

    def __init__(self, socket: Path, outputs: dict[str, np.ndarray]) -> None:
        self.socket, self.outputs = socket, outputs
        self.answers: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with InferenceClient(self.socket) as client:
            for _ in range(MAX_REQUESTS):
                if self._stop.wait(PACE_S):
                    return
                try:
                    got = client.infer(MODEL, {"x": X})["y"]
                except Exception as exc:  # a client-visible failure: counted, named
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                which = [v for v, y in self.outputs.items() if np.allclose(got, y, rtol=1e-5)]
                key = which[0] if len(which) == 1 else "unknown"
                self.answers[key] = self.answers.get(key, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture
def world(tmp_path: Path, broker: Broker) -> Iterator[World]:
    repo = tmp_path / "repo"
    edgectl("init", repo)
    bundles = {}
    # 2.0.0 has 1.0.0's weights (it agrees); 3.0.0 has others (it disagrees).
    for seed, version in ((1, "1.0.0"), (1, "2.0.0"), (5, "3.0.0")):
        onnx_path = make_linear_model(tmp_path / f"model-{version}.onnx", seed=seed)
        bundles[version] = tmp_path / f"{MODEL}-{version}.bundle"
        edgectl("bundle", "build", onnx_path, "--name", MODEL, "--version", version,
                "-o", bundles[version])  # fmt: skip
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    config = write_agent_config(tmp_path / "device", device="dev-1", fleet=FLEET,
                                broker=broker.address, repo_url=url,
                                root=repo / "metadata" / "root.json")  # fmt: skip
    with open(config, "a") as f:
        f.write("[install]\nprobation_tick_s = 0.25\n[telemetry]\nheartbeat_interval_s = 1.0\n")
    w = World(tmp_path, repo, bundles, config, serve, start_agent(config))
    w.procs += [serve, w.agent]
    try:
        w.release("1.0.0")
        client = InferenceClient(w.socket)
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 60, "1.0.0 to be served")
        wait_until(lambda: w.record().phase is Phase.COMMITTED, 30, "1.0.0 to be committed")
        yield w
    finally:
        for proc in reversed(w.procs):
            proc.stop()


def test_a_disagreeing_candidate_fails_in_shadow_and_never_answers_a_client(
    world: World,
) -> None:
    outputs = {v: bundle_output(world.bundles[v], X) for v in ("1.0.0", "3.0.0")}
    assert not np.allclose(outputs["1.0.0"], outputs["3.0.0"])
    world.release("3.0.0", "--shadow-duration", "600")
    wait_until(lambda: world.record().phase is Phase.SHADOW, 60, "3.0.0 to go into shadow")
    # SIGKILL in shadow, before it compared enough: back serving 1.0.0, shadowing again.
    world.agent.process.kill()
    world.agent.process.wait()
    world.restart_agent()
    client = InferenceClient(world.socket)
    wait_until(lambda: served_version(client, MODEL) == "1.0.0", 60, "1.0.0 served again")
    record = world.record()
    assert (record.phase, record.version, record.interrupted) == (Phase.SHADOW, "3.0.0", 1)
    assert "shadowing again from the start" in world.agent.text()

    traffic = Traffic(world.socket, outputs)
    try:
        failed = wait_until(
            lambda: (r := world.record()).phase is Phase.FAILED and r, 90, "3.0.0 to fail"
        )
    finally:
        traffic.stop()
    assert failed.version == "3.0.0"
    assert "below min_agreement 0.98" in failed.reason, failed.reason
    # Judged at the first probation tick with enough compared (more may have arrived).
    compared = re.search(r"\((\d+) requests compared", failed.reason)
    assert compared and int(compared.group(1)) >= int(SAMPLES), failed.reason
    # Every answer during the shadow (and after) was the serving version's; none failed.
    assert traffic.failures == []
    assert set(traffic.answers) == {"1.0.0"} and traffic.answers["1.0.0"] >= int(SAMPLES)
    assert served_version(client, MODEL) == "1.0.0"

    # The controller stored the device's shadow report and the failure event.
    store = open_store(str(world.repo / "telemetry.sqlite"))
    try:

        def report_stored() -> object:
            rows = store.shadow_reports(FLEET, MODEL, "3.0.0")
            return rows[0].report if rows and rows[0].report.state == "failed" else None

        report = wait_until(report_stored, 30, "the failed shadow report in the store")
        assert report.agreement is not None and report.agreement < 0.98  # type: ignore[attr-defined]
        assert report.samples >= int(SAMPLES)  # type: ignore[attr-defined]
        events = store.events(device="dev-1", fleet=FLEET, limit=50)
        kinds = [e.kind for e in events if e.version == "3.0.0"]
        assert "shadow_started" in kinds and "install_failed" in kinds
        assert "activated" not in kinds
    finally:
        store.close()


def test_an_agreeing_candidate_is_promoted_after_its_shadow(world: World) -> None:
    outputs = {"1.0.0": bundle_output(world.bundles["1.0.0"], X)}
    traffic = Traffic(world.socket, outputs)
    try:
        world.release("2.0.0", "--shadow-duration", "600")
        client = InferenceClient(world.socket)
        wait_until(lambda: served_version(client, MODEL) == "2.0.0", 90, "2.0.0 to be served")
    finally:
        traffic.stop()
    record = world.record()
    assert record.version == "2.0.0" and record.phase in (Phase.ACTIVE, Phase.COMMITTED)
    text = world.agent.text()
    passed = re.search(r"shadow passed: (\d+) requests compared, top-1 agreement 1\.000", text)
    assert passed and int(passed.group(1)) >= int(SAMPLES), text
    assert traffic.failures == []
    assert set(traffic.answers) == {"1.0.0"}  # 2.0.0 computes the same outputs
