from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Broker, make_linear_model, start_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private mosquitto on a free loopback port, stopped after the test."""
    b = start_broker(tmp_path / "broker")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def linear_model(tmp_path: Path) -> Path:
    """A small real ONNX model (MatMul + Add + Softmax) written to a temp file."""
    return make_linear_model(tmp_path / "models" / "linear.onnx", seed=1)
