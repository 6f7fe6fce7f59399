"""``/metrics`` device gauges grouped in SQL equal what loading every device gave.

``TelemetryStore.fleet_aggregates`` (SQLite and PostgreSQL, real stores) against
``render_metrics(store.devices(), ...)`` on the same store, at injected times around the
stale threshold of devices that sit exactly on it, for a population with several fleets,
devices with no heartbeat, no models or an interval of zero, models with no version and
devices dropping outbox events.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.contracts import Event, Status
from controller.app import add_metrics_route
from controller.fleet.records import HeartbeatFacts, IngestBatch, ModelFacts
from controller.fleet.status import StalePolicy, health
from controller.fleet.store import TelemetryStore
from controller.serve.metrics import render_aggregates, render_metrics

NOW = 1_800_000_000.0
POLICY = StalePolicy(default_interval_s=10.0, stale_after=3.0)


def facts(
    fleet: str,
    device: str,
    interval_s: float,
    dropped: int,
    models: tuple[ModelFacts, ...],
) -> HeartbeatFacts:
    return HeartbeatFacts(fleet, device, "0.1.0", interval_s, {}, 0, dropped, models)


def model(name: str, version: str | None, state: str = "committed") -> ModelFacts:
    return (name, version, state, 10, 0, 0, None)


def populate(store: TelemetryStore) -> dict[str, float]:
    """Store the population; return each threshold device's ``now - last_seen`` limit."""
    at_threshold = {
        # interval 10 s: stale past 30 s of silence.
        "edge-10": (10.0, 30.0),
        # An interval whose threshold is no exact binary fraction (3 * 0.1).
        "edge-0.1": (0.1, 3.0 * 0.1),
        # Interval 0 means "not said": the default applies, as for no heartbeat at all.
        "edge-zero": (0.0, 30.0),
    }
    beats: list[tuple[HeartbeatFacts, float, str]] = []
    for device, (interval, limit) in at_threshold.items():
        beats.append(
            (facts("alpha", device, interval, 1, (model("det", "1.0"),)), NOW - limit, "{}")
        )
    beats += [
        (facts("alpha", "fresh", 10.0, 4, (model("det", "1.0"), model("cls", "2.0"))), NOW, "{}"),
        (facts("alpha", "no-version", 10.0, 0, (model("det", None, "installing"),)), NOW, "{}"),
        (facts("alpha", "no-models", 10.0, 2, ()), NOW - 5.0, "{}"),
        (facts("alpha", "long-gone", 10.0, 0, (model("det", "0.9"),)), NOW - 3600.0, "{}"),
        (facts("beta", "b1", 5.0, 7, (model("det", "1.0"),)), NOW - 1.0, "{}"),
        (facts("beta", "b2", 5.0, 0, (model("det", "1.0"),)), NOW - 15.0, "{}"),
        # Offline by its last will, though heard from just now.
        (facts("beta", "gone-b3", 5.0, 3, (model("det", "1.1", "probation"),)), NOW, "{}"),
        # A fleet name that needs escaping in a label.
        (facts('ga"mma\\', "g1", 10.0, 1, (model("det", "1.0"),)), NOW - 2.0, "{}"),
    ]
    statuses = [
        (Status("gone-b3", "beta", False, "0.1.0", {}, "2026-01-01T00:00:00Z"), NOW + 1.0),
        # No heartbeat ever: online by its status, judged on the default interval.
        (
            Status("status-only", "delta", True, "0.1.0", {"det": {"version": "3.0"}}, "x"),
            NOW - 30.0,
        ),
        (Status("status-gone", "delta", False, "", {}, "x"), NOW - 100.0),
    ]
    # Neither heartbeat nor status: seen through an event only (online unknown).
    events = [(Event("event-only", "delta", "s", 1, "x", "install_started"), NOW - 31.0)]
    store.write(IngestBatch(heartbeat_facts=beats, statuses=statuses, events=events))
    return {device: limit for device, (_interval, limit) in at_threshold.items()}


def old_text(store: TelemetryStore, now: float) -> str:
    return render_metrics(store.devices(), store.event_counts(), {"heartbeats": 3}, now, POLICY)


def new_text(store: TelemetryStore, now: float) -> str:
    aggregates = store.fleet_aggregates(now, POLICY.default_interval_s, POLICY.stale_after)
    return render_aggregates(aggregates, store.event_counts(), {"heartbeats": 3})


def test_sql_aggregates_equal_the_rows_at_and_around_the_thresholds(
    store: TelemetryStore,
) -> None:
    limits = populate(store)
    devices = {row.device: row for row in store.devices()}
    times = {NOW, NOW + 30.0, NOW + 31.0, NOW + 10_000.0}
    for device, limit in limits.items():
        exact = devices[device].last_seen + limit
        times |= {math.nextafter(exact, -math.inf), exact, math.nextafter(exact, math.inf)}
    for now in sorted(times):
        assert new_text(store, now) == old_text(store, now), now

    # The thresholds are really exercised: just before them online, just past them stale,
    # and the two exact ones (30 s of silence, 30 s by the default interval) online on it.
    for device, limit in limits.items():
        row = devices[device]
        exact = row.last_seen + limit
        assert health(row, math.nextafter(exact, -math.inf), POLICY) == "online", device
        assert health(row, math.nextafter(exact, math.inf), POLICY) == "stale", device
    for device in ("edge-10", "edge-zero"):
        assert NOW - devices[device].last_seen == 30.0
        assert health(devices[device], NOW, POLICY) == "online"
    text = new_text(store, NOW)
    for line in (
        'edgefleet_devices{fleet="alpha",health="online"} 6',
        'edgefleet_devices{fleet="alpha",health="stale"} 1',
        'edgefleet_devices{fleet="beta",health="offline"} 1',
        'edgefleet_devices{fleet="delta",health="online"} 1',
        'edgefleet_devices{fleet="delta",health="stale"} 1',
        'edgefleet_devices{fleet="delta",health="offline"} 1',
        'edgefleet_devices{fleet="ga\\"mma\\\\",health="online"} 1',
        'edgefleet_model_devices{fleet="alpha",model="det",version="",state="installing"} 1',
        'edgefleet_model_devices{fleet="alpha",model="det",version="1.0",state="committed"} 4',
        'edgefleet_model_devices{fleet="delta",model="det",version="3.0",state="unknown"} 1',
        'edgefleet_device_events_dropped{fleet="alpha"} 9',
        'edgefleet_device_events_dropped{fleet="beta"} 10',
        'edgefleet_device_events_dropped{fleet="delta"} 0',
        'edgefleet_events_total{fleet="delta",kind="install_started"} 1',
    ):
        assert line in text.splitlines(), line


def test_an_empty_store_renders_as_before(store: TelemetryStore) -> None:
    assert new_text(store, NOW) == old_text(store, NOW)


def test_the_metrics_route_serves_the_sql_aggregates(
    store: TelemetryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(store)
    monkeypatch.setattr(time, "time", lambda: NOW)

    async def scrape() -> str:
        app = web.Application()
        add_metrics_route(app, store, None, POLICY)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/metrics")
            assert response.status == 200
            return await response.text()

    expected = render_metrics(store.devices(), store.event_counts(), {}, NOW, POLICY)
    assert asyncio.run(scrape()) == expected
