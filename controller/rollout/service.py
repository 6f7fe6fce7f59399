"""Rollouts at the edges: operator commands, and the scheduled job ``edgectl serve`` runs.

The orchestrators here read the telemetry store and the repository, call the pure core
(``controller.rollout.stages``, ``controller.rollout.gates``) and write what it decides: the
rollout record (``controller.rollout.store``) and the fleet's desired state, signed with
the online rollout key, under the repository lock.

Order of writes, so a crash at any instant leaves a state the next tick repairs:
- ``start_rollout`` saves the record (``published`` false) before it writes desired
  state, then saves it again with ``published`` true.
- A record is either published with its desired state or discarded. Before any command
  or tick acts on records, ``settle_records`` (under the lock) looks at every active
  record that is not published: when desired state names its rollout id, its start
  published and died before saying so (the record becomes published); otherwise its
  start was interrupted before it published (SIGKILL, a full disk, a missing key) and
  it becomes ``abandoned``, never written to desired state. A start that fails with an
  error settles its own record before it returns. So a leftover record can never push
  desired state back over a release made after it.
- Every later change writes desired state first, then the record. A crash in between
  leaves the record as it was; the next tick writes desired state back to what the
  record says (the command did not happen, and the operator's command reported an error).
- A record whose entry in desired state now carries another rollout id, after it was
  published, was replaced by someone else (``edgectl release``, another rollout): it
  becomes ``superseded`` and is never written again.
- Desired state moves backwards only on an operator's command (``abort``, a release or
  a rollout of an older version); ``retire_version`` refuses a version an active
  rollout names.

Wiring into ``edgectl serve`` (``controller.app``)::

    scheduler = AsyncIOScheduler()
    start_rollout_service(scheduler, config.repo_dir, store, RolloutSettings(
        tick_interval_s=5.0, heartbeat_interval_s=config.heartbeat_interval_s))
    scheduler.start()            # ... and scheduler.shutdown(wait=False) on stop

The tick is synchronous (store reads, signing, fsync); APScheduler's asyncio executor
runs it in a worker thread, one at a time (``max_instances=1``, ``coalesce``).

With several ``edgectl serve`` on one store, the job is given their ``Leadership``
(``controller.fleet.lease``): a follower's tick does nothing; the leader checks it still
leads under the repository lock right before each write, and claims each promotion in
the store first (``store.claim_promotion``: once per rollout and stage, refused by the
database unless the lease's epoch is the leader's).
"""

from __future__ import annotations

import contextlib
import logging
import time
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final

from agent.contracts import (
    InvalidNameError,
    ModelRelease,
    ProbationPolicy,
    ShadowPolicy,
    Waiting,
    bundle_target_path,
    check_name,
    check_version,
    device_bucket,
    device_buckets,
)
from controller.base.errors import ConflictError, ControllerError, UsageError
from controller.base.fsio import repo_lock
from controller.fleet.drift import latest_drift
from controller.fleet.lease import Leadership, NotLeaderError
from controller.fleet.store import Claim, TelemetryStore
from controller.repository.history import (
    DEFAULT_GRACE,
    RetireRefusedError,
    RetireResult,
    retire_locked,
)
from controller.repository.release import (
    DEFAULT_DELTA_FROM,
    current_desired_state,
    new_rollout_id,
    publish_bundle,
    write_model_release,
)
from controller.repository.repo import Repository
from controller.repository.rotation import locked_repository
from controller.rollout.gates import (
    FAILURE_KINDS,
    Evidence,
    GatePolicy,
    GateReport,
    Incident,
    RolledEvidence,
    Sample,
    ShadowSample,
    evaluate_gates,
)
from controller.rollout.stages import (
    OnFailure,
    Rollout,
    RolloutState,
    abandon,
    abort,
    advance,
    desired_release,
    new_rollout,
    pause,
    promote,
    resume,
    stable_version,
    supersede,
)
from controller.rollout.store import RolloutStore

logger = logging.getLogger(__name__)

ACTIONS: Final = ("pause", "resume", "promote", "abort")
JOB_ID: Final = "rollouts"
# Seconds of heartbeats read again on every tick, for those stored after the last read.
WINDOW_OVERLAP_S: Final = 30.0
# Devices ``rollout status`` names with their waiting reason (the counts cover them all).
MAX_WAITING_SHOWN: Final = 10


