"""The telemetry store against both backends: SQLite and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from agent.contracts import (
    Event,
    Heartbeat,
    ModelFigures,
    Status,
    SystemFigures,
    telemetry_payload,
)
from controller.fleet.records import DeviceRow, IngestBatch
from controller.fleet.status import StalePolicy, health, render_fleet_table
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import is_postgres, open_store
from controller.serve.metrics import render_metrics
from tests.controller.test_store_support import store_location


def beat(
    device: str, requests: int, version: str = "1.0.0", fleet: str = "lab", seq: int = 1
) -> Heartbeat:
    return Heartbeat(
        device=device,
        fleet=fleet,
        at=f"2026-01-01T00:00:{seq:02}Z",
        seq=seq,
        interval_s=10.0,
        agent_version="0.1.0",
        uptime_s=5.0,
        system=SystemFigures(cpu_percent=12.5, disk_free_bytes=10**9),
        models={"lin": ModelFigures(version, "committed", requests, 1, 0, 0.001, 0.002, 0.004)},
        outbox_pending=2,
        outbox_dropped=3,
    )


def event(device: str, seq: int, kind: str = "install_started", stream: str = "s1") -> Event:
    return Event(device, "lab", stream, seq, "2026-01-01T00:00:00Z", kind, "lin", "2.0.0")


def status(device: str, online: bool, models: dict[str, dict[str, str]]) -> Status:
    return Status(device, "lab", online, "0.1.0", models, "2026-01-01T00:00:00Z")


def test_a_batch_is_stored_and_read_back(store: TelemetryStore) -> None:
    batch = IngestBatch(
        heartbeats=[(beat("d1", 10), 100.0), (beat("d2", 20, "2.0.0"), 100.0)],
        events=[(event("d1", 1), 100.0), (event("d1", 2, "verified"), 100.5)],
        statuses=[(status("d1", True, {"lin": {"version": "1.0.0", "state": "committed"}}), 99.0)],
    )
    assert store.write(batch) == 5
    devices = {d.device: d for d in store.devices()}
    assert set(devices) == {"d1", "d2"}
    d1 = devices["d1"]
    assert d1.online is True and d1.last_seen == 100.5 and d1.interval_s == 10.0
    assert d1.outbox_pending == 2 and d1.outbox_dropped == 3
    assert d1.system["cpu_percent"] == 12.5
    (model,) = d1.models
    assert (model.model, model.version, model.requests, model.errors) == ("lin", "1.0.0", 10, 1)
    assert model.p99_s == pytest.approx(0.004)
    assert devices["d2"].online is None  # no status seen yet
    assert [e.seq for e in store.events(device="d1")] == [1, 2]
    assert [b.payload["models"]["lin"]["requests"] for b in store.heartbeats("d2")] == [20]
    assert sorted(store.event_counts()) == [("lab", "install_started", 1), ("lab", "verified", 1)]


def test_duplicate_events_are_stored_once_and_new_streams_are_kept(store: TelemetryStore) -> None:
    store.write(IngestBatch(events=[(event("d1", 1), 1.0), (event("d1", 2), 1.0)]))
    store.write(IngestBatch(events=[(event("d1", 2), 2.0), (event("d1", 3), 2.0)]))
    store.write(IngestBatch(events=[(event("d1", 1, stream="s2"), 3.0)]))
    assert [(e.stream, e.seq) for e in store.events(device="d1")] == [
        ("s1", 1),
        ("s1", 2),
        ("s1", 3),
        ("s2", 1),
    ]
    assert store.count("events") == 4


def test_an_older_heartbeat_does_not_overwrite_a_newer_one(store: TelemetryStore) -> None:
    store.write(IngestBatch(heartbeats=[(beat("d1", 50, "2.0.0", seq=2), 200.0)]))
    store.write(IngestBatch(heartbeats=[(beat("d1", 5, "1.0.0", seq=1), 150.0)]))
    (device,) = store.devices()
    assert device.last_seen == 200.0
    assert (device.models[0].version, device.models[0].requests) == ("2.0.0", 50)
    assert store.count("heartbeats") == 2  # history keeps both


def test_a_redelivered_heartbeat_adds_one_history_row(store: TelemetryStore) -> None:
    # The broker sends a QoS 1 heartbeat again when its acknowledgement was lost: same
    # device, same at and seq, received later, in the same batch or a later one.
    store.write(IngestBatch(heartbeats=[(beat("d1", 7), 100.0), (beat("d1", 7), 100.5)]))
    store.write(IngestBatch(heartbeats=[(beat("d1", 7), 101.0), (beat("d2", 7), 101.0)]))
    assert [b.payload["seq"] for b in store.heartbeats("d1")] == [1]
    assert store.count("heartbeats") == 2
    # After a restart the agent counts from 1 again, at another time: a new heartbeat.
    restarted = Heartbeat(**{**beat("d1", 3).__dict__, "at": "2026-01-02T00:00:00Z"})
    store.write(IngestBatch(heartbeats=[(restarted, 200.0)]))
    assert [b.payload["at"][:10] for b in store.heartbeats("d1")] == ["2026-01-01", "2026-01-02"]


def test_a_heartbeat_without_at_or_seq_has_no_key_and_is_always_added(
    store: TelemetryStore,
) -> None:
    # Not our agent's: a device whose at never changes must not stop its own history.
    no_at = Heartbeat(**{**beat("d1", 7).__dict__, "at": ""})
    no_seq = Heartbeat(**{**beat("d2", 7).__dict__, "seq": 0})
    store.write(IngestBatch(heartbeats=[(no_at, 1.0), (no_seq, 1.0), (no_at, 2.0)]))
    store.write(IngestBatch(heartbeats=[(no_at, 3.0), (no_seq, 3.0)]))
    assert [len(store.heartbeats(d)) for d in ("d1", "d2")] == [3, 2]


# The heartbeats table as the first release created it: no at, no seq, no key.
_FIRST_HEARTBEATS = (
    "CREATE TABLE heartbeats (id {serial}, fleet TEXT NOT NULL, device TEXT NOT NULL, "
    "received_at DOUBLE PRECISION NOT NULL, payload TEXT NOT NULL)"
)


def _make_first_release_store(location: str, duplicates: int) -> None:
    """A store as the first release left it, holding ``duplicates`` copies of one beat."""
    payload = telemetry_payload(beat("d1", 7)).decode()
    rows = [("lab", "d1", 100.0 + i, payload) for i in range(duplicates)]
    insert = "INSERT INTO heartbeats (fleet, device, received_at, payload) VALUES "
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as pg:
            pg.execute(_FIRST_HEARTBEATS.format(serial="BIGSERIAL PRIMARY KEY"))
            pg.cursor().executemany(insert + "(%s, %s, %s, %s)", rows)
        return
    with closing(sqlite3.connect(location)) as lite, lite:
        lite.execute(_FIRST_HEARTBEATS.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT"))
        lite.executemany(insert + "(?, ?, ?, ?)", rows)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_of_the_first_release_holding_duplicates_is_upgraded(
    tmp_path: Path, backend: str
) -> None:
    with store_location(backend, tmp_path) as location:
        _make_first_release_store(location, duplicates=2)
        # The rows stored before have no key: both kept, and the same heartbeat once more
        # (its first keyed copy); the second start finds the store upgraded.
        for start, expected in ((1, [2, 3, 3, 4]), (2, [4, 4, 4, 4])):
            store = open_store(location)
            try:
                counts = [store.count("heartbeats")]
                for received in (200.0, 300.0):
                    store.write(IngestBatch(heartbeats=[(beat("d1", 7), received + start)]))
                    counts.append(store.count("heartbeats"))
                store.write(IngestBatch(heartbeats=[(beat("d1", 8, seq=2), 400.0 + start)]))
                assert [*counts, store.count("heartbeats")] == expected
            finally:
                store.close()


def test_the_last_will_says_offline_and_keeps_the_versions(store: TelemetryStore) -> None:
    running = {"lin": {"version": "2.0.0", "state": "committed"}}
    store.write(IngestBatch(statuses=[(status("d1", True, running), 10.0)]))
    store.write(IngestBatch(heartbeats=[(beat("d1", 7, "2.0.0"), 11.0)]))
    store.write(IngestBatch(statuses=[(status("d1", False, {}), 12.0)]))
    (device,) = store.devices()
    assert device.online is False
    assert device.models[0].version == "2.0.0" and device.models[0].requests == 7


def test_filters_by_fleet_and_model(store: TelemetryStore) -> None:
    other = Heartbeat(**{**beat("d3", 1, fleet="north").__dict__, "models": {}})
    store.write(IngestBatch(heartbeats=[(beat("d1", 1), 1.0), (beat("d2", 1), 1.0), (other, 1.0)]))
    assert [d.device for d in store.devices(fleet="lab")] == ["d1", "d2"]
    assert [d.device for d in store.devices(model="lin")] == ["d1", "d2"]
    assert [d.device for d in store.devices(fleet="north")] == ["d3"]
    assert store.devices(model="other") == []


def test_filters_by_device_id_in_every_fleet_with_only_its_models(store: TelemetryStore) -> None:
    """``edgectl fleet device show`` reads one device, not the fleet's every row."""
    store.write(
        IngestBatch(
            heartbeats=[
                (beat("d1", 5, fleet="lab"), 1.0),
                (beat("d1", 7, "2.0.0", fleet="north"), 2.0),
                (beat("d2", 9), 1.0),
            ]
        )
    )
    found = store.devices(device="d1")
    assert [(d.fleet, d.device) for d in found] == [("lab", "d1"), ("north", "d1")]
    assert [[(m.version, m.requests) for m in d.models] for d in found] == [
        [("1.0.0", 5)],
        [("2.0.0", 7)],
    ]
    assert [d.fleet for d in store.devices(fleet="north", device="d1")] == ["north"]
    assert store.devices(fleet="north", device="d2") == []
    assert [d.device for d in store.devices(device="d2", model="lin")] == ["d2"]
    assert store.devices(device="d9") == []


