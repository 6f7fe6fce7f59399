"""The controller's store of fleet telemetry: one small interface, two SQL backends.

What it keeps, per device: the latest status (online, from the retained status message
and its last will), when it was last heard from, the latest heartbeat's figures per model,
a history of heartbeats (pruned after a retention period) and every lifecycle event,
once. This module holds the interface (``TelemetryStore``), the schema and the SQL both
backends run; the values it takes and returns, and the rows a batch writes, are in
``controller.fleet.records``. Two backends implement it: SQLite (``controller.fleet.sqlite``)
and PostgreSQL (``controller.fleet.postgres``, so several ``edgectl serve`` workers can
share it); ``controller.fleet.stores.open_store`` picks one. This module imports neither.

Invariants:
- ``write`` stores one batch in one transaction; events are keyed on
  (fleet, device, stream, seq) and heartbeats on (fleet, device, at, seq), the time and
  number the agent gave them: a duplicate (at-least-once delivery) is ignored.
  A heartbeat without both (an empty ``at``, no ``seq`` of 1 or more: not from our
  agent) has no key and is always added, so that a device whose ``at`` never changes
  cannot stop its own history; so are the rows of a database made before the key.
- Figures only move forward: a heartbeat or status older than what is stored does not
  overwrite it (two workers may store a device's messages out of order).
- Rows are written in key order, so concurrent writers on PostgreSQL cannot deadlock
  (``controller.fleet.records`` builds them so, in the column order of the statements here).
- Readers never block the writer: each store holds its own read connection.
- Events are bounded: ``prune_events`` drops those older than the retention period and,
  of each device, all but its newest ``max_per_device`` (a device flooding events
  fills only its own share).
- Devices and model rows are bounded too: ``prune_devices`` forgets devices silent past
  their retention (sooner when revoked), ``prune_models`` the models a device stopped
  naming. ``event_counts`` is kept as events are stored (``write`` counts only the rows
  it added), so ``/metrics`` never scans the events table and pruning never lowers it.
- Rollout evidence is summed as heartbeats are stored (``controller.fleet.rollup``), in
  the batch's transaction, from the heartbeats the history did not already hold (a
  redelivery adds nothing); ``rollout_rollup`` reads it. The sums follow the heartbeats'
  retention (``prune_heartbeats``); a store made before them sums the heartbeats it
  holds when opened.
- Devices are counted as they are stored: per fleet (with a generation that moves, in
  commit order, with every device added or removed, and a log of which), and model rows
  per fleet, model and version, kept by triggers in the transaction that changes them
  (``COUNT_TABLES``); ``rollout_census`` and ``fleet_changes`` read them, so a rollout
  tick reads a few rows, not every device. A model row exists only with its device's.
- An event keeps the rollout it was sent under (``rollout_id``, empty from agents that
  predate it). A rollout's evidence is read by that id (``rollout_events``), reduced in
  SQL to a few rows per device: what an aborted rollout of the same version reported
  late is not evidence against a new one, and no window of "the newest N" leaves
  anything out.

Raises ``StoreError`` (a ``ControllerError``) when the store cannot be opened, and its
``StoreUnavailable`` when an operation cannot reach it (PostgreSQL restarting or failing
over; ``controller.fleet.postgres`` reconnects by itself): retry later. ``up`` and
``errors`` say how the last operation went and how many failed (``/metrics``).
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from enum import StrEnum
from typing import Any, Final, NamedTuple

from agent.contracts import ShadowReport, Waiting
from controller.base.errors import ControllerError
from controller.fleet.lease import LeaseRow
from controller.fleet.records import (
    SIGNIFICANT_DRIFT,
    DeviceRow,
    EventRow,
    FleetAggregates,
    HeartbeatFacts,
    HeartbeatRow,
    IngestBatch,
    ModelFacts,
    ModelRow,
    ShadowRow,
    conflict_rows,
    drift_rows,
    event_rows,
    heartbeat_rows,
    shadow_rows,
    status_rows,
    waiting_from_json,
)
from controller.fleet.rollup import (
    BUCKET_S,
    DeviceTotals,
    RolloutRollup,
    VersionTotals,
    bucket_of,
    payload_models,
    rollup_rows,
)


class DriftPoint(NamedTuple):
    """One heartbeat's drift of a model (``TelemetryStore.drift_history``)."""

    device: str
    model: str
    version: str
    at: float
    drift: float | None
    input_drift: float | None
    samples: int


# A stored heartbeat's key: (fleet, device, at, seq).
HeartbeatKey = tuple[str, str, str, int]


def _fresh(
    beats: Iterable[tuple[HeartbeatFacts, float]], inserted: set[HeartbeatKey] | None
) -> Iterator[tuple[str, str, float, tuple[ModelFacts, ...]]]:
    """The heartbeats of a batch the history did not hold before it, each once: those
    ``inserted`` (the first of a key in the batch; None: all of them) and those without
    a key (always added)."""
    if inserted is None:
        for facts, received in beats:
            yield facts.fleet, facts.device, received, facts.models
        return
    seen: set[HeartbeatKey] = set()
    for facts, received in beats:
        identity = facts.identity
        if identity is not None:
            key = (facts.fleet, facts.device, *identity)
            if key not in inserted or key in seen:
                continue
            seen.add(key)
        yield facts.fleet, facts.device, received, facts.models


class RolloutCensus(NamedTuple):
    """``TelemetryStore.rollout_census``: the counts a rollout tick reads."""

    generation: int
    running: int
    waiting: tuple[tuple[str, str | None, Waiting], ...]
    # The fleet's devices at ``generation`` (fleet_sizes).
    devices: int = 0


class Promotion(NamedTuple):
    """A promotion claimed in the store (``TelemetryStore.claim_promotion``)."""

    rollout_id: str
    stage: int
    percent: float
    holder: str
    epoch: int
    claimed_at: float


class Claim(StrEnum):
    """What ``claim_promotion`` found: claimed now; claimed before (by this or an earlier
    leader, whose write may not have happened); refused, the lease not held."""

    CLAIMED = "claimed"
    CLAIMED_BEFORE = "claimed before"
    NOT_LEADER = "not leader"


class StoreError(ControllerError):
    """The telemetry store cannot be opened or used (a bad DSN, an unreachable server)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (PostgreSQL down, restarting or failing over): the
    operation did not happen, or a write's commit was lost with the connection. Retrying
    later is safe (writes are idempotent: ``write``'s rows are keyed). Any other error
    the store raises is about the data, and retrying the same data fails the same way."""


