"""The SQLite backend of the telemetry store: one file, WAL, batched transactions.

WAL lets ``edgectl fleet status`` and ``/metrics`` read while ``edgectl serve`` writes.

A ``durable`` batch (``IngestBatch.durable``: it holds a QoS 1 message, which ingestion
acknowledges right after the commit, and the device then deletes) commits with
``synchronous=FULL``: the WAL is fsynced before ``write`` returns. With ``NORMAL`` a
commit reaches the disk only at the next checkpoint, and a power cut could lose
acknowledged events. A batch of QoS 0 heartbeats only (nothing acknowledged; most of
the traffic) commits with ``NORMAL``: a power cut may lose the last of those, never half
a batch, and their fsync would cost about a tenth of the store's time (docs/benchmarks.md,
telemetry ingest, 2026-12-03). A ``FULL`` commit also makes every commit before it durable.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.fleet.records import IngestBatch
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
            self._write_conn = _connect(path, "FULL")  # until a batch says otherwise
            self._read_conn = _connect(path, "NORMAL")  # it never writes
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the telemetry store {path}: {exc}") from None
        self._synchronous = "FULL"
        self._create_tables()

    def write(self, batch: IngestBatch) -> int:
        """Store ``batch``; on the disk when this returns if ``batch.durable`` (module
        docstring). Called from one thread (ingestion's writer)."""
        mode = "FULL" if batch.durable else "NORMAL"
        if mode != self._synchronous:
            with self._write_lock:  # between transactions: SQLite ignores it inside one
                self._write_conn.execute(f"PRAGMA synchronous={mode}")
            self._synchronous = mode
        return super().write(batch)

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
