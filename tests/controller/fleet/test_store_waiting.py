"""A device's waiting reason (why it does not install what desired state names) through
ingestion and the store, on both backends: parsed alike on the hot path and by the
contract, stored from heartbeats and status messages, cleared when the device no longer
waits, added to a store made before the column, and shown by ``fleet status``."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from agent.contracts import (
    MAX_DETAIL,
    Heartbeat,
    ModelFigures,
    PayloadError,
    Status,
    SystemFigures,
    Waiting,
    parse_status,
    parse_telemetry,
    status_payload,
    telemetry_payload,
)
from controller.fleet.payloads import parse_heartbeat
from controller.fleet.records import IngestBatch, heartbeat_facts
from controller.fleet.status import StalePolicy, device_json, render_device, render_fleet_table
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import is_postgres, open_store
from tests.controller.test_store_support import store_location

PROBATION = Waiting(
    "probation", "waits until probation of 1.0.0 ends (in 30 s)", "2.0.0", "2026-01-01T00:00:00Z"
)


def beat(device: str, seq: int, waiting: Waiting | None, version: str = "1.0.0") -> Heartbeat:
    return Heartbeat(
        device=device,
        fleet="lab",
        at=f"2026-01-01T00:00:{seq:02}Z",
        seq=seq,
        interval_s=10.0,
        agent_version="0.1.0",
        uptime_s=5.0,
        system=SystemFigures(),
        models={"lin": ModelFigures(version, "active", 3, 0, 0, waiting=waiting)},
    )


def status(device: str, models: dict[str, dict[str, object]]) -> Status:
    raw = status_payload(device, "lab", True, models, "0.1.0", "2026-01-01T00:00:00Z")
    return parse_status(raw)


def test_a_heartbeat_without_a_reason_is_the_payload_it_was() -> None:
    doc = json.loads(telemetry_payload(beat("d1", 1, None)))
    assert "waiting" not in doc["models"]["lin"]
    assert parse_telemetry(telemetry_payload(beat("d1", 1, None))).models["lin"].waiting is None


def test_the_hot_path_and_the_contract_read_a_reason_alike() -> None:
    raw = telemetry_payload(beat("d1", 1, PROBATION))
    assert parse_telemetry(raw).models["lin"].waiting == PROBATION
    fast = parse_heartbeat("lab", "d1", raw)
    assert fast == heartbeat_facts(parse_telemetry(raw))
    assert [name for name, _text in fast.waiting] == ["lin"]


def test_a_reason_no_store_can_hold_is_refused_on_both_paths_and_an_odd_one_ignored() -> None:
    doc = json.loads(telemetry_payload(beat("d1", 1, PROBATION)))
    doc["models"]["lin"]["waiting"]["detail"] = "x" * (MAX_DETAIL + 1)
    raw = json.dumps(doc).encode()
    for parse in (parse_telemetry, lambda r: parse_heartbeat("lab", "d1", r)):
        with pytest.raises(PayloadError, match=r"waiting\.detail expected at most 1000"):
            parse(raw)
    doc["models"]["lin"]["waiting"] = {"no": "code"}  # not a reason: as if absent
    raw = json.dumps(doc).encode()
    assert parse_telemetry(raw).models["lin"].waiting is None
    assert parse_heartbeat("lab", "d1", raw).waiting == ()


def test_a_reason_is_stored_from_heartbeats_and_statuses_and_cleared(
    store: TelemetryStore,
) -> None:
    store.write(IngestBatch(heartbeats=[(beat("d1", 1, PROBATION), 100.0)]))
    (row,) = store.devices()
    assert row.models[0].waiting == PROBATION
    assert store.waiting("lab", "lin") == {"d1": PROBATION}
    assert store.waiting("lab", "other") == {} and store.waiting("prod", "lin") == {}
    # An older heartbeat without it does not clear it; the newer one does.
    store.write(IngestBatch(heartbeats=[(beat("d1", 2, None), 90.0)]))
    assert store.devices()[0].models[0].waiting == PROBATION
    store.write(IngestBatch(heartbeats=[(beat("d1", 3, None, "2.0.0"), 110.0)]))
    assert store.devices()[0].models[0].waiting is None
    # The retained status says it too (a model not served yet: version None).
    no_room = Waiting("no_space", "need 10 bytes, have 1", "1.0.0", "2026-01-01T00:00:05Z")
    models: dict[str, dict[str, object]] = {
        "lin": {"version": "2.0.0", "state": "committed"},
        "new": {"version": None, "state": "idle", "waiting": no_room.__dict__},
    }
    store.write(IngestBatch(statuses=[(status("d1", models), 120.0)]))
    (row,) = store.devices()
    assert {m.model: m.waiting for m in row.models} == {"lin": None, "new": no_room}
    assert {m.model: m.version for m in row.models} == {"lin": "2.0.0", "new": None}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_made_before_the_reason_gains_its_column_and_keeps_its_rows(
    tmp_path: Path, backend: str
) -> None:
    with store_location(backend, tmp_path) as location:
        store = open_store(location)
        try:
            store.write(IngestBatch(heartbeats=[(beat("d1", 1, None), 100.0)]))
        finally:
            store.close()
        _drop_waiting_column(location)
        store = open_store(location)
        try:
            (row,) = store.devices()
            assert row.models[0].version == "1.0.0" and row.models[0].waiting is None
            store.write(IngestBatch(heartbeats=[(beat("d1", 2, PROBATION), 110.0)]))
            assert store.waiting("lab", "lin") == {"d1": PROBATION}
        finally:
            store.close()


def _drop_waiting_column(location: str) -> None:
    """Make the store look as the release before this column left it (without the
    column's index, made since)."""
    unindex = "DROP INDEX IF EXISTS device_models_waiting"
    drop = "ALTER TABLE device_models DROP COLUMN waiting"
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as pg:
            pg.execute(unindex)
            pg.execute(drop)
        return
    with closing(sqlite3.connect(location)) as lite, lite:
        lite.execute(unindex)
        lite.execute(drop)
        columns = [r[1] for r in lite.execute("PRAGMA table_info(device_models)")]
        assert "waiting" not in columns


def test_fleet_status_and_device_show_say_why_a_device_waits(store: TelemetryStore) -> None:
    store.write(
        IngestBatch(heartbeats=[(beat("d1", 1, PROBATION), 100.0), (beat("d2", 1, None), 100.0)])
    )
    rows = store.devices()
    now = 1767225630.0  # 2026-01-01T00:00:30Z: 30 s after the reason's since
    table = render_fleet_table(rows, now, StalePolicy())
    assert table.splitlines()[-1] == (
        "  lab/d1 lin: probation for 2.0.0, 30s: waits until probation of 1.0.0 ends (in 30 s)"
    )
    assert "waiting (see docs/rollouts.md" in table and "lab/d2" not in table.split("waiting")[-1]
    assert device_json(rows[0], now, StalePolicy())["models"]["lin"]["waiting"] == {
        "code": "probation",
        "detail": PROBATION.detail,
        "version": "2.0.0",
        "since": PROBATION.since,
    }
    assert device_json(rows[1], now, StalePolicy())["models"]["lin"]["waiting"] is None
    shown = render_device(rows[:1], [], [], now, StalePolicy())
    assert "    waiting: probation for 2.0.0, 30s: waits until probation" in shown
