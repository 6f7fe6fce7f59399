"""``fleet_counts`` reads counts the store keeps (``store.rollout_census``: tables kept by
triggers) and the fleet's ids only when devices came or went. After every round of a
random mix of what changes them (heartbeats and statuses moving versions and waiting
reasons, late messages that must change nothing, devices appearing through events alone,
silent and revoked devices pruned and coming back, model rows pruned, the stage moving)
its counts equal those counted from scratch from the device rows, and the count tables
equal a count of the rows they count, on SQLite and PostgreSQL. One service lives through
all the rounds, so what it keeps between ticks is checked too."""

from __future__ import annotations

import random
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import Event, Waiting, parse_status, status_payload
from controller.fleet import store as store_module
from controller.fleet.records import HeartbeatFacts, IngestBatch, waiting_json
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import is_postgres, open_store
from controller.rollout.service import RolloutService, place_rollout
from tests.controller.rollout.test_evidence import (
    FLEET,
    MODEL,
    SETTINGS,
    T0,
    _reference_counts,
    _rollout,
)
from tests.controller.test_store_support import store_location

DEVICES = [f"dev-{i:03d}" for i in range(120)]
VERSIONS = ("1.0.0", "2.0.0", None)


def _waits(rng: random.Random, names: list[str], minute: int) -> tuple[tuple[str, str], ...]:
    out = []
    for name in names:
        code = rng.choice(("probation", "no_space", None, None))
        if code is not None:
            version = rng.choice(("2.0.0", "1.5.0", None))
            since = f"2026-01-01T00:{minute % 60:02d}:{rng.randrange(60):02d}Z"
            out.append((name, waiting_json(Waiting(code, "d", version, since)) or ""))
    return tuple(out)


def _round(rng: random.Random, now: float, seq: int, stored: list[str], joins: bool) -> IngestBatch:
    """Heartbeats, statuses and (``joins``) events; without ``joins`` only from devices
    ``stored``, so that no device row is added (the service's ids stay valid)."""
    batch = IngestBatch()
    pool = DEVICES if joins else stored
    for device in rng.sample(pool, min(40, len(pool))):
        fleet = FLEET if device < "dev-100" else "other"
        names = sorted(rng.sample((MODEL, "aux"), rng.randrange(1, 3)))
        models = tuple((name, rng.choice(VERSIONS), "committed", 1, 0, 0, None) for name in names)
        # A late heartbeat (received before what is stored) must change nothing.
        at = now - rng.choice((0.0, 0.0, 0.0, 50.0))
        facts = HeartbeatFacts(
            fleet, device, "t", 10.0, {}, 0, 0, models, f"t{seq}", seq, _waits(rng, names, seq)
        )
        batch.heartbeat_facts.append((facts, at + rng.random(), "{}"))
    for device in rng.sample([d for d in pool if d < "dev-100"], 8):
        version = rng.choice(VERSIONS)
        doc: dict[str, object] = {"version": version, "state": "committed"}
        if rng.random() < 0.5:
            doc["waiting"] = Waiting("probation", "d", rng.choice(("2.0.0", None)), None).__dict__
        raw = status_payload(device, FLEET, True, {MODEL: doc}, "t", "2026-01-01T00:00:00Z")
        batch.statuses.append((parse_status(raw), now - rng.choice((0.0, 0.0, 60.0))))
    # Devices the store first hears of through an event: a device row, no model rows.
    for k in range(2 if joins else 0):
        device = f"new-{seq:03d}-{k}"
        batch.events.append(
            (Event(device, FLEET, "s", 1, "", "committed", MODEL, "2.0.0"), now + rng.random())
        )
    return batch


def _table_counts(store: TelemetryStore) -> tuple[dict[str, int], dict[tuple[str, ...], int]]:
    """The count tables as they are and as the rows they count say, compared by the caller."""
    sizes: dict[str, int] = {}
    versions: dict[tuple[str, ...], int] = {}
    for row in store.devices():
        sizes[row.fleet] = sizes.get(row.fleet, 0) + 1
        for m in row.models:
            key = (row.fleet, m.model, m.version or "")
            versions[key] = versions.get(key, 0) + 1
    return sizes, versions


def _kept_counts(store: TelemetryStore) -> tuple[dict[str, int], dict[tuple[str, ...], int]]:
    with store._read() as cur:
        cur.execute("SELECT fleet, devices FROM fleet_sizes")
        sizes = {str(f): int(n) for f, n in cur.fetchall() if n}
        cur.execute("SELECT fleet, model, version, devices FROM model_versions")
        versions = {(str(f), str(m), str(v)): int(n) for f, m, v, n in cur.fetchall() if n}
    return sizes, versions


