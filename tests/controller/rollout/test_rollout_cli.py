"""`edgectl rollout`: the commands as an operator types them, exit codes and output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from controller.repository.release import release_bundle
from controller.repository.repo import Repository
from controller.rollout.store import RolloutStore
from tests.controller.conftest import MODEL, edgectl_cmd


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(edgectl_cmd(*args), capture_output=True, text=True, timeout=60)


def test_start_status_promote_abort(repo: Repository, bundles: dict[str, Path]) -> None:
    release_bundle(bundles["v1"], "lab", repo.path)
    bad = _run("rollout", "start", MODEL, "2.0.0", "--fleet", "lab", "--repo", repo.path,
               "--bundle", bundles["v2"], "--gate", "latency<2")  # fmt: skip
    assert bad.returncode == 2 and "unknown gate 'latency'" in bad.stderr
    started = _run("rollout", "start", MODEL, "2.0.0", "--fleet", "lab", "--repo", repo.path,
                   "--bundle", bundles["v2"], "--stages", "5,50,100", "--wait", "1m",
                   "--canary", "cam-1,cam-2", "--on-failure", "abort")  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert "RUNNING at 5%" in started.stdout and "canaries cam-1, cam-2" in started.stdout
    assert "on failure abort" in started.stdout and "deadline 10m" in started.stdout

    promoted = _run("rollout", "promote", MODEL, "--fleet", "lab", "--repo", repo.path)
    assert promoted.returncode == 0 and "RUNNING at 50%" in promoted.stdout
    assert "promoted" in promoted.stdout

    status = _run("rollout", "status", "--repo", repo.path, "--json")
    (doc,) = json.loads(status.stdout)
    assert doc["state"] == "running" and doc["percent"] == 50 and doc["stage"] == 1

    aborted = _run("rollout", "abort", MODEL, "--fleet", "lab", "--repo", repo.path,
                   "--reason", "smoke")  # fmt: skip
    assert aborted.returncode == 0 and "ABORTED at 0%" in aborted.stdout
    assert "halted (operator)" in aborted.stdout and "smoke" in aborted.stdout

    again = _run("rollout", "abort", MODEL, "--fleet", "lab", "--repo", repo.path)
    assert again.returncode == 2 and "no running or paused rollout" in again.stderr
    # --watch ends by itself when nothing shown is active.
    watched = _run("rollout", "status", "--repo", repo.path, "--watch", "--interval", "0.1")
    assert watched.returncode == 0 and "ABORTED" in watched.stdout


def test_a_partial_gate_keeps_the_other_default_gates(
    repo: Repository, bundles: dict[str, Path]
) -> None:
    """Issue 20 item 1: ``--gate min_devices=1`` lowers the floor and keeps every other
    default gate; the effective set is printed before the start and stored as it is."""
    full = "error_rate<0.01,p99_ratio<1.5,failed_installs<0.02,min_devices=1"
    release_bundle(bundles["v1"], "lab", repo.path)
    started = _run("rollout", "start", MODEL, "2.0.0", "--fleet", "lab", "--repo", repo.path,
                   "--bundle", bundles["v2"], "--gate", "min_devices=1")  # fmt: skip
    assert started.returncode == 0, started.stderr
    # Printed first, before the rollout it started.
    assert (
        started.stdout.splitlines()[0] == f"gates {full} (--gate min_devices=1 over the defaults)"
    )
    assert f"gates {full};" in started.stdout and "RUNNING" in started.stdout
    (doc,) = json.loads(_run("rollout", "status", "--repo", repo.path, "--json").stdout)
    assert doc["gates"] == full
    records = RolloutStore(repo.path)
    (record,) = records.all()
    assert json.loads(records.path(record.id).read_text())["gates"] == full
    assert record.gates.limit("error_rate") == 0.01
    assert record.gates.limit("p99_ratio") == 1.5
    assert record.gates.limit("failed_installs") == 0.02
    assert record.gates.min_devices == 1
    _run("rollout", "abort", MODEL, "--fleet", "lab", "--repo", repo.path)

    # Dropping one takes NAME=off; --json stays one JSON document holding the set.
    dropped = _run("rollout", "start", MODEL, "2.0.0", "--fleet", "lab", "--repo", repo.path,
                   "--gate", "p99_ratio=off,min_devices=1", "--json")  # fmt: skip
    assert dropped.returncode == 0, dropped.stderr
    assert json.loads(dropped.stdout)["gates"] == (
        "error_rate<0.01,failed_installs<0.02,min_devices=1"
    )
