"""A bounded on-disk outbox: lifecycle events wait here until the broker has them.

Events are appended in the order they happen and leave only when the broker
acknowledged them (PUBACK), oldest first, so a device that is offline for an hour, or
restarts while offline, reports everything in order once it reconnects. The outbox is
one SQLite file (WAL, ``synchronous=FULL``: an appended event survives a power cut).

Invariants:
- ``seq`` numbers grow by one per appended event and are never reused within a
  ``stream`` (a random id chosen when the file is created), so a reader that keys
  events on (stream, seq) drops duplicates and sees every gap.
- At most ``max_events`` events are pending; appending past the bound drops the oldest
  first and adds them to ``dropped``, a counter kept in the file and reported in every
  heartbeat.
- Thread-safe: the lifecycle appends from worker threads while the MQTT link drains.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Builds the payload of the event numbered ``seq`` in ``stream``.
PayloadBuilder = Callable[[str, int], bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL,
                                   payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    topic: str
    payload: bytes


class Outbox:
    """Pending events on disk, bounded, oldest dropped first."""

    def __init__(self, path: Path, max_events: int) -> None:
        if max_events < 1:
            raise ValueError(f"max_events expected >= 1, got {max_events}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_events = max_events
        self._lock = threading.Lock()
        self._appended = threading.Condition(self._lock)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._lock:
            self.stream = self._meta("stream") or self._init_stream()
            self._last_seq = int(self._meta("last_seq") or 0)
            self._dropped = int(self._meta("dropped") or 0)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def _set_meta(self, key: str, value: str | int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    def _init_stream(self) -> str:
        stream = secrets.token_hex(8)
        self._set_meta("stream", stream)
        return stream

    # ------------------------------------------------------------------ producers

    def append(self, topic: str, build: PayloadBuilder) -> int:
        """Store the next event durably and return its seq; drop the oldest past the bound."""
        with self._lock:
            seq = self._last_seq + 1
            payload = build(self.stream, seq)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO events (seq, topic, payload) VALUES (?, ?, ?)",
                    (seq, topic, payload),
                )
                self._set_meta("last_seq", seq)
                excess = self._count() - self.max_events
                if excess > 0:
                    self._db.execute(
                        "DELETE FROM events WHERE seq IN "
                        "(SELECT seq FROM events ORDER BY seq LIMIT ?)",
                        (excess,),
                    )
                    self._set_meta("dropped", self._dropped + excess)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._last_seq = seq
            if excess > 0:
                self._dropped += excess
                logger.warning(
                    "event outbox full (%d): dropped the %d oldest event(s), %d in all",
                    self.max_events,
                    excess,
                    self._dropped,
                )
            self._appended.notify_all()
            return seq

    # ------------------------------------------------------------------ the sender

    def peek(self, limit: int) -> list[OutboxItem]:
        """The oldest ``limit`` pending events, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM events ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxItem(int(s), str(t), bytes(p)) for s, t, p in rows]

    def remove(self, seqs: Iterable[int]) -> None:
        """Forget events the broker acknowledged (already dropped ones are ignored)."""
        batch = [(s,) for s in seqs]
        if not batch:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM events WHERE seq = ?", batch)
            self._db.execute("COMMIT")

    def wait_for_events(self, timeout_s: float) -> bool:
        """Block until an event is pending (True) or ``timeout_s`` passed (False)."""
        with self._lock:
            if self._count():
                return True
            self._appended.wait(timeout_s)
            return self._count() > 0

    def wake(self) -> None:
        """Wake a sender blocked in ``wait_for_events`` (used at shutdown)."""
        with self._lock:
            self._appended.notify_all()

    # ------------------------------------------------------------------ figures

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM events").fetchone()[0])

    @property
    def pending(self) -> int:
        with self._lock:
            return self._count()

    @property
    def dropped(self) -> int:
        """Events dropped because the outbox was full, since the file was created."""
        with self._lock:
            return self._dropped

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._last_seq

    def close(self) -> None:
        with self._lock:
            self._db.close()
