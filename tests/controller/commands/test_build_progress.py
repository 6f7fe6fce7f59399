"""``bundle build`` shows its progress on stderr and keeps ONNX Runtime's chatter out
(issue 20, item 12): ``--quantize auto`` ran for minutes on a real CNN printing only the
calibrator's "Collecting tensor data and making histogram ..." and "Number of tensors :
N", on stdout, where it also broke ``--json``.

The real CLI runs in a subprocess on a small MatMul model with calibration data, so every
recipe, the calibration and the static-mixed search run; stderr is a pipe (plain lines)
or a pseudo-terminal (the live display).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from controller.commands.progress import _Plain, progress_display
from tests.controller.conftest import edgectl_cmd
from tests.helpers import make_linear_model

CHATTER = ("Collecting tensor data", "Number of tensors", "Finding optimal threshold")
PREFIX = "bundle build: "
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("progress")
    onnx_path = make_linear_model(root / "m.onnx", seed=5, in_features=16, out_features=4)
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.standard_normal((24, 16)).astype(np.float32))
    return onnx_path, root / "calib.npz"


def _build(model: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    onnx_path, calib = model
    # --fallback fp32: the run succeeds whichever candidates pass; no latency limit.
    return edgectl_cmd(
        "bundle", "build", onnx_path, "--name", "m", "--version", "1.0.0", "-o", out,
        "--quantize", "auto", "--calibration", calib, "--latency-runs", "2",
        "--max-latency-ratio", "1000", "--fallback", "fp32", *extra,
    )  # fmt: skip


def test_auto_prints_each_phase_and_candidate_on_stderr(
    model: tuple[Path, Path], tmp_path: Path
) -> None:
    # A gate no int8 model meets, so static-mixed always profiles its blocks (with the
    # default gate the all-int8 model of this small model may pass, and then it does not).
    cmd = _build(model, tmp_path / "b.bundle", "--max-drift", "abs=1e-9")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    # Besides progress, stderr may hold our own warnings (a candidate bigger than the
    # original), never ONNX Runtime's chatter.
    lines = [line for line in out.stderr.splitlines() if " WARNING controller." not in line]
    assert lines and all(line.startswith(PREFIX) for line in lines), out.stderr
    text = "\n".join(line.removeprefix(PREFIX) for line in lines)
    for i, recipe in enumerate(("dynamic-matmul", "dynamic", "static", "static-mixed", "fp16"), 1):
        assert f"quantizing candidate {i}/5: {recipe} (" in text, text
    for phase in (
        "checking the model",
        "running the original on 64 generated samples and 24 calibration samples",
        "  calibrating: running 24 batches",
        "  calibrating: tensor histograms and ranges",
        "  profiling the sensitivity of each block (1)",
        "candidates against the original on 64 samples",
        "timing latency: 2 runs of each model",
        "recording 8 golden vectors",
        f"writing the bundle {tmp_path / 'b.bundle'}",
    ):
        assert phase in text, text
    for chatter in CHATTER:
        assert chatter not in out.stdout and chatter not in out.stderr
    assert out.stdout.startswith("recipe "), out.stdout  # stdout: the table, as before


def test_json_prints_one_document_and_no_progress(model: tuple[Path, Path], tmp_path: Path) -> None:
    out = subprocess.run(
        _build(model, tmp_path / "b.bundle", "--json"), capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # the whole of stdout is the JSON document
    assert [c["recipe"] for c in doc["candidates"]] == [
        "dynamic-matmul", "dynamic", "static", "static-mixed", "fp16",
    ]  # fmt: skip
    # No progress; only our own warning (the fp16 candidate it keeps is bigger than the
    # original), which the JSON's reason carries too.
    assert all(" WARNING controller." in line for line in out.stderr.splitlines()), out.stderr
    assert PREFIX not in out.stderr


def test_verbose_logs_the_chatter_on_stderr_only(model: tuple[Path, Path], tmp_path: Path) -> None:
    onnx_path, calib = model
    out = subprocess.run(
        edgectl_cmd(
            "-v", "bundle", "build", onnx_path, "--name", "m", "--version", "1.0.0",
            "-o", tmp_path / "b.bundle", "--quantize", "static", "--calibration", calib,
            "--latency-runs", "0", "--json",
        ),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    json.loads(out.stdout)
    assert "DEBUG controller.build.quantize: onnxruntime: Collecting tensor data" in out.stderr


def test_a_terminal_gets_the_live_display(model: tuple[Path, Path], tmp_path: Path) -> None:
    """stderr on a pseudo-terminal: rich's display (phases ticked when done), stdout
    still the table only."""
    primary, secondary = os.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    try:
        out = subprocess.run(
            _build(model, tmp_path / "b.bundle"),
            stdout=subprocess.PIPE, stderr=secondary, text=True, timeout=240, env=env,
        )  # fmt: skip
    finally:
        os.close(secondary)
        reader.join(10)
        os.close(primary)
    assert out.returncode == 0
    screen = ESCAPES.sub("", b"".join(chunks).decode("utf-8", "replace"))
    assert "✓ quantizing candidate 4/5: static-mixed" in screen, screen[-3000:]
    assert "✓ writing the bundle" in screen
    assert PREFIX not in screen  # no plain lines on a terminal
    assert out.stdout.startswith("recipe ") and "\x1b[" not in out.stdout
    for chatter in CHATTER:
        assert chatter not in out.stdout and chatter not in screen


def test_plain_lines_count_a_long_step(capsys: pytest.CaptureFixture[str]) -> None:
    """A counted step says how far it is when it runs long; a short one stays one line."""
    slow = _Plain("bundle build", every_s=0.0)
    slow.step("profiling the sensitivity of each block (3)", total=3)
    for _ in range(3):
        slow.advance()
    quick = _Plain("bundle build", every_s=3600.0)
    quick.phase("evaluating 2 candidates", total=2)
    quick.advance()
    quick.advance()
    assert capsys.readouterr().err.splitlines() == [
        "bundle build:   profiling the sensitivity of each block (3)",
        "bundle build:   profiling the sensitivity of each block (3): 1/3",
        "bundle build:   profiling the sensitivity of each block (3): 2/3",
        "bundle build: evaluating 2 candidates",
    ]


def test_log_lines_print_whole_above_the_live_display(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warning logged while the display runs (e.g. a recipe that grew the model) prints
    on its own line above it, not into the middle of a redrawn line."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat stderr as a terminal
    monkeypatch.setenv("COLUMNS", "100")
    handler = logging.StreamHandler(sys.stderr)  # as edgectl's logging.basicConfig does
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with progress_display("bundle build") as progress:
            progress.phase("quantizing the model: fp16 (float16 weights)")
            logging.getLogger("controller.build.builder").warning("fp16 made the model bigger")
            progress.phase("writing the bundle b.bundle")
    finally:
        root.removeHandler(handler)
    assert handler.stream is sys.stderr  # given back
    lines = [line.strip() for line in ESCAPES.sub("", capsys.readouterr().err).splitlines()]
    assert "fp16 made the model bigger" in lines, lines
    assert any(line.startswith("✓ writing the bundle b.bundle") for line in lines), lines
