"""``RolloutService.evidence`` (one ``fleet_heartbeats`` query a tick) gives the Evidence
the per-device reads gave (``store.devices`` + one ``store.heartbeats`` per device), and
``fleet_counts`` (``store.devices_running``) the counts of the device rows, on randomised
store contents, on SQLite and PostgreSQL.

The reference below is that earlier algorithm, kept small. The two agree whenever the
heartbeats in [stage start, read_from) are already in the window, which holds on a
stage's first tick (read_from is the stage start) and on later ones as long as every
heartbeat is stored within ``WINDOW_OVERLAP_S`` of being received.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import Event, ProbationPolicy, Waiting, resolve_release
from controller.fleet.records import EventRow, HeartbeatFacts, IngestBatch, waiting_json
from controller.fleet.store import TelemetryStore
from controller.rollout.gates import (
    FAILURE_KINDS,
    Evidence,
    Incident,
    Sample,
    evaluate_gates,
    parse_gates,
)
from controller.rollout.service import (
    MAX_WAITING_SHOWN,
    WINDOW_OVERLAP_S,
    RolloutService,
    RolloutSettings,
    _sample,
)
from controller.rollout.stages import OnFailure, Rollout, desired_release, new_rollout

FLEET = "lab"
MODEL = "lin"
T0 = 1_700_000_000.0
SETTINGS = RolloutSettings(heartbeat_interval_s=10.0, max_heartbeats_per_device=7)
ROLLOUT_ID = f"{MODEL}-2.0.0-test"


@dataclass
class Reference:
    """The per-device reads, as ``evidence`` did them before ``fleet_heartbeats``."""

    store: TelemetryStore
    window: dict[tuple[str, float], Sample]
    read_at: float | None = None

    def evidence(self, r: Rollout, now: float) -> Evidence:
        since = r.stage_started_at
        read_from = since if self.read_at is None else max(since, self.read_at - WINDOW_OVERLAP_S)
        for row in self.store.devices(fleet=r.fleet):
            if row.last_seen < read_from:
                continue
            interval = row.interval_s or SETTINGS.heartbeat_interval_s
            limit = min(SETTINGS.max_heartbeats_per_device, int((now - read_from) / interval) + 5)
            for beat in self.store.heartbeats(row.device, limit):
                if beat.fleet != r.fleet or beat.received_at < since:
                    continue
                sample = _sample(row.device, beat.received_at, beat.payload, r.model)
                if sample is not None:
                    self.window[(row.device, beat.received_at)] = sample
        self.read_at = now
        # Every event of the rollout (its id, or none given) since the stage start, then
        # of each device the latest failure of each kind and the latest other event.
        latest: dict[tuple[str, str], EventRow] = {}
        for e in self.store.events(fleet=r.fleet, limit=10**9):  # in stored order
            if (e.model, e.version) != (r.model, r.version) or e.received_at < since:
                continue
            if e.rollout_id in (r.id, ""):
                key = (e.device, e.kind if e.kind in FAILURE_KINDS else "")
                if key not in latest or e.received_at >= latest[key].received_at:
                    latest[key] = e
        incidents = tuple(
            Incident(e.device, e.received_at, e.kind, e.reason)
            for e in sorted(latest.values(), key=lambda e: (e.received_at, e.id))
        )
        return Evidence(
            r.version, r.previous, tuple(self.window.values()), incidents, r.baseline_p99_s
        )


def _rollout(since: float) -> Rollout:
    return new_rollout(
        rollout_id=ROLLOUT_ID,
        fleet=FLEET,
        model=MODEL,
        version="2.0.0",
        previous="1.0.0",
        stages=(10, 100),
        wait_s=60.0,
        deadline_s=600.0,
        gates=parse_gates("error_rate<0.01"),
        canaries=(),
        on_failure=OnFailure.PAUSE,
        probation=ProbationPolicy(),
        now=since,
    )


def _payload(rng: random.Random) -> str:
    models: dict[str, object] = {
        "other": {"version": "9.0.0", "requests": 1},
        MODEL: {
            "version": rng.choice(("1.0.0", "2.0.0")),
            "requests": rng.randrange(100),
            "errors": rng.randrange(3),
            "p99_s": rng.choice((None, 0.01, 0.02)),
        },
    }
    if rng.random() < 0.15:
        del models[MODEL]  # a heartbeat without the rollout's model: no sample
    return json.dumps({"models": models})


def _beats(rng: random.Random, since: float, end: float) -> list[tuple[HeartbeatFacts, float, str]]:
    """Devices of the rollout's fleet and of another (some with the same ids), each with
    its own interval (or none), 0-20 heartbeats from before the stage start to ``end``,
    some at the same instant, some with no identity."""
    rows = []
    for i in range(30):
        device = f"dev-{i:02d}"
        fleets = [FLEET] if i < 20 else ["other"] if i >= 25 else [FLEET, "other"]
        for fleet in fleets:
            interval = rng.choice((0.0, 5.0, 10.0, 30.0))
            quiet = rng.random() < 0.2  # nothing since well before the window
            last = since - rng.uniform(50, 500) if quiet else end
            times = sorted(rng.uniform(since - 120, last) for _ in range(rng.randrange(21)))
            for k, received in enumerate(times):
                if k and rng.random() < 0.1:
                    received = times[k - 1]  # two heartbeats received at the same instant
                keyed = rng.random() < 0.8
                facts = HeartbeatFacts(
                    fleet, device, "t", interval, {}, 0, 0, (), f"a{k}" if keyed else "", k + 1
                )
                rows.append((facts, received, _payload(rng)))
    return rows


def _events(rng: random.Random, since: float) -> list[tuple[Event, float]]:
    """0-8 events per device of both fleets, before and after the stage start, about the
    rollout's model and version or others."""
    rows = []
    for i in range(30):
        for k in range(rng.randrange(9)):
            kind = rng.choice(("install_started", "install_failed", "committed", "rolled_back"))
            event = Event(
                f"dev-{i:02d}",
                rng.choice((FLEET, FLEET, "other")),
                "s",
                k + 1,
                "t",
                kind,
                rng.choice((MODEL, MODEL, "other")),
                rng.choice(("2.0.0", "2.0.0", "1.0.0")),
                # this rollout's, an earlier one's of the same version, or none (old agents)
                rollout_id=rng.choice((ROLLOUT_ID, ROLLOUT_ID, f"{MODEL}-2.0.0-old", "")),
            )
            rows.append((event, since + rng.uniform(-30, 60)))
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_first_tick_evidence_equals_the_per_device_reads(store: TelemetryStore, seed: int) -> None:
    rng = random.Random(seed)
    since = T0 + rng.uniform(0, 100)
    now = since + rng.uniform(1, 60)
    rows = _beats(rng, since, now + 15)  # some received after `now`: the tick is late
    rng.shuffle(rows)
    store.write(IngestBatch(heartbeat_facts=rows, events=_events(rng, since)))
    r = _rollout(since)
    want = Reference(store, {}).evidence(r, now)
    assert len(want.samples) > 20  # the data exercises the reads
    assert len(want.incidents) > 10 and len({i.device for i in want.incidents}) > 5
    assert RolloutService(Path("unused"), store, SETTINGS).evidence(r, now) == want
    # Reduced to each device's last word of each kind, the gates judge as on every event.
    every = tuple(
        Incident(e.device, e.received_at, e.kind, e.reason)
        for e in store.events(fleet=FLEET, limit=10**9)
        if (e.model, e.version, e.rollout_id)
        in ((MODEL, "2.0.0", ROLLOUT_ID), (MODEL, "2.0.0", ""))
        and e.received_at >= since
    )
    policy = parse_gates("failed_installs<0.3,rollbacks<0.5")
    assert len(every) > len(want.incidents)
    assert evaluate_gates(policy, replace(want, incidents=every)) == evaluate_gates(policy, want)


