"""Drift in the fleet (issue 23): heartbeats' drift through both ingest paths and both
store backends, the alert on a device whose drift stays high (pure, injected clock), and
what ``fleet status`` and ``device show`` print."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.contracts import (
    Heartbeat,
    ModelFigures,
    PayloadError,
    SystemFigures,
    parse_telemetry,
    telemetry_payload,
)
from controller.fleet.drift import DriftPolicy, drift_alerts, latest_drift
from controller.fleet.payloads import parse_heartbeat
from controller.fleet.records import FleetAggregates, IngestBatch, heartbeat_facts
from controller.fleet.status import StalePolicy, device_json, render_device, render_fleet_table
from controller.fleet.store import DriftPoint
from tests.controller.test_store_support import store_for


def beat(
    device: str, seq: int, drift: float | None, samples: int | None = 1500, version: str = "1.0.0"
) -> Heartbeat:
    return Heartbeat(
        device=device,
        fleet="lab",
        at=f"2026-01-01T00:{seq // 60:02}:{seq % 60:02}Z",
        seq=seq,
        interval_s=10.0,
        agent_version="0.1.0",
        uptime_s=5.0,
        system=SystemFigures(),
        models={
            "lin": ModelFigures(
                version, "active", 3, 0, 0, drift=drift, input_drift=drift, drift_samples=samples
            )
        },
    )


def test_without_a_reference_the_payload_has_no_drift_fields() -> None:
    doc = json.loads(telemetry_payload(beat("d1", 1, None, samples=None)))
    assert not {"drift", "input_drift", "drift_samples"} & set(doc["models"]["lin"])
    assert (
        parse_telemetry(telemetry_payload(beat("d1", 1, None, samples=None)))
        .models["lin"]
        .drift_samples
        is None
    )


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"drift_samples": -1}, "drift_samples expected a count"),
        ({"drift_samples": 1.5}, "drift_samples expected a count"),
        ({"drift_samples": 10, "drift": -0.1}, "drift expected a number >= 0"),
        ({"drift_samples": 10, "input_drift": "high"}, "input_drift expected a number"),
    ],
)
def test_a_malformed_drift_is_refused_by_both_parsers(entry: dict, match: str) -> None:
    doc = json.loads(telemetry_payload(beat("d1", 1, 0.1)))
    doc["models"]["lin"].update(entry)
    raw = json.dumps(doc).encode()
    with pytest.raises(PayloadError, match=match):
        parse_telemetry(raw)
    with pytest.raises(PayloadError, match=match):
        parse_heartbeat("lab", "d1", raw)


def test_both_ingest_paths_keep_the_same_drift() -> None:
    raw = telemetry_payload(beat("d1", 1, 0.3125))
    facts = parse_heartbeat("lab", "d1", raw)
    assert facts == heartbeat_facts(parse_telemetry(raw))
    assert facts.drift == (("lin", "1.0.0", 0.3125, 0.3125, 1500),)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_store_keeps_the_latest_drift_and_its_history(backend: str, tmp_path: Path) -> None:
    with store_for(backend, tmp_path) as store:
        batch = IngestBatch()
        for seq, drift in enumerate((0.01, 0.02, None), 1):
            raw = telemetry_payload(beat("d1", seq, drift))
            batch.heartbeat_facts.append(
                (parse_heartbeat("lab", "d1", raw), 100.0 + seq, raw.decode())
            )
        store.write(batch)
        store.write(batch)  # a redelivery adds no history
        (row,) = store.devices(fleet="lab")
        (m,) = row.models
        assert (m.drift, m.input_drift, m.drift_samples) == (None, None, 1500)  # the newest
        points = store.drift_history("lab", 0.0)
        assert [(p.at, p.drift) for p in points] == [(101.0, 0.01), (102.0, 0.02), (103.0, None)]
        # A newer version without a reference: its row shows no drift of the old version.
        raw = telemetry_payload(beat("d1", 9, None, samples=None, version="2.0.0"))
        later = IngestBatch(
            heartbeat_facts=[(parse_heartbeat("lab", "d1", raw), 200.0, raw.decode())]
        )
        store.write(later)
        (m,) = store.devices(fleet="lab")[0].models
        assert (m.version, m.drift, m.drift_samples) == ("2.0.0", None, None)
        assert store.prune_heartbeats(102.5) == 2
        assert [p.at for p in store.drift_history("lab", 0.0)] == [103.0]


def point(at: float, drift: float | None, device: str = "d1", version: str = "1.0.0") -> DriftPoint:
    return DriftPoint(device, "lin", version, at, drift, None, 1500)


POLICY = DriftPolicy(threshold=0.25, window_s=600.0)


def test_an_alert_needs_drift_above_the_threshold_for_the_whole_window() -> None:
    now = 10_000.0
    above = [point(now - 700 + 10 * i, 0.4) for i in range(71)]  # 700 s above, to now
    alerts = drift_alerts(above, now, POLICY)
    assert set(alerts) == {("d1", "lin")} and alerts[("d1", "lin")].since == now - 700
    # Above for only 500 s: not yet.
    assert drift_alerts(above[20:], now, POLICY) == {}
    # One point at or below the threshold inside the window restarts the run.
    dipped = [*above[:50], point(above[50].at, 0.25), *above[51:]]
    assert drift_alerts(dipped, now, POLICY) == {}
    # Points without a score neither start nor end a run.
    gaps = [p if i % 3 else point(p.at, None) for i, p in enumerate(above)]
    assert set(drift_alerts(gaps, now, POLICY)) == {("d1", "lin")}
    # Silent for longer than the window: stale, not drifting.
    assert drift_alerts(above, now + 700, POLICY) == {}
    # Another version's points do not count for the version the device runs now.
    assert drift_alerts(above, now, POLICY, {("d1", "lin"): "2.0.0"}) == {}
    # The threshold is the operator's.
    assert drift_alerts(above, now, DriftPolicy(threshold=0.5, window_s=600.0)) == {}


def test_latest_drift_is_each_devices_newest_score() -> None:
    points = [point(1, 0.5), point(2, 0.1), point(3, None), point(1, 0.3, device="d2")]
    assert latest_drift(points) == {"d1": 0.1, "d2": 0.3}


@pytest.mark.parametrize("backend", ["sqlite"])
def test_fleet_status_and_device_show_print_drift_and_mark_the_alert(
    backend: str, tmp_path: Path
) -> None:
    with store_for(backend, tmp_path) as store:
        batch = IngestBatch()
        for device, drift, samples in (("d1", 0.41, 1500), ("d2", 0.02, 1500), ("d3", None, 40)):
            raw = telemetry_payload(beat(device, 1, drift, samples))
            batch.heartbeat_facts.append(
                (parse_heartbeat("lab", device, raw), 1000.0, raw.decode())
            )
        raw = telemetry_payload(beat("d4", 1, None, samples=None))
        batch.heartbeat_facts.append((parse_heartbeat("lab", "d4", raw), 1000.0, raw.decode()))
        store.write(batch)
        rows = store.devices(fleet="lab")
    alerts = {
        ("d1", "lin"): drift_alerts([point(300.0, 0.41), point(1000.0, 0.41)], 1000.0, POLICY)[
            ("d1", "lin")
        ]
    }
    table = render_fleet_table(rows, 1000.0, StalePolicy(), alerts=alerts, drift_policy=POLICY)
    lines = {line.split()[1]: line for line in table.splitlines()[1:5]}
    assert "0.410 !" in lines["d1"] and "0.020" in lines["d2"] and "!" not in lines["d2"]
    assert "- (40)" in lines["d3"] and "n/a" in lines["d4"]
    assert "1 drifting (!: drift above 0.25 for 10m or more)" in table
    doc = device_json(rows[0], 1000.0, StalePolicy(), None, alerts)["models"]["lin"]
    assert doc["drift"] == 0.41 and doc["drift_samples"] == 1500
    assert doc["drift_alert"] == {"since": "1970-01-01T00:05:00Z", "drift": 0.41}
    assert device_json(rows[3], 1000.0, StalePolicy())["models"]["lin"]["drift_samples"] is None
    shown = render_device(rows[:1], [], [], 1000.0, StalePolicy(), (), alerts)
    assert "drift: 0.410 (PSI of outputs), inputs 0.410, on 1500 samples; above" in shown


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_metrics_give_the_drift_of_each_version_from_the_store_as_from_rows(
    backend: str, tmp_path: Path
) -> None:
    from controller.serve.metrics import aggregate_rows, render_aggregates

    with store_for(backend, tmp_path) as store:
        batch = IngestBatch()
        for device, drift in (("d1", 0.4), ("d2", 0.1), ("d3", None)):
            raw = telemetry_payload(beat(device, 1, drift))
            facts = parse_heartbeat("lab", device, raw)
            batch.heartbeat_facts.append((facts, 1000.0, raw.decode()))
        store.write(batch)
        aggregates = store.fleet_aggregates(1000.0, 10.0, 3.0)
        rows = store.devices()
    assert aggregates.drift == {("lab", "lin", "1.0.0"): (0.4, pytest.approx(0.25), 2, 1)}
    assert aggregate_rows(rows, 1000.0, StalePolicy()).drift == aggregates.drift
    text = render_aggregates(aggregates, [], {})
    labels = '{fleet="lab",model="lin",version="1.0.0"}'
    assert f"edgefleet_model_drift_max{labels} 0.4" in text
    assert f"edgefleet_model_drift_devices{labels} 2" in text
    assert f"edgefleet_model_drift_significant_devices{labels} 1" in text
    # Every series has its HELP and TYPE lines even without a sample.
    empty = render_aggregates(FleetAggregates({}, {}, {}), [], {})
    assert "# TYPE edgefleet_model_drift_mean gauge" in empty
