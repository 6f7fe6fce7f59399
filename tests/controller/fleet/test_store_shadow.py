"""A device's shadow report (a candidate compared in shadow before it answers a client)
through ingestion and the store, on both backends: parsed alike on the hot path and by
the contract, kept latest per device and candidate version, and pruned."""

from __future__ import annotations

import json

import pytest

from agent.contracts import (
    Heartbeat,
    ModelFigures,
    PayloadError,
    ShadowReport,
    SystemFigures,
    parse_telemetry,
    telemetry_payload,
)
from controller.fleet.payloads import parse_heartbeat
from controller.fleet.records import IngestBatch, heartbeat_facts
from controller.fleet.store import TelemetryStore

FAILED = ShadowReport(
    version="3.0.0",
    serving="2.0.0",
    state="failed",
    samples=20,
    agreement=0.35,
    cosine_min=0.42,
    max_abs=0.91,
    latency_ratio=1.04,
    errors=0,
    dropped=3,
)


def beat(device: str, seq: int, shadow: ShadowReport | None) -> Heartbeat:
    return Heartbeat(
        device=device,
        fleet="lab",
        at=f"2026-01-01T00:00:{seq:02}Z",
        seq=seq,
        interval_s=10.0,
        agent_version="0.1.0",
        uptime_s=5.0,
        system=SystemFigures(),
        models={"lin": ModelFigures("2.0.0", "shadow", 3, 0, 0, shadow=shadow)},
    )


def test_a_heartbeat_without_a_shadow_is_the_payload_it_was() -> None:
    doc = json.loads(telemetry_payload(beat("d1", 1, None)))
    assert "shadow" not in doc["models"]["lin"]


def test_the_hot_path_and_the_contract_read_a_report_alike() -> None:
    raw = telemetry_payload(beat("d1", 1, FAILED))
    assert parse_telemetry(raw).models["lin"].shadow == FAILED
    fast = parse_heartbeat("lab", "d1", raw)
    assert fast == heartbeat_facts(parse_telemetry(raw))
    assert [name for name, _text in fast.shadows] == ["lin"]


def test_a_report_no_store_can_hold_is_refused_on_both_paths_and_an_odd_one_ignored() -> None:
    doc = json.loads(telemetry_payload(beat("d1", 1, FAILED)))
    doc["models"]["lin"]["shadow"]["samples"] = 2**40
    raw = json.dumps(doc).encode()
    for parse in (parse_telemetry, lambda r: parse_heartbeat("lab", "d1", r)):
        with pytest.raises(PayloadError, match="samples expected at most"):
            parse(raw)
    doc["models"]["lin"]["shadow"] = {"no": "version"}  # not a report: as if absent
    raw = json.dumps(doc).encode()
    assert parse_telemetry(raw).models["lin"].shadow is None
    assert parse_heartbeat("lab", "d1", raw).shadows == ()


def test_the_latest_report_per_device_and_version_is_kept_and_pruned(
    store: TelemetryStore,
) -> None:
    running = ShadowReport(version="3.0.0", serving="2.0.0", state="running", samples=4)
    raw = telemetry_payload(beat("d2", 1, FAILED))
    facts = parse_heartbeat("lab", "d2", raw)
    store.write(
        IngestBatch(
            heartbeats=[(beat("d1", 1, running), 100.0)],
            heartbeat_facts=[(facts, 101.0, raw.decode())],
        )
    )
    store.write(IngestBatch(heartbeats=[(beat("d1", 2, FAILED), 110.0)]))
    store.write(IngestBatch(heartbeats=[(beat("d1", 3, running), 105.0)]))  # older: ignored
    rows = store.shadow_reports("lab", "lin", "3.0.0")
    assert [(r.device, r.received_at, r.report) for r in rows] == [
        ("d1", 110.0, FAILED),
        ("d2", 101.0, FAILED),
    ]
    assert store.shadow_reports("lab", "lin", "2.0.0") == []
    assert store.shadow_reports("prod", "lin", "3.0.0") == []
    store.prune_models(before=105.0)
    assert [r.device for r in store.shadow_reports("lab", "lin", "3.0.0")] == ["d1"]
