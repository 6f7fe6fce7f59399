"""The agent's request and latency series (``agent.serving.metrics``), rendered by its own
collector, read the same as prometheus-client's Counter and Histogram would."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from agent.serving.metrics import _BUCKETS, InferenceMetrics

# Below, on and above bounds, past the last one, and failures (no latency).
LATENCIES = (0.00004, 0.00005, 0.0003, 0.0003, 0.004, 2.0, 10.0, 20.0, None, None)


def _samples(text: bytes, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(
        line
        for line in text.decode().splitlines()
        if line.startswith(prefixes) and "_created" not in line
    )


def test_requests_and_latency_render_as_prometheus_client_would() -> None:
    ours = InferenceMetrics()
    reference = CollectorRegistry()
    requests = Counter(
        "edge_agent_infer_requests", "Infer requests answered", ["model", "version"],
        registry=reference,
    )  # fmt: skip
    latency = Histogram(
        "edge_agent_infer_latency_seconds", "Latency of successful infer requests",
        ["model", "version"], buckets=_BUCKETS, registry=reference,
    )  # fmt: skip
    for version in ("1.0.0", "2.0.0"):
        for value in LATENCIES if version == "1.0.0" else LATENCIES[:3]:
            ours.record_request("m", version, value)
            requests.labels("m", version).inc()
            if value is not None:
                latency.labels("m", version).observe(value)
    names = ("edge_agent_infer_requests", "edge_agent_infer_latency_seconds")
    prefixes = (*names, *(f"# TYPE {name}" for name in names))
    got = _samples(ours.render(), prefixes)
    assert got == _samples(generate_latest(reference), prefixes)
    assert 'edge_agent_infer_requests_total{model="m",version="1.0.0"} 10.0' in got
    bucket = 'edge_agent_infer_latency_seconds_bucket{le="5e-05",model="m",version="1.0.0"}'
    assert f"{bucket} 2.0" in got

    ours.forget("m", "1.0.0")
    assert 'version="1.0.0"' not in ours.render().decode()


def test_concurrent_recording_loses_nothing() -> None:
    metrics = InferenceMetrics()

    def record() -> None:
        for _ in range(5000):
            metrics.record_request("m", "1", 0.001)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = metrics.render().decode()
    assert 'edge_agent_infer_requests_total{model="m",version="1"} 20000.0' in text
    assert 'edge_agent_infer_latency_seconds_count{model="m",version="1"} 20000.0' in text


def test_a_serving_or_live_version_has_error_swap_and_rollback_series_at_zero() -> None:
    metrics = InferenceMetrics()
    metrics.record_request("m", "1.0.0", 0.001)
    metrics.record_swap("m", "2.0.0")
    text = metrics.render().decode()
    for version in ("1.0.0", "2.0.0"):
        for kind in ("client_error", "model_error", "overloaded", "deadline", "not_ready"):
            line = f'edge_agent_infer_errors_total{{kind="{kind}",model="m",version="{version}"}}'
            assert f"{line} 0.0" in text, line
        assert f'edge_agent_model_rollbacks_total{{model="m",version="{version}"}} 0.0' in text
    assert 'edge_agent_model_swaps_total{model="m",version="1.0.0"} 0.0' in text
    assert 'edge_agent_model_swaps_total{model="m",version="2.0.0"} 1.0' in text
    metrics.forget("m", "1.0.0")
    assert 'version="1.0.0"' not in metrics.render().decode()