@dataclass(frozen=True)
class RolloutSettings:
    """How the scheduled job runs: tick period and how much telemetry one tick reads."""

    tick_interval_s: float = 5.0
    # Devices that do not say their heartbeat interval are assumed to use this one.
    heartbeat_interval_s: float = 10.0
    max_heartbeats_per_device: int = 2_000


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC).replace(microsecond=0)


# ---------------------------------------------------------------------------- commands


def start_rollout(
    repo_dir: Path,
    *,
    fleet: str,
    model: str,
    version: str,
    stages: Sequence[float],
    wait_s: float,
    deadline_s: float,
    gates: GatePolicy,
    canaries: Sequence[str] = (),
    on_failure: OnFailure = OnFailure.PAUSE,
    probation: ProbationPolicy | None = None,
    shadow: ShadowPolicy | None = None,
    bundle: Path | None = None,
    now: float | None = None,
    delta_from: int = DEFAULT_DELTA_FROM,
    require_clean: bool = False,
) -> Rollout:
    """Start a staged rollout and write its first stage into the fleet's desired state.

    With ``bundle``, publish it first (release key); ``require_clean`` refuses it unless
    its manifest shows a clean Git work tree (``release_bundle``'s rule), and needs it.
    Raises UsageError (bad names, the version is not published, the fleet already runs
    it), ConflictError (another rollout of the model is active in the fleet),
    RepositoryError, OSError (the repository could not be written; the record is then
    discarded, by this call or the next settle).
    """
    now = time.time() if now is None else now
    try:
        check_name("fleet", fleet)
        check_name("model", model)
        check_version(version)
        for device in canaries:
            check_name("device", device)
    except InvalidNameError as exc:
        raise UsageError(str(exc)) from None
    if require_clean and bundle is None:
        raise UsageError(
            "--require-clean judges the bundle this command publishes: give --bundle FILE "
            f"(a published {model} {version} was judged, or not, by the command that "
            "published it; `edgectl releases show` prints its source)"
        )
    if bundle is not None:
        published = publish_bundle(
            bundle, repo_dir, _utc(now), delta_from=delta_from, require_clean=require_clean
        )
        if (published.model, published.version) != (model, version):
            raise UsageError(
                f"{bundle} holds {published.model} {published.version}, not {model} {version}"
            )
    records = RolloutStore(repo_dir)
    # names `edgectl init` when there is no repository; finishes a half-done key rotation
    with locked_repository(repo_dir) as repo:
        settle_records(repo_dir, records, now)
        target = bundle_target_path(model, version)
        if target not in repo.load("targets").signed.targets:
            raise UsageError(
                f"{model} {version} is not published ({target} is not in the signed targets); "
                "pass --bundle FILE to publish it"
            )
        for other in records.find(fleet, model, active_only=True):
            raise ConflictError(
                f"rollout {other.id} of {model} {other.version} is {other.state.value} in "
                f"fleet {fleet} at {other.percent:g}%: `edgectl rollout abort` or "
                "`promote` it first"
            )
        desired = current_desired_state(repo, fleet)
        rollout = new_rollout(
            rollout_id=new_rollout_id(model, version),
            fleet=fleet,
            model=model,
            version=version,
            previous=stable_version(desired.models.get(model) if desired else None),
            stages=stages,
            wait_s=wait_s,
            deadline_s=deadline_s,
            gates=gates,
            canaries=canaries,
            on_failure=on_failure,
            probation=probation or ProbationPolicy(),
            now=now,
            shadow=shadow,
        )
        records.save(rollout)
        try:
            rollout = _commit(repo, records, rollout, rollout, now)
        except BaseException:
            # Publish failed (a key, the disk, Ctrl-C): discard the record now unless
            # desired state names it. If even that fails, the next command or tick does.
            with contextlib.suppress(Exception):
                settle_records(repo_dir, records, now)
            raise
    logger.info("rollout %s started: %s %s in fleet %s", rollout.id, model, version, fleet)
    return rollout


