"""Prometheus metrics of the local inference API (``GET /metrics``).

One ``InferenceMetrics`` per agent, on its own ``CollectorRegistry`` (no global state):
the inference server records requests, errors, latency, queue depth and connections; the
update service records hot swaps and rollbacks through ``record_swap`` and
``record_rollback``. Every method is thread-safe and cheap: requests and latency, recorded
on every infer request, are plain numbers per version under one lock each, rendered by a
collector of our own (prometheus-client's Counter and Histogram take a lock per
counter, sum and bucket: ~5 µs a request, measured, against ~1 µs).

Metric names (all prefixed ``edge_agent_``):

- ``infer_requests_total{model,version}``: infer requests answered for that version;
- ``infer_errors_total{model,version,kind}``: kind is ``client_error`` (4xx),
  ``model_error`` (the run failed), ``overloaded`` (queue full, 503),
  ``deadline`` (the request outlived its deadline, 503), ``not_ready`` (503);
- ``infer_latency_seconds{model,version}``: histogram from a complete request to its
  response being ready, successful requests only;
- ``infer_queue_depth`` / ``infer_in_flight``: requests waiting for / holding a slot;
- ``connections``: open client connections;
- ``infer_body_buffer_bytes``: large request bodies held in memory (the body quota's
  charge: bodies being received, and buffers connections keep for reuse);
- ``model_swaps_total{model,version}``, ``model_rollbacks_total{model,version}``: the
  version made live, and the version rolled back to.

A version's error, swap and rollback series start at 0 once it answers a request or is
made live (``_start_at_zero``): a healthy device exposes them, and a first error is an
increase, not a series appearing.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
ERROR_KINDS: Final = ("client_error", "model_error", "overloaded", "deadline", "not_ready")
# From 50 µs (a tiny model inline) to 10 s (a big model on a small device).
_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_LE: Final = (*(floatToGoString(b) for b in _BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class _Tally:
    """One version's answered requests and its latency histogram (non-cumulative
    buckets, the last one past every bound)."""

    __slots__ = ("buckets", "lock", "requests", "total")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.buckets = [0] * len(_LE)
        self.total = 0.0


class _RequestCollector:
    """Renders every version's ``_Tally`` as ``infer_requests_total`` and
    ``infer_latency_seconds`` (a prometheus-client custom collector)."""

    def __init__(self, tallies: dict[tuple[str, str], _Tally]) -> None:
        self._tallies = tallies

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "edge_agent_infer_requests", "Infer requests answered", labels=labels
        )
        latency = HistogramMetricFamily(
            "edge_agent_infer_latency_seconds",
            "Latency of successful infer requests",
            labels=labels,
        )
        for (model, version), tally in list(self._tallies.items()):
            with tally.lock:
                answered, buckets, total = tally.requests, list(tally.buckets), tally.total
            requests.add_metric([model, version], answered)
            cumulative = itertools.accumulate(buckets)
            latency.add_metric(
                [model, version],
                [(le, float(n)) for le, n in zip(_LE, cumulative, strict=True)],
                total,
            )
        yield requests
        yield latency


class InferenceMetrics:
    """The agent's inference metrics, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._tallies: dict[tuple[str, str], _Tally] = {}
        r.register(_RequestCollector(self._tallies))
        self._errors = Counter(
            "edge_agent_infer_errors",
            "Infer requests that failed, by kind",
            ["model", "version", "kind"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "edge_agent_infer_queue_depth", "Infer requests waiting for a slot", registry=r
        )
        self.in_flight = Gauge(
            "edge_agent_infer_in_flight", "Infer requests running in the pool", registry=r
        )
        self.connections = Gauge("edge_agent_connections", "Open client connections", registry=r)
        self.body_buffer_bytes = Gauge(
            "edge_agent_infer_body_buffer_bytes",
            "Large request bodies held in memory (received or kept for reuse)",
            registry=r,
        )
        self._swaps = Counter(
            "edge_agent_model_swaps", "Versions made live", ["model", "version"], registry=r
        )
        self._rollbacks = Counter(
            "edge_agent_model_rollbacks",
            "Rollbacks, by the version rolled back to",
            ["model", "version"],
            registry=r,
        )

    def record_request(self, model: str, version: str, latency_s: float | None) -> None:
        """One answered infer request; ``latency_s`` only for a successful one."""
        tally = self._tallies.get((model, version))
        if tally is None:
            tally = self._tallies.setdefault((model, version), _Tally())
            self._start_at_zero(model, version)
        with tally.lock:
            tally.requests += 1
            if latency_s is not None:
                tally.buckets[bisect.bisect_left(_BUCKETS, latency_s)] += 1
                tally.total += latency_s

    def _start_at_zero(self, model: str, version: str) -> None:
        """Give a version its error, swap and rollback series at 0 (once it serves or is
        made live), so a healthy device exposes them: a query or an alert on errors has a
        series to divide, and the first error is an increase Prometheus sees (a counter
        that appears at 1 has no earlier sample to rise from)."""
        for kind in ERROR_KINDS:
            self._errors.labels(model, version, kind)
        self._swaps.labels(model, version)
        self._rollbacks.labels(model, version)

    def record_error(self, model: str, version: str, kind: str) -> None:
        """One failed infer request (``kind`` in ERROR_KINDS)."""
        self._errors.labels(model, version, kind).inc()

    def record_swap(self, model: str, version: str) -> None:
        """``version`` of ``model`` was made live (the updater calls this)."""
        self._start_at_zero(model, version)
        self._swaps.labels(model, version).inc()

    def record_rollback(self, model: str, version: str) -> None:
        """``model`` was rolled back to ``version`` (the updater calls this)."""
        self._start_at_zero(model, version)
        self._rollbacks.labels(model, version).inc()

    def forget(self, model: str, version: str) -> None:
        """Drop the per-version series of a version no longer on the device."""
        self._tallies.pop((model, version), None)
        for metric in (self._swaps, self._rollbacks):
            with contextlib.suppress(KeyError):
                metric.remove(model, version)
        for kind in ERROR_KINDS:
            with contextlib.suppress(KeyError):
                self._errors.remove(model, version, kind)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
