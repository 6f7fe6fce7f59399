"""Where rollout records live: one JSON file per rollout in ``REPO_DIR/rollouts/``.

Why files in the repository folder and not tables in the telemetry store: a rollout's
record and the desired state it produces must change together, and every change to
desired state already happens under the repository lock (``fsio.repo_lock``). Keeping
the record beside it, under the same lock, makes "record says stage 3" and "desired
state says stage 3" one atomic step per process, with no second transaction to lose;
the telemetry store stays a replaceable read model (SQLite or PostgreSQL). The folder
is never served over HTTP (only ``metadata/`` and ``targets/`` are).

Invariants:
- ``save`` is atomic (``fsio.atomic_write``); callers hold ``repo_lock`` around
  read-modify-write sequences.
- At most one active (running or paused) rollout per (fleet, model):
  ``controller.rollout.service.start_rollout`` refuses a second one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from controller.base.errors import RepositoryError
from controller.base.fsio import atomic_write, make_dir
from controller.rollout.stages import Rollout, RolloutRecordError, parse_rollout

logger = logging.getLogger(__name__)

ROLLOUTS_DIR: Final = "rollouts"


class RolloutStore:
    """The rollout records of one repository folder."""

    def __init__(self, repo_dir: Path) -> None:
        self.dir = repo_dir / ROLLOUTS_DIR

    def path(self, rollout_id: str) -> Path:
        return self.dir / f"{rollout_id}.json"

    def save(self, rollout: Rollout) -> None:
        """Write the record atomically. Raises OSError naming the file when it cannot (the
        CLI turns it into the cause and what to do: ``controller.cli.describe_os_error``)."""
        make_dir(self.dir, 0o750)
        atomic_write(self.path(rollout.id), rollout.to_json_bytes() + b"\n", 0o640)

    def load(self, rollout_id: str) -> Rollout:
        """One record. Raises RepositoryError when missing or damaged."""
        try:
            return parse_rollout(self.path(rollout_id).read_bytes())
        except FileNotFoundError:
            raise RepositoryError(f"no rollout {rollout_id} in {self.dir}") from None
        except (OSError, RolloutRecordError) as exc:
            raise RepositoryError(f"rollout record {rollout_id}: {exc}") from None

    def all(self) -> list[Rollout]:
        """Every readable record, oldest first; a damaged one is logged and skipped."""
        out = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            try:
                out.append(parse_rollout(path.read_bytes()))
            except (OSError, RolloutRecordError) as exc:
                logger.error("skipping rollout record %s: %s", path, exc)
        return sorted(out, key=lambda r: (r.created_at, r.id))

    def active(self) -> list[Rollout]:
        """Running and paused rollouts, oldest first."""
        return [r for r in self.all() if r.is_active]

    def find(
        self, fleet: str, model: str | None = None, active_only: bool = False
    ) -> list[Rollout]:
        """Rollouts of ``fleet`` (and ``model``), newest first."""
        found = [
            r
            for r in self.all()
            if r.fleet == fleet
            and (model is None or r.model == model)
            and (r.is_active or not active_only)
        ]
        return found[::-1]
