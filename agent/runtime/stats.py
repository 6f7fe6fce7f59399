"""Request statistics per (model, version): counts, errors and recent latencies.

The inference server records every infer request here; probation reads it to judge a
new version against the previous one, and telemetry and metrics report it. Recording is
O(1) under a lock; percentiles are computed on demand over a bounded window of the most
recent latencies, so memory stays fixed however long the agent runs.

Outcomes: ``ok``; ``client_error`` (the request was wrong, HTTP 4xx; never the model's
fault, so it does not count against a version); ``error`` (the model or runtime failed
on a valid request).

Beside them, each version accumulates what Triton's statistics extension reports
(``Execution``): successes and failures with their total durations, and for each
success where its time went (``Phases``: waiting for a slot, preparing the inputs,
running the model, encoding the outputs), as measured by the server. A failure is any
infer request a version did not answer with a result, whatever the cause (a wrong
request, a full queue, the model failing). The figures of a version are dropped with
it (``forget``): they count since the version was loaded on this device, as long as it
stays (live, or kept for a rollback's figures).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    OK = "ok"
    CLIENT_ERROR = "client_error"
    ERROR = "error"


@dataclass(frozen=True)
class StatsSnapshot:
    """Figures of one (model, version) at one instant. Latencies in seconds."""

    requests: int
    errors: int
    client_errors: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    window: int

    @property
    def error_rate(self) -> float:
        """Errors over requests the model was asked to serve (client errors excluded)."""
        served = self.requests - self.client_errors
        return self.errors / served if served > 0 else 0.0


EMPTY = StatsSnapshot(0, 0, 0, None, None, None, 0)


class Phases:
    """Where one answered infer request's time went, in nanoseconds: ``queue`` waiting for
    a slot (admission), ``input`` reading and checking its tensors, ``infer`` the model's
    run, ``output`` encoding the response. The server sets each as the request goes,
    every one of them before a success is recorded (no ``__init__``: made per request,
    it costs about half of one that sets zeros)."""

    __slots__ = ("infer_ns", "input_ns", "output_ns", "queue_ns")
    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int


@dataclass(frozen=True)
class Execution:
    """Triton's statistics of one (model, version) at one instant: request counts and
    total durations in nanoseconds; ``timed`` successes were measured phase by phase
    (every success the server answers), ``last_inference_ms`` is the wall clock of the
    last request (milliseconds since the epoch, 0: none yet)."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    timed: int = 0
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    last_inference_ms: int = 0


class _Counters:
    __slots__ = (
        "client_errors",
        "errors",
        "fail",
        "fail_ns",
        "infer_ns",
        "input_ns",
        "last_inference_ms",
        "latencies",
        "output_ns",
        "queue_ns",
        "requests",
        "success",
        "success_ns",
        "timed",
    )

    def __init__(self, window: int) -> None:
        self.requests = 0
        self.errors = 0
        self.client_errors = 0
        self.latencies: deque[float] = deque(maxlen=window)
        self.success = self.success_ns = self.fail = self.fail_ns = 0
        self.timed = self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self.last_inference_ms = 0

    def execution(self) -> Execution:
        return Execution(
            self.success,
            self.success_ns,
            self.fail,
            self.fail_ns,
            self.timed,
            self.queue_ns,
            self.input_ns,
            self.infer_ns,
            self.output_ns,
            self.last_inference_ms,
        )


class RequestStats:
    """Thread-safe counters and a latency window per (model, version)."""

    def __init__(self, window: int = 4096) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._by_version: dict[tuple[str, str], _Counters] = {}

    def record(
        self,
        model: str,
        version: str,
        latency_s: float,
        outcome: Outcome,
        phases: Phases | None = None,
    ) -> None:
        """One infer request the version ran or tried to (``phases``: where a success's
        time went)."""
        key = (model, version)
        now_ms = time.time_ns() // 1_000_000
        latency_ns = int(latency_s * 1e9)
        with self._lock:
            counters = self._by_version.get(key)
            if counters is None:
                counters = self._by_version[key] = _Counters(self._window)
            counters.requests += 1
            counters.last_inference_ms = now_ms
            if outcome is Outcome.OK:
                counters.latencies.append(latency_s)
                counters.success += 1
                counters.success_ns += latency_ns
                if phases is not None:
                    counters.timed += 1
                    counters.queue_ns += phases.queue_ns
                    counters.input_ns += phases.input_ns
                    counters.infer_ns += phases.infer_ns
                    counters.output_ns += phases.output_ns
                return
            counters.fail += 1
            counters.fail_ns += latency_ns
            if outcome is Outcome.ERROR:
                counters.errors += 1
            else:
                counters.client_errors += 1

    def record_refused(self, model: str, version: str, latency_s: float) -> None:
        """An infer request for the version refused before it could run (the agent not
        ready, a JSON part too large, a full queue, a deadline passed in the queue): a
        failure in Triton's statistics, no request of the version's otherwise (it says
        nothing of the version's health)."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            counters = self._by_version.get((model, version))
            if counters is None:
                counters = self._by_version[(model, version)] = _Counters(self._window)
            counters.fail += 1
            counters.fail_ns += int(latency_s * 1e9)
            counters.last_inference_ms = now_ms

    def execution(self, model: str, version: str) -> Execution:
        """Triton's statistics of the version (zeros when it has none yet)."""
        with self._lock:
            counters = self._by_version.get((model, version))
            return Execution() if counters is None else counters.execution()

    def versions(self) -> list[tuple[str, str]]:
        """Every (model, version) with figures, sorted."""
        with self._lock:
            return sorted(self._by_version)

    def snapshot(self, model: str, version: str) -> StatsSnapshot:
        import numpy as np  # only with a model's figures: an idle agent has none

        with self._lock:
            counters = self._by_version.get((model, version))
            if counters is None:
                return EMPTY
            requests, errors, client_errors = (
                counters.requests,
                counters.errors,
                counters.client_errors,
            )
            latencies = np.fromiter(counters.latencies, dtype=np.float64)
        if latencies.size == 0:
            return StatsSnapshot(requests, errors, client_errors, None, None, None, 0)
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        return StatsSnapshot(
            requests, errors, client_errors, float(p50), float(p95), float(p99), latencies.size
        )

    def forget(self, model: str, keep_versions: set[str]) -> None:
        """Drop the figures of versions no longer on the device."""
        with self._lock:
            for key in [k for k in self._by_version if k[0] == model and k[1] not in keep_versions]:
                del self._by_version[key]
