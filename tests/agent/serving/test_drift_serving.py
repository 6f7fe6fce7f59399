"""The inference server counts what it serves in the version's drift sketch, on every
path a request can take: the full path, an unbound repeat, a bound repeat (I/O binding),
each once its response is written.
Real server, real Unix socket, real ONNX Runtime; the counts are checked exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.contracts.reference import Histogram, Reference, class_counts, psi
from agent.runtime.drift import DriftSketch
from agent.runtime.registry import ModelRegistry
from tests.agent._serving import serving
from tests.agent.serving.test_repeat_bound import LARGE, _linear
from tests.e2e_support import wait_until

UNIFORM = (1 / 3, 1 / 3, 1 / 3)


@pytest.mark.parametrize("rows", [2, LARGE], ids=["bytes-body", "bound-repeats"])
def test_every_answered_row_is_counted_in_the_sketch(tmp_path: Path, rows: int) -> None:
    plain = _linear(tmp_path)
    sketch = DriftSketch(
        Reference(100, {"y": Histogram("classes", UNIFORM)}, {}), half_window=10**9
    )
    model = dataclasses.replace(plain, drift=sketch)
    registry = ModelRegistry()
    registry.activate(model)
    rng = np.random.default_rng(5)
    count = 60 if rows == 2 else 6  # past the sketch's minimum of 100 samples
    frames = [rng.normal(size=(rows, 4)).astype(np.float32) for _ in range(count)]
    with serving(registry) as server, InferenceClient(server.socket_path) as client:
        for x in frames:  # the first full, the second kept as a repeat, then repeats
            client.infer("linear", {"x": x})
        if rows == LARGE:
            assert model.bound_runs  # the later ones ran bound
    expected = sum(class_counts(plain.infer({"x": x})["y"], 3) for x in frames)
    # Counted once each response is written (off the client's path): the last one may
    # land just after the client has read it.
    figures = wait_until(
        lambda: f if (f := sketch.figures()).samples == count * rows else None, 10, "the count"
    )
    assert figures.psi == pytest.approx(psi(expected.tolist(), UNIFORM), abs=1e-6)
