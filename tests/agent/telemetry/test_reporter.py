"""Heartbeat and event building (pure), the interval figures, and the payload contracts;
and events queued on a real full disk (a small tmpfs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.contracts import (
    EVENT_KIND_BY_PHASE,
    PayloadError,
    SystemFigures,
    Waiting,
    event_payload,
    parse_event,
    parse_status,
    parse_telemetry,
    status_payload,
    telemetry_payload,
)
from agent.runtime.stats import Outcome
from agent.telemetry.outbox import Outbox
from agent.telemetry.reporter import (
    IntervalStats,
    TelemetryReporter,
    build_heartbeat,
    lifecycle_event,
    sample_system,
)
from agent.update.journal import JournalRecord, Phase

if TYPE_CHECKING:
    from tests.chaos.fleet import StateDisk


def test_interval_figures_cover_only_the_time_since_the_last_heartbeat() -> None:
    stats = IntervalStats()
    for i in range(100):
        stats.record("m", "1.0.0", 0.001 * (i + 1), Outcome.OK)
    stats.record("m", "1.0.0", 0.5, Outcome.ERROR)
    stats.record("m", "1.0.0", 0.5, Outcome.CLIENT_ERROR)
    first = stats.take_interval()[("m", "1.0.0")]
    assert (first.requests, first.errors, first.client_errors) == (102, 1, 1)
    assert first.p50_s == pytest.approx(0.0505)
    assert first.p99_s == pytest.approx(0.09901)
    stats.record("m", "1.0.0", 0.002, Outcome.OK)
    second = stats.take_interval()[("m", "1.0.0")]
    assert (second.requests, second.p99_s) == (1, pytest.approx(0.002))
    assert stats.take_interval() == {}
    # The long window (probation's) still has everything.
    assert stats.snapshot("m", "1.0.0").requests == 103


def test_a_heartbeat_reports_the_version_serving_with_its_interval_figures() -> None:
    stats = IntervalStats()
    stats.record("m", "2.0.0", 0.004, Outcome.OK)
    stats.record("m", "1.0.0", 0.004, Outcome.OK)  # the old version, before the swap
    beat = build_heartbeat(
        device="d1",
        fleet="lab",
        at="2026-01-01T00:00:00Z",
        seq=7,
        interval_s=10.0,
        uptime_s=42.0,
        system=SystemFigures(cpu_percent=3.0),
        models_status={"m": {"version": "2.0.0", "state": "active"}, "idle": {"state": "idle"}},
        interval=stats.take_interval(),
        outbox_pending=1,
        outbox_dropped=2,
    )
    assert beat.models["m"].requests == 1 and beat.models["m"].state == "active"
    assert beat.models["idle"].version is None and beat.models["idle"].requests == 0
    parsed = parse_telemetry(telemetry_payload(beat))
    assert parsed == beat


def test_a_heartbeat_carries_why_a_model_waits() -> None:
    """The models' status (``AgentApp.models_status``) holds the update check's reasons:
    the heartbeat carries them, a model not served yet too."""
    waits = {"code": "no_space", "detail": "need 10 bytes, have 1", "version": "1.0.0",
             "since": "2026-01-01T00:00:00Z"}  # fmt: skip
    beat = build_heartbeat(
        device="d1",
        fleet="lab",
        at="2026-01-01T00:00:00Z",
        seq=1,
        interval_s=10.0,
        uptime_s=1.0,
        system=SystemFigures(),
        models_status={
            "m": {"version": "2.0.0", "state": "committed"},
            "new": {"version": None, "state": "idle", "waiting": waits},
        },
        interval={},
    )
    assert beat.models["m"].waiting is None
    assert beat.models["new"].waiting == Waiting(**waits)
    doc = json.loads(telemetry_payload(beat))
    assert "waiting" not in doc["models"]["m"] and doc["models"]["new"]["waiting"] == waits
    assert parse_telemetry(telemetry_payload(beat)) == beat


def test_every_phase_becomes_an_event_with_its_reason() -> None:
    record = JournalRecord(
        model="m",
        phase=Phase.ROLLED_BACK,
        version="2.0.0",
        previous="1.0.0",
        rollout_id="r1",
        reason="error rate 0.5 > 0.05",
    )
    event = lifecycle_event(record, device="d1", fleet="lab", at="now", stream="s", seq=3)
    assert event.kind == "rolled_back" and event.reason == "error rate 0.5 > 0.05"
    assert parse_event(event_payload(event)) == event
    assert set(EVENT_KIND_BY_PHASE) == {p.value for p in Phase}


def test_the_machine_is_measured(tmp_path: Path) -> None:
    figures = sample_system(tmp_path)
    assert figures.memory_total_bytes and figures.memory_total_bytes > 0
    assert figures.disk_free_bytes is not None and figures.cpu_percent is not None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not valid JSON"),
        (b'{"schema": "edgefleet.event/2"}', "schema expected"),
        (
            b'{"schema": "edgefleet.event/1", "device": "a/b", "fleet": "f"}',
            "invalid device name",
        ),
        (
            b'{"schema":"edgefleet.event/1","device":"d","fleet":"f","stream":"s","seq":0,'
            b'"at":"x","kind":"k"}',
            "seq expected >= 1",
        ),
    ],
)
def test_bad_payloads_are_refused_naming_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_event(raw)


def test_status_round_trips() -> None:
    raw = status_payload("d1", "lab", False, {"m": {"version": "1.0.0"}}, "0.1.0", "at")
    status = parse_status(raw)
    assert status.online is False and status.models["m"]["version"] == "1.0.0"
    assert json.loads(raw)["schema"] == "edgefleet.status/1"


def test_events_of_an_install_on_a_full_disk_are_held_in_order_not_raised(
    small_disk: StateDisk, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(small_disk.state_dir / "outbox.sqlite", max_events=100)
    reporter = TelemetryReporter(
        device="d1",
        fleet="lab",
        interval_s=10.0,
        stats=IntervalStats(),
        outbox=outbox,
        models_status=lambda: {},
        publish_heartbeat=lambda payload: False,
        disk_path=small_disk.state_dir,
    )
    reporter.agent_started({})
    small_disk.fill()
    with caplog.at_level(logging.INFO, logger="agent.telemetry"):
        for phase in (Phase.DOWNLOADING, Phase.IDLE):
            reporter.on_transition(JournalRecord(model="m", phase=phase, version="2.0.0"))
        reporter.agent_started({})
    assert "event 2: install_started m 2.0.0 (held in memory: the disk refuses it)" in caplog.text
    assert "event 4: agent_started (held in memory" in caplog.text
    small_disk.free()
    assert outbox.persist_held()
    kinds = [json.loads(i.payload)["kind"] for i in outbox.peek(10)]
    assert kinds == ["agent_started", "install_started", "install_put_back", "agent_started"]
