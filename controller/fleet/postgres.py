"""The PostgreSQL backend of the telemetry store (psycopg 3), for several workers.

Each ``edgectl serve`` worker of a shared MQTT subscription holds one write and one read
connection. Batches go through ``executemany`` (pipelined by psycopg) in one transaction;
rows are written in key order so two workers touching the same devices cannot deadlock.
A transaction that still fails on a serialization error or a deadlock is retried once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from controller.fleet.records import IngestBatch
from controller.fleet.store import StoreError, TelemetryStore


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

    def __init__(self, dsn: str) -> None:
        super().__init__()
        self.dsn = dsn
        try:
            self._write_conn = psycopg.connect(dsn, connect_timeout=10)
            self._read_conn = psycopg.connect(dsn, connect_timeout=10, autocommit=True)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the telemetry store: {exc}") from None
        try:
            self._create_tables()
        except pg_errors.UniqueViolation:
            # Two workers creating the tables at once: the other one won.
            self._write_conn.rollback()

    @contextmanager
    def _writer(self) -> Iterator[Any]:
        with self._write_conn.transaction(), self._write_conn.cursor() as cur:
            yield cur

    @contextmanager
    def _reader(self) -> Iterator[Any]:
        with self._read_conn.cursor() as cur:
            yield cur

    def write(self, batch: IngestBatch) -> int:
        try:
            return super().write(batch)
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
            return super().write(batch)

    def close(self) -> None:
        self._write_conn.close()
        self._read_conn.close()
