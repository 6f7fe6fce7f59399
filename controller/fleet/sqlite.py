"""The SQLite backend of the telemetry store: one file, WAL, batched transactions.

WAL lets ``edgectl fleet status`` and ``/metrics`` read while ``edgectl serve`` writes.
The write connection runs ``synchronous=FULL``: a commit is on the disk (the WAL
fsynced) before ``write`` returns, because ingestion acknowledges QoS 1 events right
after it and the device then deletes them; with ``NORMAL`` a power cut could lose the
last committed, acknowledged batches (docs/benchmarks.md measures the cost, telemetry
ingest, 2026-12-03).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.fleet.store import StoreError, TelemetryStore


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class SqliteStore(TelemetryStore):
    # Too big (SQLITE_TOOBIG), a type or constraint refused; OverflowError: beyond 64 bits.
    data_errors = (*TelemetryStore.data_errors, sqlite3.DataError, sqlite3.IntegrityError)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_conn = _connect(path, "FULL")  # durable before the acknowledgement
            self._read_conn = _connect(path, "NORMAL")  # it never writes
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the telemetry store {path}: {exc}") from None
        self._create_tables()

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Cursor]:
        cur = self._write_conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            if self._write_conn.in_transaction:  # SQLite ends it itself on a full disk
                cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Cursor]:
        yield self._read_conn.cursor()

    def close(self) -> None:
        self._write_conn.close()
        self._read_conn.close()
