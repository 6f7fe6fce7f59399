"""What the harness reads of the fleet from outside, without changing it.

The version an agent serves (asked over its socket), its install journal, its outbox's
ledger (read-only SQLite, also while it runs) and the events the store holds for it
(read-only SQL on the store's events table, ``controller.fleet.store``'s schema: opening
the store itself would write, creating its tables, while serve ingests).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.client import InferenceClient
from agent.update.journal import JournalRecord, parse_record
from controller.serve.config import DEFAULT_STORE_NAME
from tests.chaos import invariants as inv
from tests.chaos.fleet import AgentProcess
from tests.chaos.traffic import MODEL
from tests.e2e_support import served_version


def serving(agent: AgentProcess) -> str | None:
    """The version the agent serves, or None while it does not answer or serves none."""
    with InferenceClient(agent.socket, timeout_s=10) as client:
        try:
            return served_version(client, MODEL)
        except Exception:  # not listening (yet), or nothing served
            return None


def journal(agent: AgentProcess) -> JournalRecord | None:
    """The agent's install journal of the model, or None when there is none (yet)."""
    try:
        return parse_record((agent.state_dir / "models" / MODEL / "journal.json").read_bytes())
    except (OSError, ValueError):
        return None


def ledger(agent: AgentProcess) -> inv.Ledger:
    """What the agent's outbox says it produced (read-only, also while it runs)."""
    path = agent.state_dir / "outbox.sqlite"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        pending = int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        db.close()
    return inv.Ledger(
        stream=str(meta.get("stream", "")),
        last_seq=int(meta.get("last_seq", 0)),
        dropped=int(meta.get("dropped", 0)),
        pending=pending,
    )


def stored_events(repo: Path, device: str) -> list[inv.StoredEvent]:
    """The device's events in the store, in stored order."""
    path = repo / DEFAULT_STORE_NAME
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT id, stream, seq, kind FROM events WHERE device = ? ORDER BY id", (device,)
        ).fetchall()
    finally:
        db.close()
    return [inv.StoredEvent(int(i), str(st), int(sq), str(k)) for i, st, sq, k in rows]
