"""Opening the telemetry store: the one place that chooses a backend.

``open_store`` reads the location: a ``postgresql://`` (or ``postgres://``) DSN, or a libpq
``key=value`` string naming a ``dbname``, opens PostgreSQL (``controller.fleet.postgres``),
so several ``edgectl serve`` workers can share it; anything else is a SQLite file in WAL
mode (``controller.fleet.sqlite``).

Invariant: the interface (``controller.fleet.store``) never imports a backend; the
backends import the interface; only this module imports all three. Each backend is
imported when first opened, so a SQLite deployment never loads psycopg.
"""

from __future__ import annotations

from pathlib import Path

from controller.fleet.store import TelemetryStore


def is_postgres(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://")) or "dbname=" in location


def open_store(location: str) -> TelemetryStore:
    """Open (and create the tables of) the store at ``location``. Raises StoreError."""
    if is_postgres(location):
        from controller.fleet.postgres import PostgresStore

        return PostgresStore(location)
    from controller.fleet.sqlite import SqliteStore

    return SqliteStore(Path(location))
