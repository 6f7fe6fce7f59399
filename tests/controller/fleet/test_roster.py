"""Ingestion's admission checks (issue 18): senders against the device registry, and
heartbeat counts against what a device can serve. Pure functions, and the reader of a
real registry file with an injected clock."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import PayloadError, device_topic, status_payload
from controller.base.errors import RepositoryError
from controller.fleet.ingest import Ingestor, IngestSettings
from controller.fleet.payloads import (
    Admission,
    add_payload,
    check_plausible,
    most_requests,
    parse_heartbeat,
)
from controller.fleet.records import FleetAggregates, HeartbeatFacts, IngestBatch
from controller.fleet.roster import RefusedMessage, Roster, RosterEntry, RosterReader
from controller.serve.metrics import render_aggregates
from tests.controller.fleet.test_ingest import make_event
from tests.controller.fleet.test_ingest_hot_path import good_payload
from tests.controller.test_store_support import store_for
from tests.e2e_support import wait_until
from tests.helpers import Broker

ROSTER = Roster.of([("cam-1", "lab", False), ("cam-2", "prod", False), ("cam-3", "lab", True)])


def test_the_roster_admits_a_device_on_its_own_fleet_only() -> None:
    assert ROSTER.refusal("lab", "cam-1") is None
    assert ROSTER.refusal("prod", "cam-1") == "other_fleet"
    assert ROSTER.refusal("lab", "cam-3") == "revoked"
    assert ROSTER.refusal("prod", "cam-9") == "unenrolled"
    with pytest.raises(RefusedMessage, match="'cam-1' is enrolled in fleet 'lab', not 'prod'"):
        ROSTER.check("prod", "cam-1")


@pytest.mark.parametrize(
    ("fleet", "device", "reason"),
    [("prod", "cam-1", "other_fleet"), ("lab", "cam-3", "revoked"), ("lab", "cam-9", "unenrolled")],
)
def test_add_payload_refuses_every_kind_from_a_sender_the_registry_refuses(
    fleet: str, device: str, reason: str
) -> None:
    batch = IngestBatch()
    admission = Admission(ROSTER)
    messages = {
        "telemetry": good_payload(device).replace(b'"fleet":"lab"', f'"fleet":"{fleet}"'.encode()),
        "events": make_event(device, "s", 1).replace(
            b'"fleet":"lab"', f'"fleet":"{fleet}"'.encode()
        ),
        "status": status_payload(device, fleet, True, {}, "1.0", "now"),
    }
    for kind, payload in messages.items():
        with pytest.raises(RefusedMessage) as refused:
            add_payload(batch, device_topic(fleet, device, kind), payload, 1.0, admission)
        assert refused.value.reason == reason
        add_payload(batch, device_topic(fleet, device, kind), payload, 1.0)  # no registry: in
    assert len(batch) == 3
    add_payload(batch, device_topic("lab", "cam-1", "telemetry"), good_payload(), 2.0, admission)
    assert len(batch) == 4


def _facts(
    requests: int, errors: int = 0, client_errors: int = 0, interval: float = 10.0
) -> HeartbeatFacts:
    raw = good_payload(requests=requests).replace(b'"errors":1', b'"errors":%d' % errors)
    raw = raw.replace(b'"client_errors":0', b'"client_errors":%d' % client_errors)
    raw = raw.replace(b'"interval_s":10.0', b'"interval_s":%r' % interval)
    facts = parse_heartbeat("lab", "cam-1", raw)
    assert facts.models[0][3:6] == (requests, errors, client_errors)
    assert facts.interval_s == interval
    return facts


def test_counts_no_device_serves_are_refused_as_implausible() -> None:
    check_plausible(_facts(1000, 3, 2), 50_000)
    assert most_requests(10.0, 50_000) == 1_000_000  # two intervals of 10 s
    check_plausible(_facts(1_000_000), 50_000)
    for facts, why in (
        (_facts(2**31 - 1), "2,147,483,647 requests in an interval of 10 s"),
        (_facts(1_000_001), "at most 1,000,000"),
        (_facts(100, -50), "a negative count"),
        (_facts(-100), "a negative count"),
        (_facts(10, 8, 3), "8 errors and 3 client errors in 10 requests"),
        # An interval counts at most an hour, whatever the heartbeat claims.
        (_facts(2**31 - 1, interval=1e9), "at most 360,000,000"),
    ):
        with pytest.raises(RefusedMessage, match=why) as refused:
            check_plausible(facts, 50_000)
        assert refused.value.reason == "implausible"
    # The bound is the operator's ([serve] max_requests_per_s); below 1 s counts as 1 s.
    with pytest.raises(RefusedMessage, match="at most 20"):
        check_plausible(_facts(21, interval=0.001), 10)
    add = Admission(max_requests_per_s=5)  # 200 requests in 10 s: more than 2 x 10 x 5
    with pytest.raises(RefusedMessage):
        add_payload(
            IngestBatch(), device_topic("lab", "cam-1", "telemetry"), good_payload(), 1, add
        )


def _write_registry(path: Path, entries: dict[str, tuple[str, bool]]) -> None:
    devices = {d: {"fleet": f, "revoked": r} for d, (f, r) in entries.items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(devices))
    tmp.replace(path)  # atomically, as the registry is written


def test_the_reader_follows_the_registry_file_and_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "devices.json"
    reads = []

    def load() -> list[RosterEntry]:
        reads.append(1)
        try:
            doc = json.loads(path.read_text())
        except ValueError as exc:
            raise RepositoryError(f"{path}: {exc}") from None
        return [(d, e["fleet"], e["revoked"]) for d, e in doc.items()]

    clock = [100.0]
    reader = RosterReader(
        path,
        load,
        check_interval_s=1.0,
        clock=lambda: clock[0],
        wall_clock=lambda: time.time() + 60,  # every write has settled (FileMemo)
    )
    assert reader.load() is None  # no registry: admit every well-formed message
    _write_registry(path, {"cam-1": ("lab", False)})
    assert reader.current() is None  # looked at less than 1 s ago
    clock[0] += 1
    roster = reader.current()
    assert roster is not None and roster.refusal("lab", "cam-1") is None
    clock[0] += 1
    assert reader.current() is roster and len(reads) == 1  # unchanged: not parsed again
    _write_registry(path, {"cam-1": ("lab", True)})  # revoked while connected
    clock[0] += 1
    revoked = reader.current()
    assert revoked is not None and revoked.refusal("lab", "cam-1") == "revoked"
    path.write_text("{garbage")
    clock[0] += 1
    with caplog.at_level(logging.ERROR):
        assert reader.current() is revoked  # the last good roster stays
    assert "cannot read the device registry" in caplog.text
    with pytest.raises(RepositoryError):
        reader.load()  # at start-up a damaged registry is an error
    with pytest.raises(PayloadError):  # a refusal is a payload error to older callers
        revoked.check("lab", "cam-1")


def test_ingestion_counts_and_drops_what_the_registry_refuses(
    tmp_path: Path, broker: Broker
) -> None:
    """A real mosquitto (anonymous: the broker lets everything through, as a stale ACL
    would) and a real store: only cam-1's own heartbeat on lab is stored; the rest is
    refused by reason, acknowledged (never sent again) and shown in /metrics."""
    path = tmp_path / "devices.json"
    _write_registry(path, {"cam-1": ("lab", False), "cam-3": ("lab", True)})

    def load() -> list[RosterEntry]:
        return [(d, e["fleet"], e["revoked"]) for d, e in json.loads(path.read_text()).items()]

    refused = {
        device_topic("prod", "cam-1", "telemetry"): good_payload().replace(
            b'"fleet":"lab"', b'"fleet":"prod"'
        ),
        device_topic("lab", "cam-9", "events"): make_event("cam-9", "s", 1),
        device_topic("lab", "cam-3", "status"): status_payload("cam-3", "lab", True, {}, "1", "t"),
    }
    with store_for("sqlite", tmp_path) as store:
        ingestor = Ingestor(
            IngestSettings(broker.host, broker.port, client_id="roster", flush_s=0.05),
            store,
            roster=RosterReader(path, load),
        )
        ingestor.start()
        wait_until(lambda: ingestor.is_subscribed, 10, "the ingestor to connect")
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="roster-sim")
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        try:
            own = device_topic("lab", "cam-1", "telemetry")
            infos = [publisher.publish(topic, raw, qos=1) for topic, raw in refused.items()]
            infos.append(publisher.publish(own, good_payload(requests=2**31 - 1), qos=1))
            infos.append(publisher.publish(own, good_payload(), qos=1))
            for info in infos:
                info.wait_for_publish(timeout=10)
            wait_until(lambda: ingestor.counts["heartbeats"] == 1, 20, "cam-1's heartbeat")
        finally:
            publisher.loop_stop()
            publisher.disconnect()
            ingestor.stop()
        assert dict(ingestor.refusals) == {
            "other_fleet": 1,
            "unenrolled": 1,
            "revoked": 1,
            "implausible": 1,
        }
        assert ingestor.counts["refused"] == 4 and ingestor.counts["rejected"] == 0
        assert ingestor.unacknowledged == 0  # refused for good: the broker keeps nothing
        assert [(d.fleet, d.device) for d in store.devices()] == [("lab", "cam-1")]
        assert store.count("heartbeats") == 1 and store.count("events") == 0
        (beat,) = store.heartbeats("cam-1")
        assert beat.payload == json.loads(good_payload())
        text = render_aggregates(
            FleetAggregates({}, {}, {}), [], dict(ingestor.counts), None, ingestor.refusals
        )
        assert 'edgefleet_ingest_refused_total{reason="other_fleet"} 1' in text
        assert 'edgefleet_ingest_messages_total{kind="refused"} 4' in text
