"""The dashboard and the alert rules in packaging/, checked against a real Prometheus
(issue 24, part 3).

A real `prometheus` (Debian package) on a free loopback port, with its own config and
TSDB in the test's folder, scrapes every second a real `edgectl serve` (``/metrics`` on
its ``--listen`` port) and a real `edge-agent` (its loopback TCP listener, ``[inference]
tcp_port``), jobs and labels as packaging/prometheus.yml names them, and loads
packaging/prometheus-rules.yml. Around them: a private mosquitto, a repository with a
device CA (so the CA, CRL and certificate gauges exist), two releases built with eval data
(so the device reports drift), bounded inference traffic (with a few client errors) and a
staged rollout from 1.0.0 to 2.0.0 run by serve's rollout job.

Then, through Prometheus' HTTP API:

- every PromQL expression of packaging/grafana-dashboard.json (every panel's targets,
  rows and collapsed rows included, its template variables substituted with the values
  their own ``label_values`` queries give, as Grafana would) returns at least one series;
  so does each template variable's query;
- every alert rule's ``series`` annotation (the expression its condition compares, which
  must appear in the rule's expression: packaging/prometheus-rules.yml says why) returns at
  least one series, so the metric exists with the labels the rule uses; the condition
  itself is meant to be false here, and every rule evaluates without error;
- no alert is pending or firing on this healthy system.

Each check is tallied (conftest.py) and a failing one is named, all at once, not just the
first. Bounded: every wait has a deadline; the test takes about 30 s (up to a minute more
while some query has no series: it waits for one, then names it).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.base.errors import AgentError
from agent.client import InferenceClient
from controller.rollout.stages import RolloutState
from controller.rollout.store import RolloutStore
from tests.e2e_support import Proc, edgectl, served_version, start_agent, start_serve, wait_until
from tests.helpers import Broker, free_port, make_linear_model, stop_process
from tests.monitoring.conftest import MonitoringTally, skip_or_fail
from tests.test_telemetry_e2e import write_agent_config

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
FLEET, DEVICE, MODEL = "lab", "dev-1", "linear"
# Grafana's built-in interval variables, for a 1 s scrape interval.
BUILTINS = {"__rate_interval": "15s", "__interval": "5s", "__range": "5m"}
SCRAPE_S = 1
# One device (the canary): a stage passes once it reports on the new version.
GATES = "error_rate<0.5,p99_ratio=off,failed_installs<0.5,min_devices=1"


# ----------------------------------------------------------------------- the processes


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        skip_or_fail("prometheus is not installed (make system-deps installs it)")
        raise AssertionError("unreachable")
    return found


def _scrape_config(serve_target: str, agent_target: str, rules: Path) -> dict[str, Any]:
    """packaging/prometheus.yml with this test's targets and a 1 s interval (JSON is YAML)."""
    example = (PACKAGING / "prometheus.yml").read_text()
    for needed in ("job_name: edgectl", "job_name: edge-agent", "fleet:", "device:",
                   "prometheus-rules.yml"):  # fmt: skip
        assert needed in example, f"packaging/prometheus.yml no longer has {needed!r}"
    return {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "edgectl",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [serve_target]}],
            },
            {
                "job_name": "edge-agent",
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [agent_target], "labels": {"fleet": FLEET, "device": DEVICE}}
                ],
            },
        ],
    }


@contextlib.contextmanager
def _prometheus(folder: Path, config: dict[str, Any]) -> Iterator[str]:
    binary = _prometheus_binary()
    folder.mkdir(parents=True)
    (folder / "prometheus.yml").write_text(json.dumps(config, indent=2))
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{log.read_text(errors='replace')}")
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

        wait_until(ready, 30, "prometheus to be ready")
        yield url
    finally:
        stop_process(process)


def _api(url: str, path: str, **params: str) -> Any:
    answer = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    doc = answer.json()
    assert doc.get("status") == "success", (path, params, doc)
    return doc["data"]


def _compact(url: str, expr: str) -> str:
    """``expr`` as Prometheus prints it, without whitespace."""
    return re.sub(r"\s+", "", _api(url, "format_query", query=expr))


def _series(url: str, expr: str) -> int:
    """How many series ``expr`` returns now (an error is an AssertionError naming it)."""
    data = _api(url, "query", query=expr)
    return len(data["result"]) if data["resultType"] in ("vector", "matrix") else 1


