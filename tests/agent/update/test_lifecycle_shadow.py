"""The shadow phase in the lifecycle, for real: bundles unpacked and loaded into ONNX
Runtime, the journal on disk, the candidate's runner on its own thread; requests are fed
as the inference server feeds them (the live version answers, the runner gets a copy),
and both clocks are injected, so a verdict never depends on timing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.contracts import ProbationPolicy, ShadowPolicy
from agent.device.config import AgentConfig, InferenceConfig
from agent.runtime.registry import ModelRegistry
from agent.telemetry.reporter import IntervalStats
from agent.update.journal import JournalRecord, Phase, serving_version
from agent.update.lifecycle import ModelLifecycle
from agent.update.store import ModelStore
from controller.build.builder import build_bundle
from tests.helpers import ManualClock, make_linear_model

MODEL = "lin"
PROBATION = ProbationPolicy(duration_s=60.0)
SHADOW = ShadowPolicy(samples=6, max_duration_s=30.0)


class Device:
    def __init__(self, tmp: Path, bundles: dict[str, Path]) -> None:
        self.tmp, self.bundles = tmp, bundles
        self.wall = ManualClock(now=1_780_000_000.0)
        self.transitions: list[JournalRecord] = []
        self.start()

    def start(self) -> ModelLifecycle:
        """A new agent process on the same state folder (a restart)."""
        config = AgentConfig(
            device_id="dev-1",
            fleet="lab",
            state_dir=self.tmp / "state",
            trusted_root=self.tmp / "root.json",
            inference=InferenceConfig(socket_path=self.tmp / "infer.sock"),
        )
        self.monotonic = ManualClock(now=50.0)
        self.registry = ModelRegistry()
        self.lifecycle = ModelLifecycle(
            config,
            self.registry,
            ModelStore(self.tmp / "state" / "models"),
            IntervalStats(),
            clock=self.wall,
            monotonic=self.monotonic,
            on_transition=self.transitions.append,
        )
        return self.lifecycle

    def install(self, version: str, shadow: ShadowPolicy | None = SHADOW) -> None:
        download = self.tmp / "download" / f"{version}.bundle"
        download.parent.mkdir(exist_ok=True)
        shutil.copy(self.bundles[version], download)
        self.lifecycle.install(MODEL, version, f"r-{version}", PROBATION, lambda: download, shadow)

    def serve(self, requests: int, seed: int = 0) -> list[str]:
        """``requests`` requests as the server answers them: the live version runs, and a
        copy goes to the candidate in shadow when its runner claims it. Returns the
        version that answered each."""
        answered = []
        rng = np.random.default_rng(seed)
        for _ in range(requests):
            live = self.registry.get(MODEL)
            assert live is not None
            x = {"x": rng.normal(size=(4, 4)).astype(np.float32)}
            outputs = live.infer(x)
            answered.append(live.version)
            runner = self.registry.shadow(MODEL)
            if runner is not None and runner.claim(live.version):
                runner.submit(x, outputs, wall_s=1e-4, cpu_s=1e-4)
                assert runner.wait_idle(10.0)
        return answered

    def judge(self) -> JournalRecord:
        self.lifecycle.judge_probation()
        return self.lifecycle.record(MODEL)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    bundles = {}
    # 2.0.0 has 1.0.0's weights (it agrees); 3.0.0 has others (it disagrees).
    for seed, version in ((1, "1.0.0"), (1, "2.0.0"), (5, "3.0.0")):
        onnx_path = make_linear_model(tmp_path / f"{version}.onnx", seed=seed)
        bundles[version] = build_bundle(onnx_path, MODEL, version, tmp_path / version, 2).path
    device = Device(tmp_path, bundles)
    device.install("1.0.0")  # nothing serves yet: no shadow, straight to probation
    assert device.lifecycle.record(MODEL).phase is Phase.ACTIVE
    device.monotonic.now += 60.0
    assert device.judge().phase is Phase.COMMITTED
    yield device
    runner = device.registry.shadow(MODEL)
    if runner is not None:
        runner.close()


def test_an_agreeing_candidate_is_promoted_after_its_samples(device: Device) -> None:
    device.install("2.0.0")
    record = device.lifecycle.record(MODEL)
    assert (record.phase, serving_version(record)) == (Phase.SHADOW, "1.0.0")
    assert device.serve(5) == ["1.0.0"] * 5
    assert device.judge().phase is Phase.SHADOW  # 5 of 6 compared
    doc = device.lifecycle.shadow_doc(MODEL)
    assert doc is not None and (doc["state"], doc["samples"], doc["version"]) == (
        "running", 5, "2.0.0"
    )  # fmt: skip
    assert device.serve(1) == ["1.0.0"]
    record = device.judge()
    assert (record.phase, record.version) == (Phase.ACTIVE, "2.0.0")
    assert record.reason.startswith("shadow passed: 6 requests compared")
    assert "top-1 agreement 1.000" in record.reason
    assert device.registry.shadow(MODEL) is None
    assert device.serve(2) == ["2.0.0"] * 2  # live now, on probation
    doc = device.lifecycle.shadow_doc(MODEL)
    assert doc is not None and doc["state"] == "passed" and doc["agreement"] == 1.0


def test_a_disagreeing_candidate_fails_in_shadow_and_never_answers(device: Device) -> None:
    device.install("3.0.0")
    answered = device.serve(6)
    record = device.judge()
    assert (record.phase, record.version, serving_version(record)) == (
        Phase.FAILED, "3.0.0", "1.0.0"
    )  # fmt: skip
    assert "below min_agreement 0.98" in record.reason and "6 requests compared" in record.reason
    assert answered == ["1.0.0"] * 6 and device.serve(3) == ["1.0.0"] * 3
    assert device.registry.shadow(MODEL) is None
    doc = device.lifecycle.shadow_doc(MODEL)
    assert doc is not None and doc["state"] == "failed"
    assert isinstance(doc["agreement"], float) and doc["agreement"] < 0.98
    kinds = [r.phase for r in device.transitions]
    assert kinds[-3:] == [Phase.SMOKE_TESTED, Phase.SHADOW, Phase.FAILED]
    assert Phase.ACTIVE not in kinds[kinds.index(Phase.SHADOW, len(kinds) - 3) :]


def test_no_traffic_passes_at_the_time_limit(device: Device) -> None:
    device.install("3.0.0")
    device.monotonic.now += 29.0
    assert device.judge().phase is Phase.SHADOW
    device.monotonic.now += 1.0
    record = device.judge()
    assert record.phase is Phase.ACTIVE and "no request to compare" in record.reason


def test_no_shadow_policy_or_a_disabled_one_activates_at_once(device: Device) -> None:
    device.install("2.0.0", ShadowPolicy(enabled=False))
    assert device.lifecycle.record(MODEL).phase is Phase.ACTIVE


def test_a_restart_in_shadow_serves_the_old_version_and_shadows_again(device: Device) -> None:
    device.install("3.0.0")
    device.serve(4)
    device.wall.now += 5.0
    device.start().restore()  # the process died: a new registry, nothing compared
    record = device.lifecycle.record(MODEL)
    assert (record.phase, record.interrupted) == (Phase.SHADOW, 1)
    live = device.registry.get(MODEL)
    assert live is not None and live.version == "1.0.0"
    runner = device.registry.shadow(MODEL)
    assert runner is not None and runner.candidate.version == "3.0.0"
    assert runner.figures().samples == 0  # from the start
    assert device.serve(5) == ["1.0.0"] * 5
    assert device.judge().phase is Phase.SHADOW
    device.serve(1)
    assert device.judge().phase is Phase.FAILED


def test_desired_state_moving_on_cancels_the_shadow(device: Device) -> None:
    device.install("3.0.0")
    assert device.lifecycle.cancel_shadow(MODEL, "desired state names 2.0.0 now")
    record = device.lifecycle.record(MODEL)
    assert (record.phase, record.version) == (Phase.IDLE, "1.0.0")
    assert device.registry.shadow(MODEL) is None
    device.install("2.0.0")
    assert device.lifecycle.record(MODEL).phase is Phase.SHADOW
