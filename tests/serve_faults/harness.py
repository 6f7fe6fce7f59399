"""What every serve fault case runs: simulated devices, a staged rollout, `/metrics`.

``SimFleet`` is a handful of devices, each its own paho client, publishing the real
protocol's messages (``agent.contracts`` builders): numbered events and numbered
heartbeats (which report the rollout's version serving clean requests), all with QoS 1.
Each device records which of its messages the broker acknowledged (PUBACK): after a
fault, every one of those must be in the store, once.

``Scenario`` starts a real `edgectl serve` on a repository with a staged rollout running
(stages judged every 0.5 s), lets the rollout pass its first stage, injects the fault,
waits until serve says what is wrong in its log and in ``/metrics``, holds the fault for
a few rollout ticks, removes it, and checks that serve recovered by itself: the metrics
say so, the rollout completes with a promotion after the fault and no stage passed twice,
and every message the broker acknowledged is in the store, once.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import (
    Event,
    Heartbeat,
    ModelFigures,
    SystemFigures,
    device_topic,
    event_payload,
    telemetry_payload,
)
from controller.fleet.stores import is_postgres
from controller.rollout.stages import Rollout, RolloutState
from controller.rollout.store import RolloutStore
from tests.e2e_support import Proc, edgectl, start_serve, wait_until

FLEET = "lab"
MODEL = "linear"
VERSION = "2.0.0"
DEVICES = [f"sim-{i}" for i in range(4)]
STAGES = (10, 20, 40, 60, 80, 100)
# Each stage is watched 2 s and needs two devices reporting the new version; the deadline
# is far away so that a long fault never halts a stage for want of devices. Only the
# error rate is judged (no timings, no install failures): the rest are off.
GATES = "error_rate<0.5,p99_ratio=off,failed_installs=off,min_devices=2"
ROLLOUT_ARGS = ("--stages", ",".join(map(str, STAGES)), "--wait", "2s", "--deadline", "1h",
                "--gate", GATES)  # fmt: skip
SEND_EVERY_S = 0.25
SERVE_SETTINGS: dict[str, float | str] = {
    "rollout_tick_interval_s": 0.5,
    "heartbeat_interval_s": SEND_EVERY_S,
    "resign_check_interval_s": 1.0,
    "ingest_flush_s": 0.05,
    "ingest_store_retry_max_s": 1.0,
    "ingest_stop_timeout_s": 5.0,
}
# How long a fault is held once serve has said what is wrong: several rollout ticks,
# several ingest retries, dozens of messages published meanwhile.
HOLD_S = 4.0


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SimDevice:
    """One device's MQTT client: ``send`` publishes its next event and heartbeat (QoS 1).

    paho keeps an unacknowledged QoS 1 message and sends it again after a reconnection;
    ``acked`` is what the broker took responsibility for."""

    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.seq = 0
        self.started = time.monotonic()
        self._by_mid: dict[int, tuple[str, int]] = {}
        self._acked_mids: list[int] = []  # appended by paho's thread (never under a lock:
        # paho calls on_publish holding its own lock, which publish() takes too)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-link")
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.client.max_queued_messages_set(0)  # unbounded: nothing given up while offline
        self.client.on_publish = self._on_publish
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def _on_publish(self, _c: object, _u: object, mid: int, _rc: object, _p: object) -> None:
        self._acked_mids.append(mid)

    def send(self) -> None:
        self.seq += 1
        seq, at = self.seq, _now()
        event = Event(self.name, FLEET, "sim", seq, at, "agent_started")
        beat = Heartbeat(
            device=self.name,
            fleet=FLEET,
            at=at,
            seq=seq,
            interval_s=SEND_EVERY_S,
            agent_version="sim",
            uptime_s=time.monotonic() - self.started,
            system=SystemFigures(),
            models={MODEL: ModelFigures(version=VERSION, state="committed", requests=5)},
        )
        for kind, topic, payload in (
            ("event", device_topic(FLEET, self.name, "events"), event_payload(event)),
            ("heartbeat", device_topic(FLEET, self.name, "telemetry"), telemetry_payload(beat)),
        ):
            info = self.client.publish(topic, payload, qos=1)
            self._by_mid[info.mid] = (kind, seq)

    def acked(self) -> set[tuple[str, str, int]]:
        """(kind, device, seq) of every message the broker acknowledged."""
        out = set()
        for mid in list(self._acked_mids):
            key = self._by_mid.get(mid)
            if key is not None:
                out.add((key[0], self.name, key[1]))
        return out

    def published(self) -> set[tuple[str, str, int]]:
        return {(k, self.name, s) for k, s in self._by_mid.values()}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class SimFleet:
    """``DEVICES`` sending every ``SEND_EVERY_S`` from a thread until ``stop``."""

    def __init__(self, host: str, port: int) -> None:
        self.devices = [SimDevice(name, host, port) for name in DEVICES]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-fleet", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded even if a test forgets to stop it
        while not self._stop.is_set() and time.monotonic() < deadline:
            for device in self.devices:
                device.send()
            self._stop.wait(SEND_EVERY_S)

    def stop_sending(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def acked(self) -> set[tuple[str, str, int]]:
        return set().union(*(d.acked() for d in self.devices))

    def published(self) -> set[tuple[str, str, int]]:
        return set().union(*(d.published() for d in self.devices))

    def close(self) -> None:
        self.stop_sending()
        for device in self.devices:
            device.close()


def stored_messages(location: str) -> list[tuple[str, str, int]]:
    """(kind, device, seq) of every event and heartbeat row in the store, duplicates kept."""
    queries = (
        ("event", "SELECT device, seq FROM events"),
        ("heartbeat", "SELECT device, seq FROM heartbeats"),
    )
    rows: list[tuple[str, str, int]] = []
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, connect_timeout=5) as conn:
            for kind, query in queries:
                rows += [(kind, d, int(s)) for d, s in conn.execute(query).fetchall()]
        return rows
    conn = sqlite3.connect(f"file:{location}?mode=ro", uri=True, timeout=10)
    try:
        for kind, query in queries:
            rows += [(kind, d, int(s)) for d, s in conn.execute(query).fetchall()]
    finally:
        conn.close()
    return rows


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of the sample ``name{labels}`` in a Prometheus text, or None."""
    selector = re.escape(name + (f"{{{labels}}}" if labels else ""))
    match = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def the_rollout(repo: Path) -> Rollout:
    (r,) = [r for r in RolloutStore(repo).all() if r.version == VERSION]
    return r


