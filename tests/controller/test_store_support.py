"""Helpers for tests that need a telemetry store: a fresh PostgreSQL schema per test.

PostgreSQL comes from ``EDGEFLEET_TEST_PG_DSN`` (default: the local server on
127.0.0.1:5432 as ``postgres``, trust auth). Without a reachable server the tests that
need it are skipped with the reason, except under CI (``CI`` set), where they fail:
CI must show they ran.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store

PG_DSN = os.environ.get("EDGEFLEET_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _unreachable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI and unreachable at {PG_DSN}: {reason}")
    pytest.skip(f"no PostgreSQL reachable at {PG_DSN} ({reason}); set EDGEFLEET_TEST_PG_DSN")


@contextmanager
def fresh_pg_schema() -> Iterator[str]:
    """A DSN whose search_path is a new, empty schema; the schema is dropped afterwards."""
    import psycopg

    try:
        admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        _unreachable(str(exc).strip())
        raise AssertionError("unreachable") from None
    schema = f"edgefleet_test_{secrets.token_hex(6)}"
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_DSN else "?"
    try:
        yield f"{PG_DSN}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


@contextmanager
def store_location(backend: str, tmp_path: Path) -> Iterator[str]:
    """Where an empty store of ``backend`` (``sqlite`` or ``postgres``) can be opened: a
    file under ``tmp_path``, or a fresh PostgreSQL schema (dropped afterwards)."""
    if backend == "sqlite":
        yield str(tmp_path / "telemetry.sqlite")
        return
    with fresh_pg_schema() as dsn:
        yield dsn


@contextmanager
def store_for(backend: str, tmp_path: Path) -> Iterator[TelemetryStore]:
    """An empty store of ``backend`` (``sqlite`` or ``postgres``), closed afterwards."""
    with store_location(backend, tmp_path) as location:
        store = open_store(location)
        try:
            yield store
        finally:
            store.close()
