"""The evidence a tick judges (``RolledEvidence``: the store's rollup, summed at ingest)
gives the same gate verdicts as the heartbeats themselves (``Evidence``, the reference),
gate by gate, on a corpus of stage windows: healthy versions, failing ones, one device
flooding clean requests beside failing ones, slow ones, quiet fleets, failed installs.

Pure first (``rollup_rows`` summed as the store's read sums them, an injected clock),
then through the store on SQLite and PostgreSQL (``RolloutService.rolled_evidence``
against ``RolloutService.evidence``), redelivered heartbeats included, and a store made
before the rollup tables, whose heartbeats are summed when it is opened.

The windows start on a time bucket's start: the rollup reads whole buckets, so a
window that starts inside one also counts the heartbeats of that bucket before it
(``test_a_window_counts_its_first_bucket_whole`` pins it down).
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import Event, ProbationPolicy
from controller.fleet.records import HeartbeatFacts, IngestBatch
from controller.fleet.rollup import (
    ALPHA,
    BUCKET_S,
    DeviceTotals,
    bin_value,
    binned_median,
    bucket_of,
    latency_bin,
    rollup_rows,
)
from controller.fleet.store import ROLLUP_TABLES, TelemetryStore
from controller.fleet.stores import open_store
from controller.rollout.gates import (
    FAILURE_KINDS,
    MIN_LATENCY_REQUESTS,
    Evidence,
    GatePolicy,
    GateReport,
    Incident,
    RolledEvidence,
    Sample,
    evaluate_gates,
    judge_n,
    parse_gates,
)
from controller.rollout.service import RolloutService, RolloutSettings, _sample
from controller.rollout.stages import OnFailure, Rollout, new_rollout
from tests.controller.test_store_support import store_location

FLEET = "lab"
MODEL = "det"
NEW, OLD = "2.0.0", "1.0.0"
T0 = 1_700_000_040.0  # a bucket's start
ROLLOUT_ID = f"{MODEL}-{NEW}-test"
POLICIES = (
    parse_gates("error_rate<0.01,p99_ratio<1.5,failed_installs<0.1,min_devices=3"),
    parse_gates("error_rate<0.05,p99_ratio<1.6,rollbacks<0.3,min_devices=5,min_requests=2000"),
    parse_gates("error_rate<0.002,failed_installs<0.5,min_devices=1"),
)

# ---------------------------------------------------------------------------- corpus

# A heartbeat: (device, received at, version, requests, errors, client errors, p99).
Beat = tuple[str, float, str, int, int, int, float | None]


def _corpus(seed: int, since: float) -> tuple[list[Beat], list[Incident]]:
    """One stage window: 3-30 devices, 1-8 heartbeats each, 10 s apart, after ``since``."""
    rng = random.Random(seed)
    error_p = rng.choice((0.0, 0.0005, 0.004, 0.03, 0.3))
    slow = rng.choice((1.0, 1.0, 2.2))  # the new version's latency over the old one's
    traffic = rng.choice((3, 40, 200))  # requests per heartbeat, about
    share = rng.choice((0.1, 0.5, 1.0))  # of the devices on the new version
    beats: list[Beat] = []
    incidents: list[Incident] = []
    devices = rng.randrange(3, 31)
    for i in range(devices):
        device = f"dev-{i:03d}"
        version = NEW if i < max(1, round(devices * share)) else OLD
        flood = version == NEW and i == 0 and rng.random() < 0.3  # clean requests galore
        base = rng.uniform(0.008, 0.012) * (slow if version == NEW else 1.0)
        start = since + rng.uniform(0, 9.9)
        for k in range(rng.randrange(1, 9)):
            quiet = rng.random() < 0.1
            requests = 0 if quiet else rng.randrange(traffic // 2, traffic + 1)
            requests *= 200 if flood else 1
            p = 0.0 if flood or version == OLD else error_p
            errors = sum(rng.random() < p for _ in range(min(requests, 5000)))
            client = rng.randrange(0, 3) if requests > 3 and rng.random() < 0.2 else 0
            p99 = None if quiet else base * rng.uniform(0.97, 1.03)
            beats.append((device, start + 10.0 * k, version, requests, errors, client, p99))
        if version == NEW and rng.random() < 0.12:
            kind = rng.choice(sorted(FAILURE_KINDS))
            incidents.append(Incident(device, start + 1.0, kind, "golden vectors"))
        elif version == OLD and rng.random() < 0.1 and share < 1:
            incidents.append(Incident(device, start + 1.0, "install_failed", "no room"))
    return beats, incidents


def _raw(beats: Iterable[Beat], incidents: list[Incident], since: float) -> Evidence:
    samples = tuple(Sample(d, at, v, r, e, c, p) for d, at, v, r, e, c, p in beats if at >= since)
    return Evidence(NEW, OLD, samples, tuple(incidents))


def _rolled(beats: Iterable[Beat], incidents: list[Incident], since: float) -> RolledEvidence:
    """The rollup of ``beats`` as ``TelemetryStore.rollout_rollup`` sums it, in Python."""
    rows = rollup_rows(
        (FLEET, d, at, [(MODEL, v, "committed", r, e, c, p)]) for d, at, v, r, e, c, p in beats
    )
    start = bucket_of(since)
    devices: dict[str, list[Any]] = {}
    for _f, _m, version, bucket, device, *sums in rows["devices"]:
        if version == NEW and bucket >= start:
            mine = devices.setdefault(device, [0, 0, 0, 0.0, 0])
            for n, value in enumerate(sums):
                mine[n] += value
    served = sum(r - c for _f, _m, v, b, _n, r, _e, c in rows["figures"] if v == OLD and b >= start)
    latency: dict[int, int] = {}
    for _f, _m, version, bucket, index, n in rows["latency"]:
        if version == OLD and bucket >= start:
            latency[index] = latency.get(index, 0) + n
    return RolledEvidence(
        NEW,
        OLD,
        tuple(DeviceTotals(d, *sums) for d, sums in sorted(devices.items())),
        served,
        latency,
        tuple(incidents),
    )


def verdicts(policy: GatePolicy, report: GateReport) -> dict[str, str]:
    """Each gate's verdict: ``fail`` (broke), ``pass`` (judged, held) or ``wait`` (not
    enough evidence to judge it yet); and the stage's: ``halt``, ``advance`` or ``wait``."""
    broken = {b.gate for b in report.breaches}
    out = {}
    for gate in policy.limits:
        if gate.metric in broken:
            out[gate.metric] = "fail"
            continue
        if gate.metric == "error_rate":
            judged = report.served >= judge_n(policy, gate.limit)
        elif gate.metric == "p99_ratio":
            judged = report.p99_ratio is not None and report.served >= MIN_LATENCY_REQUESTS
        else:
            judged = report.attempted > 0
        out[gate.metric] = "pass" if judged else "wait"
    out["min_devices"] = "pass" if len(report.reporting) >= policy.min_devices else "wait"
    out["min_requests"] = "pass" if report.served >= policy.min_requests else "wait"
    out["stage"] = "halt" if report.breaches else "advance" if report.healthy else "wait"
    return out


