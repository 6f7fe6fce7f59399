"""The device adversary suite (issue 18): a device holding a valid certificate attacks the
fleet through the real TLS broker `edgectl broker config` writes, with a real
`edgectl serve` ingesting, judging rollouts and answering chunk requests.

Two fleets, each with a staged rollout of ``lin`` 1.0.0 -> 2.0.0 that its honest devices
report as failing: north (n-1: 5 % errors, n-2: install failed) and south (s-1: both). The
attacker is s-evil, enrolled in south; s-rogue (south) is revoked while connected.

Every attack asserts that it was refused, where the refusal happens (the broker's PUBACK
reason 135, the ingest's refusal counters in /metrics, the responder's 503, the gates'
per-device evidence), and that north's gate evidence and verdict are exactly what they
were before it; in-fleet attacks also assert that s-1's failure still breaks south's
gates. The tally ``N/N device attacks refused`` is printed by tests/security/conftest.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import (
    Event,
    ModelFigures,
    SystemFigures,
    announce_topic,
    device_topic,
    event_payload,
    status_payload,
    telemetry_payload,
)
from agent.contracts.chunks import (
    ChunkRequest,
    parse_chunk,
    request_topic,
    response_topic,
)
from agent.telemetry.reporter import build_heartbeat
from controller.build.builder import build_bundle
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from controller.identity.broker import refresh_broker_files
from controller.identity.devices import revoke_device
from controller.repository.release import release_bundle
from controller.rollout.gates import DEFAULT_GATES, evaluate_gates, parse_gates
from controller.rollout.service import RolloutService, start_rollout
from controller.rollout.store import RolloutStore
from controller.serve.mqtt_repo import RepoResponder, ResponderLimits
from controller.serve.mqtt_tls import MqttTlsFiles, client_tls_context
from tests.e2e_support import wait_until
from tests.helpers import make_linear_model, stop_process
from tests.test_broker_acl import NOT_AUTHORIZED, Client, Setup, tls_broker
from tests.test_serve_tls import _serve

pytestmark = pytest.mark.slow

MODEL, OLD, NEW = "lin", "1.0.0", "2.0.0"
DEVICES = {"n-1": "north", "n-2": "north", "s-1": "south", "s-evil": "south", "s-rogue": "south"}
AT = "2026-01-01T00:00:00.000Z"


def heartbeat(fleet: str, device: str, seq: int, requests: int, errors: int) -> bytes:
    """A real ``edgefleet.telemetry/1`` heartbeat: ``lin`` on the new version."""
    beat = build_heartbeat(
        device=device,
        fleet=fleet,
        at=AT,
        seq=seq,
        interval_s=10.0,
        uptime_s=60.0,
        system=SystemFigures(10.0, 2**29, 2**30, 2**33, 0.2, None),
        models_status={},
        interval={},
    )
    figures = ModelFigures(NEW, "probation", requests, errors, 0, 0.004, 0.009, 0.02)
    return telemetry_payload(beat.__class__(**{**beat.__dict__, "models": {MODEL: figures}}))


def event(fleet: str, device: str, seq: int, kind: str, reason: str = "") -> bytes:
    return event_payload(Event(device, fleet, "s", seq, AT, kind, MODEL, NEW, OLD, reason=reason))


@dataclass
class World:
    setup: Setup
    metrics_url: str
    broker: subprocess.Popen[bytes]
    clients: dict[str, Client] = field(default_factory=dict)

    @property
    def repo(self) -> Path:
        return self.setup.repo

    def refused(self) -> dict[str, int]:
        """``edgefleet_ingest_refused_total`` by reason, from serve's /metrics."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        found = re.findall(r'^edgefleet_ingest_refused_total\{reason="(\w+)"\} (\d+)$', text, re.M)
        return {reason: int(n) for reason, n in found}

    def wait_refused(self, before: dict[str, int], reason: str, more: int) -> None:
        """Until serve has refused ``more`` messages for ``reason`` since ``before``."""
        want = before.get(reason, 0) + more
        wait_until(lambda: self.refused().get(reason, 0) >= want, 20, f"{more} {reason} refusal(s)")
        assert self.refused()[reason] == want

    def reload_broker(self) -> None:
        """SIGHUP mosquitto, as `systemctl reload mosquitto` does; returns once it reloaded."""
        log = self.setup.broker_dir.parent / "mosquitto.log"
        reloads = log.read_text().count("Reloading config")
        os.kill(self.broker.pid, signal.SIGHUP)
        wait_until(lambda: log.read_text().count("Reloading config") > reloads, 10, "the reload")

    @contextmanager
    def store(self) -> Iterator[TelemetryStore]:
        """A connection of its own to the store serve writes."""
        store = open_store(str(self.repo / "telemetry.sqlite"))
        try:
            yield store
        finally:
            store.close()

    def judged(self, fleet: str) -> dict[str, Any]:
        """What the gates see in ``fleet`` now, read from the store serve writes: the stage
        window's evidence, the report and its breaches."""
        (rollout,) = [r for r in RolloutStore(self.repo).find(fleet, MODEL) if r.version == NEW]
        with self.store() as store:
            service = RolloutService(self.repo, store)
            evidence = service.evidence(rollout, time.time())
            rolled = evaluate_gates(rollout.gates, service.rolled_evidence(rollout))
        report = evaluate_gates(rollout.gates, evidence)
        return {
            "samples": sorted(evidence.samples, key=repr),
            "incidents": sorted(evidence.incidents, key=repr),
            "summary": report.summary(),
            "breaches": sorted(b.describe() for b in report.breaches),
            # What a tick judges: the sums the store keeps (the same verdicts).
            "rolled": (rolled.served, rolled.errors, rolled.reporting, rolled.failed),
            "rolled_breaches": sorted(b.gate for b in rolled.breaches),
        }

    def stored(self, device: str) -> tuple[int, int]:
        """(heartbeats, events) stored of ``device``."""
        with self.store() as store:
            beats = store.heartbeats(device, limit=10**6)
            return len(beats), len(store.events(device=device, limit=10**6))


