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

Shadow (``ShadowPolicy`` enabled, and a previous version serving): the smoke-tested
candidate is not swapped in but put in shadow beside the serving version
(``agent.runtime.shadow.ShadowRunner``, held by the registry, which the inference
server offers copies of live requests); each probation tick judges it
(``agent.update.shadow.evaluate_shadow``): pass → active (probation as without a
shadow), fail → failed with the figures in the reason; the candidate never answers a
client in shadow. The last shadow's figures stay readable per model (``shadow_doc``)
for heartbeats while the journal names that candidate.
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
from agent.contracts import ProbationPolicy, ShadowPolicy, parse_manifest
from agent.device.config import AgentConfig
from agent.runtime.memory import release_memory
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.runtime.shadow import ShadowFigures, ShadowRunner
from agent.runtime.stats import RequestStats, StatsSnapshot
from agent.update.journal import (
    PRE_ACTIVE,
    JournalRecord,
    Phase,
    begin_install,
    cancel_shadow,
    enter_shadow,
    fail,
    probation_carried_s,
    recover,
    retry_later,
    serving_version,
    transition,
)
from agent.update.probation import ProbationClock, Verdict, evaluate_probation
from agent.update.shadow import ShadowVerdict, evaluate_shadow
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
        # The candidate in shadow per model in this process: its runner and when it
        # started (monotonic); the last shadow's figures and verdict per model.
        self._shadows: dict[str, tuple[ShadowRunner, float]] = {}
        self._shadow_results: dict[str, tuple[ShadowFigures, str]] = {}

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
                if record.phase is Phase.SHADOW:
                    self._resume_shadow(record, served)
        return restored

    def _restore_one(
        self, record: JournalRecord, load: str | None, fallback: str | None
    ) -> str | None:
        model = record.model
        if load is not None:
            try:
                self._registry.activate(self._load_checked(model, load))
                logger.info("serving %s %s (restored from disk)", model, load)
                keep = {load} | ({fallback} if fallback else set())
                if record.phase is Phase.SHADOW and record.version:
                    keep.add(record.version)  # shadowed again from the start
                self._prune(model, keep)
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
        shadow: ShadowPolicy | None = None,
    ) -> None:
        """Install ``version`` through every phase up to probation (or up to its shadow,
        when ``shadow`` is enabled and a previous version serves), or fail cleanly.

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
            if shadow is not None and shadow.enabled and self._serves(model, record.previous):
                self._start_shadow(record, loaded, shadow)
                return
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

    def _activate(self, record: JournalRecord, loaded: LoadedModel, reason: str = "") -> None:
        model, version = record.model, loaded.version
        baseline = self._stats.snapshot(model, record.previous) if record.previous else None
        now = self._clock()
        active = transition(record, Phase.ACTIVE, now, reason=reason)
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

    # ------------------------------------------------------------------ shadow

    def _serves(self, model: str, version: str | None) -> bool:
        live = self._registry.get(model)
        return version is not None and live is not None and live.version == version

    def _start_shadow(
        self, record: JournalRecord, loaded: LoadedModel, policy: ShadowPolicy
    ) -> None:
        """Persist the shadow, then put ``loaded`` in shadow beside the serving version."""
        record = self._persist(enter_shadow(record, policy, self._clock()))
        self._run_shadow(record, loaded)

    def _run_shadow(self, record: JournalRecord, loaded: LoadedModel) -> None:
        assert record.shadow is not None and record.previous is not None
        runner = ShadowRunner(
            loaded,
            record.previous,
            record.shadow.sample_rate,
            cpu_timed=self._config.inference.intra_op_threads == 1,
        )
        replaced = self._registry.set_shadow(record.model, runner)
        if replaced is not None:
            replaced.close()
        self._shadows[record.model] = (runner, self._monotonic())
        self._shadow_results[record.model] = (runner.figures(), "running")
        logger.info(
            "%s %s in shadow beside %s: %d requests to compare, at most %gs",
            record.model,
            record.version,
            record.previous,
            record.shadow.samples,
            record.shadow.max_duration_s,
        )

    def _resume_shadow(self, record: JournalRecord, served: str | None) -> None:
        """After a restart in shadow (``recover_shadow``): load the candidate beside the
        version restored and shadow it again from the start. A candidate that no longer
        loads fails; with nothing serving to compare with, the shadow is cancelled and
        the next check installs it again."""
        model, version = record.model, record.version
        assert version is not None
        if served is None or served != record.previous:
            self._persist(
                cancel_shadow(
                    record, self._clock(), f"{record.previous} does not serve: shadow cancelled"
                )
            )
            return
        try:
            loaded = self._load_checked(model, version)
        except AgentError as exc:
            self._persist(
                transition(
                    record, Phase.FAILED, self._clock(), reason=f"shadow after a restart: {exc}"
                )
            )
            self._prune(model, set(), drop=frozenset({version}))
            return
        self._run_shadow(record, loaded)

    def _stop_shadow(self, model: str) -> ShadowRunner | None:
        runner, _ = self._shadows.pop(model, (None, 0.0))
        registered = self._registry.set_shadow(model, None)
        for r in {id(x): x for x in (runner, registered) if x is not None}.values():
            r.close()
        return runner

    def cancel_shadow(self, model: str, reason: str) -> bool:
        """Stop the shadow of ``model`` without a verdict (desired state names another
        version now): back to idle on the version in service. False if none runs."""
        with self._lock:
            record = self._store.read_journal(model)
            if record.phase is not Phase.SHADOW:
                return False
            self._persist(cancel_shadow(record, self._clock(), reason))
            runner = self._stop_shadow(model)
            if runner is not None:
                self._shadow_results[model] = (runner.figures(), "cancelled")
            logger.info("%s: shadow of %s cancelled: %s", model, record.version, reason)
            return True

    def shadow_doc(self, model: str) -> dict[str, object] | None:
        """The shadow figures of ``model``'s candidate for heartbeats: while it is in
        shadow, and after its verdict while the journal still names it; None otherwise."""
        result = self._shadow_results.get(model)
        if result is None:
            return None
        figures, state = result
        shadowed = self._shadows.get(model)
        if shadowed is not None:
            figures, state = shadowed[0].figures(), "running"
        if self._store.read_journal(model).version != figures.version:
            return None
        return shadow_figures_doc(figures, state)

    def _judge_shadow(self, record: JournalRecord) -> bool:
        """Judge the candidate of ``record`` in shadow; True when it was settled."""
        model = record.model
        assert record.shadow is not None
        shadowed = self._shadows.get(model)
        if shadowed is None or shadowed[0].candidate.version != record.version:
            # Not started by this process (``restore`` resumes every shadow): start it.
            self._resume_shadow(record, self._live_version(model))
            return self._store.read_journal(model).phase is not Phase.SHADOW
        runner, started = shadowed
        figures = runner.figures()
        decision = evaluate_shadow(record.shadow, figures, self._monotonic() - started)
        if decision.verdict is ShadowVerdict.WAIT:
            return False
        self._stop_shadow(model)
        if decision.verdict is ShadowVerdict.PASS:
            self._shadow_results[model] = (figures, "passed")
            logger.info("%s %s: %s", model, record.version, decision.reason)
            self._activate(record, runner.candidate, decision.reason)
            return True
        self._shadow_results[model] = (figures, "failed")
        self._persist(transition(record, Phase.FAILED, self._clock(), reason=decision.reason))
        logger.error(
            "%s %s failed in shadow (it answered no client): %s",
            model,
            record.version,
            decision.reason,
        )
        version = record.version
        del runner, shadowed
        self._prune(model, set(), drop=frozenset({version}) if version else frozenset())
        release_memory()
        return True

    def _live_version(self, model: str) -> str | None:
        live = self._registry.get(model)
        return live.version if live is not None else None

    # ------------------------------------------------------------------ probation

    def judge_probation(self) -> list[str]:
        """Judge every model on probation (commit or roll back) and every candidate in
        shadow (activate or fail). Returns the models settled.

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
                if record.phase is Phase.SHADOW:
                    if self._judge_shadow(record):
                        settled.append(model)
                    continue
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


def shadow_figures_doc(figures: ShadowFigures, state: str) -> dict[str, object]:
    """A shadow's figures as a model's ``shadow`` object in heartbeats (docs/protocol.md);
    ``state``: running, passed, failed or cancelled."""
    return {
        "version": figures.version,
        "serving": figures.serving,
        "state": state,
        "samples": figures.samples,
        "agreement": figures.agreement,
        "cosine_min": figures.cosine_min,
        "max_abs": figures.max_abs,
        "latency_ratio": figures.latency_ratio,
        "errors": figures.errors,
        "dropped": figures.dropped,
    }