def assert_same_judgement(policy: GatePolicy, raw: GateReport, rolled: GateReport) -> None:
    assert verdicts(policy, rolled) == verdicts(policy, raw)
    # The counts and the weighted error rate are exact; only the p99s are estimates.
    for name in ("reporting", "served", "errors", "attempted", "failed", "rolled_back"):
        assert getattr(rolled, name) == getattr(raw, name), name
    assert rolled.error_rate == pytest.approx(raw.error_rate)
    assert [b.gate for b in rolled.breaches] == [b.gate for b in raw.breaches]
    # The p99s are other statistics (gates.RolledEvidence): on this corpus, where a
    # device's p99s vary by 3 % and devices by ±20 %, within 15 % of the reference's.
    assert (rolled.p99_ratio is None) == (raw.p99_ratio is None)
    if raw.p99_ratio is not None and rolled.p99_ratio is not None:
        assert rolled.p99_ratio == pytest.approx(raw.p99_ratio, rel=0.15)


# ---------------------------------------------------------------------------- pure


def test_the_corpus_exercises_every_verdict() -> None:
    seen: dict[str, set[str]] = {}
    for seed in range(120):
        beats, incidents = _corpus(seed, T0)
        for policy in POLICIES:
            for gate, verdict in verdicts(
                policy, evaluate_gates(policy, _raw(beats, incidents, T0))
            ).items():
                seen.setdefault(gate, set()).add(verdict)
    for gate in ("error_rate", "p99_ratio", "failed_installs", "rollbacks"):
        assert {"pass", "fail"} <= seen[gate], gate
    assert seen["stage"] == {"halt", "advance", "wait"}
    assert seen["min_devices"] == {"pass", "wait"}


