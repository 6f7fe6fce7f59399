"""The agent's composition root: builds the parts, owns the tasks, shuts them down.

Start-up order matters for the "always serve the last good version" contract: the
versions active before a restart are loaded (and their golden vectors checked) before
the socket listens, and before anything is fetched from the network.

Tasks: ``update-loop`` runs one update check at a time in a worker thread whenever an
announcement or the poll asks for one (requests made during a check coalesce into one
more check). The poll runs on APScheduler with jitter so a fleet does not poll in step;
the heartbeat runs on it too, in a worker thread. Every journal record the lifecycle
persists becomes an event in the on-disk outbox (``state_dir/outbox.sqlite``), which the
MQTT link drains in order whenever the broker is reachable.

Under systemd (``Type=notify``, see ``systemd/edge-agent.service``) the agent sends
``READY=1`` once the socket listens with the restored (last good) versions serving,
``STATUS=`` with the versions served whenever they change, ``STOPPING=1`` on shutdown,
and ``WATCHDOG=1`` from the ``watchdog`` task on the event loop, so a hung loop stops
the pings and systemd kills and restarts the agent. The watchdog task starts first:
systemd arms the timer when the process starts, not when it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from agent.device.config import AgentConfig
from agent.device.sdnotify import Notifier, NotifyError
from agent.runtime.memory import configure_allocator
from agent.runtime.registry import ModelRegistry
from agent.serving.metrics import InferenceMetrics
from agent.serving.server import InferenceServer
from agent.telemetry.mqtt import MqttLink
from agent.telemetry.outbox import Outbox
from agent.telemetry.reporter import IntervalStats, TelemetryReporter
from agent.update.journal import JournalRecord, Phase
from agent.update.lifecycle import ModelLifecycle, PhaseHook
from agent.update.store import ModelStore
from agent.update.updater import UpdateService

logger = logging.getLogger(__name__)
# Not EDGE_AGENT_*: that prefix is reserved for config overrides.
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"


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
        self.updates = UpdateService(config, self.lifecycle)
        self.metrics = InferenceMetrics()
        self.server = InferenceServer.from_config(
            self.registry, config.inference, stats=self.stats, metrics=self.metrics
        )
        self.link = MqttLink(config, self._announced, self.models_status, self.outbox)
        self.telemetry = TelemetryReporter(
            device=config.device_id,
            fleet=config.fleet,
            interval_s=config.telemetry.heartbeat_interval_s,
            stats=self.stats,
            outbox=self.outbox,
            models_status=self.models_status,
            publish_heartbeat=self.link.publish_heartbeat,
            disk_path=config.state_dir,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._check_wanted = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduler: AsyncIOScheduler | None = None

    def models_status(self) -> Mapping[str, Mapping[str, Any]]:
        status: dict[str, dict[str, Any]] = {}
        for name, model in sorted(self.registry.snapshot().items()):
            record = self.store.read_journal(name)
            status[name] = {"version": model.version, "state": record.phase.value}
            if record.phase.value in ("failed", "rolled_back"):
                status[name]["failed_version"] = record.version
                status[name]["reason"] = record.reason
        return status

    def request_check(self) -> None:
        """Ask for an update check (event loop thread only)."""
        self._check_wanted.set()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.notifier.watchdog_interval_s is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._notify(STATUS="restoring the last good versions")
        configure_allocator()  # before the first model loads (see agent.runtime.memory)
        restored = await asyncio.to_thread(self.lifecycle.restore)
        logger.info("restored %d model(s) from %s", len(restored), self.config.state_dir)
        self.telemetry.agent_started(self.models_status())
        await self.server.start()
        logger.info("inference socket listening on %s", self.config.inference.socket_path)
        self._notify(READY=1, STATUS=self.status_line())
        self.link.start()
        self._tasks.append(asyncio.create_task(self._update_loop(), name="update-loop"))
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            self.request_check,
            "interval",
            seconds=self.config.repository.poll_interval_s,
            jitter=self.config.repository.poll_jitter_s or None,
            id="poll",
            name="repository poll",
        )
        self._scheduler.add_job(
            self._judge_probation,
            "interval",
            seconds=self.config.install.probation_tick_s,
            id="probation",
            name="probation judge",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            self._heartbeat,
            "interval",
            seconds=self.config.telemetry.heartbeat_interval_s,
            id="heartbeat",
            name="telemetry heartbeat",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()
        self.request_check()
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    def status_line(self) -> str:
        """One line for ``systemctl status``: the versions served now."""
        models = self.registry.snapshot()
        if not models:
            return "serving no model yet"
        served = ", ".join(f"{name} {m.version}" for name, m in sorted(models.items()))
        return f"serving {served}"

    def _notify(self, **fields: str | int) -> None:
        """Tell systemd; a failure is logged once, never fatal (the watchdog will tell)."""
        try:
            self.notifier.send(**fields)
        except NotifyError as exc:
            if not self._notify_failed:
                logger.warning("%s", exc)
            self._notify_failed = True

    async def _watchdog(self) -> None:
        interval_s = self.notifier.watchdog_interval_s
        assert interval_s is not None
        # Twice per interval, as sd_watchdog_enabled(3) advises, so one late tick is no kill.
        logger.info("systemd watchdog: %.1f s, pinging every %.1f s", interval_s, interval_s / 2)
        while True:
            self._notify(WATCHDOG=1)
            await asyncio.sleep(interval_s / 2)

    async def _update_loop(self) -> None:
        while True:
            await self._check_wanted.wait()
            self._check_wanted.clear()
            await asyncio.to_thread(self.updates.check)
            self._publish_status()

    async def _judge_probation(self) -> None:
        settled = await asyncio.to_thread(self.lifecycle.judge_probation)
        if settled:
            self._publish_status()
            # A release that waited for this probation to end can start now.
            self.request_check()

    async def _heartbeat(self) -> None:
        await asyncio.to_thread(self.telemetry.heartbeat)

    async def _shutdown(self) -> None:
        logger.info("shutting down")
        self._notify(STOPPING=1, STATUS="stopping")
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop()
        await asyncio.to_thread(self.link.stop)
        self.outbox.close()
        self.updates.close()

    # called from other threads ---------------------------------------------------

    def _announced(self, timestamp_version: int | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_check)

    def _transitioned(self, record: JournalRecord) -> None:
        self.telemetry.on_transition(record)

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


async def run_agent(config: AgentConfig, notifier: Notifier | None = None) -> None:
    """Run an agent until SIGTERM or SIGINT."""
    app = AgentApp(config, notifier)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    await app.run()
