"""A real ``edge-agent`` whose wall clock steps keeps its cadence (issue 18, chaos defect C).

NTP correcting a device's time steps its wall clock by hours, at once; the agent's
periodic work (the repository poll, the probation judge, the heartbeat) and a probation's
elapsed time must not follow it. The agent runs as its own process under libfaketime
(``tests.chaos.faked_clock_agent``: the wall clock read from an rc file, the monotonic
clock left alone), against a real HTTP mirror of a real repository and a private
mosquitto. While a release is on probation the test steps the agent's wall clock:

- back 6 h: heartbeats keep arriving, the repository keeps being polled, and the
  probation is judged and committed (before: all three stopped for the 6 h of the step);
- forward 6 h: the same, and the probation commits after its own duration, not at once
  on the 6 h the wall clock jumped (before: "probation passed ... after 21604s").

Nothing here asserts a timing: each wait is a bound for a hang, and the elapsed time the
test checks is the one the agent wrote in its commit reason.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.client import InferenceClient
from agent.contracts import ProbationPolicy, ShadowPolicy
from agent.update.journal import JournalRecord, Phase, parse_record
from controller.build.builder import build_bundle
from controller.repository.release import release_bundle
from controller.repository.repo import Repository, init_repository
from tests.chaos.fleet import SteppedClock, faketime_library, spawn
from tests.e2e_support import BIN, Proc, served_version, wait_until, write_agent_config
from tests.helpers import Broker, make_linear_model
from tests.security.simulator import HostileMirror

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "linear"
FLEET = "lab"
DEVICE = "dev-1"
HOUR_S = 3600.0
# Long enough that a step lands inside it, short enough for a quick test.
PROBATION_S = 6.0
# Passes of each loop the test waits for after a step (the agent ticks every 1 s or less).
PASSES = 4
TIMESTAMP = "/metadata/timestamp.json"
AGENT_TAIL = "[telemetry]\nheartbeat_interval_s = 1\n[install]\nprobation_tick_s = 0.25\n"


class Heartbeats:
    """Every heartbeat the device publishes, counted by a real MQTT subscriber."""

    def __init__(self, broker: Broker) -> None:
        self._count = 0
        self._lock = threading.Lock()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="heartbeats")
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.subscribe(f"edgefleet/v1/fleets/{FLEET}/devices/{DEVICE}/telemetry")
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@dataclass
class SteppedDevice:
    repo: Repository
    mirror: HostileMirror
    bundles: dict[str, Path]
    clock: SteppedClock
    state: Path
    agent: Proc
    client: InferenceClient
    heartbeats: Heartbeats

    def release(self, version: str, probation_s: float) -> None:
        policy = ProbationPolicy(duration_s=probation_s)
        release_bundle(
            self.bundles[version],
            FLEET,
            self.repo.path,
            probation=policy,
            shadow=ShadowPolicy(enabled=False),
        )

    def journal(self) -> JournalRecord:
        return parse_record((self.state / "models" / MODEL / "journal.json").read_bytes())

    def polls(self) -> int:
        return len(self.mirror.fetched(TIMESTAMP))

    def alive(self) -> bool:
        if self.agent.process.poll() is not None:
            raise AssertionError(f"the agent exited:\n{self.agent.text()[-4000:]}")
        return True


@pytest.fixture
def device(tmp_path: Path, broker: Broker) -> Iterator[SteppedDevice]:
    library = faketime_library()
    if library is None:
        if os.environ.get("EDGEFLEET_REQUIRE_SYSTEM_TEST") == "1":
            pytest.fail("libfaketime must be installed here (make system-deps)")
        pytest.skip("libfaketime is not installed (make system-deps installs `faketime`)")
    repo = init_repository(tmp_path / "repo")
    bundles = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        onnx_path = make_linear_model(tmp_path / f"{version}.onnx", seed=seed)
        bundles[version] = build_bundle(onnx_path, MODEL, version, tmp_path / version, 4).path
    mirror = HostileMirror(repo.path)
    folder = tmp_path / "device"
    config = write_agent_config(
        folder,
        device=DEVICE,
        fleet=FLEET,
        broker=broker.address,
        repo_url=mirror.url,
        root=repo.metadata_dir / "1.root.json",
        poll_interval_s=1.0,
    )
    config.write_text(config.read_text() + AGENT_TAIL)
    clock = SteppedClock(tmp_path, library)
    heartbeats = Heartbeats(broker)
    args = [str(BIN / "python"), "-m", "tests.chaos.faked_clock_agent", "run"]
    agent = spawn([*args, "--config", str(config)], folder / "agent.log", clock.environment())
    client = InferenceClient(folder / "infer.sock")
    try:
        yield SteppedDevice(
            repo, mirror, bundles, clock, folder / "state", agent, client, heartbeats
        )
    finally:
        agent.stop()
        heartbeats.close()
        mirror.close()


def step_during_probation(device: SteppedDevice, offset_s: float) -> JournalRecord:
    """Serve 1.0.0, release 2.0.0 on a probation of ``PROBATION_S``, step the agent's
    wall clock to ``offset_s`` from real time as soon as 2.0.0 is live, and wait until
    the agent has heartbeated, polled and settled the probation after the step."""
    device.release("1.0.0", probation_s=0.0)
    wait_until(
        lambda: device.alive() and device.journal().phase is Phase.COMMITTED, 60, "1.0.0 committed"
    )
    device.release("2.0.0", probation_s=PROBATION_S)
    wait_until(
        lambda: device.alive() and served_version(device.client, MODEL) == "2.0.0",
        60,
        "2.0.0 live",
    )
    device.clock.step(offset_s)
    beats, polls = device.heartbeats.count, device.polls()
    assert device.journal().phase is Phase.ACTIVE  # the step lands inside the probation

    # libfaketime reads the rc file at most once a second: the step is in effect by then.
    time.sleep(2.0)
    wait_until(
        lambda: device.alive() and device.heartbeats.count >= beats + PASSES,
        30,
        f"{PASSES} heartbeats after the step to {offset_s / HOUR_S:+.0f} h",
    )
    wait_until(
        lambda: device.alive() and device.polls() >= polls + PASSES,
        30,
        f"{PASSES} polls after the step to {offset_s / HOUR_S:+.0f} h",
    )
    record = wait_until(
        lambda: device.alive() and (r := device.journal()).phase is not Phase.ACTIVE and r,
        30,
        f"the probation of 2.0.0 judged after the step to {offset_s / HOUR_S:+.0f} h",
    )
    assert "Traceback" not in device.agent.text()
    return record


def committed_after_s(record: JournalRecord) -> float:
    """The elapsed probation the agent wrote in its commit reason."""
    assert (record.phase, record.version) == (Phase.COMMITTED, "2.0.0"), record
    match = re.search(r"after (\d+)s$", record.reason)
    assert match, record.reason
    return float(match.group(1))


def test_a_wall_clock_stepped_back_keeps_the_agents_cadence(device: SteppedDevice) -> None:
    record = step_during_probation(device, -6 * HOUR_S)
    assert PROBATION_S <= committed_after_s(record) < HOUR_S
    assert served_version(device.client, MODEL) == "2.0.0"


def test_a_wall_clock_stepped_forward_does_not_end_probation_early(
    device: SteppedDevice,
) -> None:
    record = step_during_probation(device, 6 * HOUR_S)
    # Counted on the monotonic clock: the probation's own 6 s, not the 6 h of the step.
    assert PROBATION_S <= committed_after_s(record) < HOUR_S
    assert served_version(device.client, MODEL) == "2.0.0"
