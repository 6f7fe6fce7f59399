"""The PostgreSQL store outlives its server: a restart or failover never needs ``serve``
restarted, and while the server is away every reader says so (issue 19, item 4).

Each test runs its own PostgreSQL (``tests.controller.private_postgres``), stops and
restarts it; nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from paho.mqtt.enums import CallbackAPIVersion

from agent.contracts import Event, device_topic, event_payload
from controller.app import add_metrics_route
from controller.fleet.ingest import Ingestor, IngestSettings
from controller.fleet.records import IngestBatch
from controller.fleet.status import StalePolicy
from controller.fleet.store import StoreUnavailable, TelemetryStore
from controller.fleet.stores import open_store
from controller.repository.repo import Repository
from tests.controller.conftest import Served, edgectl_cmd
from tests.controller.private_postgres import PrivatePostgres, private_postgres
from tests.e2e_support import wait_until
from tests.helpers import Broker

FLEET = "lab"


def event(device: str, seq: int) -> Event:
    return Event(device, FLEET, "s1", seq, "2026-01-01T00:00:00Z", "install_started", "m", "1.0.0")


def batch(device: str, *seqs: int) -> IngestBatch:
    return IngestBatch(events=[(event(device, seq), 100.0 + seq) for seq in seqs])


@pytest.fixture
def server() -> Iterator[PrivatePostgres]:
    with private_postgres() as s:
        yield s


@pytest.fixture
def pg_store(server: PrivatePostgres) -> Iterator[TelemetryStore]:
    store = open_store(server.dsn)
    yield store
    store.close()


def scrape(store: TelemetryStore) -> str:
    async def get() -> str:
        app = web.Application()
        add_metrics_route(app, store, None, StalePolicy())
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/metrics")
            assert response.status == 200
            return await response.text()

    return asyncio.run(get())


def test_writes_and_reads_resume_after_the_server_restarts(
    server: PrivatePostgres, pg_store: TelemetryStore
) -> None:
    pg_store.write(batch("d1", 1))
    assert pg_store.count("events") == 1  # both the writer's and a reader's connection used

    server.restart()  # every pooled connection is cut

    pg_store.write(batch("d1", 2))  # no error: the pool replaced the dead connections
    assert [e.seq for e in pg_store.events(device="d1")] == [1, 2]
    assert pg_store.up


def test_while_the_server_is_down_operations_say_unavailable_and_metrics_say_so(
    server: PrivatePostgres, pg_store: TelemetryStore
) -> None:
    pg_store.write(batch("d1", 1))
    assert "edgefleet_store_up 1\n" in scrape(pg_store)

    server.stop()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        pg_store.write(batch("d1", 2))
    with pytest.raises(StoreUnavailable):
        pg_store.devices()
    assert not pg_store.up
    text = scrape(pg_store)  # /metrics still answers, and says the store is away
    assert "edgefleet_store_up 0\n" in text
    errors = [line for line in text.splitlines() if line.startswith("edgefleet_store_errors_total")]
    assert errors and int(errors[0].split()[-1]) >= 3

    server.start()
    pg_store.write(batch("d1", 2))  # the same retry ingestion makes
    assert [e.seq for e in pg_store.events(device="d1")] == [1, 2]
    assert "edgefleet_store_up 1\n" in scrape(pg_store)


def test_fleet_status_says_the_store_is_unreachable(server: PrivatePostgres) -> None:
    store = open_store(server.dsn)
    store.close()
    server.stop()
    done = subprocess.run(
        edgectl_cmd("fleet", "status", "--store", server.dsn),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "unreachable" in done.stderr and f"127.0.0.1:{server.port}" in done.stderr


def test_ingestion_stores_everything_it_received_across_a_restart(
    server: PrivatePostgres, pg_store: TelemetryStore, broker: Broker
) -> None:
    ingestor = Ingestor(
        IngestSettings(
            broker.host, broker.port, client_id="ingest-pg", flush_s=0.05, store_retry_max_s=1.0
        ),
        pg_store,
    )
    ingestor.start()
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="device-sim")
    try:
        wait_until(lambda: ingestor.is_subscribed, 10, "the ingestor to connect")
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        topic = device_topic(FLEET, "d1", "events")

        def publish(seqs: range) -> None:
            for seq in seqs:
                info = publisher.publish(topic, event_payload(event("d1", seq)), qos=1)
                info.wait_for_publish(timeout=10)

        publish(range(1, 11))
        wait_until(lambda: pg_store.count("events") == 10, 20, "the first 10 events")

        server.stop()
        publish(range(11, 31))  # received, not storable, kept unacknowledged
        wait_until(lambda: not pg_store.up, 20, "ingestion to find the store away")
        server.start()

        wait_until(lambda: pg_store.count("events") == 30, 60, "all 30 events after the restart")
        assert [e.seq for e in pg_store.events(device="d1", limit=100)] == list(range(1, 31))
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        ingestor.stop()


def test_serve_says_the_store_is_away_and_carries_on_when_it_is_back(
    server: PrivatePostgres,
    repo: Repository,
    start_serve: Callable[..., Served],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGECTL_STORE", server.dsn)
    served = start_serve(repo.path, "")  # no broker: the store, /metrics and the rollout job

    def store_up() -> str:
        with urllib.request.urlopen(f"{served.url}/metrics", timeout=60) as response:
            text = response.read().decode()
        return next(line for line in text.splitlines() if line.startswith("edgefleet_store_up"))

    assert store_up() == "edgefleet_store_up 1"
    server.stop()
    wait_until(
        lambda: store_up() == "edgefleet_store_up 0", 60, "/metrics to say the store is away"
    )
    server.start()
    wait_until(lambda: store_up() == "edgefleet_store_up 1", 60, "/metrics to say it is back")
    assert served.process.poll() is None
    assert "unreachable" in served.stderr.read_text()  # and the log said why


def test_a_store_on_a_server_that_is_down_is_not_opened(tmp_path: Path) -> None:
    with private_postgres() as server:
        server.stop()
        with pytest.raises(Exception, match=f"127.0.0.1:{server.port}"):
            open_store(server.dsn)
