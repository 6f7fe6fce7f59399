"""Old rollout records: which ``edgectl serve`` deletes, so the rollout job (which parses
every record on every tick) and ``rollout status`` do not slow down forever.

A record is deleted, under the repository lock, only when all of these hold:
- it is finished (completed, aborted or superseded): running and paused ones are the
  job's work;
- it was last changed more than ``retention_s`` ago;
- it is not among the newest ``keep_per_model`` finished records of its fleet and model
  (what ``rollout status`` shows as recent history);
- no fleet's current desired state names its id (the job compares a record with the
  desired state it wrote; a fleet may still run a completed rollout's release).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from controller.base.fsio import repo_lock
from controller.repository.history import desired_states
from controller.repository.repo import Repository
from controller.rollout.stages import Rollout
from controller.rollout.store import RolloutStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutRetention:
    retention_s: float = 90 * 86400.0
    keep_per_model: int = 10


def due_records(
    records: list[Rollout], named: set[str], now: float, retention: RolloutRetention
) -> list[Rollout]:
    """The records the rules above delete (pure)."""
    finished: dict[tuple[str, str], list[Rollout]] = {}
    for r in records:
        if not r.is_active:
            finished.setdefault((r.fleet, r.model), []).append(r)
    due = []
    for group in finished.values():
        group.sort(key=lambda r: (max(r.updated_at, r.created_at), r.id), reverse=True)
        for r in group[retention.keep_per_model :]:
            if max(r.updated_at, r.created_at) < now - retention.retention_s and r.id not in named:
                due.append(r)
    return sorted(due, key=lambda r: r.id)


def prune_rollout_records(repo_dir: Path, now: float, retention: RolloutRetention) -> list[str]:
    """Delete the records due (``due_records``); return their ids. Raises RepositoryError."""
    records = RolloutStore(repo_dir)
    with repo_lock(repo_dir):
        states = desired_states(Repository.open(repo_dir))
        named = {m.rollout_id for state in states.values() for m in state.models.values()}
        due = due_records(records.all(), named, now, retention)
        for r in due:
            records.path(r.id).unlink(missing_ok=True)
    return [r.id for r in due]
