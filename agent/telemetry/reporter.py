"""Telemetry: heartbeats on a schedule and lifecycle events through the outbox.

Pure core, I/O at the edges: ``build_heartbeat`` and ``lifecycle_event`` are functions
of data; ``IntervalStats`` counts requests per heartbeat interval; ``sample_system``
reads the machine through psutil; ``TelemetryReporter`` is the thin orchestrator the
composition root schedules (``heartbeat``) and hands to the lifecycle
(``on_transition``).

Invariants:
- A heartbeat reports each model's requests, errors and latency percentiles for the
  interval since the previous heartbeat only (figures of the version serving now).
- Every journal record the lifecycle persists becomes exactly one event, appended to
  the outbox before the call returns; the MQTT link delivers it later, in order.
- Queuing an event never raises (``on_transition``, ``agent_started``): an event must
  not stop what it describes, nor the agent's start. A disk that refuses it is the
  outbox's to absorb (it holds the event in memory, in order); anything else (a bug) is
  logged with its traceback and the event is lost.
- Heartbeats are never queued: one due while the broker is unreachable is skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psutil  # type: ignore[import-untyped]

import agent
from agent.contracts import (
    EVENT_KIND_BY_PHASE,
    Event,
    Heartbeat,
    ModelFigures,
    SystemFigures,
    device_topic,
    event_payload,
    parse_shadow_report,
    parse_waiting,
    telemetry_payload,
)
from agent.runtime.drift import DriftFigures
from agent.runtime.stats import Outcome, Phases, RequestStats, StatsSnapshot
from agent.telemetry.outbox import Outbox, PayloadBuilder
from agent.update.journal import JournalRecord

logger = logging.getLogger(__name__)

# Latencies kept per (model, version) within one interval; beyond it the oldest go.
INTERVAL_WINDOW: Final = 8192

ModelsStatus = Callable[[], Mapping[str, Mapping[str, Any]]]
DriftSource = Callable[[], Mapping[tuple[str, str], DriftFigures]]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Interval:
    __slots__ = ("client_errors", "errors", "latencies", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.client_errors = 0
        self.latencies: deque[float] = deque(maxlen=INTERVAL_WINDOW)


class IntervalStats(RequestStats):
    """RequestStats that also counts each heartbeat interval on its own.

    The inference server records into it as into any ``RequestStats`` (probation keeps
    reading the long window); ``take_interval`` returns the figures since the previous
    call and starts a new interval.
    """

    def __init__(self, window: int = 4096) -> None:
        super().__init__(window)
        self._interval_lock = threading.Lock()
        self._interval: dict[tuple[str, str], _Interval] = {}

    def record(
        self,
        model: str,
        version: str,
        latency_s: float,
        outcome: Outcome,
        phases: Phases | None = None,
    ) -> None:
        super().record(model, version, latency_s, outcome, phases)
        with self._interval_lock:
            counters = self._interval.get((model, version))
            if counters is None:
                counters = self._interval[(model, version)] = _Interval()
            counters.requests += 1
            if outcome is Outcome.ERROR:
                counters.errors += 1
            elif outcome is Outcome.CLIENT_ERROR:
                counters.client_errors += 1
            else:
                counters.latencies.append(latency_s)

    def take_interval(self) -> dict[tuple[str, str], StatsSnapshot]:
        """Figures per (model, version) since the last call; starts a new interval."""
        with self._interval_lock:
            taken, self._interval = self._interval, {}
        return {key: _snapshot(c) for key, c in taken.items()}


def _snapshot(c: _Interval) -> StatsSnapshot:
    if not c.latencies:
        return StatsSnapshot(c.requests, c.errors, c.client_errors, None, None, None, 0)
    import numpy as np  # latencies come from a model, which brought numpy in

    lat = np.fromiter(c.latencies, dtype=np.float64)
    p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99]))
    return StatsSnapshot(c.requests, c.errors, c.client_errors, p50, p95, p99, lat.size)


# ---------------------------------------------------------------------------- pure core


def build_heartbeat(
    *,
    device: str,
    fleet: str,
    at: str,
    seq: int,
    interval_s: float,
    uptime_s: float,
    system: SystemFigures,
    models_status: Mapping[str, Mapping[str, Any]],
    interval: Mapping[tuple[str, str], StatsSnapshot],
    outbox_pending: int = 0,
    outbox_dropped: int = 0,
    agent_version: str = agent.__version__,
    drift: Mapping[tuple[str, str], DriftFigures] | None = None,
) -> Heartbeat:
    """The heartbeat for one interval: every model the device serves, with its figures
    (``drift``: the sketch of each (model, version) that has a reference)."""
    models = {}
    for name, status in models_status.items():
        version = status.get("version")
        version = version if isinstance(version, str) else None
        figures = interval.get((name, version)) if version else None
        sketch = (drift or {}).get((name, version)) if version else None
        models[name] = ModelFigures(
            version=version,
            state=str(status.get("state", "unknown")),
            requests=figures.requests if figures else 0,
            errors=figures.errors if figures else 0,
            client_errors=figures.client_errors if figures else 0,
            p50_s=figures.p50_s if figures else None,
            p95_s=figures.p95_s if figures else None,
            p99_s=figures.p99_s if figures else None,
            waiting=parse_waiting(status.get("waiting"), name),
            shadow=parse_shadow_report(status.get("shadow"), name),
            drift=sketch.psi if sketch else None,
            input_drift=sketch.input_psi if sketch else None,
            drift_samples=sketch.samples if sketch else None,
        )
    return Heartbeat(
        device=device,
        fleet=fleet,
        at=at,
        seq=seq,
        interval_s=interval_s,
        agent_version=agent_version,
        uptime_s=uptime_s,
        system=system,
        models=models,
        outbox_pending=outbox_pending,
        outbox_dropped=outbox_dropped,
    )


def lifecycle_event(
    record: JournalRecord, *, device: str, fleet: str, at: str, stream: str, seq: int
) -> Event:
    """The event for a journal record just persisted (the phase it entered)."""
    return Event(
        device=device,
        fleet=fleet,
        stream=stream,
        seq=seq,
        at=at,
        kind=EVENT_KIND_BY_PHASE[record.phase.value],
        model=record.model,
        version=record.version,
        previous=record.previous,
        phase=record.phase.value,
        rollout_id=record.rollout_id,
        reason=record.reason,
    )


# ---------------------------------------------------------------------------- the machine


def sample_system(disk_path: Path) -> SystemFigures:
    """CPU (since the previous call), memory, free disk at ``disk_path``, load, temperature.

    A figure the machine cannot give (no sensor, no load average) is None.
    """
    memory = psutil.virtual_memory()
    try:
        disk_free: int | None = int(psutil.disk_usage(str(disk_path)).free)
    except OSError:
        disk_free = None
    try:
        load: float | None = float(psutil.getloadavg()[0])
    except (AttributeError, OSError):
        load = None
    return SystemFigures(
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        memory_used_bytes=int(memory.total - memory.available),
        memory_total_bytes=int(memory.total),
        disk_free_bytes=disk_free,
        load_1m=load,
        temperature_c=_hottest_sensor(),
    )


def _hottest_sensor() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    readings = [t.current for entries in sensors.values() for t in entries if t.current]
    return float(max(readings)) if readings else None


# ---------------------------------------------------------------------------- orchestrator


class TelemetryReporter:
    """Builds heartbeats and lifecycle events for one device and hands them to the link."""

    def __init__(
        self,
        *,
        device: str,
        fleet: str,
        interval_s: float,
        stats: IntervalStats,
        outbox: Outbox,
        models_status: ModelsStatus,
        publish_heartbeat: Callable[[bytes], bool],
        disk_path: Path,
        clock: Callable[[], float] = time.monotonic,
        drift: DriftSource | None = None,
    ) -> None:
        """``drift``: the drift of each serving (model, version) with a reference, read
        at each heartbeat (none: heartbeats carry no drift)."""
        self._drift = drift
        self._device, self._fleet = device, fleet
        self._interval_s = interval_s
        self._stats = stats
        self._outbox = outbox
        self._models_status = models_status
        self._publish_heartbeat = publish_heartbeat
        self._disk_path = disk_path
        self._clock = clock
        self._started = clock()
        self._seq = 0
        self._events_topic = device_topic(fleet, device, "events")
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    def heartbeat(self) -> bool:
        """Publish one heartbeat (blocking: call from a worker thread). False if skipped."""
        self._seq += 1
        beat = build_heartbeat(
            device=self._device,
            fleet=self._fleet,
            at=utc_now(),
            seq=self._seq,
            interval_s=self._interval_s,
            uptime_s=self._clock() - self._started,
            system=sample_system(self._disk_path),
            models_status=self._models_status(),
            interval=self._stats.take_interval(),
            outbox_pending=self._outbox.pending,
            outbox_dropped=self._outbox.dropped,
            drift=self._drift() if self._drift is not None else None,
        )
        sent = self._publish_heartbeat(telemetry_payload(beat))
        if not sent:
            logger.debug("heartbeat %d skipped: the broker is unreachable", self._seq)
        return sent

    def on_transition(self, record: JournalRecord) -> None:
        """Append the event for a persisted journal record (any thread; never raises)."""
        kind = EVENT_KIND_BY_PHASE.get(record.phase.value, record.phase.value)
        reason = f" ({record.reason})" if record.reason else ""
        self._queue(
            lambda stream, seq: event_payload(
                lifecycle_event(
                    record,
                    device=self._device,
                    fleet=self._fleet,
                    at=utc_now(),
                    stream=stream,
                    seq=seq,
                )
            ),
            f"{kind} {record.model} {record.version}{reason}",
        )

    def agent_started(self, restored: Mapping[str, Mapping[str, Any]]) -> None:
        """Append an ``agent_started`` event naming what the agent serves after start-up
        (never raises)."""
        serving = ", ".join(f"{m} {s.get('version')}" for m, s in sorted(restored.items()))

        def build(stream: str, seq: int) -> bytes:
            return event_payload(
                Event(
                    device=self._device,
                    fleet=self._fleet,
                    stream=stream,
                    seq=seq,
                    at=utc_now(),
                    kind="agent_started",
                    reason=f"agent {agent.__version__} serving {serving or 'nothing'}",
                )
            )

        self._queue(build, "agent_started")

    def _queue(self, build: PayloadBuilder, summary: str) -> None:
        """Append one event to the outbox and log it as ``event N: KIND ...``."""
        try:
            seq = self._outbox.append(self._events_topic, build)
        except Exception:
            logger.exception("cannot queue the event %s; it is lost", summary)
            return
        # Held events are the newest: any held means this one is.
        held = " (held in memory: the disk refuses it)" if self._outbox.held else ""
        logger.info("event %d: %s%s", seq, summary, held)
