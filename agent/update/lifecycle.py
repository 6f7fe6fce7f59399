"""The life of a model version on the device: install, restore, probation, rollback.

This orchestrator drives the pure state machine of ``agent.update.journal`` through real side
effects. The rule it keeps: **persist the new record, then do the side effect** of the
phase it enters, so a process killed at any instant restarts into a known state
(``agent.update.journal.recover`` decides what that state means).

Each phase's work runs under its own deadline in a worker thread: a phase past its
deadline fails with a reason and the device keeps serving its last good version (the
worker's late result is discarded and cleaned up by the next prune).

The device's own disk failing under an install (full, out of inodes, read-only: any
``OSError`` in a phase's work, or a journal write refused) is a ``StorageError``: the
install is put back to idle, not failed, and retried on the next check. When even that
journal write is refused, the record stays in the phase the disk last took, and the
next check puts it back first (``put_back_interrupted``).

Two clocks: the wall clock (``clock``) stamps the journal's records; the monotonic one
(``monotonic``) times everything within this process, the phases' deadlines and a
probation's elapsed time (``ProbationClock``, per model), so a wall clock that steps
neither stalls nor rushes a verdict. A probation resumed after a restart starts from
what the journal vouches for (``agent.update.journal.probation_carried_s``).

The device always serves a version that passed its golden vectors here: a candidate is
loaded, checked and warmed while the old version serves, and a reference swap makes it
live; in-flight requests finish on the old session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import agent
from agent.base.errors import (
    AgentError,
    FetchError,
    InsufficientSpaceError,
    ModelError,
    StorageError,
    UnsupportedContractError,
    UntrustedInputError,
)
from agent.base.fsutil import remove_tree
from agent.contracts import ProbationPolicy, parse_manifest
from agent.device.config import AgentConfig
from agent.runtime.memory import release_memory
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.runtime.stats import RequestStats, StatsSnapshot
from agent.update.journal import (
    PRE_ACTIVE,
    JournalRecord,
    Phase,
    begin_install,
    fail,
    probation_carried_s,
    recover,
    retry_later,
    serving_version,
    transition,
)
from agent.update.probation import ProbationClock, Verdict, evaluate_probation
from agent.update.store import ModelStore
from agent.update.unpack import unpack_bundle

logger = logging.getLogger(__name__)
# Runs of a new version before it serves, golden cases included (the first runs of a
# session pay for its allocations).
WARM_UP_ROUNDS = 3
T = TypeVar("T")

# Called with the phase just persisted, before its side effect (test hook: pause there).
PhaseHook = Callable[[str, Phase], None]


class PhaseDeadlineError(AgentError):
    """A phase of an install ran past its deadline."""


def run_with_deadline(work: Callable[[], T], deadline_s: float, what: str) -> T:
    """Run ``work`` in a worker thread; raise PhaseDeadlineError if it overruns."""
    future: Future[T] = Future()

    def target() -> None:
        try:
            future.set_result(work())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name=f"phase:{what}", daemon=True).start()
    try:
        return future.result(timeout=deadline_s)
    except TimeoutError:
        raise PhaseDeadlineError(f"{what} exceeded its deadline of {deadline_s:g}s") from None


class ModelLifecycle:
    """Installs, restores, judges and rolls back model versions, one journal per model."""

    def __init__(
        self,
        config: AgentConfig,
        registry: ModelRegistry,
        store: ModelStore,
        stats: RequestStats,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        phase_hook: PhaseHook | None = None,
        on_swap: Callable[[str, str, str], None] | None = None,
        on_transition: Callable[[JournalRecord], None] | None = None,
        agent_version: str = agent.__version__,
    ) -> None:
        # The version a refusal for a contract this agent lacks is recorded under, and
        # that decides whether such a refusal is retried (journal.should_skip).
        self.agent_version = agent_version
        self._config = config
        self._registry = registry
        self._store = store
        self._stats = stats
        self._clock = clock
        self._monotonic = monotonic
        # The elapsed probation of each model on probation, in this process.
        self._probation: dict[str, ProbationClock] = {}
        self._phase_hook = phase_hook or (lambda model, phase: None)
        self._on_swap = on_swap or (lambda model, version, why: None)
        # Every persisted record, in order: the source of lifecycle events (telemetry).
        self._on_transition = on_transition or (lambda record: None)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ journal

    def record(self, model: str) -> JournalRecord:
        return self._store.read_journal(model)

    def installed_dir(self, model: str, version: str) -> Path:
        """Where ``version`` of ``model`` is unpacked (it may not be there): a delta's base."""
        return self._store.version_dir(model, version)

    def model_names(self) -> list[str]:
        """The models with a journal on this device."""
        return self._store.model_names()

    def probation_left_s(self, model: str) -> float | None:
        """How long the probation of ``model``'s active version has still to run, on the
        monotonic clock; None when none runs in this process (the next tick starts it)."""
        record = self._store.read_journal(model)
        clock = self._probation.get(model)
        if record.phase is not Phase.ACTIVE or clock is None or clock.version != record.version:
            return None
        return record.probation.duration_s - clock.elapsed_s(self._monotonic())

    def _persist(self, record: JournalRecord) -> JournalRecord:
        """Write ``record`` (raises StorageError when the disk refuses), then report it."""
        self._store.write_journal(record)
        logger.debug("%s: journal %s %s", record.model, record.phase.value, record.version)
        self._on_transition(record)
        self._phase_hook(record.model, record.phase)
        return record

    # ------------------------------------------------------------------ start-up

    def restore(self) -> list[str]:
        """After a (re)start: recover every model's journal and load what it serves.

        Raises IncompatibleStateError, before anything is written or loaded, when a
        journal was written by a newer agent (the agent must not start on it).
        """
        restored = []
        with self._lock:
            models = self._store.model_names()
            for model in models:
                self._store.read_journal(model)  # a newer agent's journal stops us here
            for model in models:
                self._store.migrate_pointers(model, self._clock())
            for model in models:
                plan = recover(self._store.read_journal(model), self._clock())
                record = plan.record
                if record != self._store.read_journal(model):
                    record = self._persist(record)
                    logger.warning("%s: %s", model, plan.note)
                served = self._restore_one(record, plan.load, plan.fallback)
                if served is not None:
                    restored.append(model)
                    if record.phase is Phase.ACTIVE and served == record.version:
                        # The candidate resumed (not the fallback that rolled it back).
                        self._start_probation(model, served, plan.probation_carried_s)
        return restored

    def _restore_one(
        self, record: JournalRecord, load: str | None, fallback: str | None
    ) -> str | None:
        model = record.model
        if load is not None:
            try:
                self._registry.activate(self._load_checked(model, load))
                logger.info("serving %s %s (restored from disk)", model, load)
                self._prune(model, {load} | ({fallback} if fallback else set()))
                return load
            except AgentError as exc:
                logger.error("cannot restore %s %s: %s", model, load, exc)
        if fallback is not None:
            # The candidate on probation no longer loads: roll back to the previous one.
            self._persist(
                transition(
                    record,
                    Phase.ROLLED_BACK,
                    self._clock(),
                    reason=f"{load} failed to restore after a restart",
                )
            )
            return self._restore_one(self._store.read_journal(model), fallback, None)
        if load is not None:
            logger.error("%s: nothing good to serve; waiting for the next release", model)
        return None

    # ------------------------------------------------------------------ install

    def install(
        self,
        model: str,
        version: str,
        rollout_id: str,
        policy: ProbationPolicy,
        download: Callable[[], Path],
    ) -> None:
        """Install ``version`` through every phase up to probation, or fail cleanly.

        Raises FetchError, InsufficientSpaceError or StorageError for a transient
        failure (the journal goes back to idle and the next check retries) and AgentError
        for a failure of the candidate itself (the journal records ``failed`` with the
        reason; not retried for this rollout; for an ``UnsupportedContractError`` it also
        records this agent's version, and an agent of another version retries it).
        """
        with self._lock:
            cfg = self._config
            now = self._clock()
            record = self._persist(
                begin_install(
                    self._store.read_journal(model),
                    version,
                    rollout_id,
                    policy,
                    now,
                    deadline_s=cfg.repository.download_deadline_s,
                )
            )
            try:
                bundle = download()  # the fetcher enforces the download deadline itself
                record = self._enter(record, Phase.VERIFIED, cfg.install.unpack_deadline_s)
                destination = self._store.version_dir(model, version)
                run_with_deadline(
                    lambda: self._unpack(bundle, destination, model, version),
                    cfg.install.unpack_deadline_s,
                    "unpacking (phase verified)",
                )
                record = self._enter(record, Phase.STAGED, cfg.install.smoke_test_deadline_s)
                loaded = run_with_deadline(
                    lambda: self._load_checked(model, version),
                    cfg.install.smoke_test_deadline_s,
                    "the smoke test (phase staged)",
                )
                record = self._enter(record, Phase.SMOKE_TESTED, cfg.install.activate_deadline_s)
            except (FetchError, InsufficientSpaceError, StorageError) as exc:
                self._put_back(record, exc)
                raise
            except OSError as exc:
                # The device's disk, not the candidate: full, out of inodes, read-only.
                error = StorageError(
                    f"{record.phase.value} {model} {version}: {exc.strerror or exc}"
                    f"{f' ({exc.filename})' if exc.filename else ''}; free space on the device "
                    "(or fix the state folder) and the next check retries"
                )
                self._put_back(record, error)
                raise error from exc
            except AgentError as exc:
                refused_by = self.agent_version if isinstance(exc, UnsupportedContractError) else ""
                self._persist(fail(record, self._clock(), str(exc), refused_by))
                self._prune(model, set(), drop=frozenset({version}))
                raise
            self._activate(record, loaded)

    def _put_back(self, record: JournalRecord, exc: AgentError) -> None:
        """A transient failure: back to idle. Raises StorageError naming both failures
        when the journal cannot record it (``put_back_interrupted`` does, next check)."""
        try:
            self._persist(retry_later(record, self._clock(), f"transient: {exc}"))
        except StorageError as failed:
            raise StorageError(
                f"{exc} (the journal could not record the put-back either, and still says "
                f"{record.phase.value}: the next check puts it back)"
            ) from failed

    def put_back_interrupted(self) -> list[str]:
        """Put back to idle every install left mid-way; returns the models put back.

        Installs run to their end inside one check, so between checks a record in a
        pre-active phase means the disk refused the journal write that would have put it
        back. It is put back now, as ``recover`` does after a restart, but without counting
        an interruption: the disk, not the candidate, was at fault. Raises StorageError
        when the journal still cannot be written.
        """
        put_back = []
        with self._lock:
            for model in self._store.model_names():
                record = self._store.read_journal(model)
                if record.phase not in PRE_ACTIVE:
                    continue
                logger.warning(
                    "%s: the install of %s was left in %s (a journal write failed); "
                    "putting it back",
                    model,
                    record.version,
                    record.phase.value,
                )
                reason = f"{record.phase.value} interrupted by a journal write the disk refused"
                self._persist(retry_later(record, self._clock(), reason))
                put_back.append(model)
        return put_back

    def _enter(self, record: JournalRecord, phase: Phase, deadline_s: float) -> JournalRecord:
        return self._persist(transition(record, phase, self._clock(), deadline_s=deadline_s))

    def _unpack(self, bundle: Path, destination: Path, model: str, version: str) -> None:
        limit = self._config.repository.max_bundle_bytes
        try:
            remove_tree(destination)  # a leftover of an install that did not finish
            unpack_bundle(
                bundle,
                destination,
                expected_name=model,
                expected_version=version,
                max_member_bytes=limit,
                max_total_bytes=limit,
            )
        finally:
            remove_tree(bundle)

    def _activate(self, record: JournalRecord, loaded: LoadedModel) -> None:
        model, version = record.model, loaded.version
        baseline = self._stats.snapshot(model, record.previous) if record.previous else None
        now = self._clock()
        active = transition(record, Phase.ACTIVE, now)
        active = self._persist(_with_probation(active, now, baseline))
        self._start_probation(model, version, 0.0)
        self._registry.activate(loaded)
        del loaded
        # The old session is freed when its last in-flight request ends; give back what
        # is already free (a dropped session is not memory returned, see agent.runtime.memory).
        release_memory()
        self._on_swap(model, version, "activated")
        logger.info(
            "now serving %s %s (was %s); on probation for %gs",
            model,
            version,
            record.previous or "nothing",
            active.probation.duration_s,
        )

    # ------------------------------------------------------------------ probation

    def judge_probation(self) -> list[str]:
        """Judge every model on probation; commit or roll back. Returns settled models.

        While an install or a rollback holds the lifecycle, it judges nothing and returns
        at once (the next tick judges): a tick never waits behind a download, so its own
        duration stays short and bounded (the watchdog holds it to a deadline).
        """
        settled: list[str] = []
        if not self._lock.acquire(blocking=False):
            return settled
        try:
            for model in self._store.model_names():
                record = self._store.read_journal(model)
                if record.phase is not Phase.ACTIVE or record.version is None:
                    continue
                decision = evaluate_probation(
                    record.probation,
                    self._probation_elapsed_s(record, record.version),
                    self._stats.snapshot(model, record.version),
                    _baseline(record),
                )
                if decision.verdict is Verdict.COMMIT:
                    self._commit(record, decision.reason)
                    settled.append(model)
                elif decision.verdict is Verdict.ROLL_BACK:
                    self.roll_back(model, decision.reason)
                    settled.append(model)
        finally:
            self._lock.release()
        return settled

    def _start_probation(self, model: str, version: str, carried_s: float) -> None:
        self._probation[model] = ProbationClock(version, carried_s, self._monotonic())

    def _probation_elapsed_s(self, record: JournalRecord, version: str) -> float:
        """How long ``version`` of ``record.model`` has been on probation, on the monotonic
        clock. A probation this process did not start or resume (none today) is taken
        over as a restart would, from what the journal vouches for."""
        clock = self._probation.get(record.model)
        if clock is None or clock.version != version:
            carried_s, starts_over = probation_carried_s(record, self._clock())
            if starts_over:
                logger.warning("%s: %s", record.model, starts_over)
            self._start_probation(record.model, version, carried_s)
            clock = self._probation[record.model]
        return clock.elapsed_s(self._monotonic())

    def _commit(self, record: JournalRecord, reason: str) -> None:
        self._persist(transition(record, Phase.COMMITTED, self._clock(), reason=reason))
        self._probation.pop(record.model, None)
        logger.info("committed %s %s: %s", record.model, record.version, reason)
        keep = {v for v in (record.version, record.previous) if v}
        self._prune(record.model, keep)

    def roll_back(self, model: str, reason: str) -> bool:
        """Roll a version on probation back to the previous one; False if none is active."""
        with self._lock:
            record = self._store.read_journal(model)
            if record.phase is not Phase.ACTIVE:
                return False
            rolled = self._persist(
                transition(record, Phase.ROLLED_BACK, self._clock(), reason=reason)
            )
            self._probation.pop(model, None)
            logger.error("rolling back %s %s: %s", model, record.version, reason)
            previous = rolled.previous
            bad = frozenset({record.version}) if record.version else frozenset()
            if previous is None:
                self._registry.remove(model)
                logger.error("%s: no previous version to roll back to; serving nothing", model)
                return True
            try:
                self._registry.activate(self._load_checked(model, previous))
            except AgentError as exc:
                self._registry.remove(model)
                logger.error("%s: previous version %s no longer loads (%s)", model, previous, exc)
                return True
            release_memory()
            self._on_swap(model, previous, "rolled_back")
            logger.info("serving %s %s again", model, previous)
            self._prune(model, {previous}, drop=bad)
            return True

    # ------------------------------------------------------------------ helpers

    def _load_checked(self, model: str, version: str) -> LoadedModel:
        directory = self._store.version_dir(model, version)
        try:
            manifest = parse_manifest((directory / "manifest.json").read_bytes())
        except OSError as exc:
            raise ModelError(f"{model} {version} is not on disk: {exc.strerror}") from None
        except UntrustedInputError as exc:
            raise ModelError(f"{model} {version}: {exc}") from None
        # ONNX Runtime and numpy come with the first model: an agent without one has neither.
        from agent.runtime.loading import check_golden, load_model, warm_up

        loaded = load_model(
            directory, manifest, intra_op_threads=self._config.inference.intra_op_threads
        )
        check_golden(loaded)
        # The golden cases ran the model already, once each (at least one): warm it only
        # as many more times as they fall short (none for most bundles), without reading
        # golden.npz again. A restart serves sooner by as much.
        more = WARM_UP_ROUNDS - manifest.golden.cases
        if more > 0:
            warm_up(loaded, rounds=more)
        return loaded

    def _prune(self, model: str, keep: set[str], drop: frozenset[str] = frozenset()) -> None:
        """Keep ``keep``, what serves, and the newest others up to ``keep_versions``."""
        serving = serving_version(self._store.read_journal(model))
        keep = set(keep) | ({serving} if serving else set())
        budget = self._config.install.keep_versions
        for version in self._store.versions_on_disk(model):
            if len(keep) >= budget:
                break
            if version not in drop:
                keep.add(version)
        removed = self._store.prune(model, keep)
        if removed:
            self._stats.forget(model, keep)
            logger.info("%s: removed old versions %s", model, ", ".join(sorted(removed)))


def _with_probation(
    record: JournalRecord, now: float, baseline: StatsSnapshot | None
) -> JournalRecord:
    return replace(
        record,
        probation_started_at=now,
        baseline_p99_s=baseline.p99_s if baseline else None,
        baseline_samples=baseline.window if baseline else 0,
    )


def _baseline(record: JournalRecord) -> StatsSnapshot | None:
    if record.baseline_p99_s is None:
        return None
    return StatsSnapshot(
        requests=record.baseline_samples,
        errors=0,
        client_errors=0,
        p50_s=None,
        p95_s=None,
        p99_s=record.baseline_p99_s,
        window=record.baseline_samples,
    )