def control_rollout(
    repo_dir: Path,
    fleet: str,
    model: str,
    action: str,
    now: float | None = None,
    reason: str = "",
) -> Rollout:
    """Apply an operator command (pause, resume, promote, abort) to the fleet's active
    rollout of ``model``. Raises UsageError (no such rollout, an illegal move),
    RepositoryError, OSError (the repository could not be written)."""
    if action not in ACTIONS:
        raise UsageError(f"unknown rollout action {action!r}; expected {', '.join(ACTIONS)}")
    now = time.time() if now is None else now
    records = RolloutStore(repo_dir)
    with locked_repository(repo_dir):  # names `edgectl init` when there is no repository
        settle_records(repo_dir, records, now)
        active = records.find(fleet, model, active_only=True)
        if not active:
            raise UsageError(
                f"no running or paused rollout of {model} in fleet {fleet}; "
                "see `edgectl rollout status`"
            )
        before = active[0]
        if action == "pause":
            after = pause(before, now, reason or "paused by the operator")
        elif action == "resume":
            after = resume(before, now)
        elif action == "promote":
            after = promote(before, now)
        else:
            after = abort(before, now, reason or "aborted by the operator")
        after = _commit(Repository.open(repo_dir), records, before, after, now)
    logger.info("rollout %s: %s -> %s", after.id, action, after.state.value)
    return after


def _entry(repo: Repository, r: Rollout) -> ModelRelease | None:
    desired = current_desired_state(repo, r.fleet)
    return desired.models.get(r.model) if desired is not None else None


def settle_records(repo_dir: Path, records: RolloutStore, now: float) -> list[Rollout]:
    """Make every active record agree with the fleet's published desired state before
    anything acts on records; return those that changed. Hold the repository lock.

    - Not published, and desired state names its rollout id: its start published the
      first stage and died before saving that; it is published.
    - Not published, and desired state names another rollout (or none): its start was
      interrupted before it published; it is ``abandoned`` and never written.
    - Published, and desired state names another rollout: ``superseded``.

    - Pending (saved ahead of its desired state by a command that was interrupted before
      it published, see ``_commit``), and desired state still names it: its desired state
      is published now, so the command is finished, never undone. Named by another
      rollout: the pending change lost to it (superseded when still active).

    Reads desired state through a freshly opened ``Repository``: a role signed but never
    named by a snapshot (a publish that failed half-way) does not count.
    """
    todo = [r for r in records.all() if r.is_active or r.pending]
    if not todo:
        return []
    repo = Repository.open(repo_dir)
    changed = []
    for r in todo:
        entry = _entry(repo, r)
        owned = entry is not None and entry.rollout_id == r.id
        if r.pending:
            after = replace(r, pending=False)
            if owned:
                write_model_release(repo, r.fleet, r.model, desired_release(r), _utc(now))
                logger.warning(
                    "rollout %s: a change saved before an interruption is published now "
                    "(%s at %g%%)",
                    r.id,
                    r.state.value,
                    r.percent,
                )
            elif r.is_active and entry is not None:
                after = supersede(
                    after,
                    now,
                    f"desired state now names {entry.version} (rollout {entry.rollout_id})",
                )
                logger.warning("rollout %s superseded by %s", r.id, entry.rollout_id)
        elif owned and not r.published:
            after = replace(r, published=True)
            logger.warning("rollout %s: its start published and was interrupted; going on", r.id)
        elif not r.published:
            after = abandon(
                r,
                now,
                "`edgectl rollout start` was interrupted before it published its first "
                "stage; desired state never named it (run the start again)",
            )
            logger.warning("rollout %s abandoned: its start never published", r.id)
        elif entry is not None and not owned:
            after = supersede(
                r, now, f"desired state now names {entry.version} (rollout {entry.rollout_id})"
            )
            logger.warning("rollout %s superseded by %s", r.id, entry.rollout_id)
        else:
            continue
        records.save(after)
        changed.append(after)
    return changed