# ----------------------------------------------------------------------- the dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows (collapsed or not) included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, expr) of every target of every panel."""
    out = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((f"panel {panel['title']!r} {target.get('refId', '')}", target["expr"]))
    return out


LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")


def template_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, metric selector, label) of each ``label_values`` query variable."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES.match(query.strip())
        assert match, f"template variable {var['name']}: not a label_values query: {query}"
        out.append((var["name"], match.group(1) or "", match.group(2)))
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """``$var``, ``${var}`` and ``[[var]]`` replaced; an unknown variable is an error."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in values, f"unknown dashboard variable ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, expr)


def test_substitution_follows_grafana_syntax() -> None:
    values = {"fleet": "lab", "__rate_interval": "15s"}
    assert substitute('x{f=~"$fleet"}[$__rate_interval] ${fleet} [[fleet]]', values) == (
        'x{f=~"lab"}[15s] lab lab'
    )
    with pytest.raises(AssertionError, match=r"unknown dashboard variable \$nope"):
        substitute("x{$nope}", values)
    dashboard = {"panels": [{"title": "r", "panels": [{"title": "p", "targets": [{"expr": "a"}]}]}]}
    assert dashboard_queries(dashboard) == [("panel 'p' ", "a")]


# ----------------------------------------------------------------------- the system


def _eval_npz(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(256, 4)).astype(np.float32))
    return path


def _traffic(socket: Path, stop: threading.Event, sent: list[int]) -> None:
    """One request of 10 rows every 20 ms until stopped (at most 3,000)."""
    rng = np.random.default_rng(7)
    with InferenceClient(socket, timeout_s=5.0) as client:
        for _ in range(3000):
            if stop.is_set():
                return
            with contextlib.suppress(AgentError, OSError):  # a swap in progress
                client.infer(MODEL, {"x": rng.normal(size=(10, 4)).astype(np.float32)})
                sent[0] += 1
            stop.wait(0.02)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_dashboard_query_and_rule_returns_series_from_real_scrapes(
    tmp_path: Path, broker: Broker, monitoring_tally: MonitoringTally
) -> None:
    _prometheus_binary()
    repo = tmp_path / "repo"
    edgectl("init", repo)
    # A device CA, its CRL and one enrolled device: the certificate gauges exist.
    edgectl("device", "add", DEVICE, "--fleet", FLEET, "--repo", repo,
            "-o", tmp_path / "e.tar", "--repository-url", "http://127.0.0.1:1/",
            "--broker", broker.address, "--no-tls")  # fmt: skip
    bundles = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
        onnx_path = make_linear_model(tmp_path / f"v{seed}.onnx", seed=seed)
        bundles[version] = tmp_path / f"{MODEL}-{version}.bundle"
        edgectl("bundle", "build", onnx_path, "--name", MODEL, "--version", version,
                "-o", bundles[version], "--eval", _eval_npz(tmp_path / f"eval{seed}.npz", seed),
                "--latency-runs", "0")  # fmt: skip
    settings = {"rollout_tick_interval_s": 0.5, "heartbeat_interval_s": 1.0}
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log", settings)
    agent_port = free_port()
    config = write_agent_config(
        tmp_path / DEVICE, device=DEVICE, fleet=FLEET, broker=broker.address, repo_url=url,
        root=repo / "metadata" / "root.json", poll_interval_s=30,
    )  # fmt: skip
    config.write_text(
        config.read_text().replace("[inference]\n", f"[inference]\ntcp_port = {agent_port}\n")
        + "[install]\nprobation_tick_s = 0.25\n"
    )
    procs: list[Proc] = [serve, start_agent(config)]
    stop, sent = threading.Event(), [0]
    traffic = threading.Thread(target=_traffic, args=(tmp_path / DEVICE / "infer.sock", stop, sent))
    serve_target = url.removeprefix("http://").rstrip("/")
    rules = PACKAGING / "prometheus-rules.yml"
    try:
        edgectl("release", bundles["1.0.0"], "--fleet", FLEET, "--repo", repo,
                "--probation-s", "0.5", "--no-shadow")  # fmt: skip
        client = InferenceClient(tmp_path / DEVICE / "infer.sock", timeout_s=5.0)
        wait_until(lambda: served_version(client, MODEL) == "1.0.0", 90, "1.0.0 served")
        with _prometheus(
            tmp_path / "prometheus",
            _scrape_config(serve_target, f"127.0.0.1:{agent_port}", rules),
        ) as prom:
            traffic.start()
            for _ in range(3):  # client errors: a wrong input name
                with pytest.raises(AgentError):
                    client.infer(MODEL, {"nope": np.zeros((1, 4), np.float32)})
            edgectl("rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo", repo,
                    "--bundle", bundles["2.0.0"], "--stages", "50,100", "--wait", "2s",
                    "--deadline", "60s", "--canary", DEVICE, "--probation-s", "1",
                    "--no-shadow", "--gate", GATES)  # fmt: skip

            def completed() -> bool:
                (r,) = [r for r in RolloutStore(repo).all() if r.version == "2.0.0"]
                assert r.state in (RolloutState.RUNNING, RolloutState.COMPLETED), r.history
                return r.state is RolloutState.COMPLETED

            wait_until(completed, 60, "the rollout to 2.0.0 to complete")
            wait_until(lambda: served_version(client, MODEL) == "2.0.0", 30, "2.0.0 served")
            client.close()
            _check(prom, monitoring_tally)
    finally:
        stop.set()
        if traffic.is_alive():
            traffic.join(10)
        for proc in reversed(procs):
            proc.stop()
    assert sent[0] > 0


def _check(prom: str, tally: MonitoringTally) -> None:
    dashboard = json.loads((PACKAGING / "grafana-dashboard.json").read_text())
    variables = template_queries(dashboard)

    def targets_up() -> bool:
        active = _api(prom, "targets")["activeTargets"]
        return len(active) == 2 and all(t["health"] == "up" for t in active)

    wait_until(targets_up, 30, "both scrape targets up")
    # Rates need two samples, drift 100 served rows and a heartbeat on 2.0.0: wait (bounded)
    # until every query returns a series, then record each one's outcome.
    values = dict(BUILTINS)

    def variable_values() -> list[tuple[str, list[str]]]:
        out = []
        for name, selector, label in variables:
            params = {"match[]": selector} if selector else {}
            found = _api(prom, f"label/{label}/values", **params)
            out.append((name, found))
            if found:
                values[name] = found[0]  # Grafana's default: the first value
        return out

    rule_groups = _api(prom, "rules")["groups"]
    rules = [r for g in rule_groups for r in g["rules"]]
    assert len(rules) >= 10, rules

    def results() -> dict[str, dict[str, bool]]:
        out: dict[str, dict[str, bool]] = {"dashboard queries return series": {}}
        board = out["dashboard queries return series"]
        for name, found in variable_values():
            board[f"variable ${name}"] = bool(found)
        for name, expr in dashboard_queries(dashboard):
            board[f"{name}: {expr}"] = _series(prom, substitute(expr, values)) > 0
        checks = out.setdefault("alert rules' series return series", {})
        for rule in rules:
            if rule["type"] == "recording":
                checks[f"{rule['name']}: {rule['query']}"] = _series(prom, rule["query"]) > 0
                continue
            series = rule["annotations"].get("series", "")
            assert series, f"alert {rule['name']} has no series annotation"
            # The series is part of the condition: compared as Prometheus prints both.
            inner, whole = (_compact(prom, q) for q in (series, rule["query"]))
            assert inner in whole, f"alert {rule['name']}: {series} is not in {rule['query']}"
            checks[f"{rule['name']}: {series}"] = _series(prom, series) > 0
        return out

    deadline = time.monotonic() + 60
    outcome = results()
    while time.monotonic() < deadline and not all(all(c.values()) for c in outcome.values()):
        time.sleep(1)
        outcome = results()
    for kind, checks in outcome.items():
        for name, held in checks.items():
            tally.record(kind, name, held)

    # Every rule evaluated without error; none is active on this healthy system.
    rule_groups = _api(prom, "rules")["groups"]
    for rule in (r for g in rule_groups for r in g["rules"]):
        tally.record("rules evaluate without error", rule["name"], rule["health"] == "ok")
    active = {a["labels"]["alertname"] for a in _api(prom, "alerts")["alerts"]}
    for rule in rules:
        if rule["type"] == "alerting":
            tally.record(
                "alerts silent on a healthy system", rule["name"], rule["name"] not in active
            )

    failures = [
        f"{kind}: {name}"
        for kind, checks in monitoring_checks(tally).items()
        for name, held in checks.items()
        if not held
    ]
    assert failures == [], "\n".join(failures)


def monitoring_checks(tally: MonitoringTally) -> dict[str, dict[str, bool]]:
    return tally.checks
