"""Fixtures for the controller: an initialised repository, built bundles, a running serve,
a telemetry store on each backend."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.build.builder import build_bundle
from controller.fleet.store import TelemetryStore
from controller.repository.repo import Repository, init_repository
from tests.controller.test_store_support import store_for
from tests.helpers import make_linear_model, stop_process

MODEL = "lin"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return init_repository(tmp_path / "repo")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TelemetryStore]:
    """A fresh telemetry store on SQLite, then on PostgreSQL (a test file may define its
    own ``store``)."""
    with store_for(request.param, tmp_path) as s:
        yield s


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Path]:
    """Bundles of the model: 1.0.0 and 2.0.0 (different weights) and a 1.0.0 impostor."""
    out = {}
    for key, seed, version in (("v1", 1, "1.0.0"), ("v2", 2, "2.0.0"), ("v1-other", 3, "1.0.0")):
        model = make_linear_model(tmp_path / "models" / f"{key}.onnx", seed=seed)
        out[key] = build_bundle(model, MODEL, version, tmp_path / f"{key}.bundle", 4).path
    return out


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str
    stderr: Path


def edgectl_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "controller.cli", *map(str, args)]


def _read_ready_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if match := re.fullmatch(r"edgectl serve: listening on (http://\S+)\n", line):
                return match.group(1)
            if not line:
                break
    raise AssertionError(f"edgectl serve never printed its readiness line (rc {proc.poll()})")


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[object]:
    """Start ``edgectl serve`` as a real subprocess on 127.0.0.1 port 0."""
    started: list[Served] = []

    def start(repo_dir: Path, mqtt: str = "") -> Served:
        log = tmp_path / f"serve-{len(started)}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                edgectl_cmd("serve", "--repo", repo_dir, "--mqtt", mqtt, "--listen", "127.0.0.1:0"),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        served = Served(proc, "", log)
        started.append(served)
        served.url = _read_ready_line(proc, 20)
        return served

    yield start
    for served in started:
        stop_process(served.process)
