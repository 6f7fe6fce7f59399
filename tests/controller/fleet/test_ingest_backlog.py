"""The bounded backlog ingestion holds while the store is down: the policy as a pure
object, then an outage against a real mosquitto and a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import SystemFigures, device_topic, telemetry_payload
from agent.telemetry.reporter import build_heartbeat
from controller.fleet.backlog import COALESCED, DROPPED, QUEUED, Backlog, Item
from controller.fleet.records import FleetAggregates
from controller.serve.metrics import render_aggregates
from tests.controller.fleet.test_ingest_ack import failing_store, start_ingest
from tests.e2e_support import wait_until
from tests.helpers import Broker


def beat(device: str, seq: int, qos: int = 0) -> Item:
    return (f"edgefleet/v1/fleets/lab/devices/{device}/telemetry", b"%d" % seq, 0.0, qos, 0, 1)


def event(device: str, seq: int) -> Item:
    return (f"edgefleet/v1/fleets/lab/devices/{device}/events", b"%d" % seq, 0.0, 0, 0, 1)


def names(items: list[Item]) -> list[str]:
    """ "d1/telemetry:3" for each item."""
    return [f"{i[0].split('/')[-2]}/{i[0].split('/')[-1]}:{i[1].decode()}" for i in items]


def test_below_the_bound_every_message_is_kept_in_arrival_order() -> None:
    backlog = Backlog(qos0_max=4)
    puts = [beat("d1", 1), beat("d1", 2, qos=1), beat("d1", 3), event("d2", 1), beat("d1", 4)]
    assert [backlog.put(item) for item in puts] == [QUEUED] * 5
    assert backlog.qos0_held == 4
    assert backlog.take(3) == puts[:3]
    assert backlog.take(10) == puts[3:]
    assert backlog.take(10) == [] and not backlog.wait(0)


def test_past_the_bound_the_heartbeat_superseded_longest_ago_gives_way() -> None:
    backlog = Backlog(qos0_max=4)
    for item in (beat("d1", 1), beat("d2", 1), beat("d1", 2), beat("d2", 2)):
        assert backlog.put(item) == QUEUED
    # d1:1 and d2:1 are superseded (a newer heartbeat of their device is held).
    assert backlog.put(beat("d3", 1)) == COALESCED  # d1:1 goes
    assert backlog.put(beat("d1", 3)) == COALESCED  # d2:1 goes; d1:2 is superseded now
    assert backlog.put(beat("d4", 1)) == COALESCED  # d1:2 goes
    assert names(backlog.take(10)) == [
        "d2/telemetry:2",
        "d3/telemetry:1",
        "d1/telemetry:3",
        "d4/telemetry:1",
    ]


def test_when_every_message_held_is_the_latest_the_oldest_is_dropped() -> None:
    backlog = Backlog(qos0_max=2)
    assert [backlog.put(beat(d, 1)) for d in ("d1", "d2", "d3")] == [QUEUED, QUEUED, DROPPED]
    # Events are not heartbeats: a later one on the same topic supersedes nothing.
    assert [backlog.put(event("d4", n)) for n in (1, 2)] == [DROPPED, DROPPED]
    assert names(backlog.take(10)) == ["d4/events:1", "d4/events:2"]


def test_qos1_messages_are_never_dropped_nor_counted_in_the_bound() -> None:
    backlog = Backlog(qos0_max=1)
    acked = [beat(f"d{i}", 1, qos=1) for i in range(50)]
    for item in acked:
        assert backlog.put(item) == QUEUED
        assert backlog.put(beat("d0", 2)) in (QUEUED, COALESCED)
    assert backlog.qos0_held == 1
    assert backlog.take(100) == [*acked, beat("d0", 2)]  # the d0:2 put last


def test_a_long_outage_keeps_every_devices_latest_heartbeat_within_the_bound() -> None:
    backlog = Backlog(qos0_max=1500)
    outcomes: dict[str, int] = {}
    for seq in range(1, 41):  # 40 rounds of 1000 devices
        for d in range(1000):
            outcome = backlog.put(beat(f"d{d}", seq))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            assert backlog.qos0_held <= 1500
    assert outcomes == {QUEUED: 1500, COALESCED: 40_000 - 1500}
    latest = {item[0]: int(item[1]) for item in backlog.take(2000)}
    assert len(latest) == 1000 and set(latest.values()) == {40}


def test_after_close_take_returns_only_what_came_before() -> None:
    backlog = Backlog(qos0_max=10)
    backlog.put(beat("d1", 1))
    backlog.close()
    backlog.put(beat("d1", 2, qos=1))
    assert backlog.wait(0) and not backlog.is_finished
    assert names(backlog.take(10)) == ["d1/telemetry:1"]
    assert backlog.is_finished and backlog.take(10) == []
    assert names(backlog.take_rest()) == ["d1/telemetry:2"]


def test_a_bound_below_one_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"\(qos0_backlog_max\) expected at least 1 message"):
        Backlog(qos0_max=0)


def test_metrics_count_what_gave_way() -> None:
    text = render_aggregates(FleetAggregates({}, {}, {}), [], {"coalesced": 7, "dropped": 2})
    assert 'edgefleet_ingest_messages_total{kind="coalesced"} 7' in text
    assert 'edgefleet_ingest_messages_total{kind="dropped"} 2' in text


# ----------------------------------------------------------------- a real store outage


def payload(device: str, seq: int) -> bytes:
    return telemetry_payload(
        build_heartbeat(
            device=device,
            fleet="lab",
            at=f"2026-01-01T00:00:{seq:02}Z",
            seq=seq,
            interval_s=10.0,
            uptime_s=1.0,
            system=SystemFigures(),
            models_status={},
            interval={},
        )
    )


def test_a_store_outage_holds_qos0_within_the_bound_and_every_qos1_message(
    tmp_path: Path, broker: Broker
) -> None:
    store = failing_store(str(tmp_path / "telemetry.sqlite"))
    ingestor = start_ingest(broker, store, qos0_backlog_max=50)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="outage-sim")
    publisher.connect(broker.host, broker.port)
    publisher.loop_start()

    def publish(device: str, seq: int, qos: int = 0) -> None:
        topic = device_topic("lab", device, "telemetry")
        publisher.publish(topic, payload(device, seq), qos).wait_for_publish(timeout=10)

    try:
        publish("first", 1, qos=1)  # the batch the writer holds while the store fails
        wait_until(lambda: store.attempts >= 1, 10, "the first write to fail")
        for seq in (1, 2, 3):  # 120 heartbeats of 40 devices: 70 superseded
            for d in range(40):
                publish(f"d{d}", seq)
        for q in range(60):  # past the bound, but QoS 1
            publish(f"q{q}", 1, qos=1)
        for e in range(10):  # 10 more devices: their room is made by superseded ones
            publish(f"e{e}", 1)
        wait_until(lambda: ingestor.counts["coalesced"] == 80, 10, "the bound to be reached")
        assert ingestor.qos0_waiting == 50 and ingestor.counts["dropped"] == 0
        wait_until(lambda: ingestor.unacknowledged == 61, 10, "every QoS 1 message held")

        store.failing.clear()  # the store is back
        wait_until(lambda: store.count("devices") == 111, 20, "every device's heartbeat")
        wait_until(lambda: ingestor.unacknowledged == 0, 10, "the acknowledgements")
        seqs = {d: [b.payload["seq"] for b in store.heartbeats(d)] for d in ("d0", "d39", "e9")}
        assert seqs == {"d0": [3], "d39": [3], "e9": [1]}
        assert store.count("heartbeats") == 111 and ingestor.counts["heartbeats"] == 111
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        ingestor.stop()
        store.close()