# The schema, in the dialect both backends accept; each backend maps the few types.
DDL: Final = (
    """CREATE TABLE IF NOT EXISTS devices (
        fleet TEXT NOT NULL, device TEXT NOT NULL,
        online INTEGER, status_at DOUBLE PRECISION,
        last_seen DOUBLE PRECISION NOT NULL, last_heartbeat DOUBLE PRECISION,
        agent_version TEXT NOT NULL DEFAULT '', interval_s DOUBLE PRECISION,
        system TEXT NOT NULL DEFAULT '{}',
        outbox_pending INTEGER NOT NULL DEFAULT 0, outbox_dropped INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (fleet, device))""",
    """CREATE TABLE IF NOT EXISTS device_models (
        fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL,
        version TEXT, state TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
        client_errors INTEGER NOT NULL DEFAULT 0, p99_s DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL, figures_at DOUBLE PRECISION, waiting TEXT,
        PRIMARY KEY (fleet, device, model))""",
    """CREATE TABLE IF NOT EXISTS heartbeats (
        id {serial}, fleet TEXT NOT NULL, device TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL, payload TEXT NOT NULL,
        at TEXT, seq BIGINT)""",
    "CREATE INDEX IF NOT EXISTS heartbeats_device ON heartbeats (device, received_at)",
    "CREATE INDEX IF NOT EXISTS heartbeats_received ON heartbeats (received_at)",
    """CREATE TABLE IF NOT EXISTS events (
        id {serial}, fleet TEXT NOT NULL, device TEXT NOT NULL, stream TEXT NOT NULL,
        seq BIGINT NOT NULL, at TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL, model TEXT, version TEXT, previous TEXT, phase TEXT,
        reason TEXT NOT NULL DEFAULT '', rollout_id TEXT,
        UNIQUE (fleet, device, stream, seq))""",
    "CREATE INDEX IF NOT EXISTS events_device ON events (device, id)",
    "CREATE INDEX IF NOT EXISTS events_received ON events (received_at)",
    "CREATE INDEX IF NOT EXISTS events_version ON events (fleet, model, version, received_at)",
    # Each device's place in a rollout (``device_buckets``), stored once per rollout by
    # `edgectl rollout start` (``place_fleet``), so that a tick counts the devices a stage
    # gives the new version by an index (``count_places``) instead of hashing every id.
    # A set is the fleet's devices as of ``generation`` (``rollout_census``); a tick
    # follows the changes since in memory. The next rollout start drops the sets of the
    # rollouts that ended (``drop_places``).
    """CREATE TABLE IF NOT EXISTS rollout_places (
        rollout_id TEXT NOT NULL, device TEXT NOT NULL, place DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (rollout_id, device))""",
    "CREATE INDEX IF NOT EXISTS rollout_places_place ON rollout_places (rollout_id, place)",
    """CREATE TABLE IF NOT EXISTS rollout_place_sets (
        rollout_id TEXT NOT NULL PRIMARY KEY, fleet TEXT NOT NULL,
        generation BIGINT NOT NULL)""",
    # Events ever stored, by fleet and kind (``/metrics``): counted as they are stored,
    # never lowered by pruning, so a scrape reads a few rows instead of every event.
    """CREATE TABLE IF NOT EXISTS event_counts (
        fleet TEXT NOT NULL, kind TEXT NOT NULL, n BIGINT NOT NULL,
        PRIMARY KEY (fleet, kind))""",
    # Rollout evidence summed as heartbeats are stored (controller.fleet.rollup).
    """CREATE TABLE IF NOT EXISTS rollout_figures (
        fleet TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        bucket DOUBLE PRECISION NOT NULL, beats BIGINT NOT NULL, requests BIGINT NOT NULL,
        errors BIGINT NOT NULL, client_errors BIGINT NOT NULL,
        PRIMARY KEY (fleet, model, version, bucket))""",
    """CREATE TABLE IF NOT EXISTS rollout_latency (
        fleet TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        bucket DOUBLE PRECISION NOT NULL, bin INTEGER NOT NULL, n BIGINT NOT NULL,
        PRIMARY KEY (fleet, model, version, bucket, bin))""",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        fleet TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        bucket DOUBLE PRECISION NOT NULL, device TEXT NOT NULL, requests BIGINT NOT NULL,
        errors BIGINT NOT NULL, client_errors BIGINT NOT NULL,
        p99_sum DOUBLE PRECISION NOT NULL, p99_n BIGINT NOT NULL,
        PRIMARY KEY (fleet, model, version, bucket, device))""",
    # Which `edgectl serve` leads (controller.fleet.lease): one row per lease, its
    # deadline in Unix seconds by the database clock, its epoch one more at every takeover.
    """CREATE TABLE IF NOT EXISTS leader_lease (
        name TEXT NOT NULL PRIMARY KEY, holder TEXT NOT NULL, epoch BIGINT NOT NULL,
        deadline DOUBLE PRECISION NOT NULL, acquired_at DOUBLE PRECISION NOT NULL)""",
    # Each promotion of a rollout to a stage (the index it moved to; len(stages): it
    # completed), claimed by the leader before it writes desired state: once, by the key.
    """CREATE TABLE IF NOT EXISTS rollout_promotions (
        rollout_id TEXT NOT NULL, stage INTEGER NOT NULL, percent DOUBLE PRECISION NOT NULL,
        holder TEXT NOT NULL, epoch BIGINT NOT NULL, claimed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (rollout_id, stage))""",
)
ROLLUP_TABLES: Final = ("rollout_figures", "rollout_latency", "rollout_devices")
# What a rollout tick counts without reading every device row (``rollout_census``): the
# devices of each fleet, with a generation that changes whenever one is added or removed,
# the devices added or removed by each generation (``fleet_changes``), and the model rows
# of each fleet, model and version ('' for none). Kept by triggers
# (``COUNT_TRIGGERS``, a backend's own), so only a device added or removed, or a model
# row added, removed or moved to another version, writes to them: a heartbeat that
# changes none of these writes nothing more. A model row exists only with its device's
# row (``write`` stores both; ``prune_devices`` removes both).
#
# A fleet's generation is its row of fleet_sizes, updated by every transaction that adds
# or removes one of its devices: a second such transaction waits for the first to commit
# (the row's lock), so generations are numbered in commit order and a reader that sees
# generation G sees every change up to G. ``changes_from``: the changes of generations
# up to it were pruned (``prune_devices``).
COUNT_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS fleet_sizes (
        fleet TEXT NOT NULL PRIMARY KEY, devices BIGINT NOT NULL, generation BIGINT NOT NULL,
        changes_from BIGINT NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS fleet_changes (
        fleet TEXT NOT NULL, generation BIGINT NOT NULL, device TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS fleet_changes_generation ON fleet_changes (fleet, generation)",
    """CREATE TABLE IF NOT EXISTS model_versions (
        fleet TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        devices BIGINT NOT NULL, PRIMARY KEY (fleet, model, version))""",
)
# The counts of the rows a store held before the count tables (made in the same
# transaction as the triggers).
_SEED_COUNTS: Final = (
    "INSERT INTO fleet_sizes (fleet, devices, generation, changes_from) "
    "SELECT fleet, count(*), 1, 1 FROM devices GROUP BY fleet",
    "INSERT INTO model_versions (fleet, model, version, devices) "
    "SELECT fleet, model, COALESCE(version, ''), count(*) FROM device_models GROUP BY 1, 2, 3",
)
# SQLite's triggers (row by row; an upsert that updates fires no INSERT trigger).
COUNT_TRIGGERS: Final = (
    """CREATE TRIGGER IF NOT EXISTS devices_added AFTER INSERT ON devices BEGIN
        INSERT INTO fleet_sizes (fleet, devices, generation) VALUES (NEW.fleet, 1, 1)
        ON CONFLICT (fleet) DO UPDATE SET devices = devices + 1, generation = generation + 1;
        INSERT INTO fleet_changes (fleet, generation, device)
        SELECT NEW.fleet, generation, NEW.device FROM fleet_sizes WHERE fleet = NEW.fleet;
    END""",
    """CREATE TRIGGER IF NOT EXISTS devices_removed AFTER DELETE ON devices BEGIN
        UPDATE fleet_sizes SET devices = devices - 1, generation = generation + 1
        WHERE fleet = OLD.fleet;
        INSERT INTO fleet_changes (fleet, generation, device)
        SELECT OLD.fleet, generation, OLD.device FROM fleet_sizes WHERE fleet = OLD.fleet;
    END""",
    """CREATE TRIGGER IF NOT EXISTS device_models_added AFTER INSERT ON device_models BEGIN
        INSERT INTO model_versions (fleet, model, version, devices)
        VALUES (NEW.fleet, NEW.model, COALESCE(NEW.version, ''), 1)
        ON CONFLICT (fleet, model, version) DO UPDATE SET devices = devices + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS device_models_removed AFTER DELETE ON device_models BEGIN
        UPDATE model_versions SET devices = devices - 1
        WHERE fleet = OLD.fleet AND model = OLD.model AND version = COALESCE(OLD.version, '');
    END""",
    """CREATE TRIGGER IF NOT EXISTS device_models_moved AFTER UPDATE OF version ON device_models
    WHEN COALESCE(OLD.version, '') <> COALESCE(NEW.version, '') BEGIN
        UPDATE model_versions SET devices = devices - 1
        WHERE fleet = OLD.fleet AND model = OLD.model AND version = COALESCE(OLD.version, '');
        INSERT INTO model_versions (fleet, model, version, devices)
        VALUES (NEW.fleet, NEW.model, COALESCE(NEW.version, ''), 1)
        ON CONFLICT (fleet, model, version) DO UPDATE SET devices = devices + 1;
    END""",
)
# Generations of each fleet's device changes kept (``prune_devices``).
KEEP_CHANGES: Final = 10_000
# The model rows that say why their device waits, without a scan of the fleet's rows.
WAITING_INDEX: Final = (
    "CREATE INDEX IF NOT EXISTS device_models_waiting ON device_models (fleet, model) "
    "WHERE waiting IS NOT NULL"
)
# A store made before event_counts: counted once from the events it holds.
_SEED_EVENT_COUNTS: Final = """
INSERT INTO event_counts (fleet, kind, n) SELECT fleet, kind, count(*) FROM events
GROUP BY fleet, kind ON CONFLICT (fleet, kind) DO NOTHING
"""
_COUNT_EVENTS: Final = """
INSERT INTO event_counts (fleet, kind, n) VALUES (?, ?, ?)
ON CONFLICT (fleet, kind) DO UPDATE SET n = event_counts.n + excluded.n
"""

# Created after MIGRATIONS: a table made before then lacks the columns. Rows that were
# there have no key (NULL, never equal), so duplicates stored before cannot fail it.
HEARTBEAT_KEY: Final = (
    "CREATE UNIQUE INDEX IF NOT EXISTS heartbeats_key ON heartbeats (fleet, device, at, seq)"
)
# Columns added since the first release: (table, column, type), added when missing.
# Rows stored before a column was added hold NULL in it.
# ---- shadow reports (issue 23 part 1): the latest report of each device per candidate
# version of a model in shadow (``controller.fleet.records.shadow_rows``), read by the
# rollout gates shadow_agreement and shadow_latency_ratio (``shadow_reports``). Pruned
# with the model rows (``prune_models``: older than the model retention).
SHADOW_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS shadow_reports (
        fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL, state TEXT NOT NULL,
        samples INTEGER NOT NULL DEFAULT 0, agreement DOUBLE PRECISION,
        cosine_min DOUBLE PRECISION, max_abs DOUBLE PRECISION,
        latency_ratio DOUBLE PRECISION, errors INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0, serving TEXT,
        PRIMARY KEY (fleet, device, model, version))""",
)
_SHADOW_UPSERT: Final = """
INSERT INTO shadow_reports (fleet, device, model, version, received_at, state, samples,
                            agreement, cosine_min, max_abs, latency_ratio, errors, dropped,
                            serving)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, device, model, version) DO UPDATE SET
    received_at = excluded.received_at, state = excluded.state, samples = excluded.samples,
    agreement = excluded.agreement, cosine_min = excluded.cosine_min,
    max_abs = excluded.max_abs, latency_ratio = excluded.latency_ratio,
    errors = excluded.errors, dropped = excluded.dropped, serving = excluded.serving
WHERE shadow_reports.received_at <= excluded.received_at"""
# ---- end of shadow reports

