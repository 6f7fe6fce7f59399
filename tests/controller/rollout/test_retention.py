"""Finished rollout records are deleted after their retention, never one the job still
works on or one a fleet's desired state names (issue 19, item 9); real record files in a
real repository."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from agent.contracts import ProbationPolicy, bundle_target_path
from agent.contracts.desired import ModelRelease
from controller.base.fsio import repo_lock
from controller.repository.release import write_model_release
from controller.repository.repo import Repository
from controller.rollout.gates import parse_gates
from controller.rollout.retention import (
    RolloutRetention,
    due_records,
    prune_rollout_records,
)
from controller.rollout.stages import OnFailure, Rollout, RolloutState, new_rollout
from controller.rollout.store import RolloutStore

DAY = 86400.0
NOW = 1_800_000_000.0


def record(n: int, state: RolloutState, age_days: float, fleet: str = "lab") -> Rollout:
    r = new_rollout(
        rollout_id=f"lin-{n}.0.0-{fleet}",
        fleet=fleet,
        model="lin",
        version=f"{n}.0.0",
        previous=None,
        stages=(10, 100),
        wait_s=60.0,
        deadline_s=600.0,
        gates=parse_gates("error_rate<0.01"),
        canaries=(),
        on_failure=OnFailure.PAUSE,
        probation=ProbationPolicy(),
        now=NOW - age_days * DAY - 1000.0,
    )
    return replace(r, state=state, updated_at=NOW - age_days * DAY, published=True)


def test_the_rules_keep_active_recent_newest_and_named_records() -> None:
    done = RolloutState.COMPLETED
    records = [
        record(1, done, 400),  # old: due
        record(2, RolloutState.ABORTED, 300),  # old: due
        record(3, RolloutState.SUPERSEDED, 200),  # old, but desired state names it
        record(4, RolloutState.PAUSED, 500),  # old, but still the job's: paused
        record(5, done, 100),  # old, but among the newest 2 of lab/lin
        record(6, done, 10),  # recent
        record(7, done, 400, fleet="other"),  # the only one of other/lin: kept
    ]
    retention = RolloutRetention(retention_s=90 * DAY, keep_per_model=2)
    due = due_records(records, {"lin-3.0.0-lab"}, NOW, retention)
    assert [r.id for r in due] == ["lin-1.0.0-lab", "lin-2.0.0-lab"]


def test_serve_deletes_the_due_record_files(repo: Repository) -> None:
    records = RolloutStore(repo.path)
    old_named = record(1, RolloutState.COMPLETED, 400)
    for r in (old_named, *(record(n, RolloutState.COMPLETED, 300 - n) for n in range(2, 6))):
        records.save(r)
    # The fleet still runs what rollout 1 released (nothing replaced it since).
    entry = ModelRelease(
        version="1.0.0",
        target=bundle_target_path("lin", "1.0.0"),
        rollout_id=old_named.id,
        percent=100.0,
        previous=None,
        previous_target=None,
        canaries=(),
        probation=ProbationPolicy(),
    )
    with repo_lock(repo.path):
        write_model_release(repo, "lab", "lin", entry, datetime.now(UTC))
    removed = prune_rollout_records(repo.path, NOW, RolloutRetention(90 * DAY, keep_per_model=1))
    assert removed == ["lin-2.0.0-lab", "lin-3.0.0-lab", "lin-4.0.0-lab"]
    assert [r.id for r in records.all()] == ["lin-1.0.0-lab", "lin-5.0.0-lab"]
    assert prune_rollout_records(repo.path, NOW, RolloutRetention(90 * DAY, 1)) == []
