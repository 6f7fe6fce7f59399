"""Events keep the rollout they were sent under, and a store made before that learns it
(issue 19, item 8), on SQLite and a real PostgreSQL."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from agent.contracts import Event
from controller.fleet.records import IngestBatch
from controller.fleet.stores import is_postgres, open_store
from tests.controller.test_store_support import store_location

# The events table as releases before the rollout id made it.
_OLD_EVENTS = """CREATE TABLE events (
    id {serial}, fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL,
    seq BIGINT NOT NULL, at TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL, model TEXT, version TEXT, previous TEXT, phase TEXT,
    reason TEXT NOT NULL DEFAULT '',
    UNIQUE (fleet, device, stream, seq))"""
_OLD_ROW = ("lab", "d1", "s", 1, "t", 100.0, "rolled_back", "lin", "2.0.0", None, None, "")


def _make_old_store(location: str) -> None:
    insert = (
        "INSERT INTO events (fleet, device, stream, seq, at, received_at, kind, model, "
        "version, previous, phase, reason) VALUES "
    )
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as pg:
            pg.execute(_OLD_EVENTS.format(serial="BIGSERIAL PRIMARY KEY"))
            pg.execute(insert + "(" + ", ".join(["%s"] * 12) + ")", _OLD_ROW)
        return
    with closing(sqlite3.connect(location)) as lite, lite:
        lite.execute(_OLD_EVENTS.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT"))
        lite.execute(insert + "(" + ", ".join(["?"] * 12) + ")", _OLD_ROW)


def event(device: str, seq: int, kind: str, rollout_id: str) -> tuple[Event, float]:
    e = Event(device, "lab", "s", seq, "t", kind, "lin", "2.0.0", rollout_id=rollout_id)
    return e, 100.0 + seq


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_made_before_the_rollout_id_is_upgraded(tmp_path: Path, backend: str) -> None:
    with store_location(backend, tmp_path) as location:
        _make_old_store(location)
        for start in (1, 2):  # the second start finds it upgraded already
            store = open_store(location)
            try:
                store.write(IngestBatch(events=[event("d1", 1 + start, "committed", "r-new")]))
                rows = store.events(device="d1")
                assert [(e.seq, e.rollout_id) for e in rows][:2] == [(1, ""), (2, "r-new")]
                # The old row names no rollout: it counts for any rollout of its version.
                for rollout_id in ("r-new", "r-other"):
                    kept = store.rollout_events(
                        "lab", rollout_id, "lin", "2.0.0", 0.0, ("rolled_back",)
                    )
                    kinds = {(e.seq, e.kind) for e in kept}
                    assert (1, "rolled_back") in kinds
                    mine = (1 + start, "committed") in kinds  # the latest other event
                    assert mine == (rollout_id == "r-new")
            finally:
                store.close()


def test_rollout_events_are_those_of_the_rollout_reduced_per_device(tmp_path: Path) -> None:
    for backend in ("sqlite", "postgres"):
        with store_location(backend, tmp_path / backend) as location:
            store = open_store(location)
            try:
                store.write(
                    IngestBatch(
                        events=[
                            event("d1", 1, "install_failed", "r-1"),
                            event("d1", 2, "install_started", "r-1"),
                            event("d1", 3, "install_failed", "r-1"),
                            event("d1", 4, "committed", "r-1"),
                            event("d1", 5, "rolled_back", "r-0"),  # another rollout's
                            event("d2", 6, "install_started", "r-1"),
                        ]
                    )
                )
                got = store.rollout_events("lab", "r-1", "lin", "2.0.0", 0.0, ("install_failed",))
                assert [(e.device, e.seq, e.kind) for e in got] == [
                    ("d1", 3, "install_failed"),
                    ("d1", 4, "committed"),
                    ("d2", 6, "install_started"),
                ]
                since = store.rollout_events("lab", "r-1", "lin", "2.0.0", 104.5, ())
                assert [(e.device, e.seq) for e in since] == [("d2", 6)]
            finally:
                store.close()