def _release(setup: Setup, folder: Path) -> None:
    """1.0.0 everywhere, then a staged rollout of 2.0.0 in each fleet that stays in its
    first stage for the whole suite (a long wait; serve ticks once an hour here)."""
    bundles = {}
    for seed, version in ((1, OLD), (2, NEW)):
        onnx = make_linear_model(folder / f"{version}.onnx", seed=seed)
        bundles[version] = build_bundle(onnx, MODEL, version, folder / f"{version}.bundle", 4).path
    for fleet in ("north", "south"):
        release_bundle(bundles[OLD], fleet, setup.repo)
    for i, fleet in enumerate(("north", "south")):
        start_rollout(
            setup.repo,
            fleet=fleet,
            model=MODEL,
            version=NEW,
            stages=(50.0, 100.0),
            wait_s=3600.0,
            deadline_s=7200.0,
            gates=parse_gates(DEFAULT_GATES),
            bundle=bundles[NEW] if i == 0 else None,
        )


def _report_failures(world: World) -> None:
    """The honest devices' reports: each fleet's 2.0.0 fails its gates."""
    failed = "golden vectors differ"
    reports = [
        ("n-1", "north", "telemetry", heartbeat("north", "n-1", 1, 400, 20)),
        ("n-2", "north", "events", event("north", "n-2", 1, "install_failed", failed)),
        ("s-1", "south", "telemetry", heartbeat("south", "s-1", 1, 400, 20)),
        ("s-1", "south", "events", event("south", "s-1", 1, "install_failed", failed)),
    ]
    for device, fleet, kind, payload in reports:
        topic = device_topic(fleet, device, kind)
        # Reason 16 (no subscriber) until serve's ingestion has subscribed; a repeat is
        # stored once (the same seq).
        wait_until(
            lambda: world.clients[device].publish(topic, payload) == 0,  # noqa: B023
            30,
            "serve's ingestion to subscribe",
        )

    def ingested() -> bool:
        return all(world.judged(f)["summary"]["failed"] == 1 for f in ("north", "south")) and all(
            world.judged(f)["summary"]["served"] == 400 for f in ("north", "south")
        )

    wait_until(ingested, 20, "the honest devices' reports to be ingested")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("adversary")
    with tls_broker(tmp, DEVICES) as (setup, broker):
        _release(setup, tmp)
        serve = _serve(setup.repo, setup.port, tmp, "rollout_tick_interval_s = 3600\n")
        world = World(setup, "", broker)
        try:
            assert serve.stdout is not None
            line = serve.stdout.readline()
            match = re.fullmatch(r"edgectl serve: listening on (http://\S+)\n", line)
            assert match, line + (tmp / "serve.log").read_text()
            world.metrics_url = f"{match.group(1)}/metrics"
            for device in DEVICES:
                world.clients[device] = Client(device, setup.port, setup.ca, setup.devices[device])
                assert world.clients[device].connect(), world.clients[device].connect_reason
            observer = Client("observer", setup.port, setup.ca, setup.controller)
            assert observer.connect()
            world.clients["observer"] = observer
            _report_failures(world)
            yield world
        finally:
            for client in world.clients.values():
                client.close()
            stop_process(serve)


