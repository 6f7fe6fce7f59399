"""Nothing in the telemetry store grows forever (issue 19, item 9), on SQLite and a real
PostgreSQL: devices gone silent or revoked are forgotten, model rows a device stopped
reporting are dropped, and ``/metrics`` counts events from counters kept as they are
stored (never lowered by pruning), not from a scan of every event."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from agent.contracts import Event
from controller.fleet.records import HeartbeatFacts, IngestBatch, ModelFacts
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import is_postgres, open_store
from tests.controller.test_store_support import store_location

DAY = 86400.0
T0 = 1_800_000_000.0


def event(device: str, seq: int, kind: str = "install_started", fleet: str = "lab") -> Event:
    return Event(device, fleet, "s", seq, "t", kind, "lin", "2.0.0")


def model(name: str) -> ModelFacts:
    return (name, "1.0.0", "committed", 1, 0, 0, None)


def beat(device: str, at: float, *models: str, fleet: str = "lab") -> IngestBatch:
    facts = HeartbeatFacts(fleet, device, "0.1.0", 10.0, {}, 0, 0, tuple(map(model, models)))
    return IngestBatch(heartbeat_facts=[(facts, at, "{}")])


def counts(store: TelemetryStore) -> dict[tuple[str, str], int]:
    return {(f, k): n for f, k, n in store.event_counts()}


def test_event_counts_are_counted_once_and_outlive_pruning(store: TelemetryStore) -> None:
    batch = [(event("d1", 1), T0), (event("d1", 2, "committed"), T0), (event("d2", 1), T0)]
    store.write(IngestBatch(events=batch))
    store.write(IngestBatch(events=batch[:2]))  # redelivered: not counted again
    store.write(IngestBatch(events=[(event("d9", 1, fleet="other"), T0 + 1)]))
    want = {("lab", "install_started"): 2, ("lab", "committed"): 1, ("other", "install_started"): 1}
    assert counts(store) == want
    # Pruning forgets the events, not that they were stored: a counter never goes down.
    assert store.prune_events(before=T0 + 1, max_per_device=1000) == 3
    assert store.count("events") == 1
    assert counts(store) == want


def _drop_event_counts(location: str) -> None:
    """What a store made before the counts looks like: events, and no event_counts."""
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as pg:
            pg.execute("DROP TABLE event_counts")
        return
    with closing(sqlite3.connect(location)) as lite, lite:
        lite.execute("DROP TABLE event_counts")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_made_before_the_counts_counts_the_events_it_holds(
    tmp_path: Path, backend: str
) -> None:
    with store_location(backend, tmp_path) as location:
        store = open_store(location)
        store.write(IngestBatch(events=[(event("d1", 1), T0), (event("d1", 2, "committed"), T0)]))
        store.close()
        _drop_event_counts(location)
        for _start in range(2):  # counted once, on the first start that lacks the table
            store = open_store(location)
            try:
                assert counts(store) == {("lab", "install_started"): 1, ("lab", "committed"): 1}
            finally:
                store.close()


def test_two_postgres_writers_count_exactly_what_was_stored(tmp_path: Path) -> None:
    """Workers of a shared subscription write at once, a redelivery to both included."""
    with store_location("postgres", tmp_path) as location:
        stores = [open_store(location), open_store(location)]
        try:

            def work(store: TelemetryStore, offset: int) -> None:
                for n in range(20):
                    rows = [
                        (event(f"d{(offset + n + i) % 30}", n, ("a", "b", "c")[i % 3]), T0)
                        for i in range(30)
                    ]
                    store.write(IngestBatch(events=rows))

            threads = [threading.Thread(target=work, args=(s, k)) for k, s in enumerate(stores)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stored = stores[0].events(limit=10**6)
            assert sum(counts(stores[0]).values()) == len(stored) > 0
        finally:
            for s in stores:
                s.close()


def test_silent_and_revoked_devices_are_forgotten(store: TelemetryStore) -> None:
    store.write(beat("old", T0 - 100 * DAY, "lin"))  # silent for 100 days
    store.write(beat("revoked", T0 - 2 * DAY, "lin"))  # revoked, silent since
    store.write(beat("revoked-now", T0 - 60.0, "lin"))  # revoked a minute ago
    store.write(beat("live", T0 - 60.0, "lin"))
    store.write(beat("quiet", T0 - 30 * DAY, "lin"))  # away a month: kept
    revoked = [("lab", "revoked"), ("lab", "revoked-now")]
    removed = store.prune_devices(T0 - 90 * DAY, revoked, revoked_before=T0 - DAY)
    assert removed == 2
    assert [d.device for d in store.devices()] == ["live", "quiet", "revoked-now"]
    assert store.count("device_models") == 3 and store.count("heartbeats") == 3
    # A forgotten device that reports again is stored anew.
    store.write(beat("old", T0, "lin"))
    assert "old" in {d.device for d in store.devices()}


def test_models_a_device_stopped_reporting_are_dropped(store: TelemetryStore) -> None:
    store.write(beat("d1", T0 - 10 * DAY, "lin", "gone"))
    store.write(beat("d1", T0 - 60.0, "lin"))  # still heartbeating, "gone" no longer named
    store.write(beat("away", T0 - 10 * DAY, "lin"))  # silent since: its model stays
    assert store.prune_models(before=T0 - 7 * DAY) == 1
    kept = {(d.device, m.model) for d in store.devices() for m in d.models}
    assert kept == {("d1", "lin"), ("away", "lin")}