@pytest.mark.parametrize("seed", range(120))
def test_rolled_evidence_gives_the_verdicts_of_the_heartbeats(seed: int) -> None:
    beats, incidents = _corpus(seed, T0)
    for policy in POLICIES:
        raw = evaluate_gates(policy, _raw(beats, incidents, T0))
        rolled = evaluate_gates(policy, _rolled(beats, incidents, T0))
        assert_same_judgement(policy, raw, rolled)


def test_one_flooding_device_does_not_hide_the_others_failures() -> None:
    """The per-device weighting (``judge_n``) needs per-device sums: the rollup keeps them."""
    beats: list[Beat] = [("flood", T0 + 1, NEW, 1_000_000, 0, 0, 0.01)]
    beats += [(f"d{i}", T0 + 2, NEW, 100, 5, 0, 0.01) for i in range(4)]
    policy = POLICIES[0]
    raw = evaluate_gates(policy, _raw(beats, [], T0))
    rolled = evaluate_gates(policy, _rolled(beats, [], T0))
    assert [b.gate for b in raw.breaches] == ["error_rate"]
    assert_same_judgement(policy, raw, rolled)


def test_a_window_counts_its_first_bucket_whole() -> None:
    since = T0 + 30.0
    beats: list[Beat] = [
        ("d0", T0 + 5, NEW, 100, 50, 0, 0.01),
        ("d1", since + 5, NEW, 10, 0, 0, 0.01),
    ]
    rolled = evaluate_gates(POLICIES[0], _rolled(beats, [], since))
    raw = evaluate_gates(POLICIES[0], _raw(beats, [], since))
    assert (rolled.served, raw.served) == (110, 10)
    assert _rolled(beats, [], T0 + BUCKET_S).devices == ()


def test_binned_medians_are_within_alpha() -> None:
    rng = random.Random(5)
    for _ in range(300):
        values = [rng.lognormvariate(-4, 1.5) for _ in range(rng.randrange(1, 40))]
        bins: dict[int, int] = {}
        for v in values:
            bins[latency_bin(v)] = bins.get(latency_bin(v), 0) + 1
            assert abs(bin_value(latency_bin(v)) - v) <= ALPHA * v * (1 + 1e-9)
        got = binned_median(bins)
        want = statistics.median(values)
        assert got is not None and math.isclose(got, want, rel_tol=ALPHA * (1 + 1e-9))
    assert binned_median({}) is None


# ---------------------------------------------------------------------------- store


def _facts_rows(beats: Iterable[Beat]) -> list[tuple[HeartbeatFacts, float, str]]:
    rows = []
    seq: dict[str, int] = {}
    for device, at, version, requests, errors, client, p99 in beats:
        seq[device] = seq.get(device, 0) + 1
        figures = {"version": version, "state": "committed", "requests": requests}
        figures.update(errors=errors, client_errors=client, p99_s=p99)
        model = (MODEL, version, "committed", requests, errors, client, p99)
        other = ("other", "9.9.9", "committed", 7, 7, 0, 0.5)  # another model: not counted
        payload = json.dumps({"models": {MODEL: figures, "other": {"version": "9.9.9"}}})
        facts = HeartbeatFacts(
            FLEET, device, "t", 10.0, {}, 0, 0, (other, model), f"at{seq[device]}", seq[device]
        )
        rows.append((facts, at, payload))
    return rows


def _rollout(since: float, policy: GatePolicy) -> Rollout:
    return new_rollout(
        rollout_id=ROLLOUT_ID,
        fleet=FLEET,
        model=MODEL,
        version=NEW,
        previous=OLD,
        stages=(10, 100),
        wait_s=600.0,
        deadline_s=1800.0,
        gates=policy,
        canaries=(),
        on_failure=OnFailure.PAUSE,
        probation=ProbationPolicy(),
        now=since,
    )


