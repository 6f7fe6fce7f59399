"""`rollout status` says why the devices of the current stage do not run the new version:
the rollout service counts their waiting reasons (from the telemetry store) into the
record's report, and the view prints the counts and a line per device."""

from __future__ import annotations

from pathlib import Path

from agent.contracts import Heartbeat, ModelFigures, SystemFigures, Waiting
from controller.fleet.records import IngestBatch
from controller.fleet.store import TelemetryStore
from controller.repository.release import release_bundle
from controller.repository.repo import Repository
from controller.rollout.gates import parse_gates
from controller.rollout.service import MAX_WAITING_SHOWN, RolloutService, start_rollout
from controller.rollout.view import render_rollout
from tests.controller.conftest import MODEL

FLEET = "lab"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DEVICES = [f"dev-{i:02d}" for i in range(14)]


def _beat(device: str, version: str, waiting: Waiting | None) -> tuple[Heartbeat, float]:
    hb = Heartbeat(
        device=device,
        fleet=FLEET,
        at="2026-01-01T00:00:05Z",
        seq=1,
        interval_s=10.0,
        agent_version="t",
        uptime_s=1.0,
        system=SystemFigures(),
        models={MODEL: ModelFigures(version, "active", 5, 0, 0, waiting=waiting)},
    )
    return hb, T0 + 5


def test_rollout_status_counts_and_names_the_devices_that_wait_and_why(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    start_rollout(
        repo.path,
        fleet=FLEET,
        model=MODEL,
        version="2.0.0",
        stages=(100,),
        wait_s=60.0,
        deadline_s=300.0,
        gates=parse_gates("min_devices=1"),
        canaries=(),
        bundle=bundles["v2"],
        now=T0,
    )
    probation = Waiting("probation", "waits until probation of 1.0.0 ends (in 25 s)", "2.0.0")
    batch = IngestBatch()
    for i, device in enumerate(DEVICES):
        if i == 0:  # on the new version: not waiting
            batch.heartbeats.append(_beat(device, "2.0.0", None))
        elif i == 1:  # a reason about an older rollout's version says nothing of this one
            batch.heartbeats.append(_beat(device, "1.0.0", Waiting("no_space", "x", "1.5.0")))
        elif i == 2:
            no_room = Waiting(
                "no_space", "need 900 bytes, have 10", "2.0.0", "2026-01-01T00:00:01Z"
            )
            batch.heartbeats.append(_beat(device, "1.0.0", no_room))
        else:
            since = f"2026-01-01T00:00:{i:02d}Z"
            waits = Waiting(probation.code, probation.detail, "2.0.0", since)
            batch.heartbeats.append(_beat(device, "1.0.0", waits))
    store.write(batch)
    (r,) = RolloutService(repo.path, store).tick(T0 + 30)
    assert r.last_report["waiting"] == {"no_space": 1, "probation": 11}
    listed = r.last_report["waiting_devices"]
    assert len(listed) == MAX_WAITING_SHOWN
    # Longest waiting first.
    assert [d["device"] for d in listed[:3]] == ["dev-02", "dev-03", "dev-04"]
    assert listed[0] == {
        "device": "dev-02",
        "code": "no_space",
        "detail": "need 900 bytes, have 10",
        "since": "2026-01-01T00:00:01Z",
    }
    text = render_rollout(r, T0 + 31)
    stage = next(line for line in text.splitlines() if "stage 1" in line)
    assert "1/14 devices" in stage and "waiting: 1 no_space, 11 probation" in stage
    assert "    dev-02 waits: no_space for 2.0.0, 30s: need 900 bytes, have 10" in text
    assert (
        "    dev-03 waits: probation for 2.0.0, 28s: waits until probation of 1.0.0 ends "
        "(in 25 s)" in text
    )
    assert f"    ... and 2 more (edgectl fleet status --fleet {FLEET})" in text