@pytest.fixture
def north_unchanged(world: World) -> Iterator[dict[str, Any]]:
    """North's gate view before the attack; after it, the test asserts it is the same."""
    before = world.judged("north")
    assert before["summary"]["failed"] == 1 and before["breaches"], before
    yield before
    assert world.judged("north") == before


def _south_still_fails(world: World) -> dict[str, Any]:
    view = world.judged("south")
    assert any("s-1" in b and b.startswith("gate failed_installs") for b in view["breaches"]), view
    assert any("s-1" in b and b.startswith("gate error_rate") for b in view["breaches"]), view
    return view


# ---------------------------------------------------------------------------- the attacks


@pytest.mark.device_attack("other_fleet")
def test_publishing_into_another_fleet_is_refused_by_the_broker(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    evil = world.clients["s-evil"]
    attempts = {
        device_topic("north", "s-evil", "telemetry"): heartbeat("north", "s-evil", 1, 10**6, 0),
        device_topic("north", "s-evil", "events"): event("north", "s-evil", 1, "committed"),
        device_topic("north", "s-evil", "status"): status_payload(
            "s-evil", "north", True, {MODEL: {"version": NEW}}, "0.1.0", AT
        ),
        request_topic("north", "s-evil"): ChunkRequest(
            "t1", "metadata/root.json", 0, 10
        ).to_bytes(),
    }
    for topic, payload in attempts.items():
        assert evil.publish(topic, payload) == NOT_AUTHORIZED, topic
    assert world.stored("s-evil") == (0, 0)


@pytest.mark.device_attack("other_device")
def test_publishing_as_another_device_is_refused_by_the_broker(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    evil = world.clients["s-evil"]
    south = _south_still_fails(world)
    attempts = {
        # s-1's own tree, in s-evil's fleet: clean figures to hide s-1's errors.
        device_topic("south", "s-1", "telemetry"): heartbeat("south", "s-1", 9, 10**6, 0),
        device_topic("south", "s-1", "events"): event("south", "s-1", 9, "committed"),
        device_topic("north", "n-1", "telemetry"): heartbeat("north", "n-1", 9, 10**6, 0),
        device_topic("north", "n-2", "events"): event("north", "n-2", 9, "rolled_back"),
        request_topic("south", "s-1"): ChunkRequest("t2", "metadata/root.json", 0, 10).to_bytes(),
        announce_topic("south"): b'{"forged": true}',
    }
    for topic, payload in attempts.items():
        assert evil.publish(topic, payload) == NOT_AUTHORIZED, topic
    assert world.judged("south") == south


@pytest.mark.device_attack("read_others")
def test_other_devices_and_fleets_topics_are_never_delivered(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    evil, observer = world.clients["s-evil"], world.clients["observer"]
    evil.messages.clear()
    for topic in (
        "#",
        "edgefleet/v1/fleets/+/devices/+/+",
        "edgefleet/v1/fleets/+/devices/+/repo/response",
        announce_topic("north"),
        response_topic("south", "s-1"),
    ):
        evil.subscribe(topic)
    observer.subscribe("edgefleet/v1/fleets/+/devices/+/#")
    # Traffic the attacker would like to see: another device's status, and the answer
    # serve sends to another device's repository request.
    status = status_payload("n-1", "north", True, {MODEL: {"version": NEW}}, "0.1.0", AT)
    assert world.clients["n-1"].publish(device_topic("north", "n-1", "status"), status) == 0
    s1 = world.clients["s-1"]
    s1.subscribe(response_topic("south", "s-1"))
    request = ChunkRequest("read-1", "metadata/root.json", 0, 64).to_bytes()
    assert s1.publish(request_topic("south", "s-1"), request) == 0
    wait_until(
        lambda: any(t == response_topic("south", "s-1") for t, _ in s1.messages), 20, "s-1's answer"
    )
    wait_until(
        lambda: (device_topic("north", "n-1", "status"), status) in observer.messages,
        20,
        "n-1's status at the controller",
    )
    time.sleep(0.5)  # anything delivered to the attacker would have arrived by now
    # Its own fleet's retained announcement is all it may read.
    assert {t for t, _ in evil.messages} <= {announce_topic("south")}, evil.messages


@pytest.mark.device_attack("event_flood")
def test_a_flood_of_events_cannot_hide_another_devices_failure(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    evil = world.clients["s-evil"]
    flood = 500  # all read in SQL, reduced to its last word of each kind
    topic = device_topic("south", "s-evil", "events")
    infos = [
        evil.client.publish(topic, event("south", "s-evil", 1000 + n, "committed"), qos=1)
        for n in range(flood)
    ]
    for info in infos:
        info.wait_for_publish(timeout=20)
    # Its own topic: the broker takes it and serve stores it.
    wait_until(lambda: world.stored("s-evil")[1] >= flood, 30, "the flood to be stored")
    view = _south_still_fails(world)
    evil_incidents = [i for i in view["incidents"] if i.device == "s-evil"]
    assert len(evil_incidents) == 1  # its latest "committed": one row however many it sends
    # And the table keeps of a device only its newest (serve prunes so every 10 min).
    with world.store() as store:
        assert store.prune_events(before=0.0, max_per_device=100) == flood - 100
    assert world.stored("s-evil")[1] == 100 and world.stored("s-1")[1] == 1
    _south_still_fails(world)


@pytest.mark.device_attack("impossible_counts")
def test_counts_no_device_serves_are_refused_by_ingest(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    evil = world.clients["s-evil"]
    south = _south_still_fails(world)
    stored = world.stored("s-evil")[0]
    before = world.refused()
    topic = device_topic("south", "s-evil", "telemetry")
    lies = [
        heartbeat("south", "s-evil", 11, 2**31 - 1, 0),  # 2**31 clean requests in 10 s
        heartbeat("south", "s-evil", 12, 400, -10_000),  # negative errors, to cancel s-1's
        heartbeat("south", "s-evil", 13, 10, 400),  # more errors than requests
    ]
    for payload in lies:
        assert evil.publish(topic, payload) == 0  # its own topic: the broker takes it
    world.wait_refused(before, "implausible", len(lies))
    assert world.stored("s-evil")[0] == stored
    assert world.judged("south") == south


@pytest.mark.device_attack("outweigh")
def test_one_devices_volume_cannot_hide_anothers_errors(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    """A plausible volume (a million requests in 10 s is within the bound) is stored, but
    the gates weigh each device at most judge_n requests: s-1's 5 % still breaks them."""
    evil = world.clients["s-evil"]
    stored = world.stored("s-evil")[0]
    payload = heartbeat("south", "s-evil", 21, 1_000_000, 0)
    assert evil.publish(device_topic("south", "s-evil", "telemetry"), payload) == 0
    wait_until(lambda: world.stored("s-evil")[0] > stored, 20, "the heartbeat stored")
    view = _south_still_fails(world)
    assert view["summary"]["served"] == 1_000_400  # what devices reported, all of it
    assert view["summary"]["error_rate"] >= 0.01  # weighted: 15 errors in 600


@pytest.mark.device_attack("chunk_flood")
def test_a_flood_of_chunk_requests_stays_within_the_devices_share(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    evil, n1 = world.clients["s-evil"], world.clients["n-1"]
    flood = 300
    # The per-device share cannot be multiplied through other fleets' trees.
    other = ChunkRequest("f-x", "metadata/root.json", 0, 1024).to_bytes()
    assert evil.publish(request_topic("north", "s-evil"), other) == NOT_AUTHORIZED
    # 1. Admission alone: a responder on the same broker whose workers never run (none
    #    started) admits exactly max_per_device of a device's requests and answers every
    #    other one 503 at once; another device's request is still admitted.
    limits = ResponderLimits(workers=0, max_queued=256, max_per_device=16)
    controller = world.setup.controller
    stalled = RepoResponder(
        world.repo,
        "localhost",
        world.setup.port,
        "adversary-stalled-responder",
        limits=limits,
        tls=client_tls_context(MqttTlsFiles(world.setup.ca, controller.cert, controller.key)),
    )
    stalled.start()
    try:
        assert stalled.subscribed.wait(20), "the stalled responder never subscribed"
        requests = [
            ChunkRequest(f"flood-{i}", "metadata/root.json", 0, 1024).to_bytes()
            for i in range(flood)
        ]
        infos = [evil.client.publish(request_topic("south", "s-evil"), r, qos=1) for r in requests]
        for info in infos:
            info.wait_for_publish(timeout=20)
        busy = flood - limits.max_per_device
        wait_until(lambda: stalled.answered == busy, 20, "503 for every request past the share")
        honest = ChunkRequest("honest-1", "metadata/root.json", 0, 1024).to_bytes()
        assert n1.publish(request_topic("north", "n-1"), honest) == 0
        late = ChunkRequest("flood-late", "metadata/root.json", 0, 1024).to_bytes()
        assert evil.publish(request_topic("south", "s-evil"), late) == 0
        wait_until(lambda: stalled.answered >= busy + 1, 20, "the late request's 503")
        # The late request, sent after n-1's, was answered 503; n-1's was admitted.
        assert stalled.answered == busy + 1
    finally:
        stalled.stop()
    # 2. The real serve during a flood: the attacker's answers are its own; n-1 is served.
    n1.subscribe(response_topic("north", "n-1"))
    evil.subscribe(response_topic("south", "s-evil"))
    infos = [
        evil.client.publish(request_topic("south", "s-evil"), r, qos=1)
        for r in (
            ChunkRequest(f"f2-{i}", "metadata/root.json", 0, 4096).to_bytes() for i in range(flood)
        )
    ]
    wanted = ChunkRequest("honest-2", "metadata/root.json", 0, 4096)
    assert n1.publish(request_topic("north", "n-1"), wanted.to_bytes()) == 0
    for info in infos:
        info.wait_for_publish(timeout=20)

    def served() -> bool:
        return any(
            t == response_topic("north", "n-1")
            and parse_chunk(p).transfer == "honest-2"
            and parse_chunk(p).status == 200
            for t, p in n1.messages
        )

    wait_until(served, 30, "n-1's answer during the flood")
    assert all(
        t == response_topic("south", "s-evil") or t == announce_topic("south")
        for t, _ in evil.messages
    )


@pytest.mark.device_attack("revoked")
def test_a_revoked_device_still_connected_is_refused_by_ingest(
    world: World, north_unchanged: dict[str, Any]
) -> None:
    """Revoked while connected: before the broker reloads, its connection is open and
    the broker passes on what it sends, and ingest refuses it; after the reload (SIGHUP)
    the connection is still open, and the broker refuses what it sends (issue 20, item 2;
    what the broker does is tests/test_broker_acl.py's)."""
    rogue = world.clients["s-rogue"]
    topic = device_topic("south", "s-rogue", "telemetry")
    assert rogue.publish(topic, heartbeat("south", "s-rogue", 1, 100, 0)) == 0
    wait_until(lambda: world.stored("s-rogue")[0] == 1, 20, "its heartbeat before")
    revoke_device(world.repo, "s-rogue")
    refresh_broker_files(world.repo)  # as `edgectl device revoke` does; no broker reload
    south = _south_still_fails(world)
    # Serve looks at the registry at most every second: publish until it refuses.
    seq = 1
    before = world.refused()

    def refused_one() -> bool:
        nonlocal seq
        seq += 1
        sent = rogue.publish(topic, heartbeat("south", "s-rogue", seq, 10**6, 0))
        time.sleep(0.2)
        return sent == NOT_AUTHORIZED or world.refused().get("revoked", 0) > before.get(
            "revoked", 0
        )

    wait_until(refused_one, 20, "serve to see the revocation")
    stored = world.stored("s-rogue")[0]
    south = _south_still_fails(world)
    before = world.refused()
    attempts = [
        (topic, heartbeat("south", "s-rogue", 100, 10**6, 0)),
        (device_topic("south", "s-rogue", "events"), event("south", "s-rogue", 100, "committed")),
        (device_topic("south", "s-rogue", "events"), event("south", "s-rogue", 101, "rolled_back")),
    ]
    by_ingest = 0
    for attempt_topic, payload in attempts:
        answer = rogue.publish(attempt_topic, payload)
        assert answer == 0  # the broker has not reloaded its ACL: it passes it on
        by_ingest += 1
    world.wait_refused(before, "revoked", by_ingest)
    assert world.stored("s-rogue")[0] == stored and world.stored("s-rogue")[1] == 0
    assert world.judged("south") == south

    # The reload: the connection stays, the broker refuses all it sends; ingest gets none.
    world.reload_broker()
    before = world.refused()
    for attempt_topic, payload in attempts:
        assert rogue.publish(attempt_topic, payload) == NOT_AUTHORIZED, attempt_topic
    assert rogue.client.is_connected()
    # The honest s-1 through the same broker and ingest, after those: once it is stored,
    # anything of s-rogue's the broker had passed on would have been stored or refused.
    s1, beats = world.clients["s-1"], world.stored("s-1")[0]
    s1_topic = device_topic("south", "s-1", "telemetry")
    assert s1.publish(s1_topic, heartbeat("south", "s-1", 900, 1, 0)) == 0
    wait_until(lambda: world.stored("s-1")[0] > beats, 20, "s-1's heartbeat after the reload")
    assert world.refused() == before
    assert world.stored("s-rogue")[0] == stored and world.stored("s-rogue")[1] == 0
