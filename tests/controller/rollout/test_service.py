"""The rollout service on a real repository and a real SQLite telemetry store.

Telemetry is written through the store's own interface (what ``edgectl serve``'s ingestor
writes), with an injected clock, so stages can be walked in milliseconds.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.contracts import (
    Event,
    Heartbeat,
    ModelFigures,
    SystemFigures,
    desired_target_path,
    parse_desired_state,
    resolve_release,
)
from controller.base.errors import ConflictError, UsageError
from controller.base.fsio import repo_lock
from controller.fleet.records import IngestBatch
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from controller.repository.release import current_desired_state, release_bundle, write_model_release
from controller.repository.repo import Repository
from controller.rollout.gates import parse_gates
from controller.rollout.service import RolloutService, control_rollout, start_rollout
from controller.rollout.stages import OnFailure, RolloutState
from controller.rollout.store import RolloutStore
from tests.controller.conftest import MODEL

FLEET = "lab"
T0 = 1_700_000_000.0
DEVICES = [f"dev-{i:02d}" for i in range(40)]
CANARIES = ("dev-00", "dev-01", "dev-02")


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = open_store(str(tmp_path / "telemetry.sqlite"))
    yield s
    s.close()


def _beat(device: str, version: str, at: float, requests: int, errors: int, p99: float) -> tuple:
    hb = Heartbeat(
        device=device,
        fleet=FLEET,
        at="",
        seq=int(at),
        interval_s=10.0,
        agent_version="t",
        uptime_s=1.0,
        system=SystemFigures(),
        models={MODEL: ModelFigures(version, "committed", requests, errors, 0, None, None, p99)},
    )
    return hb, at


def _event(device: str, kind: str, at: float, reason: str = "", seq: int = 1) -> tuple:
    e = Event(device, FLEET, "s", seq, "", kind, MODEL, "2.0.0", "1.0.0", None, "", reason)
    return e, at


def _report_fleet(store: TelemetryStore, repo_dir: Path, at: float, bad: bool = False) -> None:
    """Every device reports what desired state resolves to for it, as a heartbeat."""
    desired = current_desired_state(Repository.open(repo_dir), FLEET)
    assert desired is not None
    release = desired.models[MODEL]
    batch = IngestBatch()
    for device in DEVICES:
        resolved = resolve_release(release, device)
        version = resolved[0] if resolved else "1.0.0"
        errors = 30 if bad and version == "2.0.0" else 0
        batch.heartbeats.append(_beat(device, version, at, 100, errors, 0.01))
    store.write(batch)


def _percent(repo_dir: Path) -> float:
    raw = Repository.open(repo_dir).read_target("rollout", desired_target_path(FLEET))
    assert raw is not None
    return parse_desired_state(raw, FLEET).models[MODEL].percent


def _start(repo_dir: Path, bundle: Path, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "fleet": FLEET,
        "model": MODEL,
        "version": "2.0.0",
        "stages": (5, 25, 100),
        "wait_s": 60.0,
        "deadline_s": 300.0,
        "gates": parse_gates("error_rate<0.01,failed_installs<0.2,min_devices=3"),
        "canaries": CANARIES,
        "bundle": bundle,
        "now": T0,
    }
    args.update(kw)
    return start_rollout(repo_dir, **args)  # type: ignore[arg-type]


def test_a_good_rollout_walks_to_100_percent(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    r = _start(repo.path, bundles["v2"])
    assert r.previous == "1.0.0" and _percent(repo.path) == 5
    service = RolloutService(repo.path, store)
    now = T0
    for expected in (25, 100):
        _report_fleet(store, repo.path, now + 10)
        (r,) = service.tick(now + 30)  # healthy, but the wait is not over
        assert r.state is RolloutState.RUNNING and _percent(repo.path) == r.percent
        now += 60
        (r,) = service.tick(now)
        assert r.percent == expected and _percent(repo.path) == expected
        assert r.last_report == {}  # a new stage starts with a fresh report
    _report_fleet(store, repo.path, now + 10)
    (r,) = service.tick(now + 60)
    assert r.state is RolloutState.COMPLETED
    assert service.tick(now + 120) == []  # nothing active any more
    stored = RolloutStore(repo.path).load(r.id)
    assert stored == r and set(stored.passed) == {"0", "1", "2"}
    assert stored.passed["0"]["reporting"] >= 3


def test_a_bad_rollout_halts_at_its_first_stage_and_abort_goes_back(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    r = _start(repo.path, bundles["v2"], on_failure=OnFailure.ABORT)
    _report_fleet(store, repo.path, T0 + 5, bad=True)
    (r,) = RolloutService(repo.path, store).tick(T0 + 10)
    assert r.state is RolloutState.ABORTED and r.halt is not None
    assert r.halt.kind == "gate" and "error_rate<0.01" in r.halt.reason
    assert set(r.halt.breaches[0]["devices"]) >= set(CANARIES)
    desired = current_desired_state(Repository.open(repo.path), FLEET)
    assert desired is not None
    entry = desired.models[MODEL]
    assert entry.percent == 0 and entry.canaries == ()
    assert {resolve_release(entry, d)[0] for d in DEVICES} == {"1.0.0"}  # type: ignore[index]


def test_rollbacks_reported_as_events_halt_and_pause(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    _start(repo.path, bundles["v2"])
    batch = IngestBatch()
    batch.events += [_event(d, "install_started", T0 + 1, seq=1) for d in CANARIES]
    batch.events.append(_event("dev-01", "rolled_back", T0 + 3, "p99 latency 40 ms > 2 x", 2))
    store.write(batch)
    (r,) = RolloutService(repo.path, store).tick(T0 + 5)
    assert r.state is RolloutState.PAUSED and r.halt is not None
    assert "failed_installs<0.2" in r.halt.reason and "dev-01 (rolled_back: p99" in r.halt.reason
    assert _percent(repo.path) == 5  # paused: devices keep what they run
    resumed = control_rollout(repo.path, FLEET, MODEL, "resume", now=T0 + 100)
    assert resumed.state is RolloutState.RUNNING and resumed.stage_started_at == T0 + 100


def test_too_few_devices_pause_at_the_deadline(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    _start(repo.path, bundles["v2"])
    service = RolloutService(repo.path, store)
    store.write(IngestBatch(heartbeats=[_beat("dev-00", "2.0.0", T0 + 5, 10, 0, 0.01)]))
    (r,) = service.tick(T0 + 299)
    assert r.state is RolloutState.RUNNING
    assert r.last_report["reporting"] == 1 and r.last_report["devices_known"] == 1
    (r,) = service.tick(T0 + 300)
    assert r.state is RolloutState.PAUSED and r.halt is not None
    assert r.halt.kind == "too_few_devices" and "only 1 of min_devices=3" in r.halt.reason


def test_operator_commands_write_desired_state(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    _start(repo.path, bundles["v2"])
    with pytest.raises(ConflictError, match="abort"):
        _start(repo.path, bundles["v2"])
    assert control_rollout(repo.path, FLEET, MODEL, "promote", now=T0 + 1).percent == 25
    assert _percent(repo.path) == 25
    assert control_rollout(repo.path, FLEET, MODEL, "pause", now=T0 + 2).state.value == "paused"
    # A paused rollout is not advanced, however healthy.
    _report_fleet(store, repo.path, T0 + 3)
    (r,) = RolloutService(repo.path, store).tick(T0 + 1000)
    assert r.state is RolloutState.PAUSED and _percent(repo.path) == 25
    aborted = control_rollout(repo.path, FLEET, MODEL, "abort", now=T0 + 4)
    assert aborted.state is RolloutState.ABORTED and _percent(repo.path) == 0
    with pytest.raises(UsageError, match="no running or paused rollout"):
        control_rollout(repo.path, FLEET, MODEL, "resume", now=T0 + 5)
    # After an abort the fleet runs 1.0.0: a new rollout of 2.0.0 goes from there.
    again = _start(repo.path, None, now=T0 + 6)
    assert again.previous == "1.0.0" and again.id != aborted.id


def test_an_unpublished_version_is_refused(repo: Repository, bundles: dict[str, Path]) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    with pytest.raises(UsageError, match="--bundle"):
        _start(repo.path, None)


def test_edgectl_release_supersedes_a_running_rollout(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    r = _start(repo.path, bundles["v2"])
    release_bundle(bundles["v2"], FLEET, repo.path)  # straight to 100 %
    (after,) = RolloutService(repo.path, store).tick(T0 + 1)
    assert after.state is RolloutState.SUPERSEDED and after.id == r.id
    assert _percent(repo.path) == 100


def test_a_record_saved_before_a_crash_is_discarded_by_the_next_tick(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    """A start that never published did not happen: the tick discards its record rather
    than publish it later, over whatever the fleet was told since (see
    test_interrupted_start.py for the same with a real kill and a release in between)."""
    release_bundle(bundles["v1"], FLEET, repo.path)
    before = current_desired_state(Repository.open(repo.path), FLEET)
    assert before is not None
    r = _start(repo.path, bundles["v2"])
    # A crash between saving the record and writing desired state: put both back to
    # that instant (the fleet still at 1.0.0, the record never published).
    with repo_lock(repo.path):
        write_model_release(
            Repository.open(repo.path), FLEET, MODEL, before.models[MODEL], datetime.now(UTC)
        )
    RolloutStore(repo.path).save(replace(r, published=False))
    assert _percent(repo.path) == 100
    assert RolloutService(repo.path, store).tick(T0 + 1) == []
    after = RolloutStore(repo.path).load(r.id)
    assert after.state is RolloutState.ABANDONED and not after.published
    assert _percent(repo.path) == 100


def _drift_beat(device: str, at: float, drift: float | None) -> tuple:
    hb, received = _beat(device, "2.0.0", at, 100, 0, 0.01)
    figures = replace(hb.models[MODEL], drift=drift, input_drift=drift, drift_samples=1500)
    return replace(hb, models={MODEL: figures}), received


def test_the_drift_gate_reads_the_stores_drift_and_halts_or_waits_for_evidence(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    # Issue 23: the canaries' newest drift on the new version, from the store.
    release_bundle(bundles["v1"], FLEET, repo.path)
    gates = parse_gates("error_rate<0.01,drift<0.2,min_devices=3")
    _start(repo.path, bundles["v2"], gates=gates, on_failure=OnFailure.PAUSE)
    service = RolloutService(repo.path, store)
    store.write(IngestBatch(heartbeats=[_beat(d, "2.0.0", T0 + 5, 100, 0, 0.01) for d in CANARIES]))
    (r,) = service.tick(T0 + 70)  # healthy figures, the wait over, but no drift reported
    assert r.state is RolloutState.RUNNING and r.stage == 0
    assert r.last_report["drift_devices"] == 0 and not r.last_report["enough"]
    store.write(
        IngestBatch(
            heartbeats=[_drift_beat(d, T0 + 80, 0.02) for d in CANARIES[:2]]
            + [_drift_beat("dev-02", T0 + 80, 0.35)]
        )
    )
    (r,) = service.tick(T0 + 90)
    assert r.state is RolloutState.PAUSED and r.halt is not None
    assert "drift<0.2 broke: 0.35" in r.halt.reason and "dev-02 (PSI 0.350)" in r.halt.reason
