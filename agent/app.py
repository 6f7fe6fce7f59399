"""The agent's composition root: builds the parts, owns the tasks, shuts them down.

Start-up order matters for the "always serve the last good version" contract: the
versions active before a restart are loaded (and their golden vectors checked) before
the socket listens, and before anything is fetched from the network.

Tasks: ``update-loop`` runs one update check at a time in a worker thread whenever an
announcement or the poll asks for one (requests made during a check coalesce into one
more check). ``poll`` asks for one every ``poll_interval_s``, with jitter so a fleet does
not poll in step; ``probation`` judges the versions on probation every
``probation_tick_s``; ``heartbeat`` publishes one every ``heartbeat_interval_s``, in a
worker thread. All three keep their cadence on the monotonic clock
(``agent.device.cadence``), so a wall clock that steps (NTP at boot) neither stalls nor
rushes them. Every journal record the lifecycle persists becomes an event in the on-disk
outbox (``state_dir/outbox.sqlite``), which the MQTT link drains in order whenever the
broker is reachable.

The update loop never ends on an error: ``UpdateService.check`` returns every error it
expects in its result, and anything else (a bug) is logged with its traceback and the
check retried after a back-off (``retry_delay_s``).

Under systemd (``Type=notify``, see ``systemd/edge-agent.service``) the agent sends
``READY=1`` once the socket listens with the restored (last good) versions serving,
``STATUS=`` with the versions served whenever they change, ``STOPPING=1`` on shutdown,
and ``WATCHDOG=1`` from the ``watchdog`` task on the event loop, but only while every
long-lived loop is alive, within its pass deadline and not late for its next pass
(``agent.device.liveness``; the loops and bounds: ``watch_loops``, ``pass_deadlines``,
``idle_bounds``). So a hung event loop, a dead loop (the update loop, the poll, the
probation judge, the heartbeat, the MQTT link's threads, the inference acceptor), a pass
stuck past its deadline or a loop whose passes stopped coming stops the pings, and
systemd kills and restarts the agent. The watchdog task starts first: systemd arms the
timer when the process starts, not when it is ready; until the loops start (restoring
the last good versions), nothing is watched and the pings go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import agent
from agent.base.errors import ConfigError
from agent.contracts import waiting_doc
from agent.device.cadence import Cadence, run_every
from agent.device.config import AgentConfig
from agent.device.liveness import Liveness, Verdict
from agent.device.sdnotify import Notifier, NotifyError
from agent.runtime.drift import DriftFigures
from agent.runtime.memory import configure_allocator, release_memory
from agent.runtime.registry import ModelRegistry
from agent.serving.metrics import InferenceMetrics
from agent.serving.routes import import_infer_path
from agent.serving.server import InferenceServer
from agent.serving.triton import IndexEntry
from agent.telemetry.mqtt import MqttLink
from agent.telemetry.outbox import Outbox
from agent.telemetry.reporter import IntervalStats, TelemetryReporter
from agent.update.holdings import held_versions
from agent.update.journal import JournalRecord, Phase
from agent.update.lifecycle import ModelLifecycle, PhaseHook
from agent.update.store import ModelStore
from agent.update.updater import UpdateService

logger = logging.getLogger(__name__)
# Not EDGE_AGENT_*: that prefix is reserved for config overrides.
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"
STOP_LOOP_ENV = "EDGEFLEET_TEST_STOP_LOOP"
# Slack on top of a probation tick's own deadlines, a heartbeat's least deadline, and on
# top of each loop's cadence before it is late.
PASS_SLACK_S = 60.0
# Back-off after an unexpected error in the update loop: from this, doubling.
FIRST_RETRY_S = 5.0
# How often loops are judged when systemd asks for no watchdog (problems are logged).
HEALTH_CHECK_S = 10.0


class LoopStoppedForTest(RuntimeError):
    """Raised by the update loop when ``EDGEFLEET_TEST_STOP_LOOP=update`` asks it to end."""


@dataclass(frozen=True)
class PassDeadlines:
    """How long one pass of each loop may run before the watchdog calls it stuck."""

    update_s: float  # counted again from every transfer's progress and journal record
    probation_s: float
    telemetry_s: float


def pass_deadlines(config: AgentConfig) -> PassDeadlines:
    """Generous bounds from the config: they catch a hang, never a slow network.

    A check renews its deadline whenever it makes progress: a transfer that starts or
    receives data (``TransferLimits.on_progress``) and every journal record an install
    persists. So its bound is the longest step that reports nothing: a transfer waiting
    up to ``download_deadline_s`` for its next bytes, or an install phase up to its own
    deadline, plus a minute for what lies between (hashing a bundle, applying a delta).
    Neither the number of transfers nor of repository sources adds to it: a check stuck
    in the middle (a lock that is never released) is caught after that bound, not after
    every transfer of every source could have run to its deadline. A probation tick
    (which never waits behind an install): a rollback's load and swap. A heartbeat: twice
    its interval, at least a minute.
    """
    install = config.install
    longest_step_s = max(
        config.repository.download_deadline_s,
        install.unpack_deadline_s,
        install.smoke_test_deadline_s,
        install.activate_deadline_s,
    )
    return PassDeadlines(
        update_s=longest_step_s + PASS_SLACK_S,
        probation_s=install.smoke_test_deadline_s + install.activate_deadline_s + PASS_SLACK_S,
        telemetry_s=max(PASS_SLACK_S, 2 * config.telemetry.heartbeat_interval_s),
    )


@dataclass(frozen=True)
class IdleBounds:
    """How long each periodic loop may go without a pass before the watchdog calls it late."""

    update_s: float  # the poll asks for a check at least this often
    probation_s: float
    telemetry_s: float


def idle_bounds(config: AgentConfig) -> IdleBounds:
    """Each loop's longest gap between passes on its cadence, plus a minute of slack.

    The update loop passes whenever the poll asks (or an announcement), so its gap is the
    poll's (its back-off after an unexpected error never exceeds ``poll_interval_s``).
    """
    return IdleBounds(
        update_s=poll_cadence(config).longest_gap_s + PASS_SLACK_S,
        probation_s=config.install.probation_tick_s + PASS_SLACK_S,
        telemetry_s=config.telemetry.heartbeat_interval_s + PASS_SLACK_S,
    )


def poll_cadence(config: AgentConfig) -> Cadence:
    return Cadence(config.repository.poll_interval_s, config.repository.poll_jitter_s)


def retry_delay_s(failures: int, first_s: float, max_s: float) -> float:
    """The wait before retrying after ``failures`` unexpected errors in a row (≥ 1):
    ``first_s``, doubling, at most ``max_s``."""
    if failures < 1:
        raise ValueError(f"failures expected >= 1, got {failures}")
    doublings = min(failures - 1, 32)  # past that the cap has long been reached
    return min(max_s, first_s * float(1 << doublings))


class AgentApp:
    """One running agent: inference server, update service, MQTT link and poll."""

    def __init__(self, config: AgentConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self._notify_failed = False
        self.registry = ModelRegistry()
        self.stats = IntervalStats()
        self.store = ModelStore(config.state_dir / "models")
        self.outbox = Outbox(config.state_dir / "outbox.sqlite", config.telemetry.outbox_max_events)
        self.lifecycle = ModelLifecycle(
            config,
            self.registry,
            self.store,
            self.stats,
            phase_hook=pause_hook_from_env(config.state_dir),
            on_swap=self._swapped,
            on_transition=self._transitioned,
        )
        self.updates = UpdateService(config, self.lifecycle, on_progress=self._check_progressed)
        self.metrics = InferenceMetrics()
        self.link = MqttLink(config, self._announced, self.models_status, self.outbox)
        self.server = InferenceServer.from_config(
            self.registry,
            config.inference,
            agent_status=self.agent_status,
            stats=self.stats,
            metrics=self.metrics,
            repository=self.repository_index,
        )
        self.telemetry = TelemetryReporter(
            device=config.device_id,
            fleet=config.fleet,
            interval_s=config.telemetry.heartbeat_interval_s,
            stats=self.stats,
            outbox=self.outbox,
            models_status=self.models_status,
            publish_heartbeat=self.link.publish_heartbeat,
            disk_path=config.state_dir,
            drift=self.drift_figures,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._check_wanted = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.liveness = Liveness()
        self.deadlines = pass_deadlines(config)
        self.idle = idle_bounds(config)
        self._problems: tuple[str, ...] = ()
        self._stop_loop = stop_loop_from_env()

    def drift_figures(self) -> dict[tuple[str, str], DriftFigures]:
        """The drift of each serving version whose bundle has a reference (heartbeats)."""
        return {
            (name, model.version): model.drift.figures()
            for name, model in self.registry.snapshot().items()
            if model.drift is not None
        }

    def models_status(self) -> Mapping[str, Mapping[str, Any]]:
        """Each model served (its version and install state) and each model that waits
        to install the version desired state names, with why (``waiting``): one not
        served yet has version None."""
        status: dict[str, dict[str, Any]] = {}
        for name, model in sorted(self.registry.snapshot().items()):
            record = self.store.read_journal(name)
            status[name] = {"version": model.version, "state": record.phase.value}
            if record.phase.value in ("failed", "rolled_back"):
                status[name]["failed_version"] = record.version
                status[name]["reason"] = record.reason
        for name, waiting in sorted(self.updates.waiting.snapshot().items()):
            entry = status.get(name)
            if entry is None:
                entry = status[name] = {
                    "version": None,
                    "state": self.store.read_journal(name).phase.value,
                }
            entry["waiting"] = waiting_doc(waiting)
        for name in self.lifecycle.model_names():
            shadow = self.lifecycle.shadow_doc(name)
            if shadow is not None and name in status:
                status[name]["shadow"] = shadow
        return dict(sorted(status.items()))

    def agent_status(self) -> Mapping[str, Any]:
        """What ``GET /v2/health/agent`` adds to live and ready: the device, the broker
        connection (``MqttLink.broker_status``), the repository sources and which failed
        during the last check, and what keeps the watchdog from being fed, if anything
        (read from the inference server's threads)."""
        return {
            "device": self.config.device_id,
            "fleet": self.config.fleet,
            "agent_version": agent.__version__,
            "broker": self.link.broker_status(),
            # The repository sources in the order a check tries them, and each one that
            # failed during the last check ("<url>: <why>"; a later one may have served it).
            "repository": {
                "sources": list(self.updates.sources),
                "failed_last_check": list(self.updates.source_failures),
            },
            "problems": list(self._problems),
        }

    def repository_index(self) -> list[IndexEntry]:
        """Every version of every model the device holds, with its state: Triton's
        repository index (called on an inference connection's thread)."""
        live = self.registry.snapshot()
        entries: list[IndexEntry] = []
        for name in sorted(set(self.store.model_names()) | set(live)):
            try:
                on_disk = self.store.versions_on_disk(name)
            except OSError:  # a version removed while listed: list the others next time
                on_disk = []
            served = live.get(name)
            record = self.store.read_journal(name)
            for held in held_versions(record, on_disk, served.version if served else None):
                entries.append(IndexEntry(name, *held))
        return entries

    def request_check(self) -> None:
        """Ask for an update check (event loop thread only)."""
        self._check_wanted.set()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._notify(STATUS="restoring the last good versions")
        configure_allocator()  # before the first model loads (see agent.runtime.memory)
        restored = await asyncio.to_thread(self.lifecycle.restore)
        if restored:  # the infer path's imports now, not in the first request's time
            await asyncio.to_thread(import_infer_path)
            # What loading and the golden cases freed, back to the kernel (~2 ms; 0.5 MiB
            # with the CNN), as after a swap.
            await asyncio.to_thread(release_memory)
        logger.info("restored %d model(s) from %s", len(restored), self.config.state_dir)
        self.telemetry.agent_started(self.models_status())
        await self.server.start()
        logger.info("inference socket listening on %s", self.config.inference.socket_path)
        self._notify(READY=1, STATUS=self.status_line())
        self.link.start()
        update_loop = self._start_task(self._update_loop(), "update-loop")
        config = self.config
        poll = self._every(poll_cadence(config), self._poll, "poll", "the repository poll")
        probation = self._every(
            Cadence(config.install.probation_tick_s),
            self._judge_probation,
            "probation",
            "a probation tick",
        )
        heartbeat = self._every(
            Cadence(config.telemetry.heartbeat_interval_s),
            self._heartbeat,
            "heartbeat",
            "a telemetry heartbeat",
        )
        self.watch_loops(update_loop, poll, probation, heartbeat)
        self.request_check()
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def _start_task(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A long-lived task, named, cancelled on shutdown; logged if it ever ends."""
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_log_end)
        self._tasks.append(task)
        return task

    def _every(
        self, cadence: Cadence, work: Callable[[], Awaitable[None]], name: str, what: str
    ) -> asyncio.Task[None]:
        """A task running ``work`` on ``cadence`` (the monotonic clock) until shutdown."""
        return self._start_task(run_every(cadence, work, what), name)

    def watch_loops(
        self,
        update_loop: asyncio.Task[None],
        poll: asyncio.Task[None],
        probation: asyncio.Task[None],
        heartbeat: asyncio.Task[None],
    ) -> None:
        """Register every long-lived loop with the liveness registry (see ``_watchdog``)."""
        watch, idle = self.liveness.watch, self.idle
        watch("update", lambda: not update_loop.done() and not poll.done(), idle.update_s)
        watch("probation", lambda: not probation.done(), idle.probation_s)
        watch("telemetry", lambda: not heartbeat.done(), idle.telemetry_s)
        watch("mqtt", lambda: self.link.is_running)
        watch("inference acceptor", lambda: self.server.is_accepting)

    def status_line(self) -> str:
        """One line for ``systemctl status``: the versions served now, and what keeps the
        watchdog from being fed, if anything."""
        models = self.registry.snapshot()
        served = ", ".join(f"{name} {m.version}" for name, m in sorted(models.items()))
        line = f"serving {served}" if models else "serving no model yet"
        if self._problems:
            line += f"; not feeding the watchdog: {'; '.join(self._problems)}"
        return line

    def _notify(self, **fields: str | int) -> None:
        """Tell systemd; a failure is logged once, never fatal (the watchdog will tell)."""
        try:
            self.notifier.send(**fields)
        except NotifyError as exc:
            if not self._notify_failed:
                logger.warning("%s", exc)
            self._notify_failed = True

    async def _watchdog(self) -> None:
        """Judge the loops; ping systemd's watchdog only while they are all healthy."""
        interval_s = self.notifier.watchdog_interval_s
        if interval_s is not None:
            # Twice per interval, as sd_watchdog_enabled(3) advises: one late tick is no kill.
            logger.info(
                "systemd watchdog: %.1f s, pinging every %.1f s while every loop is healthy",
                interval_s,
                interval_s / 2,
            )
        while True:
            verdict = self.liveness.verdict()
            if verdict.problems != self._problems:
                self._report(verdict)
            if verdict.is_healthy and interval_s is not None:
                self._notify(WATCHDOG=1)
            await asyncio.sleep(interval_s / 2 if interval_s is not None else HEALTH_CHECK_S)

    def _report(self, verdict: Verdict) -> None:
        self._problems = verdict.problems
        if verdict.is_healthy:
            logger.warning("every loop is healthy again; feeding the watchdog")
        elif self.notifier.watchdog_interval_s is not None:
            logger.error(
                "not feeding the systemd watchdog: %s; systemd restarts the agent",
                "; ".join(verdict.problems),
            )
        else:
            logger.error(
                "%s; restart the agent (under systemd, its watchdog would)",
                "; ".join(verdict.problems),
            )
        self._notify(STATUS=self.status_line())

    async def _update_loop(self) -> None:
        failures = 0
        while True:
            await self._check_wanted.wait()
            self._check_wanted.clear()
            try:
                with self.liveness.passing("update", self.deadlines.update_s):
                    await asyncio.to_thread(self.updates.check)
                    self._publish_status()
            except Exception:
                # Expected errors come back in the check's result: this is a bug. Keep
                # following the fleet all the same.
                failures += 1
                poll_s = self.config.repository.poll_interval_s
                delay_s = retry_delay_s(failures, FIRST_RETRY_S, poll_s)
                logger.exception(
                    "update check failed unexpectedly (%d in a row); retrying in %.0f s",
                    failures,
                    delay_s,
                )
                await asyncio.sleep(delay_s)
                self.request_check()
                continue
            failures = 0
            if self._stop_loop == "update":
                raise LoopStoppedForTest(f"the update loop ends here ({STOP_LOOP_ENV}=update)")

    async def _poll(self) -> None:
        self.request_check()

    async def _judge_probation(self) -> None:
        with self.liveness.passing("probation", self.deadlines.probation_s):
            settled = await asyncio.to_thread(self.lifecycle.judge_probation)
        if settled:
            self._publish_status()
            # A release that waited for this probation to end can start now.
            self.request_check()

    async def _heartbeat(self) -> None:
        with self.liveness.passing("telemetry", self.deadlines.telemetry_s):
            await asyncio.to_thread(self.telemetry.heartbeat)

    async def _shutdown(self) -> None:
        logger.info("shutting down")
        self._notify(STOPPING=1, STATUS="stopping")
        for task in self._tasks:
            task.cancel()
        # A task that ended with an error was logged then (``_log_end``): shut down anyway.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop()
        await asyncio.to_thread(self.link.stop)
        self.outbox.close()
        self.updates.close()

    # called from other threads ---------------------------------------------------

    def _announced(self, timestamp_version: int | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_check)

    def _check_progressed(self) -> None:
        self.liveness.renew("update")  # a transfer started or received data

    def _transitioned(self, record: JournalRecord) -> None:
        self.liveness.renew("update")  # an install that persists a record makes progress
        self.telemetry.on_transition(record)  # never raises: an event must not stop an install

    def _publish_status(self) -> None:
        self.link.publish_status()
        self._notify(STATUS=self.status_line())

    def _swapped(self, model: str, version: str, why: str) -> None:
        if why == "rolled_back":
            self.metrics.record_rollback(model, version)
        else:
            self.metrics.record_swap(model, version)
        self._publish_status()


def pause_hook_from_env(state_dir: Path) -> PhaseHook | None:
    """Test-only: ``EDGEFLEET_TEST_PAUSE_AT=<phase>`` freezes the agent right after it
    persists that phase, so a test can SIGKILL it there. It writes
    ``<state_dir>/paused-at-<phase>`` first, then sleeps (at most 120 s)."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return None
    logger.warning("%s=%s: this agent pauses for tests", PAUSE_ENV, wanted)

    def hook(model: str, phase: Phase) -> None:
        if phase.value == wanted:
            (state_dir / f"paused-at-{phase.value}").write_text(model)
            time.sleep(120)

    return hook


def stop_loop_from_env() -> str | None:
    """Test-only: ``EDGEFLEET_TEST_STOP_LOOP=update`` ends the update loop after its first
    check (with ``LoopStoppedForTest``), so a test can see the watchdog stop being fed
    and systemd restart the agent. Any other value is refused."""
    wanted = os.environ.get(STOP_LOOP_ENV)
    if not wanted:
        return None
    if wanted != "update":
        raise ConfigError(f"{STOP_LOOP_ENV}: expected 'update', got {wanted!r}")
    logger.warning("%s=update: the update loop ends after its first check (tests)", STOP_LOOP_ENV)
    return wanted


def _log_end(task: asyncio.Task[None]) -> None:
    """A long-lived task ended: say how (the watchdog then stops being fed)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("task %s ended: %s", task.get_name(), exc, exc_info=exc)


async def run_agent(config: AgentConfig, notifier: Notifier | None = None) -> None:
    """Run an agent until SIGTERM or SIGINT."""
    app = AgentApp(config, notifier)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    await app.run()