@dataclass
class Fault:
    """One infrastructure fault: how to cause it and take it away, and how serve must
    say it is there (its log, and ``/metrics`` while it lasts and once it is gone)."""

    inject: Callable[[], None]
    clear: Callable[[], None]
    log: str  # a regular expression the serve log must match once the fault is there
    during: Callable[[str], bool]  # the /metrics text says what is wrong
    after: Callable[[str], bool]  # the /metrics text says it is over
    # The rollout cannot move while the fault lasts (it needs the store or a key).
    holds_rollout: bool = False


@dataclass
class Scenario:
    """One serve under one fault: ``run`` it, ``close`` it whatever happened."""

    tmp: Path
    repo: Path
    bundle: Path
    broker_address: str
    store: str
    serve: Proc | None = None
    url: str = ""
    fleet: SimFleet | None = None

    def start(self) -> None:
        edgectl("init", self.repo)
        self.serve, self.url = start_serve(
            self.repo,
            self.broker_address,
            self.tmp / "serve.log",
            {**SERVE_SETTINGS, "store": self.store},
        )
        # Before the devices publish: a message no session subscribes to is not delivered.
        wait_until(lambda: "ingest: subscribed to" in self.log(), 30, "ingest to subscribe")
        host, port = self.broker_address.rsplit(":", 1)
        self.fleet = SimFleet(host, int(port))
        edgectl("rollout", "start", MODEL, VERSION, "--fleet", FLEET, "--repo", self.repo,
                "--bundle", self.bundle, *ROLLOUT_ARGS)  # fmt: skip

    def alive(self) -> None:
        assert self.serve is not None
        assert self.serve.process.poll() is None, f"serve exited:\n{self.serve.text()[-4000:]}"

    def log(self) -> str:
        assert self.serve is not None
        return self.serve.text()

    def run(self, fault: Fault) -> None:
        """Start, inject ``fault`` once the first stage passed, hold it, clear it, and
        check that serve recovered by itself."""
        self.start()
        fleet = self.fleet
        assert fleet is not None
        wait_until(lambda: the_rollout(self.repo).stage >= 1, 60, "the first stage to pass")
        wait_until(lambda: stored_messages(self.store), 30, "the first messages stored")
        self.alive()

        fault.inject()
        wait_until(lambda: re.search(fault.log, self.log()), 60, f"serve to log /{fault.log}/")
        wait_until(lambda: fault.during(scrape(self.url)), 30, "/metrics to show the fault")
        stage_at_fault = the_rollout(self.repo).stage
        time.sleep(HOLD_S)  # the fault lasts: ticks and retries fail meanwhile
        self.alive()
        assert fault.during(scrape(self.url)), scrape(self.url)
        assert the_rollout(self.repo).state is RolloutState.RUNNING
        if fault.holds_rollout:
            assert the_rollout(self.repo).stage == stage_at_fault, the_rollout(self.repo).history
        stage_at_recovery = the_rollout(self.repo).stage
        fault.clear()

        wait_until(lambda: fault.after(scrape(self.url)), 30, "/metrics to show the recovery")
        done = wait_until(
            lambda: (r := the_rollout(self.repo)).state is not RolloutState.RUNNING and r,
            90,
            "the rollout to complete",
        )
        self.alive()
        assert done.state is RolloutState.COMPLETED, done.history
        # It continued from where it was: a promotion happened after the fault.
        assert stage_at_recovery < len(STAGES) - 1, done.history
        # No stage passed twice.
        notes = [note for _at, note in done.history]
        for i, percent in enumerate(STAGES):
            passed = [n for n in notes if n.startswith(f"stage {i + 1} ({percent}%) passed")]
            assert len(passed) == 1, notes
        assert sorted(done.passed, key=int) == [str(i) for i in range(len(STAGES))], done.passed

        # Ingestion caught up: every message the broker acknowledged is stored, once.
        fleet.stop_sending()
        published = fleet.published()
        wait_until(lambda: fleet.acked() == published, 60, "the broker to take them all")
        try:
            wait_until(
                lambda: set(stored_messages(self.store)) >= published, 30, "every message stored"
            )
        except AssertionError:
            missing = sorted(published - set(stored_messages(self.store)))
            raise AssertionError(
                f"{len(missing)} of {len(published)} not stored: {missing[:40]}"
            ) from None
        stored = stored_messages(self.store)
        assert len(stored) == len(set(stored)), "a message stored twice"
        assert set(stored) == published
        self.alive()

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        if self.serve is not None:
            self.serve.stop()
