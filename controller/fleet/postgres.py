"""The PostgreSQL backend of the telemetry store (psycopg 3), for several workers.

Each ``edgectl serve`` worker of a shared MQTT subscription holds a small pool of
connections (``psycopg_pool``): the writer and a reader each take one, so readers never
wait for the writer. A batch is one transaction; its heartbeat rows (history, devices,
models: nearly all of ingestion's rows) go as one multi-row statement per table, the
columns sent as arrays and read back with ``unnest`` (``bulk_statement``), which psycopg prepares
once per connection; the rarer status and event rows through ``executemany`` (pipelined
by psycopg). Rows are written in key order (``unnest`` keeps the arrays' order) so two
workers touching the same devices cannot deadlock. A transaction that still fails on a
serialization error or a deadlock is retried once.

A database restart or failover never needs ``edgectl serve`` restarted: a connection is
checked when taken from the pool, a broken one is replaced, and the pool reconnects in
the background with exponential back-off (1 s, doubling, with jitter) while the server
is away. Meanwhile each operation waits at most ``timeout_s`` for a connection, then
raises ``StoreUnavailable``: ingestion keeps its messages unacknowledged and retries, the
rollout job skips the tick, ``/metrics`` says ``edgefleet_store_up 0``. An error with a
live connection is about the data and is raised as psycopg raised it.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Final

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from controller.fleet.records import IngestBatch
from controller.fleet.store import (
    DEVICE_FROM_HEARTBEAT,
    EVENT_INSERT,
    HEARTBEAT_INSERT,
    MODEL_UPSERT,
    ROLLUP,
    HeartbeatKey,
    StoreError,
    StoreUnavailable,
    TelemetryStore,
    rollup_upsert,
)

logger = logging.getLogger(__name__)

# libpq settings used unless the DSN sets them: fail a connection attempt in seconds, and
# notice a server that vanished without closing the socket (a failover, a cut cable)
# within about a minute instead of the kernel's two hours.
CONNECT_DEFAULTS: Final = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}


# The PostgreSQL types of the columns of the statements sent as one multi-row statement.
_BULK_TYPES: Final = {
    HEARTBEAT_INSERT: ("text", "text", "float8", "text", "text", "int8"),
    DEVICE_FROM_HEARTBEAT: (
        *("text", "text", "float8", "float8", "text", "float8", "text", "int4", "int4"),
    ),
    MODEL_UPSERT: (
        *("text", "text", "text", "text", "text", "int4", "int4", "int4", "float8", "text"),
        *("float8", "float8"),
    ),
}
_VALUES: Final = re.compile(r"VALUES \((?:\?, )*\?\)")


# The count tables' triggers (``controller.fleet.store.COUNT_TABLES``). Rows added or
# removed are counted once a statement, from its transition table: a batch's bulk insert
# of devices seen for the first time is one upsert per fleet, not one per device. A model
# row moved to another version is counted row by row, only when its version changes
# (the WHEN is checked as the row is updated; a heartbeat that keeps its version fires
# nothing). Counter rows are updated in key order, so two writers moving devices both
# ways cannot deadlock on them (``write`` retries a deadlock once anyway).
COUNT_TRIGGERS: Final = (
    """CREATE OR REPLACE FUNCTION edgefleet_devices_added() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN
        WITH counted AS (
            INSERT INTO fleet_sizes (fleet, devices, generation)
            SELECT fleet, count(*), 1 FROM added GROUP BY fleet ORDER BY fleet
            ON CONFLICT (fleet) DO UPDATE SET devices = fleet_sizes.devices + excluded.devices,
                generation = fleet_sizes.generation + 1
            RETURNING fleet, generation)
        INSERT INTO fleet_changes (fleet, generation, device)
        SELECT a.fleet, c.generation, a.device FROM added a JOIN counted c ON c.fleet = a.fleet;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION edgefleet_devices_removed() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN
        WITH counted AS (
            UPDATE fleet_sizes SET devices = fleet_sizes.devices - gone.n,
                generation = fleet_sizes.generation + 1
            FROM (SELECT fleet, count(*) AS n FROM removed GROUP BY fleet ORDER BY fleet) gone
            WHERE fleet_sizes.fleet = gone.fleet
            RETURNING fleet_sizes.fleet, fleet_sizes.generation)
        INSERT INTO fleet_changes (fleet, generation, device)
        SELECT r.fleet, c.generation, r.device FROM removed r JOIN counted c ON c.fleet = r.fleet;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION edgefleet_models_added() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN
        INSERT INTO model_versions (fleet, model, version, devices)
        SELECT fleet, model, COALESCE(version, ''), count(*) FROM added
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (fleet, model, version)
        DO UPDATE SET devices = model_versions.devices + excluded.devices;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION edgefleet_models_removed() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN
        UPDATE model_versions SET devices = model_versions.devices - gone.n
        FROM (SELECT fleet, model, COALESCE(version, '') AS version, count(*) AS n
              FROM removed GROUP BY 1, 2, 3) gone
        WHERE model_versions.fleet = gone.fleet AND model_versions.model = gone.model
          AND model_versions.version = gone.version;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE FUNCTION edgefleet_models_moved() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN
        INSERT INTO model_versions (fleet, model, version, devices)
        SELECT NEW.fleet, NEW.model, v.version, v.n
        FROM (VALUES (COALESCE(OLD.version, ''), -1), (COALESCE(NEW.version, ''), 1))
             AS v(version, n) ORDER BY v.version
        ON CONFLICT (fleet, model, version)
        DO UPDATE SET devices = model_versions.devices + excluded.devices;
        RETURN NULL;
    END $$""",
    """CREATE OR REPLACE TRIGGER devices_added AFTER INSERT ON devices
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT
    EXECUTE FUNCTION edgefleet_devices_added()""",
    """CREATE OR REPLACE TRIGGER devices_removed AFTER DELETE ON devices
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION edgefleet_devices_removed()""",
    """CREATE OR REPLACE TRIGGER device_models_added AFTER INSERT ON device_models
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT
    EXECUTE FUNCTION edgefleet_models_added()""",
    """CREATE OR REPLACE TRIGGER device_models_removed AFTER DELETE ON device_models
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT
    EXECUTE FUNCTION edgefleet_models_removed()""",
    """CREATE OR REPLACE TRIGGER device_models_moved AFTER UPDATE OF version ON device_models
    FOR EACH ROW WHEN (COALESCE(OLD.version, '') <> COALESCE(NEW.version, ''))
    EXECUTE FUNCTION edgefleet_models_moved()""",
)


def bulk_statement(statement: str, types: tuple[str, ...]) -> str:
    """``statement`` (an INSERT of one row of ``?`` parameters, in the store's dialect)
    as one that inserts every row of its columns, each given as an array."""
    arrays = ", ".join(f"%b::{kind}[]" for kind in types)
    bulk, found = _VALUES.subn(f"SELECT * FROM unnest({arrays})", statement)
    if found != 1 or bulk.count("?"):
        raise ValueError(f"not an INSERT of one row of {len(types)} parameters: {statement}")
    return bulk


def describe(dsn: str) -> str:
    """Where ``dsn`` points, fit for a message (no password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "PostgreSQL"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    db = params.get("dbname") or params.get("user") or ""
    return f"PostgreSQL at {host}:{port}" + (f" (database {db})" if db else "")


class PostgresStore(TelemetryStore):
    placeholder = "%s"
    greatest = "GREATEST"
    least = "LEAST"
    truncate = "trunc({})"
    serial = "BIGSERIAL PRIMARY KEY"
    # Another worker may add the column between our look and our ALTER.
    add_column = "ADD COLUMN IF NOT EXISTS"
    # SQLSTATE classes 22 (data exception: out of range, NUL in text), 23 (integrity) and
    # 54 (program limit exceeded: an index entry too large).
    data_errors = (
        *TelemetryStore.data_errors,
        psycopg.DataError,
        psycopg.IntegrityError,
        pg_errors.ProgramLimitExceeded,
    )

    count_triggers = COUNT_TRIGGERS
    db_now = "extract(epoch from now())::float8"

    # No writer may add a row between the count and the trigger that counts it.
    lock_for_counts = ("LOCK TABLE devices, device_models IN SHARE ROW EXCLUSIVE MODE",)

    def __init__(self, dsn: str, timeout_s: float = 5.0) -> None:
        super().__init__()
        self.dsn = dsn
        self.where = describe(dsn)
        self.timeout_s = timeout_s
        given = conninfo_to_dict(dsn)
        conninfo = make_conninfo(
            dsn, **{k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        )
        # One plain connection first: a bad DSN or a server that is down fails here, at
        # once and with libpq's own words, not after the pool's retries.
        try:
            with psycopg.connect(conninfo) as conn:
                self._create_tables_on(conn)
        except psycopg.Error as exc:
            raise StoreError(
                f"the telemetry store ({self.where}) is unreachable: {str(exc).strip()}"
            ) from None
        self._bulk = {
            statement: self._sql(bulk_statement(statement, types))
            for statement, types in _BULK_TYPES.items()
        }
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=2,  # the writer's and a reader's
            max_size=4,
            open=True,
            check=ConnectionPool.check_connection,
            timeout=timeout_s,
            name="telemetry-store",
            reconnect_failed=self._reconnect_failed,
        )

    def _create_tables_on(self, conn: psycopg.Connection[Any]) -> None:
        try:
            with conn.transaction(), conn.cursor() as cur:
                self._create_tables_with(cur)
        except pg_errors.UniqueViolation:
            pass  # two workers creating the tables at once: the other one won

    def _reconnect_failed(self, _pool: ConnectionPool[Any]) -> None:
        logger.error(
            "telemetry store (%s) still unreachable; reconnecting when next used", self.where
        )

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        """A cursor in one transaction (committed on exit, rolled back on an error) on a
        pooled connection; ``StoreUnavailable`` when there is no live connection."""
        try:
            with self._pool.connection(timeout=self.timeout_s) as conn:
                try:
                    with conn.cursor() as cur:
                        yield cur
                except psycopg.Error as exc:
                    if conn.closed:  # the connection died under us: the pool replaces it
                        raise self._unavailable(str(exc)) from exc
                    raise
        except PoolTimeout:
            raise self._unavailable(f"no connection within {self.timeout_s:g} s") from None

    def _unavailable(self, cause: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"the telemetry store ({self.where}) is unreachable: {cause.strip()}"
        )

    def _writer(self) -> AbstractContextManager[Any]:
        return self._cursor()

    def _lease_cursor(self) -> AbstractContextManager[Any]:
        # Its own pooled connection: a renewal never waits behind an ingestion batch.
        return self._observed(self._cursor())

    def _reader(self) -> AbstractContextManager[Any]:
        return self._cursor()

    def _has_table(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT to_regclass(%s)", [name])  # in the search path, as the DDL
        return cur.fetchone()[0] is not None

    def _insert_events(self, cur: Any, rows: list[tuple[Any, ...]]) -> Counter[tuple[str, str]]:
        # Several writers at once: each counts the rows its own statements returned.
        cur.executemany(self._sql(EVENT_INSERT) + " RETURNING fleet, kind", rows, returning=True)
        added: Counter[tuple[str, str]] = Counter()
        while True:
            for fleet, kind in cur.fetchall():
                added[(str(fleet), str(kind))] += 1
            if not cur.nextset():
                return added

    def _write_rows(self, cur: Any, statement: str, rows: list[tuple[Any, ...]]) -> None:
        bulk = self._bulk.get(statement)
        if bulk is None or len(rows) == 1:
            super()._write_rows(cur, statement, rows)
        else:
            cur.execute(bulk, [list(column) for column in zip(*rows, strict=True)])

    def _insert_places(
        self, cur: Any, rollout_id: str, devices: Sequence[str], places: Sequence[float]
    ) -> None:
        # One statement, the columns as arrays (executemany costs ~20 µs a row).
        cur.execute(
            "INSERT INTO rollout_places (rollout_id, device, place) "
            "SELECT %s, * FROM unnest(%s::text[], %s::float8[]) "
            "ON CONFLICT (rollout_id, device) DO NOTHING",
            [rollout_id, list(devices), list(places)],
        )

    def _insert_heartbeats(self, cur: Any, rows: list[tuple[Any, ...]]) -> set[HeartbeatKey] | None:
        # Several writers at once: when some rows were there already, the new ones are
        # those this transaction wrote (their xmin), looked up by key in the unique index.
        self._write_rows(cur, HEARTBEAT_INSERT, rows)  # one statement: its rowcount is the new rows
        if cur.rowcount == len(rows):
            return None
        keyed = [r for r in rows if r[4] is not None and r[5] is not None]
        cur.execute(
            "SELECT h.fleet, h.device, h.at, h.seq FROM heartbeats h JOIN "
            "unnest(%s::text[], %s::text[], %s::text[], %s::bigint[]) AS k(fleet, device, at, seq) "
            "ON h.fleet = k.fleet AND h.device = k.device AND h.at = k.at AND h.seq = k.seq "
            "WHERE h.xmin = pg_current_xact_id()::xid",
            [
                [r[0] for r in keyed],
                [r[1] for r in keyed],
                [r[4] for r in keyed],
                [r[5] for r in keyed],
            ],
        )
        return {(str(f), str(d), str(a), int(q)) for f, d, a, q in cur.fetchall()}

    def _write_rollup(self, cur: Any, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        # One statement a table, its columns passed as arrays: executemany would cost
        # the client ~20 µs a row (docs/benchmarks.md, rollout tick evidence).
        for key, table, head, extra, sums in ROLLUP:
            if rows[key]:
                every = (*head, *extra, *sums)
                arrays = ", ".join(f"%s::{kind}[]" for _c, kind in every)
                statement = rollup_upsert(
                    table,
                    [c for c, _t in (*head, *extra)],
                    [c for c, _t in sums],
                    f"SELECT * FROM unnest({arrays})",
                )
                cur.execute(statement, [list(column) for column in zip(*rows[key], strict=True)])

    def write(self, batch: IngestBatch) -> int:
        try:
            return super().write(batch)
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
            return super().write(batch)

    def close(self) -> None:
        self._pool.close()