MIGRATIONS: Final = (
    ("heartbeats", "at", "TEXT"),
    ("heartbeats", "seq", "BIGINT"),
    ("events", "rollout_id", "TEXT"),
    ("devices", "identity_conflict", "TEXT"),
    ("devices", "identity_conflict_at", "DOUBLE PRECISION"),
    # Why the device does not install the version desired state names (JSON, or NULL).
    ("device_models", "waiting", "TEXT"),
    # -- drift (issue 23): the latest drift a device reported for a model, of the version
    # ``drift_version`` (read only while the model row is still on it), at ``drift_at``.
    ("device_models", "drift", "DOUBLE PRECISION"),
    ("device_models", "input_drift", "DOUBLE PRECISION"),
    ("device_models", "drift_samples", "INTEGER"),
    ("device_models", "drift_version", "TEXT"),
    ("device_models", "drift_at", "DOUBLE PRECISION"),
)
# -- drift (issue 23): every heartbeat's drift, for the fleet's drift alert (how long a
# device stayed above a threshold) and the rollout's drift gate; pruned with the
# heartbeats (``prune_heartbeats``).
DRIFT_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS drift_history (
        fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL, drift DOUBLE PRECISION,
        input_drift DOUBLE PRECISION, samples INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS drift_history_fleet ON drift_history (fleet, received_at)",
    "CREATE INDEX IF NOT EXISTS drift_history_version "
    "ON drift_history (fleet, model, version, received_at)",
)
_DRIFT_UPDATE: Final = """
UPDATE device_models SET drift_version = ?, drift = ?, input_drift = ?, drift_samples = ?,
    drift_at = ?
WHERE fleet = ? AND device = ? AND model = ? AND (drift_at IS NULL OR drift_at <= ?)
"""
_DRIFT_HISTORY_INSERT: Final = """
INSERT INTO drift_history (fleet, device, model, version, received_at, drift, input_drift,
                           samples) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""

# The rollup of new heartbeats (controller.fleet.rollup.rollup_rows), last in a batch's
# transaction: with several PostgreSQL workers these rows are shared, so their locks are
# held for as short a time as the batch allows, and taken in key order. Each table: the
# rows' key in ``rollup_rows``, its name, its key columns and its summed columns (in the
# order of the rows), with their PostgreSQL types (a backend may pass columns as arrays).
ROLLUP: Final = (
    (
        "devices",
        "rollout_devices",
        (("fleet", "text"), ("model", "text"), ("version", "text"), ("bucket", "float8")),
        (("device", "text"),),
        (
            ("requests", "int8"),
            ("errors", "int8"),
            ("client_errors", "int8"),
            ("p99_sum", "float8"),
            ("p99_n", "int8"),
        ),
    ),
    (
        "latency",
        "rollout_latency",
        (("fleet", "text"), ("model", "text"), ("version", "text"), ("bucket", "float8")),
        (("bin", "int4"),),
        (("n", "int8"),),
    ),
    (
        "figures",
        "rollout_figures",
        (("fleet", "text"), ("model", "text"), ("version", "text"), ("bucket", "float8")),
        (),
        (("beats", "int8"), ("requests", "int8"), ("errors", "int8"), ("client_errors", "int8")),
    ),
)


def rollup_upsert(table: str, keys: Sequence[str], sums: Sequence[str], source: str) -> str:
    """The statement adding rows from ``source`` (``VALUES (...)``, a ``SELECT``) to a
    rollup table: a new key inserted, a known one's sums added to."""
    columns = ", ".join((*keys, *sums))
    added = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in sums)
    return (
        f"INSERT INTO {table} ({columns}) {source} "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {added}"
    )


_HEARTBEAT_INSERT: Final = """
INSERT INTO heartbeats (fleet, device, received_at, payload, at, seq) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, device, at, seq) DO NOTHING
"""
_DEVICE_FROM_HEARTBEAT: Final = """
INSERT INTO devices (fleet, device, last_seen, last_heartbeat, agent_version, interval_s,
                     system, outbox_pending, outbox_dropped)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, device) DO UPDATE SET
    last_seen = {greatest}(devices.last_seen, excluded.last_seen),
    last_heartbeat = excluded.last_heartbeat, agent_version = excluded.agent_version,
    interval_s = excluded.interval_s, system = excluded.system,
    outbox_pending = excluded.outbox_pending, outbox_dropped = excluded.outbox_dropped
WHERE devices.last_heartbeat IS NULL OR devices.last_heartbeat <= excluded.last_heartbeat
"""
# Version, state and waiting reason follow the newest of heartbeat and status; figures
# follow heartbeats.
_MODEL_UPSERT: Final = """
INSERT INTO device_models (fleet, device, model, version, state, requests, errors,
                           client_errors, p99_s, waiting, updated_at, figures_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, device, model) DO UPDATE SET
    version = CASE WHEN device_models.updated_at <= excluded.updated_at
                   THEN excluded.version ELSE device_models.version END,
    state = CASE WHEN device_models.updated_at <= excluded.updated_at
                 THEN excluded.state ELSE device_models.state END,
    waiting = CASE WHEN device_models.updated_at <= excluded.updated_at
                   THEN excluded.waiting ELSE device_models.waiting END,
    updated_at = {greatest}(device_models.updated_at, excluded.updated_at),
    requests = excluded.requests, errors = excluded.errors,
    client_errors = excluded.client_errors, p99_s = excluded.p99_s,
    figures_at = excluded.figures_at
WHERE device_models.figures_at IS NULL OR device_models.figures_at <= excluded.figures_at
"""
# A status changes the model's version, state and waiting reason only: figures come from
# heartbeats.
_MODEL_FROM_STATUS: Final = """
INSERT INTO device_models (fleet, device, model, version, state, waiting, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, device, model) DO UPDATE SET
    version = excluded.version, state = excluded.state, waiting = excluded.waiting,
    updated_at = excluded.updated_at
WHERE device_models.updated_at <= excluded.updated_at
"""
_DEVICE_FROM_STATUS: Final = """
INSERT INTO devices (fleet, device, online, status_at, last_seen, agent_version)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, device) DO UPDATE SET
    online = excluded.online, status_at = excluded.status_at,
    last_seen = {greatest}(devices.last_seen, excluded.last_seen),
    agent_version = CASE WHEN excluded.agent_version = '' THEN devices.agent_version
                         ELSE excluded.agent_version END
WHERE devices.status_at IS NULL OR devices.status_at <= excluded.status_at
"""
_DEVICE_SEEN: Final = """
INSERT INTO devices (fleet, device, last_seen) VALUES (?, ?, ?)
ON CONFLICT (fleet, device) DO UPDATE SET
    last_seen = {greatest}(devices.last_seen, excluded.last_seen)
"""
# After _DEVICE_SEEN, which made the row of a device whose events showed the conflict.
_DEVICE_CONFLICT: Final = """
UPDATE devices SET identity_conflict = ?, identity_conflict_at = ? WHERE fleet = ? AND device = ?
"""
_EVENT_INSERT: Final = """
INSERT INTO events (fleet, device, stream, seq, at, received_at, kind, model, version,
                    previous, phase, reason, rollout_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (fleet, device, stream, seq) DO NOTHING"""
EVENT_INSERT: Final = _EVENT_INSERT  # for a backend's own way of counting what it added
# The statements of a heartbeat batch, for a backend's own way of sending many rows.
HEARTBEAT_INSERT: Final = _HEARTBEAT_INSERT
DEVICE_FROM_HEARTBEAT: Final = _DEVICE_FROM_HEARTBEAT
MODEL_UPSERT: Final = _MODEL_UPSERT
_EVENT_COLUMNS: Final = (
    "id, fleet, device, stream, seq, at, received_at, kind, model, version, previous, phase, "
    "reason, COALESCE(rollout_id, '')"
)
# rollout_events: of each device, its latest event of each kind in ``apart`` and its
# latest of any other kind. An event without a rollout id (an agent that predates it, a
# row stored before the column) counts for the rollout of its model and version.
_ROLLOUT_EVENTS: Final = """
SELECT {columns} FROM (
    SELECT id, fleet, device, stream, seq, at, received_at, kind, model, version, previous,
           phase, reason, rollout_id,
           ROW_NUMBER() OVER (PARTITION BY device, CASE WHEN kind IN ({apart}) THEN kind
                                                        ELSE '' END
                              ORDER BY received_at DESC, id DESC) AS n
    FROM events
    WHERE fleet = ? AND model = ? AND version = ? AND received_at >= ?
      AND (rollout_id = ? OR COALESCE(rollout_id, '') = '')) latest
WHERE n = 1 ORDER BY received_at, id"""

