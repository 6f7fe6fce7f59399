"""An acknowledged event survives a power cut on SQLite (issue 19, defect 7).

Ingestion acknowledges a QoS 1 event right after its batch commits, and the device then
deletes it from its outbox. In WAL mode with ``synchronous=NORMAL`` a commit reaches the
disk only at the next checkpoint, so a power cut could lose acknowledged events; the
connection that commits ingest's batches must run with ``synchronous=FULL``.
"""

from __future__ import annotations

from pathlib import Path

from controller.fleet.sqlite import SqliteStore
from controller.fleet.stores import open_store

FULL = 2  # what PRAGMA synchronous returns for FULL (NORMAL is 1)


def test_the_connection_ingest_commits_on_syncs_every_commit(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "telemetry.sqlite"))  # as edgectl serve opens it
    assert isinstance(store, SqliteStore)
    try:
        with store._write_lock, store._writer() as cur:  # the transaction write() runs in
            cur.execute("PRAGMA synchronous")
            assert cur.fetchone() == (FULL,)
            cur.execute("PRAGMA journal_mode")
            assert cur.fetchone() == ("wal",)  # readers still do not block the writer
    finally:
        store.close()
