"""Neither program lets ONNX Runtime phone home.

ONNX Runtime 1.32 on Linux writes a device id and a queue of usage events under
``~/.cache/Microsoft/DeveloperTools`` at import, to send them to Microsoft, unless
``ORT_DISABLE_TELEMETRY`` is set. ``agent`` and ``controller`` set it (without overriding an
operator's own value) before anything imports onnxruntime. Each check runs a new
interpreter with a home of its own; the first one shows the probe sees the writes at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROBE = "import onnxruntime, time; time.sleep(0.5)"


def _cache_after(home: Path, code: str) -> list[str]:
    home.mkdir()
    # ONNX Runtime also stays quiet when CI is set: drop both, so the probe runs in CI.
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, cwd=ROOT)
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


@pytest.mark.parametrize("package", ["agent", "controller"])
def test_importing_our_package_first_keeps_onnx_runtime_quiet(package: str, tmp_path: Path) -> None:
    if not any("onnxruntime" in p for p in _cache_after(tmp_path / "bare", PROBE)):
        pytest.skip("this ONNX Runtime writes no usage events: nothing to turn off")
    assert _cache_after(tmp_path / "ours", f"import {package}; {PROBE}") == []
