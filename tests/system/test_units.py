"""The systemd units: `systemd-analyze verify` silent, `security` exposure at most 1.5.

`verify` exits 0 on unknown keys and only prints a warning, so any output fails the test.
It checks that ExecStart's binary exists, so it runs against a throw-away root holding the
system's unit directory, the unit, and a stand-in for the binary at its installed path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = {
    "edge-agent.service": "/opt/edge-agent/venv/bin/edge-agent",
    "edgectl-serve.service": "/opt/edgectl/venv/bin/edgectl",
}
MAX_EXPOSURE = 1.5
SYSTEM_UNITS = Path("/usr/lib/systemd/system")

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or not SYSTEM_UNITS.is_dir(),
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_verify_prints_nothing(unit: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(ROOT / "systemd" / unit, root / "etc/systemd/system" / unit)
    binary = root / UNITS[unit].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    out = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_security_exposure(unit: str) -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(ROOT / "systemd" / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    exposure = float(match.group(1))
    print(f"{unit}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, out.stdout
