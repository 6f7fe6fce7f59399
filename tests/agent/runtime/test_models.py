"""agent.runtime.models, .loading and .registry on real ONNX Runtime: load, golden vectors,
signatures, running, the registry."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.base.errors import GoldenMismatchError, InferenceError, InvalidRequestError, ModelError
from agent.contracts import BUNDLE_GOLDEN, GOLDEN_INPUT_PREFIX, GOLDEN_OUTPUT_PREFIX, TensorSpec
from agent.runtime.loading import check_golden, load_model, warm_up
from agent.runtime.models import RunTerminatedError
from agent.runtime.registry import ModelRegistry
from tests.agent._model_dir import make_model_dir
from tests.helpers import make_linear_model, make_misbehaving_model


def test_load_passes_golden_and_matches_ort(tmp_path: Path, linear_model: Path) -> None:
    directory, manifest = make_model_dir(tmp_path / "v1", linear_model)
    model = load_model(directory, manifest, intra_op_threads=2)
    assert (model.name, model.version) == ("linear", "1.0.0")
    check_golden(model)
    warm_up(model, rounds=2)

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    reference = ort.InferenceSession(str(linear_model)).run(["y"], {"x": x})[0]
    got = model.infer({"x": x})
    assert list(got) == ["y"]
    np.testing.assert_array_equal(got["y"], reference)


def test_golden_mismatch_names_output_case_and_tolerance(
    tmp_path: Path, linear_model: Path
) -> None:
    directory, manifest = make_model_dir(tmp_path / "v1", linear_model)
    with np.load(directory / BUNDLE_GOLDEN) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    arrays[GOLDEN_OUTPUT_PREFIX + "y"][1, 0, 2] += 0.25
    np.savez(directory / BUNDLE_GOLDEN, **arrays)
    model = load_model(directory, manifest)
    with pytest.raises(GoldenMismatchError) as caught:
        check_golden(model)
    message = str(caught.value)
    assert "'y'" in message and "case 1" in message
    assert "max abs diff 0.25" in message and "rtol=0.0001" in message and "atol=1e-05" in message


def test_golden_file_with_missing_array_is_refused(tmp_path: Path, linear_model: Path) -> None:
    directory, manifest = make_model_dir(tmp_path / "v1", linear_model)
    with np.load(directory / BUNDLE_GOLDEN) as npz:
        np.savez(directory / BUNDLE_GOLDEN, **{GOLDEN_INPUT_PREFIX + "x": npz["input:x"]})
    with pytest.raises(ModelError, match="missing arrays"):
        check_golden(load_model(directory, manifest))


@pytest.mark.parametrize(
    ("inputs", "outputs", "expected"),
    [
        ((TensorSpec("z", "FP32", (-1, 4)),), None, "manifest has \\['z'\\]"),
        ((TensorSpec("x", "FP64", (-1, 4)),), None, "datatype FP64"),
        ((TensorSpec("x", "FP32", (-1, 5)),), None, "shape \\[-1, 5\\]"),
        (None, (TensorSpec("y", "FP32", (-1,)),), "output 'y'"),
    ],
)
def test_signature_differing_from_manifest_is_refused(
    tmp_path: Path,
    linear_model: Path,
    inputs: tuple[TensorSpec, ...] | None,
    outputs: tuple[TensorSpec, ...] | None,
    expected: str,
) -> None:
    kwargs = {}
    if inputs is not None:
        kwargs["inputs"] = inputs
    if outputs is not None:
        kwargs["outputs"] = outputs
    directory, manifest = make_model_dir(tmp_path / "v1", linear_model, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=expected):
        load_model(directory, manifest)


def test_missing_or_corrupt_model_file_is_refused(tmp_path: Path, linear_model: Path) -> None:
    directory, manifest = make_model_dir(tmp_path / "v1", linear_model)
    (directory / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match="ONNX Runtime refused"):
        load_model(directory, manifest)
    (directory / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"model\.onnx is missing"):
        load_model(directory, manifest)


def test_infer_rejects_unknown_output_and_bad_input(tmp_path: Path, linear_model: Path) -> None:
    model = load_model(*make_model_dir(tmp_path / "v1", linear_model))
    with pytest.raises(InvalidRequestError, match="unknown output 'nope'"):
        model.infer({"x": np.zeros((1, 4), np.float32)}, ["nope"])
    with pytest.raises(InvalidRequestError, match=r"input 'x': expected shape \[-1, 4\]"):
        model.infer({"x": np.zeros((1, 5), np.float32)})


def test_registry_swap_returns_previous_and_frees_it(tmp_path: Path, linear_model: Path) -> None:
    v1 = load_model(*make_model_dir(tmp_path / "v1", linear_model))
    other = make_linear_model(tmp_path / "m2.onnx", seed=2)
    v2 = load_model(*make_model_dir(tmp_path / "v2", other, version="1.1.0"))
    registry = ModelRegistry()
    assert registry.get("linear") is None and len(registry) == 0
    assert registry.activate(v1) is None
    assert registry.get("linear") is v1
    in_flight = registry.get("linear")  # a request holding its reference across the swap
    assert registry.activate(v2) is v1
    assert registry.get("linear") is v2
    assert in_flight is v1 and in_flight.infer({"x": np.ones((1, 4), np.float32)})["y"].shape == (
        1,
        3,
    )
    assert registry.snapshot() == {"linear": v2}

    freed = weakref.ref(v1)
    del v1, in_flight
    gc.collect()
    assert freed() is None, "the registry kept a reference to the replaced model"

    assert registry.remove("linear") is v2
    assert registry.remove("linear") is None
    assert registry.snapshot() == {}


def test_infer_without_output_names_returns_every_output_each_call(
    tmp_path: Path, linear_model: Path
) -> None:
    model = load_model(*make_model_dir(tmp_path / "v1", linear_model))
    x = np.ones((2, 4), np.float32)
    first = model.infer({"x": x})
    first["extra"] = x  # a caller's changes to one result never leak into the next
    assert list(model.infer({"x": x})) == ["y"]
    assert list(model.infer({"x": x}, ("y",))) == ["y"]
    with pytest.raises(InvalidRequestError, match=r"input 'x': expected shape \[-1, 4\]"):
        model.infer({"x": np.zeros((4,), np.float32)})


def test_run_options_terminate_from_another_thread_raises_run_terminated(
    tmp_path: Path,
) -> None:
    slow = make_misbehaving_model(tmp_path / "slow.onnx", seed=1, kind="slow")
    model = load_model(*make_model_dir(tmp_path / "v1", slow))
    batch = np.zeros((256, 4), np.float32)  # ~100 ms of matmuls: terminate lands mid-run
    options = ort.RunOptions()
    timer = threading.Timer(0.02, lambda: setattr(options, "terminate", True))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(RunTerminatedError, match="cancelled at its deadline"):
            model.infer({"x": batch}, run_options=options)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5.0
    # The same model runs fine with fresh options: the flag belongs to one run.
    assert model.infer({"x": batch[:1]}, run_options=ort.RunOptions())["y"].shape == (1, 3)


def test_failing_run_without_terminate_stays_an_inference_error(tmp_path: Path) -> None:
    errors = make_misbehaving_model(tmp_path / "errors.onnx", seed=1, kind="errors")
    model = load_model(*make_model_dir(tmp_path / "v1", errors))
    x = np.full((1, 4), 9.0, np.float32)
    with pytest.raises(InferenceError) as caught:
        model.infer({"x": x}, run_options=ort.RunOptions())
    assert not isinstance(caught.value, RunTerminatedError)
    assert "failed to run" in str(caught.value)


def test_infer_refuses_a_missing_input_and_takes_empty_output_names_as_all(
    tmp_path: Path, linear_model: Path
) -> None:
    model = load_model(*make_model_dir(tmp_path / "v1", linear_model))
    with pytest.raises(InvalidRequestError, match="input 'x' is missing"):
        model.infer({})
    x = np.ones((1, 4), np.float32)
    assert list(model.infer({"x": x}, [])) == ["y"]
    with pytest.raises(InferenceError, match="failed to run"):  # the binding's own check
        model.infer({"x": x.astype(np.float64)})