def test_old_heartbeats_are_pruned(store: TelemetryStore) -> None:
    store.write(IngestBatch(heartbeats=[(beat("d1", 1), 100.0), (beat("d1", 2, seq=2), 200.0)]))
    assert store.prune_heartbeats(150.0) == 1
    assert [b.received_at for b in store.heartbeats("d1")] == [200.0]


def test_events_are_pruned_by_age_and_to_each_devices_newest(store: TelemetryStore) -> None:
    """Issue 18: the events table grew without bound; a device flooding it now fills only
    its own share, and old events go after the retention period."""

    def events(device: str, seqs: range, received: float) -> list[tuple[Event, float]]:
        return [(Event(device, "lab", "s", n, "t", "committed", "m", "1"), received) for n in seqs]

    store.write(
        IngestBatch(
            events=events("quiet", range(1, 11), 100.0)  # old
            + events("quiet", range(11, 16), 300.0)
            + events("flood", range(1, 51), 300.0)
        )
    )
    assert store.prune_events(before=200.0, max_per_device=20) == 10 + 30
    assert [e.seq for e in store.events(device="quiet")] == list(range(11, 16))
    assert [e.seq for e in store.events(device="flood", limit=100)] == list(range(31, 51))
    # Later passes look only at devices heard from since the last one.
    store.write(IngestBatch(events=events("flood", range(51, 61), 400.0)))
    assert store.prune_events(before=0.0, max_per_device=20, active_since=350.0) == 10
    assert [e.seq for e in store.events(device="flood", limit=100)] == list(range(41, 61))
    assert store.prune_events(before=0.0, max_per_device=3, active_since=450.0) == 0