# fleet_aggregates: the arithmetic is controller.fleet.status.health's, operand for operand, in
# IEEE doubles on both backends, so a device exactly at the threshold is judged the same.
# Grouped by fleet alone (sums of CASE, not GROUP BY health): SQLite then walks the
# primary key in order instead of sorting every device (31 ms instead of 73 at 100,000).
_HEALTH_COUNTS: Final = """
SELECT fleet, count(*),
       sum(CASE WHEN online = 0 THEN 1 ELSE 0 END),
       sum(CASE WHEN online = 0 THEN 0
                WHEN CAST(? AS DOUBLE PRECISION) - last_seen
                     > CAST(? AS DOUBLE PRECISION)
                       * COALESCE(NULLIF(interval_s, 0), CAST(? AS DOUBLE PRECISION))
                THEN 1 ELSE 0 END),
       sum(outbox_dropped)
FROM devices GROUP BY fleet
"""
# Models of stored devices only, as ``devices()`` attaches them.
# The drift of each fleet, model and version its devices run, from their latest reports
# (only rows whose drift is of the version they run; issue 23).
_DRIFT_COUNTS: Final = """
SELECT fleet, model, version, max(drift), avg(drift), count(*),
       sum(CASE WHEN drift > ? THEN 1 ELSE 0 END)
FROM device_models WHERE drift IS NOT NULL AND drift_version = version
GROUP BY fleet, model, version
"""
_MODEL_COUNTS: Final = """
SELECT m.fleet, m.model, COALESCE(m.version, ''), m.state, count(*)
FROM device_models m JOIN devices d ON d.fleet = m.fleet AND d.device = m.device
GROUP BY 1, 2, 3, 4
"""


