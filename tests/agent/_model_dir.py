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


ALL_DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
)  # fmt: skip


def make_identity_model_dir(directory: Path, name: str = "echo") -> tuple[Path, Manifest]:
    """A model with one Identity per OIP datatype: input ``in_<dt>`` [-1, 3] → ``out_<dt>``."""
    import onnx
    from onnx import helper

    to_onnx = {
        "BOOL": onnx.TensorProto.BOOL, "UINT8": onnx.TensorProto.UINT8,
        "UINT16": onnx.TensorProto.UINT16, "UINT32": onnx.TensorProto.UINT32,
        "UINT64": onnx.TensorProto.UINT64, "INT8": onnx.TensorProto.INT8,
        "INT16": onnx.TensorProto.INT16, "INT32": onnx.TensorProto.INT32,
        "INT64": onnx.TensorProto.INT64, "FP16": onnx.TensorProto.FLOAT16,
        "FP32": onnx.TensorProto.FLOAT, "FP64": onnx.TensorProto.DOUBLE,
        "BYTES": onnx.TensorProto.STRING,
    }  # fmt: skip
    dts = [d.lower() for d in ALL_DATATYPES]
    graph = helper.make_graph(
        [helper.make_node("Identity", [f"in_{d}"], [f"out_{d}"]) for d in dts],
        name,
        [
            helper.make_tensor_value_info(f"in_{d.lower()}", to_onnx[d], ["N", 3])
            for d in ALL_DATATYPES
        ],
        [
            helper.make_tensor_value_info(f"out_{d.lower()}", to_onnx[d], ["N", 3])
            for d in ALL_DATATYPES
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / BUNDLE_MODEL))
    golden = {}
    for dt in ALL_DATATYPES:
        value = sample_tensor(dt)[np.newaxis]
        golden[GOLDEN_INPUT_PREFIX + f"in_{dt.lower()}"] = value
        golden[GOLDEN_OUTPUT_PREFIX + f"out_{dt.lower()}"] = value
    np.savez(directory / BUNDLE_GOLDEN, **golden)
    manifest = Manifest(
        name=name,
        version="1.0.0",
        inputs=tuple(TensorSpec(f"in_{d.lower()}", d, (-1, 3)) for d in ALL_DATATYPES),
        outputs=tuple(TensorSpec(f"out_{d.lower()}", d, (-1, 3)) for d in ALL_DATATYPES),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=0.0, atol=0.0),
        members={
            BUNDLE_MODEL: _member(directory / BUNDLE_MODEL),
            BUNDLE_GOLDEN: _member(directory / BUNDLE_GOLDEN),
        },
    )
    (directory / BUNDLE_MANIFEST).write_bytes(manifest.to_json_bytes())
    return directory, manifest


def sample_tensor(datatype: str, rows: int = 2) -> np.ndarray:
    """A [rows, 3] tensor of ``datatype`` with edge values (extremes, unicode, ...)."""
    if datatype == "BOOL":
        return np.array([[True, False, True]] * rows)
    if datatype == "BYTES":
        return np.array([["", "héllo", "a\x00b"]] * rows)
    dtype = np.dtype(
        {"FP16": "float16", "FP32": "float32", "FP64": "float64"}.get(datatype, datatype.lower())
    )
    if dtype.kind == "f":
        return np.array([[0.5, -2.0, 65504.0 if datatype == "FP16" else 1e30]] * rows, dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, info.max]] * rows, dtype)
