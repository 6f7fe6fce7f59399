"""Parsing devices' MQTT messages into an ingest batch, without a broker or a store
(controller.fleet.payloads); the heartbeat hot path has its own file
(test_ingest_hot_path.py)."""

from __future__ import annotations

import pytest

from agent.contracts import PayloadError, device_topic, status_payload
from controller.fleet.payloads import add_payload, parse_message
from controller.fleet.records import IngestBatch
from tests.controller.fleet.test_ingest import FLEET, make_event
from tests.controller.fleet.test_ingest_hot_path import good_payload


def test_a_payload_that_names_another_device_than_its_topic_is_refused() -> None:
    payload = make_event("dev-2", "s", 1)
    with pytest.raises(PayloadError, match="arrived on"):
        parse_message(device_topic(FLEET, "dev-1", "events"), payload)
    with pytest.raises(PayloadError, match="not a device topic"):
        parse_message("edgefleet/v1/fleets/lab/announce", payload)
    assert parse_message(device_topic(FLEET, "dev-2", "events"), payload).device == "dev-2"


def test_add_payload_puts_each_kind_in_its_list_and_a_refused_one_nowhere() -> None:
    batch = IngestBatch()
    beat = good_payload("cam-1")
    add_payload(batch, device_topic(FLEET, "cam-1", "telemetry"), beat, 1.0)
    add_payload(batch, device_topic(FLEET, "cam-1", "events"), make_event("cam-1", "s", 1), 2.0)
    status = status_payload("cam-1", FLEET, False, {}, "1.0", "now")
    add_payload(batch, device_topic(FLEET, "cam-1", "status"), status, 3.0)
    for topic, payload, why in (
        (device_topic(FLEET, "cam-2", "telemetry"), beat, "arrived on the topic of lab/cam-2"),
        (f"edgefleet/v1/fleets/{FLEET}/devices/.cam/events", b"{}", "invalid device name"),
        (device_topic(FLEET, "cam-1", "status"), b"{", "not valid JSON"),
    ):
        with pytest.raises(PayloadError, match=why):
            add_payload(batch, topic, payload, 4.0)
    ((facts, received, kept),) = batch.heartbeat_facts
    assert (facts.device, received, kept) == ("cam-1", 1.0, beat.decode())
    assert [(e.seq, t) for e, t in batch.events] == [(1, 2.0)]
    assert [(s.online, t) for s, t in batch.statuses] == [(False, 3.0)]
    assert len(batch) == 3 and batch.heartbeats == []