class TelemetryStore(ABC):
    """The SQL both backends share; a backend supplies connections and its dialect."""

    placeholder = "?"
    greatest = "max"
    least = "min"
    # Towards zero, as Python's int() of a float.
    truncate = "CAST({} AS INTEGER)"
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    add_column = "ADD COLUMN"
    # The database's clock, Unix seconds (the lease's deadlines are by it).
    db_now = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self) -> None:
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._health_lock = threading.Lock()
        self._up = True
        self._errors = 0

    # What ``write`` raises when a batch holds a value the database refuses (out of range,
    # text it cannot encode): the same rows fail again, whatever the database's state.
    # Every other error may pass (a lost connection, a full disk). A backend adds its
    # driver's classes.
    data_errors: tuple[type[BaseException], ...] = (OverflowError, UnicodeError)

    def is_data_error(self, exc: BaseException) -> bool:
        """Whether ``write`` failed with ``exc`` because of what its batch holds (so one
        of its messages can never be stored), not because of the store's state."""
        return isinstance(exc, self.data_errors)

    # a backend provides ---------------------------------------------------------

    @abstractmethod
    def _writer(self) -> AbstractContextManager[Any]:
        """A cursor inside one write transaction, committed on exit."""

    @abstractmethod
    def _reader(self) -> AbstractContextManager[Any]:
        """A cursor for reads."""

    @abstractmethod
    def close(self) -> None: ...

    # shared ---------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """False while the last operation found the store unreachable (``StoreUnavailable``)."""
        return self._up

    @property
    def errors(self) -> int:
        """Operations that raised since the store was opened (``edgefleet_store_errors_total``)."""
        return self._errors

    @contextmanager
    def _observed(self, cursor: AbstractContextManager[Any]) -> Iterator[Any]:
        """``cursor``, with its outcome kept for ``up`` and ``errors``."""
        try:
            with cursor as cur:
                yield cur
        except StoreUnavailable:
            with self._health_lock:
                self._errors += 1
                self._up = False
            raise
        except Exception:
            with self._health_lock:
                self._errors += 1
            raise
        self._up = True

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """A cursor inside one write transaction, one writer at a time."""
        with self._write_lock, self._observed(self._writer()) as cur:
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A read cursor, one reader at a time (never waiting for the writer)."""
        with self._read_lock, self._observed(self._reader()) as cur:
            yield cur

    def _sql(self, text: str) -> str:
        text = text.replace("{greatest}", self.greatest).replace("{serial}", self.serial)
        return text.replace("?", self.placeholder) if self.placeholder != "?" else text

    def _create_tables(self) -> None:
        with self._writer() as cur:
            self._create_tables_with(cur)

    def _create_tables_with(self, cur: Any) -> None:
        counted = self._has_table(cur, "event_counts")
        rolled = self._has_table(cur, "rollout_figures")
        sized = self._has_table(cur, "model_versions")
        for statement in (*DDL, *SHADOW_DDL):
            cur.execute(self._sql(statement))
        self._migrate(cur)
        for statement in DRIFT_DDL:
            cur.execute(statement)
        cur.execute(HEARTBEAT_KEY)
        cur.execute(WAITING_INDEX)
        if not counted:
            cur.execute(_SEED_EVENT_COUNTS)
        if not rolled:
            self._seed_rollup(cur)
        if not sized:
            # With the tables only: two PostgreSQL workers replacing a function at once
            # can fail ("tuple concurrently updated"); here the lock orders them.
            statements = (*self.lock_for_counts, *COUNT_TABLES, *_SEED_COUNTS)
            for statement in (*statements, *self.count_triggers):
                cur.execute(statement)

    # The triggers that keep COUNT_TABLES; a backend may have its own.
    count_triggers: Sequence[str] = COUNT_TRIGGERS
    # What keeps other writers out while the count tables are seeded (SQLite: nothing;
    # the transaction holds the only writer's lock already).
    lock_for_counts: Sequence[str] = ()

    def _seed_rollup(self, cur: Any, chunk: int = 5000) -> None:
        """A store made before the rollup tables: sum the heartbeats it holds into them
        once (every stored row counts, as the heartbeats a window read did)."""
        last = 0
        while True:
            cur.execute(
                self._sql(
                    "SELECT id, fleet, device, received_at, payload FROM heartbeats "
                    "WHERE id > ? ORDER BY id LIMIT ?"
                ),
                [last, chunk],
            )
            rows = cur.fetchall()
            if not rows:
                return
            last = int(rows[-1][0])
            beats = []
            for _id, fleet, device, received, payload in rows:
                try:
                    doc = json.loads(payload)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    beats.append((str(fleet), str(device), float(received), payload_models(doc)))
            self._write_rollup(cur, rollup_rows(beats))

    def _write_rows(self, cur: Any, statement: str, rows: list[tuple[Any, ...]]) -> None:
        """Run one of ``write``'s statements for every row of ``rows``, in order (a
        backend may send them as one statement: ``controller.fleet.postgres``)."""
        cur.executemany(self._sql(statement), rows)

    def _has_table(self, cur: Any, name: str) -> bool:
        cur.execute(
            self._sql("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"), [name]
        )
        return cur.fetchone() is not None

    def _insert_events(self, cur: Any, rows: list[tuple[Any, ...]]) -> Counter[tuple[str, str]]:
        """Insert event rows; return how many were new (not duplicates), by fleet and kind.
        One writer at a time on SQLite: the new rows are those past the largest id."""
        cur.execute("SELECT COALESCE(max(id), 0) FROM events")
        last = int(cur.fetchone()[0])
        cur.executemany(self._sql(_EVENT_INSERT), rows)
        cur.execute(
            self._sql("SELECT fleet, kind, count(*) FROM events WHERE id > ? GROUP BY fleet, kind"),
            [last],
        )
        return Counter({(str(f), str(k)): int(n) for f, k, n in cur.fetchall()})

    def _migrate(self, cur: Any) -> None:
        """Add the columns a store created by an earlier release lacks (``MIGRATIONS``)."""
        for table in sorted({table for table, _c, _t in MIGRATIONS}):
            cur.execute(f"SELECT * FROM {table} WHERE 1 = 0")
            have = {column[0] for column in cur.description}
            for name, column, kind in MIGRATIONS:
                if name == table and column not in have:
                    cur.execute(f"ALTER TABLE {table} {self.add_column} {column} {kind}")

    def write(self, batch: IngestBatch) -> int:
        """Store one batch in one transaction; return the rows it added or changed."""
        if not len(batch) and not batch.conflicts:
            return 0
        beats = heartbeat_rows(batch)
        statuses = status_rows(batch)
        events, seen = event_rows(batch)
        plan: Sequence[tuple[str, list[tuple[Any, ...]]]] = (
            (_DEVICE_FROM_STATUS, statuses["devices"]),
            (_DEVICE_FROM_HEARTBEAT, beats["devices"]),
            (_DEVICE_SEEN, seen),
            (_DEVICE_CONFLICT, conflict_rows(batch)),
            (_MODEL_FROM_STATUS, statuses["models"]),
            (_MODEL_UPSERT, beats["models"]),
        )
        with self._write() as cur:
            for statement, rows in plan:
                if rows:
                    self._write_rows(cur, statement, rows)
            inserted = self._insert_heartbeats(cur, beats["history"]) if beats["history"] else None
            if events:
                added = self._insert_events(cur, events)
                # Last and in key order: concurrent writers take these rows' locks alike.
                counts = [(f, k, n) for (f, k), n in sorted(added.items())]
                if counts:
                    cur.executemany(self._sql(_COUNT_EVENTS), counts)
            if beats["history"]:
                self._write_rollup(cur, rollup_rows(_fresh(beats["beats"], inserted)))
                # Drift (issue 23): after the model rows it updates.
                models, history = drift_rows(beats["beats"], inserted)
                if models:
                    self._write_rows(cur, _DRIFT_UPDATE, models)
                if history:
                    self._write_rows(cur, _DRIFT_HISTORY_INSERT, history)
            shadows = shadow_rows(batch)
            if shadows:
                self._write_rows(cur, _SHADOW_UPSERT, shadows)
        return len(batch)

    def _write_rollup(self, cur: Any, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """Add new heartbeats' sums to the rollup tables (``controller.fleet.rollup``)."""
        for key, table, head, extra, sums in ROLLUP:
            if rows[key]:
                names = [c for c, _type in (*head, *extra)]
                values = f"VALUES ({', '.join('?' for _ in (*names, *sums))})"
                statement = rollup_upsert(table, names, [c for c, _t in sums], values)
                cur.executemany(self._sql(statement), rows[key])

    def _insert_heartbeats(self, cur: Any, rows: list[tuple[Any, ...]]) -> set[HeartbeatKey] | None:
        """Insert history rows; return None when every row was new (the common case),
        else the keys (fleet, device, at, seq) of those that were (the others were
        there: a redelivery). Rows without a key are always added. One writer at a time
        on SQLite: the new rows are those past the largest id."""
        cur.execute("SELECT COALESCE(max(id), 0) FROM heartbeats")
        last = int(cur.fetchone()[0])
        self._write_rows(cur, _HEARTBEAT_INSERT, rows)
        if cur.rowcount == len(rows):
            return None
        cur.execute(
            self._sql("SELECT fleet, device, at, seq FROM heartbeats WHERE id > ? AND seq > 0"),
            [last],
        )
        return {(str(f), str(d), str(a), int(q)) for f, d, a, q in cur.fetchall()}

    def devices(
        self, fleet: str | None = None, model: str | None = None, device: str | None = None
    ) -> list[DeviceRow]:
        """Every device (of ``fleet``; running ``model``; with the id ``device``, in each
        fleet that has one), with its models, by fleet and id."""
        where, args, model_where, model_args = [], [], [], []
        for column, value in (("fleet", fleet), ("device", device)):
            if value:
                where.append(f"d.{column} = ?")
                args.append(value)
                model_where.append(f"{column} = ?")
                model_args.append(value)
        if model:
            where.append(
                "EXISTS (SELECT 1 FROM device_models m WHERE m.fleet = d.fleet "
                "AND m.device = d.device AND m.model = ?)"
            )
            args.append(model)
        query = (
            "SELECT d.fleet, d.device, d.online, d.status_at, d.last_seen, d.agent_version, "
            "d.interval_s, d.system, d.outbox_pending, d.outbox_dropped, "
            "d.identity_conflict, d.identity_conflict_at FROM devices d"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY d.fleet, d.device"
        )
        with self._read() as cur:
            cur.execute(self._sql(query), args)
            rows = cur.fetchall()
            cur.execute(
                self._sql(
                    "SELECT fleet, device, model, version, state, requests, errors, "
                    "client_errors, p99_s, updated_at, waiting, "
                    "drift_version, drift, input_drift, drift_samples FROM device_models"
                    + (" WHERE " + " AND ".join(model_where) if model_where else "")
                    + " ORDER BY fleet, device, model"
                ),
                model_args,
            )
            model_rows = cur.fetchall()
        by_device: dict[tuple[str, str], list[ModelRow]] = {}
        for (
            f,
            d,
            name,
            version,
            state,
            requests,
            errors,
            client_errors,
            p99,
            at,
            why,
            *dr,
        ) in model_rows:
            # Drift of another version than the row's (the device moved on) is not shown.
            drift = dr[1:] if dr[0] is not None and dr[0] == version else (None, None, None)
            by_device.setdefault((f, d), []).append(
                ModelRow(
                    name,
                    version,
                    state,
                    requests,
                    errors,
                    client_errors,
                    p99,
                    at,
                    waiting_from_json(why),
                    *drift,
                )
            )
        return [
            DeviceRow(
                fleet=r[0],
                device=r[1],
                online=None if r[2] is None else bool(r[2]),
                status_at=r[3],
                last_seen=float(r[4]),
                agent_version=r[5] or "",
                interval_s=r[6],
                system=json.loads(r[7] or "{}"),
                outbox_pending=int(r[8]),
                outbox_dropped=int(r[9]),
                models=tuple(by_device.get((r[0], r[1]), ())),
                identity_conflict=r[10],
                identity_conflict_at=r[11],
            )
            for r in rows
        ]

    def fleet_aggregates(
        self, now: float, default_interval_s: float, stale_after: float
    ) -> FleetAggregates:
        """The device counts of ``/metrics``, grouped in SQL: health as
        ``controller.fleet.status.health`` judges it at ``now`` (offline when the last status
        says so, else stale past ``stale_after`` intervals of silence, the device's own
        interval unless it is missing or zero, then ``default_interval_s``)."""
        with self._read() as cur:
            cur.execute(
                self._sql(_HEALTH_COUNTS),
                [float(now), float(stale_after), float(default_interval_s)],
            )
            health_rows = cur.fetchall()
            cur.execute(_MODEL_COUNTS)
            model_rows = cur.fetchall()
            cur.execute(self._sql(_DRIFT_COUNTS), [SIGNIFICANT_DRIFT])
            drift_rows_ = cur.fetchall()
        devices: dict[tuple[str, str], int] = {}
        dropped: dict[str, int] = {}
        for fleet, n, offline, stale, lost in health_rows:
            counts = {"online": int(n) - int(offline) - int(stale)}
            counts.update(stale=int(stale), offline=int(offline))
            devices.update({(str(fleet), h): k for h, k in counts.items() if k})
            dropped[str(fleet)] = int(lost)
        models = {(str(f), str(m), str(v), str(s)): int(n) for f, m, v, s, n in model_rows}
        drift = {
            (str(f), str(m), str(v)): (float(top), float(mean), int(n), int(high))
            for f, m, v, top, mean, n, high in drift_rows_
        }
        return FleetAggregates(devices, dropped, models, drift)

    def events(
        self, device: str | None = None, fleet: str | None = None, limit: int = 50
    ) -> list[EventRow]:
        """The most recent ``limit`` events (of ``device``), oldest first, in stored order."""
        where, args = [], []
        if device:
            where.append("device = ?")
            args.append(device)
        if fleet:
            where.append("fleet = ?")
            args.append(fleet)
        query = (
            f"SELECT {_EVENT_COLUMNS} FROM events"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id DESC LIMIT ?"
        )
        with self._read() as cur:
            cur.execute(self._sql(query), [*args, limit])
            rows = cur.fetchall()
        return [EventRow(*r) for r in reversed(rows)]

    def rollout_events(
        self,
        fleet: str,
        rollout_id: str,
        model: str,
        version: str,
        since: float,
        apart: Sequence[str] = (),
    ) -> list[EventRow]:
        """The events of rollout ``rollout_id`` (of ``model`` at ``version``) in ``fleet``
        received at or after ``since``, reduced in SQL: of each device, its latest event
        of each kind in ``apart`` and its latest of any other kind (ties: the last
        stored), all oldest first. At most ``len(apart) + 1`` rows per device whatever
        the device sent: who tried the version, and the last word of each kind that
        matters. Events without a rollout id count for every rollout of their version."""
        marks = ", ".join("?" for _ in apart) or "NULL"
        query = _ROLLOUT_EVENTS.format(columns=_EVENT_COLUMNS, apart=marks)
        args = [*apart, fleet, model, version, float(since), rollout_id]
        with self._read() as cur:
            cur.execute(self._sql(query), args)
            rows = cur.fetchall()
        return [EventRow(*r) for r in rows]

    def heartbeats(self, device: str, limit: int = 10) -> list[HeartbeatRow]:
        """The device's most recent heartbeats, oldest first."""
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT fleet, device, received_at, payload FROM heartbeats "
                    "WHERE device = ? ORDER BY received_at DESC, id DESC LIMIT ?"
                ),
                [device, limit],
            )
            rows = cur.fetchall()
        return [HeartbeatRow(f, d, float(t), json.loads(p)) for f, d, t, p in reversed(rows)]

    def fleet_heartbeats(
        self,
        fleet: str,
        since: float,
        read_from: float,
        span_s: float,
        default_interval_s: float,
        max_per_device: int,
    ) -> list[HeartbeatRow]:
        """The heartbeats of ``fleet`` received at or after ``since``, read in one query as
        ``heartbeats(device, limit)`` would for each device of the fleet last seen at or
        after ``read_from``: of a device's heartbeats received at or after ``read_from``
        (in any fleet), the ``limit`` most recent, where ``limit`` is
        ``min(max_per_device, int(span_s / interval) + 5)`` and ``interval`` the device's
        own heartbeat interval (``default_interval_s`` when missing or zero). By device,
        then oldest first (ties in stored order)."""
        per_device = self.truncate.format("? / COALESCE(NULLIF(interval_s, 0), ?)")
        query = f"""
            SELECT device, received_at, payload FROM (
                SELECT h.id, h.fleet, h.device, h.received_at, h.payload, d.per_device,
                       ROW_NUMBER() OVER (PARTITION BY h.device
                                          ORDER BY h.received_at DESC, h.id DESC) AS n
                FROM (SELECT device, {self.least}(?, {per_device} + 5) AS per_device
                      FROM devices WHERE fleet = ? AND last_seen >= ?) d
                JOIN heartbeats h ON h.device = d.device
                WHERE h.received_at >= ?) recent
            WHERE n <= per_device AND fleet = ? AND received_at >= ?
            ORDER BY device, received_at, id"""
        args = [
            max_per_device,
            float(span_s),
            float(default_interval_s),
            fleet,
            float(read_from),
            float(read_from),
            fleet,
            float(since),
        ]
        with self._read() as cur:
            cur.execute(self._sql(query), args)
            rows = cur.fetchall()
        return [HeartbeatRow(fleet, d, float(t), json.loads(p)) for d, t, p in rows]

    def rollout_rollup(
        self, fleet: str, model: str, version: str, others: Sequence[str], since: float
    ) -> RolloutRollup:
        """The rollup (``controller.fleet.rollup``) of ``model`` in ``fleet`` from the
        bucket holding ``since`` on: the sums of ``version`` and of each of ``others``,
        and those of ``version`` by device (by id). Three indexed reads: a few rows per
        version and bucket, and one row per device that reported ``version``."""
        versions = [version, *others]
        marks = ", ".join("?" for _ in versions)
        start = bucket_of(since)
        head = [fleet, model, *versions, start]
        where = f"fleet = ? AND model = ? AND version IN ({marks}) AND bucket >= ?"
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT version, sum(beats), sum(requests), sum(errors), sum(client_errors) "
                    f"FROM rollout_figures WHERE {where} GROUP BY version"
                ),
                head,
            )
            sums = cur.fetchall()
            cur.execute(
                self._sql(
                    f"SELECT version, bin, sum(n) FROM rollout_latency WHERE {where} "
                    "GROUP BY version, bin"
                ),
                head,
            )
            bins = cur.fetchall()
            cur.execute(
                self._sql(
                    # Cast: PostgreSQL sums bigints as numeric (Decimal in Python).
                    "SELECT device, CAST(sum(requests) AS BIGINT), CAST(sum(errors) AS BIGINT), "
                    "CAST(sum(client_errors) AS BIGINT), sum(p99_sum), "
                    "CAST(sum(p99_n) AS BIGINT) FROM rollout_devices "
                    "WHERE fleet = ? AND model = ? AND version = ? AND bucket >= ? "
                    "GROUP BY device ORDER BY device"
                ),
                [fleet, model, version, start],
            )
            devices = cur.fetchall()
        latency: dict[str, dict[int, int]] = {}
        for v, index, n in bins:
            latency.setdefault(str(v), {})[int(index)] = int(n)
        return RolloutRollup(
            versions={
                str(v): VersionTotals(int(b), int(r), int(e), int(c), latency.get(str(v), {}))
                for v, b, r, e, c in sums
            },
            devices=tuple(map(DeviceTotals._make, devices)),
        )

    def devices_running(self, fleet: str, model: str, version: str) -> list[tuple[str, bool]]:
        """Every device of ``fleet``, by id, and whether its stored models (what
        ``devices()`` attaches) include ``model`` at ``version``: only ids and a flag
        leave the store, not the device rows."""
        query = """
            SELECT d.device, CASE WHEN EXISTS (
                SELECT 1 FROM device_models m WHERE m.fleet = d.fleet AND m.device = d.device
                AND m.model = ? AND m.version = ?) THEN 1 ELSE 0 END
            FROM devices d WHERE d.fleet = ? ORDER BY d.device"""
        with self._read() as cur:
            cur.execute(self._sql(query), [model, version, fleet])
            return [(str(device), bool(runs)) for device, runs in cur.fetchall()]

    def rollout_census(self, fleet: str, model: str, version: str) -> RolloutCensus:
        """What a rollout tick counts, from a few rows: the generation of ``fleet``'s
        devices (it changes whenever one is added or removed; 0 before any was), how many
        devices' ``model`` is at ``version``, and the model rows of ``model`` in
        ``fleet`` that say why their device waits (device, version, reason), by device.
        Read in that order: a device added after the generation was read shows as a new
        generation on the next read."""
        with self._read() as cur:
            cur.execute(
                self._sql("SELECT generation, devices FROM fleet_sizes WHERE fleet = ?"), [fleet]
            )
            row = cur.fetchone()
            generation, devices = (int(row[0]), int(row[1])) if row is not None else (0, 0)
            cur.execute(
                self._sql(
                    "SELECT devices FROM model_versions WHERE fleet = ? AND model = ? "
                    "AND version = ?"
                ),
                [fleet, model, version],
            )
            row = cur.fetchone()
            running = int(row[0]) if row is not None else 0
            cur.execute(
                self._sql(
                    "SELECT m.device, m.version, m.waiting FROM device_models m "
                    "JOIN devices d ON d.fleet = m.fleet AND d.device = m.device "
                    # No ORDER BY: SQLite would walk the primary key for it, not this index.
                    "WHERE m.fleet = ? AND m.model = ? AND m.waiting IS NOT NULL"
                ),
                [fleet, model],
            )
            rows = cur.fetchall()
        waits = []
        for device, at, text in sorted(rows):
            why = waiting_from_json(text)
            if why is not None:
                waits.append((str(device), None if at is None else str(at), why))
        return RolloutCensus(generation, running, tuple(waits), devices)

    def fleet_changes(self, fleet: str, after: int, upto: int) -> dict[str, bool] | None:
        """The devices of ``fleet`` added or removed by generations ``after`` + 1 to
        ``upto`` (as ``rollout_census`` read it), each with whether the store holds it
        now; None when those changes were pruned (read the ids again)."""
        with self._read() as cur:
            cur.execute(self._sql("SELECT changes_from FROM fleet_sizes WHERE fleet = ?"), [fleet])
            row = cur.fetchone()
            if row is None or after < int(row[0]):
                return None
            cur.execute(
                self._sql(
                    "SELECT DISTINCT device FROM fleet_changes WHERE fleet = ? "
                    "AND generation > ? AND generation <= ?"
                ),
                [fleet, after, upto],
            )
            changed = sorted(str(device) for (device,) in cur.fetchall())
            present: set[str] = set()
            for at in range(0, len(changed), 500):
                chunk = changed[at : at + 500]
                marks = ", ".join("?" for _ in chunk)
                query = f"SELECT device FROM devices WHERE fleet = ? AND device IN ({marks})"
                cur.execute(
                    self._sql(query),
                    [fleet, *chunk],
                )
                present.update(str(device) for (device,) in cur.fetchall())
        return {device: device in present for device in changed}

    def fleet_device_ids(self, fleet: str) -> tuple[int, list[str]]:
        """The generation of ``fleet``'s devices (``rollout_census``), then their ids
        (read after it: an id added in between shows as a new generation next time)."""
        with self._read() as cur:
            cur.execute(self._sql("SELECT generation FROM fleet_sizes WHERE fleet = ?"), [fleet])
            row = cur.fetchone()
            cur.execute(self._sql("SELECT device FROM devices WHERE fleet = ?"), [fleet])
            ids = [str(device) for (device,) in cur.fetchall()]
        return (int(row[0]) if row is not None else 0), ids

    # rollout places ------------------------------------------------------------

    def places_generation(self, rollout_id: str) -> int | None:
        """The generation of the fleet's devices (``rollout_census``) the places stored
        for ``rollout_id`` stand at; None when none are stored."""
        with self._read() as cur:
            cur.execute(
                self._sql("SELECT generation FROM rollout_place_sets WHERE rollout_id = ?"),
                [rollout_id],
            )
            row = cur.fetchone()
        return None if row is None else int(row[0])

    def place_fleet(
        self, rollout_id: str, fleet: str, place: Callable[[Sequence[str]], list[float]]
    ) -> tuple[int, int]:
        """Store the place in rollout ``rollout_id`` of every device of ``fleet`` (``place``
        computes them for a list of ids: ``device_buckets``), replacing any stored; return
        the generation they stand at and how many devices were placed."""
        generation, ids = self.fleet_device_ids(fleet)
        places = place(ids)
        with self._write() as cur:
            cur.execute(self._sql("DELETE FROM rollout_places WHERE rollout_id = ?"), [rollout_id])
            self._insert_places(cur, rollout_id, ids, places)
            self._set_places_generation(cur, rollout_id, fleet, generation)
        return generation, len(ids)

    def count_places(self, rollout_id: str, below: float) -> int:
        """How many devices placed in ``rollout_id`` have a place under ``below`` (those
        a stage of ``below`` percent gives the new version: ``resolve_release``)."""
        with self._read() as cur:
            cur.execute(
                self._sql("SELECT count(*) FROM rollout_places WHERE rollout_id = ? AND place < ?"),
                [rollout_id, below],
            )
            (n,) = cur.fetchone()
        return int(n)

    def places_of(self, rollout_id: str, devices: Iterable[str]) -> dict[str, float]:
        """The stored places in ``rollout_id`` of those of ``devices`` that are placed."""
        wanted = sorted(set(devices))
        found: dict[str, float] = {}
        with self._read() as cur:
            for at in range(0, len(wanted), 500):
                chunk = wanted[at : at + 500]
                marks = ", ".join("?" for _ in chunk)
                cur.execute(
                    self._sql(
                        "SELECT device, place FROM rollout_places WHERE rollout_id = ? "
                        f"AND device IN ({marks})"
                    ),
                    [rollout_id, *chunk],
                )
                found.update((str(d), float(p)) for d, p in cur.fetchall())
        return found

    def placed_rollouts(self) -> list[str]:
        """The rollout ids with places stored."""
        with self._read() as cur:
            cur.execute("SELECT rollout_id FROM rollout_place_sets ORDER BY rollout_id")
            return [str(rollout_id) for (rollout_id,) in cur.fetchall()]

    def drop_places(self, rollout_ids: Iterable[str]) -> None:
        """Forget the places of these rollouts (they ended)."""
        with self._write() as cur:
            for rollout_id in sorted(set(rollout_ids)):
                for table in ("rollout_places", "rollout_place_sets"):
                    cur.execute(
                        self._sql(f"DELETE FROM {table} WHERE rollout_id = ?"), [rollout_id]
                    )

    def _set_places_generation(
        self, cur: Any, rollout_id: str, fleet: str, generation: int
    ) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO rollout_place_sets (rollout_id, fleet, generation) VALUES (?, ?, ?) "
                "ON CONFLICT (rollout_id) DO UPDATE SET generation = excluded.generation"
            ),
            [rollout_id, fleet, generation],
        )

    def _insert_places(
        self, cur: Any, rollout_id: str, devices: Sequence[str], places: Sequence[float]
    ) -> None:
        """Insert these places (a device placed already keeps its row: the same place).
        A backend may send them as one statement (``controller.fleet.postgres``)."""
        cur.executemany(
            self._sql(
                "INSERT INTO rollout_places (rollout_id, device, place) VALUES (?, ?, ?) "
                "ON CONFLICT (rollout_id, device) DO NOTHING"
            ),
            [(rollout_id, device, place) for device, place in zip(devices, places, strict=True)],
        )

    def waiting(self, fleet: str, model: str) -> dict[str, Waiting]:
        """The devices of ``fleet`` whose stored ``model`` says why it waits (its
        ``waiting`` reason), by device id; the others are not in it."""
        query = """
            SELECT m.device, m.waiting FROM device_models m
            JOIN devices d ON d.fleet = m.fleet AND d.device = m.device
            WHERE m.fleet = ? AND m.model = ? AND m.waiting IS NOT NULL ORDER BY m.device"""
        with self._read() as cur:
            cur.execute(self._sql(query), [fleet, model])
            rows = cur.fetchall()
        found = {str(device): waiting_from_json(text) for device, text in rows}
        return {device: w for device, w in found.items() if w is not None}

    def shadow_reports(self, fleet: str, model: str, version: str) -> list[ShadowRow]:
        """The latest shadow report of each device of ``fleet`` for ``model`` ``version``
        (the candidate), by device."""
        query = """
            SELECT device, received_at, state, samples, agreement, cosine_min, max_abs,
                   latency_ratio, errors, dropped, serving
            FROM shadow_reports WHERE fleet = ? AND model = ? AND version = ?
            ORDER BY device"""
        with self._read() as cur:
            cur.execute(self._sql(query), [fleet, model, version])
            rows = cur.fetchall()
        return [
            ShadowRow(
                fleet,
                str(device),
                model,
                version,
                float(received),
                ShadowReport(
                    version=version,
                    serving=serving,
                    state=str(state),
                    samples=int(samples),
                    agreement=agreement,
                    cosine_min=cosine_min,
                    max_abs=max_abs,
                    latency_ratio=latency_ratio,
                    errors=int(errors),
                    dropped=int(dropped),
                ),
            )
            for (
                device,
                received,
                state,
                samples,
                agreement,
                cosine_min,
                max_abs,
                latency_ratio,
                errors,
                dropped,
                serving,
            ) in rows
        ]

    def event_counts(self) -> list[tuple[str, str, int]]:
        """(fleet, kind, count) of the events ever stored (pruning does not lower them),
        read from the counts ``write`` keeps: a few rows, whatever the events table holds."""
        with self._read() as cur:
            cur.execute("SELECT fleet, kind, n FROM event_counts")
            return [(str(f), str(k), int(n)) for f, k, n in cur.fetchall()]

    def count(self, table: str) -> int:
        """Rows in ``table`` (devices, device_models, heartbeats, events or a rollup table)."""
        tables = ("devices", "device_models", "heartbeats", "events", *ROLLUP_TABLES)
        if table not in (*tables, "fleet_sizes", "fleet_changes", "model_versions"):
            raise ValueError(f"unknown table {table!r}")
        with self._read() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return int(cur.fetchone()[0])

    # -- drift (issue 23)

    def drift_history(
        self,
        fleet: str | None,
        since: float,
        model: str | None = None,
        version: str | None = None,
        device: str | None = None,
    ) -> list[DriftPoint]:
        """The drift heartbeats reported (in ``fleet``; of ``model`` at ``version``; by
        ``device``) since ``since``, by device, model and time."""
        where = "received_at >= ?"
        args: list[Any] = [float(since)]
        for column, value in (("fleet", fleet), ("device", device)):
            if value is not None:
                where += f" AND {column} = ?"
                args.append(value)
        if model is not None:
            where += " AND model = ?"
            args.append(model)
        if version is not None:
            where += " AND version = ?"
            args.append(version)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT device, model, version, received_at, drift, input_drift, samples "
                    f"FROM drift_history WHERE {where} ORDER BY device, model, received_at"
                ),
                args,
            )
            rows = cur.fetchall()
        return [
            DriftPoint(str(d), str(m), str(v), float(t), f, i, int(n))
            for d, m, v, t, f, i, n in rows
        ]

    def prune_heartbeats(self, before: float) -> int:
        """Delete heartbeats received before ``before`` (epoch seconds), and the rollup
        buckets that hold only such heartbeats (ending at or before ``before``); return
        how many heartbeats."""
        with self._write() as cur:
            cur.execute(self._sql("DELETE FROM heartbeats WHERE received_at < ?"), [before])
            removed = int(cur.rowcount or 0)
            cur.execute(self._sql("DELETE FROM drift_history WHERE received_at < ?"), [before])
            ended = before - BUCKET_S
            cur.execute(
                self._sql(
                    "SELECT DISTINCT fleet, model, version FROM rollout_figures WHERE bucket <= ?"
                ),
                [ended],
            )
            # By primary key prefix: the per-device table has no index on the bucket alone.
            for key in cur.fetchall():
                for table in ROLLUP_TABLES:
                    cur.execute(
                        self._sql(
                            f"DELETE FROM {table} WHERE fleet = ? AND model = ? AND version = ? "
                            "AND bucket <= ?"
                        ),
                        [*key, ended],
                    )
            return removed

    def prune_events(self, before: float, max_per_device: int, active_since: float = 0.0) -> int:
        """Delete events received before ``before`` (epoch seconds) and, of each device
        that sent one at or after ``active_since``, all but its newest ``max_per_device``
        (only those devices can have gone past it since the last prune); return how many
        were deleted."""
        with self._write() as cur:
            cur.execute(self._sql("DELETE FROM events WHERE received_at < ?"), [before])
            removed = int(cur.rowcount or 0)
            cur.execute(
                self._sql("SELECT DISTINCT device FROM events WHERE received_at >= ?"),
                [active_since],
            )
            for (device,) in cur.fetchall():
                cur.execute(
                    self._sql(
                        "SELECT id FROM events WHERE device = ? ORDER BY id DESC LIMIT 1 OFFSET ?"
                    ),
                    [device, max_per_device],
                )
                row = cur.fetchone()
                if row is not None:
                    cur.execute(
                        self._sql("DELETE FROM events WHERE device = ? AND id <= ?"),
                        [device, row[0]],
                    )
                    removed += int(cur.rowcount or 0)
            return removed

    def prune_devices(
        self,
        silent_before: float,
        revoked: Iterable[tuple[str, str]] = (),
        revoked_before: float = 0.0,
    ) -> int:
        """Forget the devices last heard from before ``silent_before``, and those of
        ``revoked`` ((fleet, device) pairs) last heard from before ``revoked_before``:
        their device row, model rows and heartbeats (their events age out by their own
        rule, their rollout sums with the heartbeats' retention). A device that reports
        again is stored anew. Returns the devices removed."""
        gone_revoked = set(revoked)
        with self._write() as cur:
            cur.execute(
                self._sql("SELECT fleet, device, last_seen FROM devices WHERE last_seen < ?"),
                [max(silent_before, revoked_before)],
            )
            gone = sorted(
                (str(f), str(d))
                for f, d, seen in cur.fetchall()
                if seen < silent_before or (seen < revoked_before and (f, d) in gone_revoked)
            )
            if gone:
                # Devices first, as ``write`` takes them (and the counts their triggers
                # keep: fleet_sizes before model_versions), so that a prune beside
                # ingestion on PostgreSQL cannot deadlock with it.
                for table in ("devices", "heartbeats", "device_models"):
                    cur.executemany(
                        self._sql(f"DELETE FROM {table} WHERE fleet = ? AND device = ?"), gone
                    )
            # Keep the newest KEEP_CHANGES generations of changes of each fleet: a reader
            # further behind reads the ids again.
            cur.execute(
                self._sql(
                    "UPDATE fleet_sizes SET changes_from = generation - ? "
                    "WHERE changes_from < generation - ?"
                ),
                [KEEP_CHANGES, KEEP_CHANGES],
            )
            cur.execute(
                "DELETE FROM fleet_changes WHERE generation <= (SELECT changes_from "
                "FROM fleet_sizes WHERE fleet_sizes.fleet = fleet_changes.fleet)"
            )
            return len(gone)

    def prune_models(self, before: float) -> int:
        """Delete the model rows a device stopped reporting: last updated before
        ``before`` while the device's heartbeats went on after it, and rows of devices no
        longer stored. Returns how many."""
        with self._write() as cur:
            cur.execute(
                self._sql(
                    """DELETE FROM device_models WHERE NOT EXISTS (
                        SELECT 1 FROM devices d WHERE d.fleet = device_models.fleet
                        AND d.device = device_models.device)
                    OR (updated_at < ? AND EXISTS (
                        SELECT 1 FROM devices d WHERE d.fleet = device_models.fleet
                        AND d.device = device_models.device
                        AND d.last_heartbeat > device_models.updated_at))"""
                ),
                [before],
            )
            removed = int(cur.rowcount or 0)
            cur.execute(self._sql("DELETE FROM shadow_reports WHERE received_at < ?"), [before])
            return removed

    # -- leadership (controller.fleet.lease)

    def _lease_cursor(self) -> AbstractContextManager[Any]:
        """A write transaction for the lease (a backend may avoid waiting for ingestion's
        writer: PostgreSQL takes its own pooled connection)."""
        return self._write()

    def _now_sql(self, text: str) -> str:
        return self._sql(text).replace("{now}", self.db_now)

    def lease_claim(self, name: str, holder: str, lease_s: float) -> LeaseRow:
        """Renew ``holder``'s lease ``name`` while it holds it unexpired, else take it when
        it is free or expired (a new epoch); return the lease as it is then, its deadline
        by the database clock. One transaction; concurrent claims take it once."""
        with self._lease_cursor() as cur:
            cur.execute(
                self._now_sql(
                    "INSERT INTO leader_lease (name, holder, epoch, deadline, acquired_at) "
                    "VALUES (?, ?, 1, {now} + ?, {now}) ON CONFLICT (name) DO NOTHING"
                ),
                [name, holder, lease_s],
            )
            cur.execute(
                self._now_sql(
                    "UPDATE leader_lease SET deadline = {now} + ? "
                    "WHERE name = ? AND holder = ? AND deadline > {now}"
                ),
                [lease_s, name, holder],
            )
            if not cur.rowcount:
                cur.execute(
                    self._now_sql(
                        "UPDATE leader_lease SET holder = ?, epoch = epoch + 1, "
                        "deadline = {now} + ?, acquired_at = {now} "
                        "WHERE name = ? AND deadline <= {now}"
                    ),
                    [holder, lease_s, name],
                )
            row = self._lease_row(cur, name)
            if row is None:  # only take_from can find none: no one ever claimed it
                raise StoreError(f"the lease {name!r} has never been claimed")
            return row

    def lease_take_from(self, name: str, dead: str, holder: str, lease_s: float) -> LeaseRow:
        """Take lease ``name`` from ``dead`` (a holder known to have stopped), a new epoch;
        return the lease as it is then (unchanged when ``dead`` no longer holds it)."""
        with self._lease_cursor() as cur:
            cur.execute(
                self._now_sql(
                    "UPDATE leader_lease SET holder = ?, epoch = epoch + 1, "
                    "deadline = {now} + ?, acquired_at = {now} WHERE name = ? AND holder = ?"
                ),
                [holder, lease_s, name, dead],
            )
            row = self._lease_row(cur, name)
            if row is None:  # only take_from can find none: no one ever claimed it
                raise StoreError(f"the lease {name!r} has never been claimed")
            return row

    def lease_release(self, name: str, holder: str, epoch: int) -> None:
        """End ``holder``'s lease at once (a clean stop), if it still holds that epoch."""
        with self._lease_cursor() as cur:
            cur.execute(
                self._now_sql(
                    "UPDATE leader_lease SET deadline = {now} "
                    "WHERE name = ? AND holder = ? AND epoch = ? AND deadline > {now}"
                ),
                [name, holder, epoch],
            )

    def lease_read(self, name: str) -> LeaseRow | None:
        """The lease ``name`` now (None before anyone took it)."""
        with self._read() as cur:
            return self._lease_row(cur, name)

    def _lease_row(self, cur: Any, name: str) -> LeaseRow | None:
        """The lease ``name`` as ``cur`` sees it, its deadline as seconds from the
        database's now (None before anyone took it)."""
        cur.execute(
            self._now_sql(
                "SELECT holder, epoch, deadline - {now} FROM leader_lease WHERE name = ?"
            ),
            [name],
        )
        row = cur.fetchone()
        return None if row is None else LeaseRow(str(row[0]), int(row[1]), float(row[2]))

    def claim_promotion(
        self, rollout_id: str, stage: int, percent: float, name: str, holder: str, epoch: int
    ) -> Claim:
        """Claim the promotion of ``rollout_id`` to ``stage``, fenced by the database: the
        row is added only while ``holder`` holds lease ``name`` at ``epoch`` unexpired (by
        the database clock), and at most once per (rollout, stage) (the primary key)."""
        with self._lease_cursor() as cur:
            cur.execute(
                self._now_sql(
                    "INSERT INTO rollout_promotions "
                    "(rollout_id, stage, percent, holder, epoch, claimed_at) "
                    "SELECT ?, ?, ?, holder, epoch, {now} FROM leader_lease "
                    "WHERE name = ? AND holder = ? AND epoch = ? AND deadline > {now} "
                    "ON CONFLICT (rollout_id, stage) DO NOTHING"
                ),
                [rollout_id, stage, percent, name, holder, epoch],
            )
            if cur.rowcount == 1:
                return Claim.CLAIMED
            cur.execute(
                self._now_sql(
                    "SELECT 1 FROM leader_lease "
                    "WHERE name = ? AND holder = ? AND epoch = ? AND deadline > {now}"
                ),
                [name, holder, epoch],
            )
            return Claim.CLAIMED_BEFORE if cur.fetchone() is not None else Claim.NOT_LEADER

    def promotions(self, rollout_id: str | None = None) -> list[Promotion]:
        """The promotions claimed (of ``rollout_id``), in the order they were claimed."""
        query = (
            "SELECT rollout_id, stage, percent, holder, epoch, claimed_at FROM rollout_promotions"
        )
        args: list[Any] = []
        if rollout_id is not None:
            query += " WHERE rollout_id = ?"
            args.append(rollout_id)
        with self._read() as cur:
            cur.execute(self._sql(query + " ORDER BY claimed_at, rollout_id, stage"), args)
            return [
                Promotion(str(r), int(s), float(p), str(h), int(e), float(c))
                for r, s, p, h, e, c in cur.fetchall()
            ]
