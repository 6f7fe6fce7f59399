"""Infrastructure faults around a real `edgectl serve` (issue 19, section 3).

Each case runs serve with a staged rollout going and simulated devices publishing over a
private mosquitto (``tests.serve_faults.harness``), takes away one thing serve depends
on, and checks that serve keeps running, says what is wrong in its log and in
``/metrics``, and resumes by itself once the fault is gone: the rollout goes on from
the stage it was at (no stage passed twice) and every message the broker acknowledged
ends up in the store, once.

- PostgreSQL (a private server) stopped mid-ingest and mid-rollout, then started again.
- The broker stopped (it saves its sessions and queued messages) and started again.
- The SQLite store's disk (a real tmpfs) filled to the last byte, then emptied.
- The timestamp key file replaced by garbage while the timestamp is due to be
  re-signed, then put back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from controller.base.fsio import repo_lock
from controller.repository.repo import Repository
from tests.controller.private_postgres import PrivatePostgres, private_postgres
from tests.helpers import Broker, start_broker
from tests.serve_faults.harness import Fault, Scenario, metric, scrape

if TYPE_CHECKING:
    from tests.chaos.fleet import StateDisk

pytestmark = pytest.mark.slow


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of the test's own (the shared one serves other tests)."""
    with private_postgres() as server:
        yield server


INGESTED_EVENTS = "edgefleet_ingest_messages_total"


def _store_up(text: str) -> float | None:
    return metric(text, "edgefleet_store_up")


def _counter(text: str, name: str, labels: str = "") -> float:
    value = metric(text, name, labels)
    assert value is not None, f"no {name}{{{labels}}} in /metrics"
    return value


@pytest.mark.serve_fault("postgres_restart")
def test_postgres_restarted_mid_ingest_and_mid_rollout(
    tmp_path: Path,
    restartable_broker: list[Broker],
    private_pg: PrivatePostgres,
    rollout_bundle: Path,
) -> None:
    scenario = Scenario(
        tmp_path, tmp_path / "repo", rollout_bundle, restartable_broker[0].address, private_pg.dsn
    )
    try:
        scenario.run(
            Fault(
                inject=private_pg.stop,
                clear=private_pg.start,
                log=r"storing \d+ message\(s\) failed .*telemetry store .*is unreachable",
                during=lambda m: _store_up(m) == 0,
                after=lambda m: _store_up(m) == 1,
                holds_rollout=True,
            )
        )
    finally:
        scenario.close()


@pytest.mark.serve_fault("broker_restart")
def test_broker_restarted(
    tmp_path: Path, restartable_broker: list[Broker], rollout_bundle: Path
) -> None:
    broker = restartable_broker[0]
    scenario = Scenario(
        tmp_path, tmp_path / "repo", rollout_bundle, broker.address, str(tmp_path / "t.sqlite")
    )

    def restart() -> None:
        restartable_broker[0] = start_broker(tmp_path / "broker", port=broker.port, persistent=True)

    def connected(text: str) -> float | None:
        return metric(text, "edgefleet_mqtt_connected", 'client="ingest"')

    try:
        scenario.run(
            Fault(
                inject=broker.stop,
                clear=restart,
                log=r"ingest: lost the broker",
                during=lambda m: connected(m) == 0,
                after=lambda m: connected(m) == 1,
            )
        )
    finally:
        scenario.close()


@pytest.mark.serve_fault("store_disk_full")
def test_sqlite_store_disk_full(
    tmp_path: Path, restartable_broker: list[Broker], small_disk: StateDisk, rollout_bundle: Path
) -> None:
    store = str(small_disk.state_dir / "telemetry.sqlite")
    scenario = Scenario(
        tmp_path, tmp_path / "repo", rollout_bundle, restartable_broker[0].address, store
    )

    before: dict[str, float] = {}

    def fill() -> None:
        before["errors"] = _counter(scrape(scenario.url), "edgefleet_store_errors_total")
        small_disk.fill()

    def free() -> None:
        before["events"] = _counter(scrape(scenario.url), INGESTED_EVENTS, 'kind="events"')
        small_disk.free()

    try:
        scenario.run(
            Fault(
                inject=fill,
                clear=free,
                log=r"database or disk is full",
                # The failed writes are counted; once there is room, events are stored again.
                during=lambda m: _counter(m, "edgefleet_store_errors_total") > before["errors"],
                after=lambda m: _counter(m, INGESTED_EVENTS, 'kind="events"') > before["events"],
            )
        )
    finally:
        scenario.close()


@pytest.mark.serve_fault("key_unreadable")
def test_timestamp_key_unreadable(
    tmp_path: Path, restartable_broker: list[Broker], rollout_bundle: Path
) -> None:
    repo = tmp_path / "repo"
    key = repo / "keys" / "timestamp.pem"
    scenario = Scenario(
        tmp_path, repo, rollout_bundle, restartable_broker[0].address, str(tmp_path / "t.sqlite")
    )
    good = b""
    at_fault: dict[str, int] = {}

    def timestamp() -> tuple[int, datetime]:
        signed = json.loads((repo / "metadata" / "timestamp.json").read_bytes())["signed"]
        expires = datetime.strptime(signed["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return int(signed["version"]), expires

    def break_key() -> None:
        nonlocal good
        with repo_lock(repo):
            # A timestamp signed 13 hours ago: less than half its day left, due now.
            Repository.open(repo).bump_timestamp(datetime.now(UTC) - timedelta(hours=13))
            at_fault["version"] = timestamp()[0]
            good = key.read_bytes()
            key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")

    def fix_key() -> None:
        key.write_bytes(good)

    def ready(text: str) -> float | None:
        return metric(text, "edgefleet_signing_ready", 'role="timestamp"')

    def serving(text: str) -> bool:
        # The repository is still served while the key is broken.
        response = httpx.get(f"{scenario.url}/metadata/timestamp.json", timeout=10)
        return ready(text) == 0 and response.status_code == 200

    def resigned(text: str) -> bool:
        version, expires = timestamp()
        fresh = expires - datetime.now(UTC) > timedelta(hours=12)
        return ready(text) == 1 and version > at_fault["version"] and fresh

    try:
        scenario.run(
            Fault(
                inject=break_key,
                clear=fix_key,
                log=r"cannot sign timestamp metadata: .*keys/timestamp\.pem",
                during=serving,
                after=resigned,
                holds_rollout=True,
            )
        )
    finally:
        scenario.close()