def test_later_ticks_read_only_the_newest_and_still_agree(store: TelemetryStore) -> None:
    """Ticks every 5 s over a stage, each heartbeat stored 0-4 s after it was received."""
    rng = random.Random(99)
    since = T0
    beats = _beats(rng, since, since + 120)
    stored_at = sorted((row[1] + rng.uniform(0, 4), i) for i, row in enumerate(beats))
    r = _rollout(since)
    service = RolloutService(Path("unused"), store, SETTINGS)
    reference = Reference(store, {})
    stored = 0
    for now in (since + 5 * k for k in range(1, 25)):
        due = [beats[i] for at, i in stored_at[stored:] if at <= now]
        store.write(IngestBatch(heartbeat_facts=due))
        stored += len(due)
        assert service.evidence(r, now) == reference.evidence(r, now), f"tick at {now - since}"
    assert stored == len(beats) and len(reference.window) > 50


def _reference_counts(store: TelemetryStore, r: Rollout) -> dict[str, Any]:
    """``fleet_counts`` as it was: every device row of the fleet loaded; with the waiting
    reasons of the devices given the new version that do not run it."""
    release = desired_release(r)
    known = expected = on_new = 0
    waiting = []
    for row in store.devices(fleet=r.fleet):
        known += 1
        resolved = resolve_release(release, row.device)
        given = resolved is not None and resolved[0] == r.version
        expected += given
        runs = any(m.model == r.model and m.version == r.version for m in row.models)
        on_new += runs
        why = next((m.waiting for m in row.models if m.model == r.model), None)
        if given and not runs and why is not None and why.version in (r.version, None):
            waiting.append((why.since or "~", row.device, why))
    waiting.sort(key=lambda item: item[:2])
    return {
        "devices_known": known,
        "expected": expected,
        "on_new": on_new,
        "waiting": dict(sorted(Counter(w.code for _s, _d, w in waiting).items())),
        "waiting_devices": [
            {"device": d, "code": w.code, "detail": w.detail, "since": w.since}
            for _s, d, w in waiting[:MAX_WAITING_SHOWN]
        ],
    }


