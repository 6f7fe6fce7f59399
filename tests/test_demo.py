"""`make demo` end to end: run it non-interactively and check its milestones.

The demo (controller/demo.py) starts its own broker, `edgectl serve` and three agents,
so this test is the whole story in one process tree: v1 served on every device, v2 on
every device after a staged rollout, a bad v3 halted by its gate and rolled back on the
canary, and nothing left running afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEVICES = {"device-1", "device-2", "device-3"}


def test_the_demo_reaches_every_milestone_and_cleans_up(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    out = subprocess.run(
        [sys.executable, "-m", "controller.demo", "--json-summary", str(summary_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["ok"] is True
    milestones = {m["name"]: m for m in summary["milestones"]}
    assert list(milestones) == ["v1_served", "v2_rolled_out", "v3_halted", "v3_rolled_back", "done"]
    # The printed lines carry the same facts as the summary file.
    printed = [line for line in out.stdout.splitlines() if line.startswith("MILESTONE ")]
    assert [line.split()[1] for line in printed] == list(milestones)

    v1 = milestones["v1_served"]
    assert v1["devices"] == dict.fromkeys(sorted(DEVICES), "1.0.0")
    assert set(v1["predicted"]) == DEVICES

    v2 = milestones["v2_rolled_out"]
    assert v2["state"] == "completed"
    assert v2["devices"] == dict.fromkeys(sorted(DEVICES), "2.0.0")

    v3 = milestones["v3_halted"]
    assert v3["state"] == "paused" and v3["stage"] == 0 and v3["kind"] == "gate", v3
    assert "device-1" in v3["reason"], v3

    back = milestones["v3_rolled_back"]
    assert back["phase"] == "rolled_back"
    assert back["devices"] == dict.fromkeys(sorted(DEVICES), "2.0.0")

    done = milestones["done"]
    assert done["requests"] > 0 and done["failed_requests"] > 0
    assert done["seconds"] < 180, f"the demo took {done['seconds']}s (budget: 3 minutes)"
    # Cleaned up: every process the demo started (broker, controller, agents) is gone.
    assert set(summary["pids"]) == {"mosquitto", "controller", *DEVICES}
    assert [name for name, pid in summary["pids"].items() if _alive(pid)] == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
