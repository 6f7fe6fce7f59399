"""A real ``edge-agent`` keeps following its fleet through faults, and the systemd
watchdog is fed only while its loops live (issue 18, defect 1).

The agent runs as its own process, against a real HTTP mirror of a real repository
(``tests.security.simulator.HostileMirror``) and a private mosquitto, with
``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` pointing at a datagram socket this test reads,
as systemd would set them.

- The mirror garbles the fleet's ``rollout`` role, which python-tuf fetches lazily after
  the refresh: the update loop logs it and keeps polling (the mirror sees it come back),
  the watchdog keeps being fed, and once the mirror heals the release installs.
- ``EDGEFLEET_TEST_STOP_LOOP=update`` ends the update loop after its first check: the
  agent stops sending ``WATCHDOG=1`` (systemd would restart it) and says why in ``STATUS=``.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.client import InferenceClient
from agent.contracts import ROLLOUT_ROLE, ProbationPolicy, ShadowPolicy
from controller.build.builder import build_bundle
from controller.repository.release import release_bundle
from controller.repository.repo import Repository, init_repository, next_version
from tests.e2e_support import Proc, served_version, start_agent, wait_until, write_agent_config
from tests.helpers import Broker, make_linear_model
from tests.security.simulator import HostileMirror, Replace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MODEL = "linear"
FLEET = "lab"
# systemd's WatchdogSec= as the agent sees it: it pings every half of it.
WATCHDOG_USEC = 2_000_000


class NotifyListener:
    """The datagram socket systemd would own: every notification, with when it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._received: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(8192).decode()
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            with self._lock:
                self._received.append((time.monotonic(), fields))

    def received(self) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return list(self._received)

    def pings_after(self, instant: float) -> int:
        return sum(1 for at, f in self.received() if at > instant and f.get("WATCHDOG") == "1")

    def status_containing(self, text: str) -> float | None:
        """When the first ``STATUS=`` holding ``text`` arrived, or None."""
        for at, fields in self.received():
            if text in fields.get("STATUS", ""):
                return at
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


@dataclass
class Fleet:
    repo: Repository
    mirror: HostileMirror
    bundles: dict[str, Path]
    # The time the next release signs at, once next_rollout_url predicted its version.
    pinned: datetime | None = None

    def release(self, version: str) -> None:
        policy = ProbationPolicy(duration_s=0.5)
        now, self.pinned = self.pinned, None
        release_bundle(
            self.bundles[version],
            FLEET,
            self.repo.path,
            now=now,
            probation=policy,
            shadow=ShadowPolicy(enabled=False),
        )

    def next_rollout_url(self) -> str:
        """The URL of the rollout role the next release will publish (it signs at the
        time pinned here, so its version is known: ``next_version``)."""
        self.pinned = datetime.now(UTC).replace(microsecond=0)
        version = next_version(int(self.repo.load(ROLLOUT_ROLE).signed.version), self.pinned)
        return f"/metadata/{version}.{ROLLOUT_ROLE}.json"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    repo = init_repository(tmp_path / "repo")
    bundles = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        onnx_path = make_linear_model(tmp_path / f"{version}.onnx", seed=seed)
        bundle = tmp_path / f"{version}.bundle"
        bundles[version] = build_bundle(onnx_path, MODEL, version, bundle, 4).path
    mirror = HostileMirror(repo.path)
    try:
        yield Fleet(repo, mirror, bundles)
    finally:
        mirror.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        yield listener
    finally:
        listener.close()


def start_watched_agent(
    tmp_path: Path,
    broker: Broker,
    fleet: Fleet,
    notify: NotifyListener,
    extra_env: dict[str, str] | None = None,
) -> tuple[Proc, InferenceClient]:
    config = write_agent_config(
        tmp_path / "device",
        device="dev-1",
        fleet=FLEET,
        broker=broker.address,
        repo_url=fleet.mirror.url,
        root=fleet.repo.metadata_dir / "1.root.json",
        poll_interval_s=1.0,
    )
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    agent = start_agent(config, env={**env, **(extra_env or {})})
    return agent, InferenceClient(tmp_path / "device" / "infer.sock")


def test_the_update_loop_survives_a_garbled_rollout_role_and_installs_once_it_heals(
    tmp_path: Path, broker: Broker, fleet: Fleet, notify: NotifyListener
) -> None:
    fleet.release("1.0.0")
    agent, client = start_watched_agent(tmp_path, broker, fleet, notify)
    try:
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 60, "1.0.0 served")
        url = fleet.next_rollout_url()
        fleet.mirror.set(url, Replace(b'{"signed": {"_type": "targets", "vers'))
        fleet.release("2.0.0")
        assert (fleet.repo.metadata_dir / url.rsplit("/", 1)[1]).exists()

        # The loop comes back to the garbled role again and again: it did not die.
        wait_until(lambda: len(fleet.mirror.fetched(url)) >= 3, 60, f"3 fetches of {url}")
        third_fault = time.monotonic()
        assert agent.process.poll() is None, agent.text()
        assert served_version(client, MODEL) == "1.0.0"
        assert "rollout" in agent.text()  # the failure is logged, naming the role
        wait_until(lambda: notify.pings_after(third_fault) >= 2, 20, "WATCHDOG=1 still sent")

        fleet.mirror.clear()
        wait_until(lambda: served_version(client, MODEL) == "2.0.0", 60, "2.0.0 after healing")
    finally:
        agent.stop()


def test_a_dead_update_loop_stops_the_watchdog_and_says_why(
    tmp_path: Path, broker: Broker, fleet: Fleet, notify: NotifyListener
) -> None:
    fleet.release("1.0.0")
    agent, client = start_watched_agent(
        tmp_path, broker, fleet, notify, {"EDGEFLEET_TEST_STOP_LOOP": "update"}
    )
    try:
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 60, "1.0.0 served")
        assert notify.pings_after(0.0) >= 1  # fed while every loop lived
        died = wait_until(
            lambda: notify.status_containing("update loop has ended"),
            30,
            "a STATUS naming the dead update loop",
        )
        # Two watchdog intervals (four ping periods) without one ping: systemd would
        # have killed the agent twice over.
        quiet_until = time.monotonic() + 2 * WATCHDOG_USEC / 1e6
        while time.monotonic() < quiet_until:
            assert notify.pings_after(died) == 0, notify.received()
            time.sleep(0.1)
        assert agent.process.poll() is None  # it does not exit on its own: systemd kills it
        assert served_version(client, MODEL) == "1.0.0"  # and serves until then
        assert "EDGEFLEET_TEST_STOP_LOOP" in agent.text()
    finally:
        agent.stop()