def _events(incidents: list[Incident]) -> list[tuple[Event, float]]:
    return [
        (
            Event(
                i.device,
                FLEET,
                "s",
                n + 1,
                "t",
                i.kind,
                MODEL,
                NEW,
                reason=i.reason,
                rollout_id=ROLLOUT_ID,
            ),
            i.at,
        )
        for n, i in enumerate(incidents)
    ]


def _judge_both(store: TelemetryStore, since: float, now: float) -> None:
    service = RolloutService(Path("unused"), store, RolloutSettings(heartbeat_interval_s=10.0))
    for policy in POLICIES:
        r = _rollout(since, policy)
        raw = evaluate_gates(policy, service.evidence(r, now))
        rolled = evaluate_gates(policy, service.rolled_evidence(r))
        assert_same_judgement(policy, raw, rolled)


@pytest.mark.parametrize("seed", [0, 3, 7, 11])
def test_the_store_rollup_gives_the_verdicts_of_its_heartbeats(
    store: TelemetryStore, seed: int
) -> None:
    beats, incidents = _corpus(seed, T0)
    # Before the window (a bucket earlier): in neither.
    beats += [("early", T0 - BUCKET_S + 1, NEW, 100, 100, 0, 9.0)]
    rows = _facts_rows(beats)
    random.Random(seed).shuffle(rows)
    half = len(rows) // 2
    store.write(IngestBatch(heartbeat_facts=rows[:half], events=_events(incidents)))
    # Redelivered: a batch holding heartbeats already stored, some twice.
    store.write(IngestBatch(heartbeat_facts=rows[half - 3 :] + rows[half : half + 2]))
    assert store.count("heartbeats") == len(rows)
    _judge_both(store, T0, T0 + 200)
    raw = evaluate_gates(POLICIES[0], _raw(beats, incidents, T0))
    service = RolloutService(Path("unused"), store)
    rolled = evaluate_gates(POLICIES[0], service.rolled_evidence(_rollout(T0, POLICIES[0])))
    assert rolled.served == raw.served and rolled.errors == raw.errors


def test_the_rollup_follows_the_heartbeats_retention(store: TelemetryStore) -> None:
    old = [(f"d{i}", T0 + i, NEW, 10, 1, 0, 0.01) for i in range(3)]
    new = [(f"d{i}", T0 + 1000 + i, NEW, 10, 1, 0, 0.01) for i in range(3)]
    store.write(IngestBatch(heartbeat_facts=_facts_rows(old + new)))
    before = {t: store.count(t) for t in ROLLUP_TABLES}
    assert store.prune_heartbeats(T0 + 500) == 3
    after = {t: store.count(t) for t in ROLLUP_TABLES}
    # model "other" and "det": one figures row each per bucket; one bucket of two is left.
    assert after == {t: n // 2 for t, n in before.items()} and after["rollout_devices"] == 6
    rolled = RolloutService(Path("unused"), store).rolled_evidence(_rollout(T0, POLICIES[0]))
    assert [d.requests for d in rolled.devices] == [10, 10, 10]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_store_made_before_the_rollup_is_summed_when_opened(backend: str, tmp_path: Path) -> None:
    beats, incidents = _corpus(4, T0)
    with store_location(backend, tmp_path) as location:
        store = open_store(location)
        try:
            store.write(IngestBatch(heartbeat_facts=_facts_rows(beats), events=_events(incidents)))
            with store._write() as cur:  # as a release before the rollup left it
                for table in ROLLUP_TABLES:
                    cur.execute(f"DROP TABLE {table}")
        finally:
            store.close()
        store = open_store(location)
        try:
            assert store.count("rollout_figures") > 0
            _judge_both(store, T0, T0 + 200)
        finally:
            store.close()
        # Opened again: summed once, not again.
        store = open_store(location)
        try:
            _judge_both(store, T0, T0 + 200)
        finally:
            store.close()


def test_payload_models_read_as_the_evidence_reads_them() -> None:
    from controller.fleet.rollup import payload_models

    payload = {"models": {MODEL: {"version": NEW, "requests": True, "errors": 2, "p99_s": "x"}}}
    sample = _sample("d", T0, payload, MODEL)
    assert sample is not None
    assert payload_models(payload) == [
        (MODEL, NEW, "", sample.requests, sample.errors, sample.client_errors, sample.p99_s)
    ]