def _commit(
    repo: Repository, records: RolloutStore, before: Rollout, after: Rollout, now: float
) -> Rollout:
    """Publish ``after``: its desired state and its record; supersede instead when someone
    else owns the fleet's entry now. Hold the repository lock.

    Only ``start_rollout`` passes a record that is not published (its first write, under
    the lock it saved the record in): desired state first, then the record, so an
    interrupted start is discarded. A published rollout whose desired state changes saves
    its record first, marked pending, so an interrupted change is finished by the next
    command or tick (``settle_records``). Everyone else settles records first."""
    entry = _entry(repo, after)
    if entry is not None and entry.rollout_id != after.id and after.published:
        if not before.is_active:
            return before
        superseded = supersede(
            before, now, f"desired state now names {entry.version} (rollout {entry.rollout_id})"
        )
        records.save(superseded)
        logger.warning("rollout %s superseded by %s", before.id, entry.rollout_id)
        return superseded
    if before.published and desired_release(after) != desired_release(before):
        # A published rollout changes: its record first (pending), then desired state. An
        # interruption between the two leaves a record ahead of desired state, which the
        # next command or tick publishes (settle_records): the change is finished, never
        # undone. A failure that is not an interruption puts the record back.
        records.save(replace(after, published=True, pending=True))
        try:
            _publish(repo, after, now)
        except BaseException:
            with contextlib.suppress(OSError):
                records.save(before)
            raise
        after = replace(after, published=True, pending=False)
        records.save(after)
        return after
    _publish(repo, after, now)
    after = replace(after, published=True)
    if after != before or not before.published:
        records.save(after)
    return after


def _publish(repo: Repository, after: Rollout, now: float) -> None:
    if write_model_release(repo, after.fleet, after.model, desired_release(after), _utc(now)):
        logger.info(
            "fleet %s: %s %s at %g%% (rollout %s, %s)",
            after.fleet,
            after.model,
            after.version,
            after.percent,
            after.id,
            after.state.value,
        )


def retire_version(
    repo_dir: Path,
    model: str,
    version: str,
    now: datetime | None = None,
    grace: timedelta = DEFAULT_GRACE,
) -> RetireResult:
    """``edgectl releases retire``: ``controller.repository.history.retire_release``, but
    records are settled first and a version an active rollout names (as its new version or
    as the one an abort goes back to) is refused, naming the rollout.

    Raises RetireRefusedError, UsageError, RepositoryError.
    """
    now = now or datetime.now(UTC).replace(microsecond=0)
    records = RolloutStore(repo_dir)
    with locked_repository(repo_dir, now=now) as repo:
        settle_records(repo_dir, records, now.timestamp())
        for r in records.active():
            if r.model == model and version in (r.version, r.previous):
                role = "its new version" if version == r.version else "what an abort goes back to"
                raise RetireRefusedError(
                    f"rollout {r.id} ({r.state.value} in fleet {r.fleet} at {r.percent:g}%) "
                    f"names {model} {version} as {role}; retiring it would strand the fleet. "
                    f"Let the rollout complete, or `edgectl rollout abort {model} --fleet "
                    f"{r.fleet} --repo {repo_dir}` and move the fleet off {version}, first"
                )
        return retire_locked(repo, model, version, now, grace)


# ---------------------------------------------------------------------------- the job


