"""`edgectl rollout`: the commands as an operator types them, exit codes and output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from controller.repository.release import release_bundle
from controller.repository.repo import Repository
from tests.controller.conftest import MODEL, edgectl_cmd


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(edgectl_cmd(*args), capture_output=True, text=True, timeout=60)


def test_start_status_promote_abort(repo: Repository, bundles: dict[str, Path]) -> None:
    release_bundle(bundles["v1"], "lab", repo.path)
    bad = _run("rollout", "start", MODEL, "2.0.0", "--fleet", "lab", "--repo", repo.path,
               "--bundle", bundles["v2"], "--gate", "latency<2")  # fmt: skip
    assert bad.returncode == 2 and "unknown metric 'latency'" in bad.stderr
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
