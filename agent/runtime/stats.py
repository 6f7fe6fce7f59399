"""Request statistics per (model, version): counts, errors and recent latencies.

The inference server records every infer request here; probation reads it to judge a
new version against the previous one, and telemetry and metrics report it. Recording is
O(1) under a lock; percentiles are computed on demand over a bounded window of the most
recent latencies, so memory stays fixed however long the agent runs.

Outcomes: ``ok``; ``client_error`` (the request was wrong, HTTP 4xx; never the model's
fault, so it does not count against a version); ``error`` (the model or runtime failed
on a valid request).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from enum import Enum

import numpy as np


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


class _Counters:
    __slots__ = ("client_errors", "errors", "latencies", "requests")

    def __init__(self, window: int) -> None:
        self.requests = 0
        self.errors = 0
        self.client_errors = 0
        self.latencies: deque[float] = deque(maxlen=window)


class RequestStats:
    """Thread-safe counters and a latency window per (model, version)."""

    def __init__(self, window: int = 4096) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._by_version: dict[tuple[str, str], _Counters] = {}

    def record(self, model: str, version: str, latency_s: float, outcome: Outcome) -> None:
        key = (model, version)
        with self._lock:
            counters = self._by_version.get(key)
            if counters is None:
                counters = self._by_version[key] = _Counters(self._window)
            counters.requests += 1
            if outcome is Outcome.ERROR:
                counters.errors += 1
            elif outcome is Outcome.CLIENT_ERROR:
                counters.client_errors += 1
            else:
                counters.latencies.append(latency_s)

    def snapshot(self, model: str, version: str) -> StatsSnapshot:
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