def test_fleet_counts_equal_those_of_the_device_rows(store: TelemetryStore) -> None:
    rng = random.Random(7)
    batch = IngestBatch()
    for i in range(300):
        fleet = rng.choice((FLEET, FLEET, "other"))
        models = tuple(
            (name, rng.choice(("1.0.0", "2.0.0", None)), "committed", 1, 0, 0, None)
            for name in sorted(rng.sample((MODEL, "other"), rng.randrange(3)))
        )
        # Some wait, for this rollout's version, another, or one they could not read.
        waits = []
        for name, *_ in models:
            code = rng.choice(("probation", "no_space", None, None))
            if code is not None:
                version = rng.choice(("2.0.0", "1.5.0", None))
                since = f"2026-01-01T00:{i % 60:02d}:00Z"
                waits.append((name, waiting_json(Waiting(code, "d", version, since)) or ""))
        facts = HeartbeatFacts(
            fleet, f"dev-{i % 250:03d}", "t", 10.0, {}, 0, 0, models, waiting=tuple(waits)
        )
        batch.heartbeat_facts.append((facts, T0 + i, "{}"))
    store.write(batch)
    r = replace(_rollout(T0), stages=(40.0, 100.0), canaries=("dev-001", "dev-002"))
    want = _reference_counts(store, r)
    assert want["on_new"] > 10 and 0 < want["expected"] < want["devices_known"]
    assert sum(want["waiting"].values()) > 1
    assert RolloutService(Path("unused"), store, SETTINGS).fleet_counts(r) == want


def test_a_devices_flood_of_events_cannot_push_anothers_failure_out(store: TelemetryStore) -> None:
    """Issue 18: the gates read the fleet's latest events, so a device sending more of its
    own than that window hid every other device's failure; now each device has its share."""
    r = _rollout(T0)
    failed = Event("dev-honest", FLEET, "s", 1, "t", "install_failed", MODEL, "2.0.0")
    flood = [
        (Event("dev-evil", FLEET, "s", seq, "t", "committed", MODEL, "2.0.0"), T0 + 2)
        for seq in range(1, 50_002)
    ]
    store.write(IngestBatch(events=[(failed, T0 + 1), *flood]))
    service = RolloutService(Path("unused"), store)  # the default settings
    evidence = service.evidence(r, T0 + 10)
    assert Incident("dev-honest", T0 + 1, "install_failed") in evidence.incidents
    mine = [i for i in evidence.incidents if i.device == "dev-evil"]
    assert mine == [Incident("dev-evil", T0 + 2, "committed")]  # its last word, once
    report = evaluate_gates(parse_gates("failed_installs<0.02"), evidence)
    assert report.failed == 1 and [b.gate for b in report.breaches] == ["failed_installs"]


