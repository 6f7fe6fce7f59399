"""A probation under a wall clock that steps: the lifecycle counts it on the monotonic
clock, and carries it across a restart by the journal's rule.

The lifecycle runs for real (a real bundle unpacked, loaded into ONNX Runtime, its golden
vectors checked, swapped in; the journal on disk) with both its clocks injected: the wall
clock that stamps the journal and the monotonic one that times the probation. Before
chaos defect C was fixed, a wall clock behind the recorded start made every probation
tick raise ValueError, and one ahead of it committed at once.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contracts import ProbationPolicy
from agent.device.config import AgentConfig, InferenceConfig
from agent.runtime.registry import ModelRegistry
from agent.telemetry.reporter import IntervalStats
from agent.update.journal import JournalRecord, Phase
from agent.update.lifecycle import ModelLifecycle
from agent.update.store import ModelStore
from controller.build.builder import build_bundle
from tests.helpers import ManualClock, make_linear_model

MODEL = "lin"
HOUR_S = 3600.0
WALL_T0 = 1_780_000_000.0
PROBATION = ProbationPolicy(duration_s=60.0, min_requests=0)


class Device:
    """One device's state folder, both its clocks, and the agent process now running."""

    def __init__(self, tmp: Path, bundles: dict[str, Path], wall: ManualClock) -> None:
        self.tmp, self.bundles, self.wall = tmp, bundles, wall
        self.start()

    def start(self) -> ModelLifecycle:
        """A new agent process on the same state folder (a restart): its own registry,
        request figures and monotonic clock, the journal as the last one left it."""
        config = AgentConfig(
            device_id="dev-1",
            fleet="lab",
            state_dir=self.tmp / "state",
            trusted_root=self.tmp / "root.json",
            inference=InferenceConfig(socket_path=self.tmp / "infer.sock"),
        )
        self.monotonic = ManualClock(now=50.0)
        self.lifecycle = ModelLifecycle(
            config,
            ModelRegistry(),
            ModelStore(self.tmp / "state" / "models"),
            IntervalStats(),
            clock=self.wall,
            monotonic=self.monotonic,
        )
        return self.lifecycle

    def install(self, version: str, policy: ProbationPolicy) -> None:
        download = self.tmp / "download" / f"{version}.bundle"
        download.parent.mkdir(exist_ok=True)
        shutil.copy(self.bundles[version], download)
        self.lifecycle.install(MODEL, version, f"r-{version}", policy, lambda: download)

    def judge(self) -> JournalRecord:
        self.lifecycle.judge_probation()
        return self.lifecycle.record(MODEL)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    bundles = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        onnx_path = make_linear_model(tmp_path / f"{version}.onnx", seed=seed)
        bundles[version] = build_bundle(onnx_path, MODEL, version, tmp_path / version, 2).path
    wall = ManualClock(now=WALL_T0 - 100)
    device = Device(tmp_path, bundles, wall)
    device.install("1.0.0", ProbationPolicy(duration_s=0.0))
    assert device.judge().phase is Phase.COMMITTED
    wall.now = WALL_T0
    device.install("2.0.0", PROBATION)  # on probation from WALL_T0, monotonic 50
    record = device.lifecycle.record(MODEL)
    assert (record.phase, record.probation_started_at) == (Phase.ACTIVE, WALL_T0)
    yield device


def assert_commits_after(device: Device, seconds: float) -> None:
    """Still on probation just before ``seconds`` more of the monotonic clock, committed
    at it, with the elapsed time the reason names counted on that clock."""
    device.monotonic.now += seconds - 0.1
    assert device.judge().phase is Phase.ACTIVE
    device.monotonic.now += 0.1
    record = device.judge()
    assert (record.phase, record.version) == (Phase.COMMITTED, "2.0.0"), record
    assert record.reason == "probation passed: 0 requests, error rate 0 after 60s"


@pytest.mark.parametrize("step_s", [-6 * HOUR_S, 6 * HOUR_S])
def test_a_wall_clock_step_during_probation_changes_nothing(device: Device, step_s: float) -> None:
    device.monotonic.now += 10.0
    device.wall.now += 10.0 + step_s  # NTP steps the wall clock, 10 s into probation
    assert device.judge().phase is Phase.ACTIVE  # neither an error nor an early commit
    assert_commits_after(device, 50.0)


def test_a_quick_restart_resumes_probation_where_it_was(device: Device) -> None:
    device.wall.now += 12.0
    device.start().restore()
    assert device.judge().restarts == 1
    assert_commits_after(device, 48.0)


@pytest.mark.parametrize("step_s", [-6 * HOUR_S, 6 * HOUR_S])
def test_a_wall_clock_step_across_a_restart_starts_probation_over(
    device: Device, step_s: float
) -> None:
    device.wall.now += 12.0 + step_s  # the agent restarts 12 s in, the clock stepped
    device.start().restore()
    record = device.judge()
    assert (record.phase, record.restarts) == (Phase.ACTIVE, 1)
    assert record.probation_started_at == device.wall.now  # the count began again
    assert_commits_after(device, 60.0)
