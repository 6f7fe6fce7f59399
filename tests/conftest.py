from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import Broker, make_linear_model, start_broker

if TYPE_CHECKING:
    from tests.chaos.fleet import StateDisk


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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[StateDisk]:
    """A 16 MiB tmpfs (``disk.state_dir`` on it) that ``fill`` fills to the last byte and
    ``free`` empties again; unmounted after the test. Skips without root."""
    from tests.chaos.fleet import StateDisk, have_root

    if not have_root():
        pytest.skip("needs root to mount a tmpfs that fills up")
    try:
        disk = StateDisk(tmp_path / "smallfs")
    except subprocess.CalledProcessError as exc:  # a container without CAP_SYS_ADMIN
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr}")
    try:
        yield disk
    finally:
        disk.unmount()