# ---------------------------------------------------------------------------- pure views


def _row(online: bool | None, last_seen: float, interval_s: float | None = 10.0) -> DeviceRow:
    return DeviceRow("lab", "d1", online, None, last_seen, "0.1.0", interval_s, {}, 0, 0)


def test_health_stale_after_three_silent_intervals_even_when_online() -> None:
    policy = StalePolicy(default_interval_s=60.0, stale_after=3.0)
    assert health(_row(True, 1000.0), 1029.0, policy) == "online"
    assert health(_row(True, 1000.0), 1031.0, policy) == "stale"
    assert health(_row(None, 1000.0), 1031.0, policy) == "stale"
    assert health(_row(False, 1000.0), 1001.0, policy) == "offline"
    # A device that never said its interval is judged on the configured default.
    assert health(_row(True, 1000.0, None), 1170.0, policy) == "online"
    assert health(_row(True, 1000.0, None), 1190.0, policy) == "stale"


def test_table_and_metrics_render_what_the_store_holds(store: TelemetryStore) -> None:
    store.write(
        IngestBatch(
            heartbeats=[(beat("d1", 10), 100.0), (beat("d2", 10, "2.0.0"), 50.0)],
            events=[(event("d1", 1, "rolled_back"), 100.0)],
        )
    )
    rows = store.devices()
    policy = StalePolicy()
    table = render_fleet_table(rows, 101.0, policy)
    assert "d1" in table and "online" in table and "10.0" in table  # 1 error in 10 requests
    assert "d2" in table and "stale" in table
    text = render_metrics(rows, store.event_counts(), {"heartbeats": 2}, 101.0, policy)
    assert 'edgefleet_devices{fleet="lab",health="online"} 1' in text
    assert 'edgefleet_devices{fleet="lab",health="stale"} 1' in text
    assert (
        'edgefleet_model_devices{fleet="lab",model="lin",version="2.0.0",state="committed"} 1'
        in text
    )
    assert 'edgefleet_events_total{fleet="lab",kind="rolled_back"} 1' in text
    assert 'edgefleet_device_events_dropped{fleet="lab"} 6' in text
    # Counters past a million are written in full, not rounded to six digits.
    big = render_metrics(rows, [], {"heartbeats": 1_234_567_891}, 101.0, policy)
    assert 'edgefleet_ingest_messages_total{kind="heartbeats"} 1234567891' in big


def test_postgres_sends_a_heartbeat_batch_as_one_statement_per_table() -> None:
    from controller.fleet.postgres import _BULK_TYPES, bulk_statement

    for statement, types in _BULK_TYPES.items():
        bulk = bulk_statement(statement, types)
        assert "VALUES" not in bulk and "?" not in bulk
        assert bulk.count("::") == len(types) == statement.count("?")
        assert bulk.split("SELECT * FROM unnest(")[1].startswith("%b::text[], %b::text[]")
    with pytest.raises(ValueError, match="one row of 2 parameters"):
        bulk_statement("INSERT INTO t (a, b) VALUES (?, ?), (?, ?)", ("int4", "int4"))
