"""Build an unpacked bundle directory (model.onnx, golden.npz, manifest.json) for tests."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.contracts import (
    BUNDLE_GOLDEN,
    BUNDLE_MANIFEST,
    BUNDLE_MODEL,
    GOLDEN_INPUT_PREFIX,
    GOLDEN_OUTPUT_PREFIX,
    GoldenSpec,
    Manifest,
    TensorSpec,
)

LINEAR_INPUTS = (TensorSpec("x", "FP32", (-1, 4)),)
LINEAR_OUTPUTS = (TensorSpec("y", "FP32", (-1, 3)),)


def _member(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_model_dir(
    directory: Path,
    onnx_path: Path,
    *,
    name: str = "linear",
    version: str = "1.0.0",
    cases: int = 3,
    batch: int = 2,
    inputs: tuple[TensorSpec, ...] = LINEAR_INPUTS,
    outputs: tuple[TensorSpec, ...] = LINEAR_OUTPUTS,
    seed: int = 0,
    width: int = 4,
) -> tuple[Path, Manifest]:
    """Copy ``onnx_path`` in, compute golden outputs with ONNX Runtime, write the manifest.

    Golden inputs are ``[cases, batch, width]`` float32: the first axis is the case index.
    ``inputs``/``outputs`` default to the linear model's ([-1, 4] → [-1, 3]); for another
    ``width`` both become [-1, width].
    """
    if width != 4 and inputs is LINEAR_INPUTS:
        inputs = (TensorSpec("x", "FP32", (-1, width)),)
        outputs = (TensorSpec("y", "FP32", (-1, width)),)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, directory / BUNDLE_MODEL)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(cases, batch, width)).astype(np.float32)
    y = np.stack([session.run(["y"], {"x": x[i]})[0] for i in range(cases)])
    np.savez(
        directory / BUNDLE_GOLDEN,
        **{GOLDEN_INPUT_PREFIX + "x": x, GOLDEN_OUTPUT_PREFIX + "y": y},
    )
    manifest = Manifest(
        name=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=cases, rtol=1e-4, atol=1e-5),
        members={
            BUNDLE_MODEL: _member(directory / BUNDLE_MODEL),
            BUNDLE_GOLDEN: _member(directory / BUNDLE_GOLDEN),
        },
    )
    (directory / BUNDLE_MANIFEST).write_bytes(manifest.to_json_bytes())
    return directory, manifest
