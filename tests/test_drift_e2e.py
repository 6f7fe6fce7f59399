"""Model-quality drift end to end (issue 23): a bundle built with eval data, two real
agents on a private mosquitto, a real `edgectl serve` ingesting their heartbeats.

One device serves held-out real digits (the distribution the reference was measured on),
the other the same digits inverted (16 - pixel). The thresholds come from the statistics,
not from timings: for a reference of m samples and n live samples of the same
distribution over B bins, the PSI is about (B - 1)(1/m + 1/n) with a standard deviation
of about sqrt(2(B - 1))(1/m + 1/n) (chi-square with B - 1 degrees of freedom); the
device on real digits must stay below the mean plus four of those deviations (and below
0.1, "stable"), the one on inverted digits above 0.25 ("significant").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.client import InferenceClient
from controller.demo.digits import Digits, train_mlp, write_onnx
from tests.e2e_support import Proc, edgectl, served_version, start_agent, start_serve, wait_until
from tests.helpers import start_broker
from tests.test_telemetry_e2e import write_agent_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FLEET, MODEL = "lab", "digits"
CLASSES = 10


def _drift(repo: Path, device: str) -> dict[str, Any] | None:
    out = edgectl("fleet", "status", "--repo", repo, "--json", "--fleet", FLEET,
                  "--drift-window", "3s")  # fmt: skip
    rows = [r for r in json.loads(out.stdout) if r["device"] == device]
    model = rows[0]["models"].get(MODEL) if rows else None
    return model if model and model.get("drift") is not None else None


def test_drift_rises_on_shifted_inputs_and_stays_low_on_the_eval_distribution(
    tmp_path: Path,
) -> None:
    digits = Digits()
    _calib, evaluation = digits.write_npz(tmp_path)  # eval.npz: 256 real digits
    reference_n = 256
    onnx_path = write_onnx(
        tmp_path / "digits.onnx", train_mlp(digits, 16, 1), fails_on_real_digits=False
    )
    bundle = tmp_path / "digits.bundle"
    edgectl("bundle", "build", onnx_path, "--name", MODEL, "--version", "1.0.0", "-o", bundle,
            "--eval", evaluation, "--latency-runs", "0")  # fmt: skip
    repo = tmp_path / "repo"
    edgectl("init", repo)
    broker = start_broker(tmp_path / "broker")
    serve, url = start_serve(repo, broker.address, tmp_path / "serve.log")
    agents: list[Proc] = []
    try:
        for device in ("calm", "shifted"):
            config = write_agent_config(
                tmp_path / device, device=device, fleet=FLEET, broker=broker.address,
                repo_url=url, root=repo / "metadata" / "root.json",
            )  # fmt: skip
            agents.append(start_agent(config))
        edgectl("release", bundle, "--fleet", FLEET, "--repo", repo, "--probation-s", "0.5")
        clients = {
            d: InferenceClient(tmp_path / d / "infer.sock", timeout_s=5.0)
            for d in ("calm", "shifted")
        }
        for device, client in clients.items():
            wait_until(lambda c=client: served_version(c, MODEL) == "1.0.0", 90, f"{device} on v1")
        # Held-out real digits (not the 256 of eval.npz), 40 rows a request.
        held_out = np.concatenate([digits.eval_x[reference_n:], digits.train_x])[:1200]
        n = len(held_out)
        for rows in np.array_split(held_out, 30):
            clients["calm"].infer(MODEL, {"pixels": rows})
            clients["shifted"].infer(MODEL, {"pixels": (16.0 - rows).astype(np.float32)})
        for client in clients.values():
            client.close()

        # A heartbeat taken while the requests were still flowing carries a score on
        # fewer samples; the next one carries all n (the sketch counts each answered row).
        def settled(device: str) -> dict[str, Any] | None:
            model = _drift(repo, device)
            return model if model and model["drift_samples"] == n else None

        calm = wait_until(lambda: settled("calm"), 60, f"calm's drift on {n} samples")
        shifted = wait_until(lambda: settled("shifted"), 60, f"shifted's drift on {n} samples")
        spread = 1 / reference_n + 1 / n
        expected, deviation = (CLASSES - 1) * spread, math.sqrt(2 * (CLASSES - 1)) * spread
        assert calm["drift"] < min(expected + 4 * deviation, 0.1), calm
        assert shifted["drift"] > 0.25 and shifted["input_drift"] > 0.25, shifted
        # Pixels: input drift of the real digits is low as well (the same bound: deciles
        # of at most 10 bins, m and n rows of 64 correlated values each).
        assert calm["input_drift"] < min(expected + 4 * deviation, 0.1), calm

        # Above 0.25 for the window (3 s of heartbeats): the shifted device is marked,
        # the calm one is not.
        def marked() -> dict[str, Any] | None:
            model = _drift(repo, "shifted")
            return model if model and model["drift_alert"] else None

        wait_until(marked, 60, "the shifted device's drift alert")
        assert _drift(repo, "calm")["drift_alert"] is None  # type: ignore[index]
        table = edgectl("fleet", "status", "--repo", repo, "--drift-window", "3s").stdout
        assert "1 drifting (!: drift above 0.25 for 3s or more)" in table, table
        metrics = httpx.get(f"{url}/metrics").text
        labels = f'{{fleet="{FLEET}",model="{MODEL}",version="1.0.0"}}'
        assert f"edgefleet_model_drift_devices{labels} 2" in metrics
        assert f"edgefleet_model_drift_significant_devices{labels} 1" in metrics
    finally:
        for proc in agents:
            proc.stop()
        serve.stop()
        broker.stop()