def test_a_devices_failure_counts_however_many_of_its_events_follow(
    store: TelemetryStore,
) -> None:
    """Issue 19, item 8: a tick read each device's newest 200 events, so a failure followed
    by more (a device retrying its install) fell out of the window."""
    r = _rollout(T0)
    failed = Event("dev-a", FLEET, "s", 1, "t", "install_failed", MODEL, "2.0.0", reason="golden")
    retries = [
        (Event("dev-a", FLEET, "s", seq, "t", "install_started", MODEL, "2.0.0"), T0 + 2)
        for seq in range(2, 303)
    ]
    store.write(IngestBatch(events=[(failed, T0 + 1), *retries]))
    evidence = RolloutService(Path("unused"), store).evidence(r, T0 + 10)
    assert Incident("dev-a", T0 + 1, "install_failed", "golden") in evidence.incidents
    report = evaluate_gates(parse_gates("failed_installs<0.02"), evidence)
    assert (report.attempted, report.failed) == (1, 1)


def test_a_stage_of_thousands_of_devices_counts_every_early_failure(
    store: TelemetryStore,
) -> None:
    """Issue 19, item 8: 8,000 devices of seven events each (56,000, more than the 50,000
    a tick once read), one in ten failing first: every failure is counted."""
    r = _rollout(T0)
    kinds = ("install_started", "downloaded", "verified", "activated", "probation", "committed")
    rows = []
    for i in range(8_000):
        device = f"dev-{i:05d}"
        first = "install_failed" if i % 10 == 0 else "install_started"
        events = [first, *kinds]
        for seq, kind in enumerate(events, start=1):
            event = Event(device, FLEET, "s", seq, "t", kind, MODEL, "2.0.0", rollout_id=r.id)
            rows.append((event, T0 + seq))
    store.write(IngestBatch(events=rows))
    evidence = RolloutService(Path("unused"), store).evidence(r, T0 + 100)
    assert len(evidence.incidents) == 8_000 + 800  # each device's last word, and its failure
    report = evaluate_gates(parse_gates("failed_installs<0.5"), evidence)
    assert (report.attempted, report.failed, report.breaches) == (8_000, 800, ())


def test_a_late_rollback_of_an_aborted_rollout_does_not_count_against_a_new_one(
    store: TelemetryStore,
) -> None:
    """Issue 19, item 8: 2.0.0 was rolled out, aborted and rolled out again; a device's
    rollback under the first rollout, reported after the second began, is not evidence
    against the second. Its own rollback under the second is."""
    r = _rollout(T0)
    old = f"{MODEL}-2.0.0-aborted"

    def event(device: str, seq: int, kind: str, rollout_id: str) -> tuple[Event, float]:
        e = Event(device, FLEET, "s", seq, "t", kind, MODEL, "2.0.0", rollout_id=rollout_id)
        return e, T0 + seq

    late = [event("dev-1", 1, "rolled_back", old)]
    healthy = [event(f"dev-{i}", 2, "committed", r.id) for i in range(1, 6)]
    store.write(IngestBatch(events=[*late, *healthy]))
    service = RolloutService(Path("unused"), store)
    policy = parse_gates("failed_installs<0.02,rollbacks<0.02")
    report = evaluate_gates(policy, service.evidence(r, T0 + 10))
    assert (report.attempted, report.failed, report.rolled_back, report.breaches) == (5, 0, 0, ())

    store.write(IngestBatch(events=[event("dev-2", 3, "rolled_back", r.id)]))
    report = evaluate_gates(policy, service.evidence(r, T0 + 10))
    assert (report.failed, report.rolled_back) == (1, 1)
    assert [b.gate for b in report.breaches] == ["failed_installs", "rollbacks"]