class RolloutService:
    """Advances and halts every active rollout of one repository; ``tick`` is one pass."""

    def __init__(
        self,
        repo_dir: Path,
        store: TelemetryStore,
        settings: RolloutSettings | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.repo_dir = repo_dir
        self.store = store
        self.settings = settings or RolloutSettings()
        # With several `edgectl serve` (controller.fleet.lease): only the leader ticks, and
        # it checks it still leads right before each write (None: this process alone).
        self.leadership = leadership
        self.records = RolloutStore(repo_dir)
        # Samples already read, per stage window: (rollout id, stage, started) → samples by
        # (device, received_at). Later ticks read only the newest heartbeats (with an
        # overlap for late writes) instead of the whole window again.
        self._windows: dict[tuple[str, int, float], dict[tuple[str, float], Sample]] = {}
        self._read_at: dict[tuple[str, int, float], float] = {}
        # The fleet's devices and their places in each active rollout (fleet_counts):
        # over the places `edgectl rollout start` stored, or read here when it did not.
        self._members: dict[str, _Placed | _Members] = {}

    def run_once(self) -> None:
        """The scheduled entry point: one tick, errors logged (the next tick retries)."""
        if self.leadership is not None and not self.leadership.is_leader:
            return  # a follower: the leader ticks
        try:
            self.tick()
        except NotLeaderError as exc:
            logger.warning("rollout tick stopped, nothing written: %s", exc)
        except ControllerError as exc:  # the store unreachable, a key that cannot sign
            logger.error("rollout tick failed: %s; retrying on the next one", exc)
        except Exception:  # a store or repository hiccup must not kill the schedule
            logger.exception("rollout tick failed; retrying on the next one")

    def tick(self, now: float | None = None) -> list[Rollout]:
        """Evaluate every active rollout once; return the records as they are after it."""
        out = []
        records = self.records.all()
        active = [r for r in records if r.is_active]
        if any((r.is_active and not r.published) or r.pending for r in records):
            with repo_lock(self.repo_dir):
                self._fence("settling rollout records")
                settle_records(self.repo_dir, self.records, time.time() if now is None else now)
            active = self.records.active()
        keep = {(r.id, r.stage, r.stage_started_at) for r in active}
        self._windows = {k: v for k, v in self._windows.items() if k in keep}
        self._read_at = {k: v for k, v in self._read_at.items() if k in keep}
        self._members = {k: v for k, v in self._members.items() if k in {r.id for r in active}}
        for r in active:
            now_r = time.time() if now is None else now
            out.append(self._tick_one(r, now_r))
        return out

    def _tick_one(self, seen: Rollout, now: float) -> Rollout:
        report: GateReport | None = None
        counts: dict[str, Any] = {}
        if seen.state is RolloutState.RUNNING:
            # Store reads happen outside the lock: they may take a while on a big fleet.
            report = evaluate_gates(seen.gates, self.rolled_evidence(seen))
            counts = self.fleet_counts(seen)
        with repo_lock(self.repo_dir):
            current = self.records.load(seen.id)
            if (current.state, current.stage, current.stage_started_at) != (
                seen.state,
                seen.stage,
                seen.stage_started_at,
            ):
                return current  # an operator command got in between: judge it next tick
            after = current
            if report is not None:
                after = advance(current, report, now)
                if after.state is RolloutState.RUNNING and after.stage == current.stage:
                    after = replace(after, last_report={**after.last_report, **counts})
            token = self._fence(f"rollout {current.id}")
            promoted_to = promotion_of(current, after)
            if token is not None and promoted_to is not None:
                self._claim(current, after, promoted_to, token.holder, token.epoch)
                self._fence(f"promoting rollout {current.id}")  # again, right before signing
            after = _commit(Repository.open(self.repo_dir), self.records, current, after, now)
        if after.state is not current.state or after.stage != current.stage:
            _log_change(after)
        return after

    def _fence(self, what: str) -> Any:
        """The lease token when this process leads (None: no lease in use); raises
        NotLeaderError when it does not lead now."""
        return None if self.leadership is None else self.leadership.check(what)

    def _claim(self, current: Rollout, after: Rollout, stage: int, holder: str, epoch: int) -> None:
        """Claim the promotion of ``current`` to ``stage`` in the store (once per rollout
        and stage, fenced by the lease's epoch in the database). Claimed before: an
        earlier leader claimed it and did not write it (the record still names the stage
        before; it held the repository lock as it claimed, so it is not writing now):
        this leader writes it, still once. Raises NotLeaderError."""
        assert self.leadership is not None
        claim = self.store.claim_promotion(
            current.id, stage, after.percent, self.leadership.name, holder, epoch
        )
        if claim is Claim.NOT_LEADER:
            raise NotLeaderError(
                f"the store refused epoch {epoch}'s claim to promote rollout {current.id} "
                "(the lease was taken over)"
            )
        if claim is Claim.CLAIMED_BEFORE:
            logger.warning(
                "rollout %s: the promotion to stage %d was claimed before and not written "
                "(the leader that claimed it stopped); writing it now",
                current.id,
                stage + 1,
            )

    # ------------------------------------------------------------------ reading telemetry

    def rolled_evidence(self, r: Rollout) -> RolledEvidence:
        """What a tick judges: the sums the store keeps as it stores heartbeats
        (``store.rollout_rollup``: a few rows per version and minute, and one row per
        device on the new version), and the events as ``evidence`` reads them. Its cost
        does not grow with the heartbeats of the window, nor with the devices still on
        the previous version."""
        others = [r.previous] if r.previous else []
        rollup = self.store.rollout_rollup(r.fleet, r.model, r.version, others, r.stage_started_at)
        old = rollup.versions.get(r.previous) if r.previous else None
        return RolledEvidence(
            version=r.version,
            previous=r.previous,
            devices=rollup.devices,
            previous_served=old.requests - old.client_errors if old else 0,
            previous_latency=old.latency if old else {},
            incidents=self._incidents(r),
            baseline_p99_s=r.baseline_p99_s,
            shadows=self._shadows(r),
            drift=self._drift(r),
        )

    def _shadows(self, r: Rollout) -> tuple[ShadowSample, ...]:
        """The devices' latest shadow reports of the new version (the shadow gates)."""
        return tuple(
            ShadowSample(
                row.device,
                row.report.state,
                row.report.samples,
                row.report.agreement,
                row.report.latency_ratio,
            )
            for row in self.store.shadow_reports(r.fleet, r.model, r.version)
            if row.received_at >= r.created_at
        )

    def _drift(self, r: Rollout) -> dict[str, float]:
        """Each device's newest drift on the new version in the stage window, when a
        drift gate asks for it (issue 23; no read otherwise)."""
        if r.gates.limit("drift") is None:
            return {}
        points = self.store.drift_history(r.fleet, r.stage_started_at, r.model, r.version)
        return latest_drift(points)

    def _incidents(self, r: Rollout) -> tuple[Incident, ...]:
        return tuple(
            Incident(e.device, e.received_at, e.kind, e.reason)
            for e in self.store.rollout_events(
                r.fleet, r.id, r.model, r.version, r.stage_started_at, sorted(FAILURE_KINDS)
            )
        )

    def evidence(self, r: Rollout, now: float) -> Evidence:
        """The heartbeats and events of ``r``'s model since its stage started: the
        reference ``rolled_evidence`` is checked against (tests/controller/rollout/
        test_rollup_verdicts.py) and measured beside (bench/rollout_evidence.py); a tick
        judges ``rolled_evidence``.

        Heartbeats are read in one query (``store.fleet_heartbeats``) from ``read_from``:
        the stage start on its first tick, later the last read less WINDOW_OVERLAP_S. A
        heartbeat stored later than that after it was received is not read. Events are
        those sent under this rollout's id (``store.rollout_events``), reduced in SQL to
        each device's last failure of each kind and its last other event: all the gates
        judge, so no device's failure is left out however many events the stage holds,
        and a late report from another rollout of the same version is not counted."""
        since = r.stage_started_at
        key = (r.id, r.stage, r.stage_started_at)
        window = self._windows.setdefault(key, {})
        # Re-read an overlap: a heartbeat is stamped when received, stored a batch later.
        read_from = max(since, self._read_at.get(key, since) - WINDOW_OVERLAP_S)
        # One query for the fleet, bounded per device as the window needs: a device's
        # newest heartbeats, a few more than its interval puts in (now - read_from).
        for beat in self.store.fleet_heartbeats(
            r.fleet,
            since,
            read_from,
            now - read_from,
            self.settings.heartbeat_interval_s,
            self.settings.max_heartbeats_per_device,
        ):
            sample = _sample(beat.device, beat.received_at, beat.payload, r.model)
            if sample is not None:
                window[(beat.device, beat.received_at)] = sample
        self._read_at[key] = now
        samples = list(window.values())
        return Evidence(
            version=r.version,
            previous=r.previous,
            samples=tuple(samples),
            incidents=self._incidents(r),
            baseline_p99_s=r.baseline_p99_s,
            shadows=self._shadows(r),
            drift=self._drift(r),
        )

    def fleet_counts(self, r: Rollout) -> dict[str, Any]:
        """Devices the store knows in the fleet, those the stage gives the new version,
        those that run it now, and why those given it and not running it wait (for
        ``rollout status``): ``waiting`` counts them by reason code, ``waiting_devices``
        names the first ``MAX_WAITING_SHOWN`` (longest waiting first).

        Read from a few rows (``store.rollout_census``): the counts the store keeps as
        devices and their versions change, and the model rows that say why they wait.
        Which devices a stage gives the new version depends on each one's place in the
        rollout (a hash of rollout id and device id, ``device_bucket``). `edgectl rollout
        start` stores the places (``place_rollout``): a tick then counts them by the
        store's index (``store.count_places``) and follows the devices added or removed
        since in memory (``_Placed``), writing nothing. Without them (rollout start could
        not reach the store) the fleet's ids are read and hashed once per rollout in this
        process (``_Members``), then followed likewise. Either follows the store's log
        (``store.fleet_changes``) when the fleet's generation moved; when that log was
        pruned past it, the ids are read again."""
        release = desired_release(r)
        census = self.store.rollout_census(r.fleet, r.model, r.version)
        members = self._members.get(r.id)
        if members is None:
            stored = self.store.places_generation(r.id)
            if stored is not None:
                members = _Placed(stored)
            else:
                logger.info(
                    "rollout %s: reading the ids of fleet %s (rollout start did not place them)",
                    r.id,
                    r.fleet,
                )
                members = _Members.read(self.store, r.fleet, r.id)
            self._members[r.id] = members
        if members.generation != census.generation:
            changes = self.store.fleet_changes(r.fleet, members.generation, census.generation)
            if changes is None:  # pruned since: every id again
                members = self._members[r.id] = _Members.read(self.store, r.fleet, r.id)
            else:
                members.follow(self.store, r.id, changes, census.generation)
        canaries = set(release.canaries)
        # resolve_release(release, device) names the new version: the stage gives it
        expected = members.below(self.store, r.id, release.percent) + sum(
            1
            for c, place in members.places_of(self.store, r.id, canaries).items()
            if place >= release.percent
        )
        waiting: list[tuple[str, Waiting]] = []
        for device, version, why in census.waiting:
            place = members.place(r.id, device)
            if place is None or version == r.version:
                continue  # added after the ids were read (counted next tick), or runs it
            # A reason about another version is older than this rollout (the device
            # has not checked since it started): it says nothing about this one.
            if (device in canaries or place < release.percent) and why.version in (
                r.version,
                None,
            ):
                waiting.append((device, why))
        waiting.sort(key=lambda item: (item[1].since or "~", item[0]))
        return {
            "devices_known": census.devices,
            "expected": expected,
            "on_new": census.running,
            "waiting": dict(sorted(Counter(w.code for _d, w in waiting).items())),
            "waiting_devices": [
                {"device": device, "code": w.code, "detail": w.detail, "since": w.since}
                for device, w in waiting[:MAX_WAITING_SHOWN]
            ],
        }


@dataclass
class _Members:
    """A fleet's devices as of a generation of the store, and their places in one
    rollout (``device_buckets``), by id and sorted: read when no places are stored."""

    generation: int
    places: dict[str, float]
    ordered: list[float]

    @classmethod
    def read(cls, store: TelemetryStore, fleet: str, rollout_id: str) -> _Members:
        """Every id of the fleet, from the store."""
        generation, ids = store.fleet_device_ids(fleet)
        places = dict(zip(ids, device_buckets(rollout_id, ids), strict=True))
        return cls(generation, places, sorted(places.values()))

    def follow(
        self, store: TelemetryStore, rollout_id: str, changes: dict[str, bool], generation: int
    ) -> None:
        """Take in the devices added (True) and removed (False) up to ``generation``."""
        del store
        for device, present in changes.items():
            place = self.places.get(device)
            if present and place is None:
                place = self.places[device] = device_bucket(rollout_id, device)
                insort(self.ordered, place)
            elif not present and place is not None:
                del self.places[device]
                del self.ordered[bisect_left(self.ordered, place)]
        self.generation = generation

    def below(self, store: TelemetryStore, rollout_id: str, percent: float) -> int:
        """How many devices have a place under ``percent``."""
        return bisect_left(self.ordered, percent)

    def places_of(
        self, store: TelemetryStore, rollout_id: str, devices: set[str]
    ) -> dict[str, float]:
        """The places of those of ``devices`` that are known."""
        return {d: self.places[d] for d in devices if d in self.places}

    def place(self, rollout_id: str, device: str) -> float | None:
        """The device's place, None when it is not known."""
        return self.places.get(device)


@dataclass
class _Placed:
    """A fleet's devices over the places stored at ``rollout start`` (as of ``stored``, a
    generation of the store): what changed since, kept in memory, so a tick writes
    nothing. ``changed``: the devices added or removed since, with whether each is in
    the fleet now; ``in_store``: whether each of those (and each canary asked about) has
    a stored place; ``hashed``: their places."""

    generation: int
    changed: dict[str, bool] = field(default_factory=dict)
    in_store: dict[str, bool] = field(default_factory=dict)
    hashed: dict[str, float] = field(default_factory=dict)

    def _look_up(self, store: TelemetryStore, rollout_id: str, devices: set[str]) -> None:
        new = devices - self.in_store.keys()
        if new:
            stored = store.places_of(rollout_id, new)
            self.in_store.update((d, d in stored) for d in new)

    def follow(
        self, store: TelemetryStore, rollout_id: str, changes: dict[str, bool], generation: int
    ) -> None:
        """Take in the devices added (True) and removed (False) up to ``generation``."""
        self._look_up(store, rollout_id, set(changes))
        self.changed.update(changes)
        self.generation = generation

    def place(self, rollout_id: str, device: str) -> float:
        """The device's place (every device asked about is in the fleet)."""
        place = self.hashed.get(device)
        if place is None:
            place = self.hashed[device] = device_bucket(rollout_id, device)
        return place

    def below(self, store: TelemetryStore, rollout_id: str, percent: float) -> int:
        """How many devices have a place under ``percent``: those stored, plus those
        added since, minus those removed since."""
        count = store.count_places(rollout_id, percent)
        for device, present in self.changed.items():
            delta = int(present) - int(self.in_store[device])
            if delta and self.place(rollout_id, device) < percent:
                count += delta
        return count

    def places_of(
        self, store: TelemetryStore, rollout_id: str, devices: set[str]
    ) -> dict[str, float]:
        """The places of those of ``devices`` that are in the fleet now."""
        self._look_up(store, rollout_id, devices)
        return {
            d: self.place(rollout_id, d) for d in devices if self.changed.get(d, self.in_store[d])
        }


def _sample(device: str, at: float, payload: dict[str, Any], model: str) -> Sample | None:
    models = payload.get("models")
    entry = models.get(model) if isinstance(models, dict) else None
    if not isinstance(entry, dict):
        return None

    def count(key: str) -> int:
        value = entry.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    p99 = entry.get("p99_s")
    version = entry.get("version")
    return Sample(
        device=device,
        at=at,
        version=version if isinstance(version, str) else None,
        requests=count("requests"),
        errors=count("errors"),
        client_errors=count("client_errors"),
        p99_s=float(p99) if isinstance(p99, int | float) and not isinstance(p99, bool) else None,
    )


def _log_change(r: Rollout) -> None:
    if r.halt is not None and r.state in (RolloutState.PAUSED, RolloutState.ABORTED):
        logger.warning("rollout %s %s: %s", r.id, r.state.value, r.halt.reason)
    else:
        logger.info("rollout %s: %s at %g%%", r.id, r.state.value, r.percent)


def place_rollout(store: TelemetryStore, r: Rollout, ended: Sequence[str] = ()) -> tuple[int, int]:
    """Store the place in ``r`` of every device of its fleet (``device_buckets``), which
    a rollout tick then counts by (``RolloutService.fleet_counts``), and forget the
    places of the rollouts ``ended`` (those of the repository no longer active); return
    the generation of the fleet's devices they stand at and how many were placed.
    `edgectl rollout start` calls it, so that no tick hashes every device id nor writes
    anything of it."""
    gone = set(ended).intersection(store.placed_rollouts()) - {r.id}
    if gone:
        store.drop_places(gone)
    # r.id is the rollout id desired state names (desired_release), which devices hash.
    return store.place_fleet(r.id, r.fleet, partial(device_buckets, r.id))


def promotion_of(before: Rollout, after: Rollout) -> int | None:
    """The stage index a tick moves a running rollout to (``len(stages)``: it completes),
    or None when it promotes nothing (a halt, the same stage)."""
    if before.state is not RolloutState.RUNNING:
        return None
    if after.state is RolloutState.COMPLETED:
        return len(after.stages)
    if after.state is RolloutState.RUNNING and after.stage > before.stage:
        return after.stage
    return None


def start_rollout_service(
    scheduler: Any,
    repo_dir: Path,
    store: TelemetryStore,
    settings: RolloutSettings | None = None,
    leadership: Leadership | None = None,
) -> RolloutService:
    """Add the rollout job to an APScheduler scheduler (started or not); return the
    service. The first tick runs at once, then every ``tick_interval_s``; with
    ``leadership``, a tick does something only in the leader."""
    service = RolloutService(repo_dir, store, settings, leadership)
    scheduler.add_job(
        service.run_once,
        "interval",
        seconds=service.settings.tick_interval_s,
        id=JOB_ID,
        name="rollout gates",
        max_instances=1,
        coalesce=True,
        next_run_time=datetime.now(UTC),
        replace_existing=True,
    )
    logger.info("rollout service: evaluating gates every %.1f s", service.settings.tick_interval_s)
    return service