@pytest.mark.parametrize("placed", [False, True], ids=["ids-read", "placed-at-start"])
@pytest.mark.parametrize("keep", [10_000, 1])
def test_fleet_counts_equal_a_count_from_scratch_through_every_kind_of_change(
    store: TelemetryStore, keep: int, placed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the store's log of device changes kept (the service follows it) and pruned
    to one generation (the service reads the ids again when it fell behind); over ids
    the service read itself, or over places `edgectl rollout start` stored (a fleet
    already there; the changes since followed in memory)."""
    monkeypatch.setattr(store_module, "KEEP_CHANGES", keep)
    rng = random.Random(21)
    base = _rollout(T0)
    if placed:
        store.write(_round(rng, T0, 0, [], joins=True))
        place_rollout(store, base)
        assert store.count_places(base.id, 100.0) == len(store.devices(fleet=FLEET))
    full_reads = []
    read_ids = store.fleet_device_ids

    def counted(fleet: str) -> tuple[int, list[str]]:
        full_reads.append(fleet)
        return read_ids(fleet)

    monkeypatch.setattr(store, "fleet_device_ids", counted)
    service = RolloutService(Path("unused"), store, SETTINGS)
    seen_waiting = seen_prunes = 0
    for seq in range(1, 41):
        now = T0 + 10.0 * seq
        # Rounds that add devices, rounds that only change those stored, rounds that
        # only remove some: the service's ids must follow each.
        kind = seq % 4
        if kind in (1, 2) or seq < 4:
            stored = [row.device for row in store.devices()]
            store.write(_round(rng, now, seq, stored, joins=kind == 2 or seq < 4))
        if kind == 0:  # silent devices leave; revoked ones leave at once
            revoked = [(FLEET, d) for d in rng.sample(DEVICES[:100], 3)]
            seen_prunes += store.prune_devices(now - 45.0, revoked, now + 1.0)
        if kind == 3:  # model rows a device stopped naming
            store.prune_models(now - 15.0)
        stages = (rng.choice((1.0, 10.0, 40.0, 75.0)), 100.0)
        canaries = (*rng.sample(DEVICES, 3), "dev-never-seen")
        r = replace(base, stages=stages, stage=rng.randrange(2), canaries=canaries)
        want = _reference_counts(store, r)
        assert service.fleet_counts(r) == want, f"round {seq}"
        assert _kept_counts(store) == _table_counts(store), f"round {seq}"
        seen_waiting += sum(want["waiting"].values())
    # The mix did what it is for: devices waited, left and came back, versions moved.
    assert seen_waiting > 20 and seen_prunes > 10
    # The ids were read once (none when placed) and followed from then on, or read
    # again after a prune.
    if keep > 1:
        assert len(full_reads) == (0 if placed else 1)
    else:
        assert len(full_reads) > 5


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_made_before_the_count_tables_counts_the_rows_it_holds(
    tmp_path: Path, backend: str
) -> None:
    rng = random.Random(5)
    with store_location(backend, tmp_path) as location:
        store = open_store(location)
        try:
            store.write(_round(rng, T0, 1, [], joins=True))
        finally:
            store.close()
        # As the release before them left it: no count tables, no triggers.
        with connect(location) as db:
            for trigger, table in TRIGGERS:
                db.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (" ON " + table) * db.pg)
            db.execute("DROP TABLE fleet_sizes")
            db.execute("DROP TABLE model_versions")
        store = open_store(location)
        try:
            assert _kept_counts(store) == _table_counts(store)
            store.write(_round(rng, T0 + 10, 2, [], joins=True))
            assert _kept_counts(store) == _table_counts(store)
            r = _rollout(T0)
            want = _reference_counts(store, r)
            assert want["devices_known"] > 50
            assert RolloutService(Path("unused"), store, SETTINGS).fleet_counts(r) == want
        finally:
            store.close()


TRIGGERS = (
    ("devices_added", "devices"),
    ("devices_removed", "devices"),
    ("device_models_added", "device_models"),
    ("device_models_removed", "device_models"),
    ("device_models_moved", "device_models"),
)


class connect:
    """An autocommitting connection to the store at ``location``, either backend."""

    def __init__(self, location: str) -> None:
        self.pg = is_postgres(location)
        if self.pg:
            import psycopg

            self.conn: Any = psycopg.connect(location, autocommit=True)
        else:
            self.conn = sqlite3.connect(location, isolation_level=None)

    def __enter__(self) -> connect:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.conn.close()

    def execute(self, sql: str) -> None:
        self.conn.execute(sql)


def test_a_tick_misses_no_device_two_postgresql_writers_add_and_remove_meanwhile(
    tmp_path: Path,
) -> None:
    """Two workers (two stores on one database) add and remove devices of the fleet while
    the service ticks: its ids follow the log by generation, which the writers number in
    commit order, so once they stop its counts equal a count from scratch."""
    with store_location("postgres", tmp_path) as location:
        stores = [open_store(location) for _ in range(3)]
        try:
            reader = stores[2]
            service = RolloutService(Path("unused"), reader, SETTINGS)
            r = replace(_rollout(T0), stages=(50.0, 100.0))
            service.fleet_counts(r)  # the ids read once, before the writers start
            failures: list[BaseException] = []

            def work(store: TelemetryStore, seed: int) -> None:
                rng = random.Random(seed)
                try:
                    for k in range(40):
                        devices = [f"w{seed}-{k:02d}-{j}" for j in range(rng.randrange(1, 6))]
                        batch = IngestBatch()
                        for device in devices:
                            model = (MODEL, rng.choice(VERSIONS), "committed", 1, 0, 0, None)
                            facts = HeartbeatFacts(
                                FLEET, device, "t", 10.0, {}, 0, 0, (model,), "t", 1
                            )
                            batch.heartbeat_facts.append((facts, T0 + k, "{}"))
                        store.write(batch)
                        if k % 3 == 2:  # the devices of an earlier round revoked
                            gone = [(FLEET, f"w{seed}-{k - 2:02d}-{j}") for j in range(5)]
                            store.prune_devices(0.0, gone, T0 + 1_000.0)
                except BaseException as exc:
                    failures.append(exc)

            threads = [threading.Thread(target=work, args=(s, n)) for n, s in enumerate(stores[:2])]
            for thread in threads:
                thread.start()
            ticks = 0
            while any(thread.is_alive() for thread in threads):
                service.fleet_counts(r)
                ticks += 1
            for thread in threads:
                thread.join()
            assert not failures, failures
            assert service.fleet_counts(r) == _reference_counts(reader, r)
            assert _kept_counts(reader) == _table_counts(reader)
            assert ticks > 3 and _reference_counts(reader, r)["devices_known"] > 50
        finally:
            for store in stores:
                store.close()
