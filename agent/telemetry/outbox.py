"""A bounded outbox: lifecycle events wait here until the broker has them.

Events are appended in the order they happen and leave only when the broker
acknowledged them (PUBACK), oldest first, so a device that is offline for an hour, or
restarts while offline, reports everything in order once it reconnects. The outbox is
one SQLite file (WAL, ``synchronous=FULL``: an appended event survives a power cut).

A disk that refuses a write (full, an I/O error, read-only: SQLite's
``OperationalError``) never makes ``append`` or ``remove`` raise. The event is *held*
in memory instead, behind those already on disk, and every held event is written, in
one transaction and in order, by the next ``append``, ``remove`` or ``persist_held`` the
disk accepts (the MQTT link's sender calls ``persist_held`` about every second). An
acknowledged event the disk cannot delete yet is remembered and not offered again. When
the file cannot even be opened (a full disk has no room for SQLite's ``-shm`` file after
a clean stop removed it), the outbox reads its stream and numbers from the file as it
was closed and holds every event until it can open it.

Invariants:
- ``seq`` numbers grow by one per appended event and are never reused within a
  ``stream`` (a random id chosen when the file is created) for an event that reached
  the disk, so a reader that keys events on (stream, seq) drops duplicates and sees
  every gap. Only what is on disk is offered to the sender: its order is the append
  order.
- At most ``max_events`` events are pending on disk; writing past the bound drops the
  oldest first and adds them to ``dropped``, a counter kept in the file and reported in
  every heartbeat.
- At most ``max_held`` events are held in memory; one more drops the oldest held event,
  counted in ``dropped`` too (the controller sees the gap in ``seq``).
- Held events live in this process only: ``close`` tries once more and logs the seqs it
  loses. An agent killed while the disk still refuses loses them, and the next start
  numbers its events from the last one on disk (the lost ones never left the device).
- Thread-safe: the lifecycle appends from worker threads while the MQTT link drains.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

# Builds the payload of the event numbered ``seq`` in ``stream``.
PayloadBuilder = Callable[[str, int], bytes]

# Events held in memory while the disk refuses them (a few hundred bytes each).
HELD_MAX_EVENTS: Final = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL,
                                   payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_SET_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT(key) DO UPDATE SET value = excluded.value"
)


@dataclass(frozen=True)
class OutboxItem:
    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class _Figures:
    """What the file says: its stream (None in a new file), last seq and dropped count."""

    stream: str | None = None
    last_seq: int = 0
    dropped: int = 0


class Outbox:
    """Pending events on disk (or held in memory while the disk refuses them), bounded,
    oldest dropped first."""

    def __init__(self, path: Path, max_events: int, max_held: int = HELD_MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError(f"max_events expected >= 1, got {max_events}")
        if max_held < 1:
            raise ValueError(f"max_held expected >= 1, got {max_held}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_events = max_events
        self.max_held = max_held
        self._lock = threading.Lock()
        self._appended = threading.Condition(self._lock)
        self._held: deque[OutboxItem] = deque()
        self._gone: set[int] = set()  # acknowledged, still on disk
        self._refusal: str | None = None  # why the disk refuses, while it does
        self._db: sqlite3.Connection | None = None
        with self._lock:
            try:
                self._db = _open(path)
                figures = _read_figures(self._db)
            except sqlite3.OperationalError as exc:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                figures = _read_closed(path, exc)
                self._refused(exc)
            self.stream = figures.stream or secrets.token_hex(8)
            self._last_seq = figures.last_seq
            self._dropped = figures.dropped
            if figures.stream is None:
                self._sync()  # a new file: it names its stream from the start

    # ------------------------------------------------------------------ producers

    def append(self, topic: str, build: PayloadBuilder) -> int:
        """Number the next event and store it durably, or hold it in memory while the disk
        refuses it; return its seq. Raises only what ``build`` raises."""
        with self._lock:
            seq = self._last_seq + 1
            item = OutboxItem(seq, topic, build(self.stream, seq))
            self._last_seq = seq
            self._held.append(item)
            if len(self._held) > self.max_held:
                lost = self._held.popleft()
                self._dropped += 1
                logger.warning(
                    "event outbox: %d event(s) held in memory, the most it holds: dropped "
                    "event %d, %d dropped in all",
                    self.max_held,
                    lost.seq,
                    self._dropped,
                )
            self._sync()
            return seq

    def persist_held(self) -> bool:
        """Write the events held in memory if the disk takes them now; True when none is
        held any more (also when none was)."""
        with self._lock:
            if self._held or self._gone or self._db is None:
                self._sync()
            return not self._held

    # ------------------------------------------------------------------ the sender

    def peek(self, limit: int) -> list[OutboxItem]:
        """The oldest ``limit`` events on disk not yet acknowledged, in order (none while
        the file cannot be read)."""
        with self._lock:
            rows = self._query(
                "SELECT seq, topic, payload FROM events ORDER BY seq LIMIT ?",
                (limit + len(self._gone),),
            )
            items = [OutboxItem(int(s), str(t), bytes(p)) for s, t, p in rows or []]
            return [i for i in items if i.seq not in self._gone][:limit]

    def remove(self, seqs: Iterable[int]) -> None:
        """Forget events the broker acknowledged (already dropped ones are ignored); while
        the disk refuses the deletion, they are remembered and not offered again."""
        batch = set(seqs)
        if not batch:
            return
        with self._lock:
            self._gone |= batch
            self._sync()

    def wait_for_events(self, timeout_s: float) -> bool:
        """Block until an event is on disk to send (True) or ``timeout_s`` passed (False)."""
        with self._lock:
            if self._sendable():
                return True
            self._appended.wait(timeout_s)
            return self._sendable() > 0

    def wake(self) -> None:
        """Wake a sender blocked in ``wait_for_events`` (used at shutdown)."""
        with self._lock:
            self._appended.notify_all()

    # ------------------------------------------------------------------ figures

    @property
    def pending(self) -> int:
        """Events not acknowledged yet: on disk, and held in memory."""
        with self._lock:
            return self._sendable() + len(self._held)

    @property
    def held(self) -> int:
        """Events held in memory because the disk refused them."""
        with self._lock:
            return len(self._held)

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
        """Write what is held if the disk takes it now (else log what is lost), and close."""
        with self._lock:
            if self._held or self._gone:
                self._sync()
            if self._held:
                logger.error(
                    "event outbox: the disk still refuses it (%s): %d event(s) held in "
                    "memory are lost (seq %d-%d)",
                    self._refusal,
                    len(self._held),
                    self._held[0].seq,
                    self._held[-1].seq,
                )
            if self._db is not None:
                self._db.close()
                self._db = None

    # ------------------------------------------------------------------ the file

    def _sync(self) -> None:
        """Bring the file up to date (caller holds the lock): in one transaction, write
        every held event and the figures, drop past the bound, delete what was
        acknowledged. A refusal leaves everything in memory, to try again later."""
        if self._db is None and not self._reopen():
            return
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            if self._gone:
                db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in self._gone])
            db.executemany(
                "INSERT INTO events (seq, topic, payload) VALUES (?, ?, ?)",
                [(i.seq, i.topic, i.payload) for i in self._held],
            )
            excess = max(0, _count(db) - self.max_events)
            if excess:
                db.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT ?)",
                    (excess,),
                )
            figures = {
                "stream": self.stream,
                "last_seq": self._last_seq,
                "dropped": self._dropped + excess,
            }
            db.executemany(_SET_META, [(k, str(v)) for k, v in figures.items()])
            db.execute("COMMIT")
        except BaseException as exc:
            # SQLite rolls back by itself on some errors (a full disk at COMMIT), and
            # ROLLBACK then fails: it must not hide why.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.OperationalError):
                raise
            self._refused(exc)
            return
        if self._refusal is not None:
            logger.warning(
                "event outbox: the disk takes writes again (%d held event(s) written)",
                len(self._held),
            )
            self._refusal = None
        self._held.clear()
        self._gone.clear()
        if excess:
            self._dropped += excess
            logger.warning(
                "event outbox full (%d): dropped the %d oldest event(s), %d in all",
                self.max_events,
                excess,
                self._dropped,
            )
        self._appended.notify_all()

    def _reopen(self) -> bool:
        """Open the file the outbox could not open before (caller holds the lock)."""
        try:
            self._db = _open(self.path)
        except sqlite3.OperationalError as exc:
            self._refused(exc)
            return False
        return True

    def _refused(self, exc: sqlite3.OperationalError) -> None:
        """The disk refused a write: say so once, until it takes writes again."""
        if self._refusal is None:
            logger.warning(
                "event outbox: the disk refuses %s (%s): holding events in memory, in order "
                "(at most %d), until it has room",
                self.path,
                exc,
                self.max_held,
            )
        self._refusal = str(exc)

    def _query(self, sql: str, args: tuple[int, ...] = ()) -> list[Any] | None:
        """Rows of a read (caller holds the lock), or None when the file cannot be read."""
        if self._db is None:
            return None
        try:
            return list(self._db.execute(sql, args).fetchall())
        except sqlite3.OperationalError as exc:
            self._refused(exc)
            return None

    def _sendable(self) -> int:
        rows = self._query("SELECT count(*) FROM events")
        return max(0, int(rows[0][0]) - len(self._gone)) if rows else 0


def _open(path: Path) -> sqlite3.Connection:
    """The outbox file, opened for writing (raises OperationalError when the disk refuses)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if not _has_tables(db):
            db.executescript(_SCHEMA)
    except sqlite3.Error:
        db.close()
        raise
    return db


def _has_tables(db: sqlite3.Connection) -> bool:
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {"events", "meta"} <= names


def _read_figures(db: sqlite3.Connection) -> _Figures:
    if not _has_tables(db):
        return _Figures()
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    return _Figures(
        stream=meta.get("stream"),
        last_seq=int(meta.get("last_seq") or 0),
        dropped=int(meta.get("dropped") or 0),
    )


def _read_closed(path: Path, refusal: sqlite3.OperationalError) -> _Figures:
    """The figures of a file that cannot be opened for writing, read as it was last
    closed. Only safe without a write-ahead log to replay: with one, re-raise
    ``refusal`` (the numbers would be stale, and a number must never be given twice)."""
    if not path.exists() or path.stat().st_size == 0:
        return _Figures()
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise refusal
    db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
    try:
        return _read_figures(db)
    finally:
        db.close()


def _count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
