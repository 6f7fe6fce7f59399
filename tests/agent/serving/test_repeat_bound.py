"""Repeats that run through ONNX Runtime's I/O binding (``agent.serving.repeat``, ``BoundRun``):
inputs read where they lie (shared memory, a large body), outputs written where the
response says, with the same answers, errors and lifetimes as the full path. Real server,
real Unix socket, real ONNX Runtime."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.base.errors import InferenceError
from agent.client import InferenceClient
from agent.contracts import TensorSpec
from agent.oip.shm import SharedMemoryRegion
from agent.runtime import models as runtime
from agent.runtime.loading import load_model
from agent.runtime.models import Bound, LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.serving.http_messages import Request
from agent.serving.repeat import Repeat
from agent.serving.server import InferenceServer
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import serving
from tests.helpers import make_linear_model, make_misbehaving_model, make_nonzero_model

URL = b"/v2/models/linear/infer"
LARGE = 20000  # rows of 4 floats: a 320 KB body, read into a buffer (not bytes)


def _linear(base: Path, seed: int = 1, version: str = "1.0.0") -> LoadedModel:
    onnx_path = make_linear_model(base / f"linear-{seed}.onnx", seed=seed)
    return load_model(*make_model_dir(base / version, onnx_path, version=version, seed=seed))


def _nonzero(base: Path) -> LoadedModel:
    outputs = (TensorSpec("y", "INT64", (2, -1)),)
    onnx_path = make_nonzero_model(base / "nonzero.onnx")
    return load_model(*make_model_dir(base / "nz", onnx_path, name="nonzero", outputs=outputs))


@pytest.fixture
def linear(tmp_path: Path) -> LoadedModel:
    return _linear(tmp_path)


@pytest.fixture
def server(linear: LoadedModel) -> Iterator[InferenceServer]:
    registry = ModelRegistry()
    registry.activate(linear)
    with serving(registry) as running:
        yield running


def _frames(count: int, rows: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [rng.normal(size=(rows, 4)).astype(np.float32) for _ in range(count)]


def _wait_unbound(model: LoadedModel) -> None:
    """The connection's thread ends after the client closes; its repeats go with it."""
    for _ in range(200):  # bounded: 10 s
        gc.collect()
        if not model.bound_runs:
            return
        time.sleep(0.05)
    raise AssertionError(f"bindings outlived their connection: {model.bound_runs}")


def test_large_binary_repeats_are_bound_and_read_their_own_values(
    server: InferenceServer, linear: LoadedModel
) -> None:
    with InferenceClient(server.socket_path) as client:
        for i, x in enumerate(_frames(12, LARGE)):
            got = client.infer("linear", {"x": x})["y"]
            np.testing.assert_array_equal(got, linear.infer({"x": x})["y"])
            # The second request keeps a repeat, the third is the first bound run.
            assert len(linear.bound_runs) == (1 if i >= 2 else 0)
    _wait_unbound(linear)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copied"])
def test_shared_memory_repeats_are_bound_and_follow_a_region_that_moves(
    server: InferenceServer, linear: LoadedModel, in_place: bool
) -> None:
    """A region unregistered and registered again is mapped elsewhere: the next repeat
    binds the new addresses (reading the old ones would read freed memory)."""
    pid = os.getpid()
    with InferenceClient(server.socket_path) as client:
        for generation in range(3):
            with SharedMemoryRegion(f"ef-bound-{pid}-{generation}", 4096) as region:
                client.register_shared_memory("frames", region)
                frame = region.ndarray(0, np.float32, (2, 4))
                for x in _frames(6):
                    x = x + generation
                    if in_place:
                        frame[:] = x
                    got = client.infer("linear", {"x": frame if in_place else x}, shm=region)
                    np.testing.assert_array_equal(got["y"], linear.infer({"x": x})["y"])
                assert len(linear.bound_runs) == 1
                client.unregister_shared_memory("frames")
    _wait_unbound(linear)


def test_an_output_of_another_shape_unbinds_and_is_answered(tmp_path: Path) -> None:
    """A bound output has the template's shape: NonZero's changes with the values, so
    that run fails inside ONNX Runtime, the request runs unbound, and the repeat stops
    binding."""
    nonzero = _nonzero(tmp_path)
    registry = ModelRegistry()
    registry.activate(nonzero)
    with (
        serving(registry) as server,
        InferenceClient(server.socket_path) as client,
        SharedMemoryRegion(f"ef-bound-nz-{os.getpid()}", 4096) as region,
    ):
        client.register_shared_memory("nz", region)
        frame = region.ndarray(0, np.float32, (2, 4))
        for count in (8, 8, 8, 3, 3, 8):
            frame[:] = 0.0
            frame.flat[:count] = 1.0
            got = client.infer("nonzero", {"x": frame}, shm=region)["y"]
            np.testing.assert_array_equal(got, np.stack(np.nonzero(frame)))
        assert not nonzero.bound_runs  # the fourth request's shape unbound it for good


def test_an_idle_connection_with_a_bound_repeat_does_not_keep_a_replaced_version_alive(
    tmp_path: Path,
) -> None:
    first, second = _linear(tmp_path, 1, "1.0.0"), _linear(tmp_path, 2, "2.0.0")
    registry = ModelRegistry()
    registry.activate(first)
    replaced = weakref.ref(first)
    x = _frames(1, LARGE)[0]
    with serving(registry) as server, InferenceClient(server.socket_path) as client:
        for _ in range(3):
            client.infer("linear", {"x": x})
        assert len(first.bound_runs) == 1  # the model owns the binding, the repeat its key
        del first
        registry.activate(second)
        gc.collect()
        assert replaced() is None  # freed (with its binding) while the connection idles
        for _ in range(3):
            got = client.infer("linear", {"x": x})["y"]
            np.testing.assert_array_equal(got, second.infer({"x": x})["y"])
        assert len(second.bound_runs) == 1


def _dispatch(
    server: InferenceServer, body: bytes, header_length: int, memo: dict[bytes, object]
) -> Request:
    """A request as a large body arrives (a view of the connection's buffer)."""
    view = memoryview(bytearray(body))
    return Request(b"POST", URL, view, True, False, header_length, 0, time.monotonic(), memo)


def test_unaligned_inputs_and_overlapping_outputs_are_not_bound(
    server: InferenceServer, linear: LoadedModel
) -> None:
    router = server._router
    x = _frames(1, LARGE)[0]
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape)}
    # A JSON header of odd length, not padded: the floats after it are misaligned.
    doc = {
        "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }
    header = json.dumps(doc).encode()
    header += b" " * ((1 - len(header)) % 4)
    assert len(header) % 4 == 1
    memo: dict[bytes, object] = {}
    for i in range(4):
        frame = x + i
        response = router.dispatch(_dispatch(server, header + frame.tobytes(), len(header), memo))
        assert response.status == 200
        got = np.frombuffer(response.body[1], np.float32).reshape(LARGE, 3)
        np.testing.assert_array_equal(got, linear.infer({"x": frame})["y"])
    assert isinstance(memo[URL], Repeat) and not linear.bound_runs

    # An output written over the input's own bytes (bound, ONNX Runtime could write it
    # while it still reads the input; unbound, it is copied after the run), and one at
    # an odd offset (a float32 written where a strict CPU would fault).
    with SharedMemoryRegion(f"ef-bound-ov-{os.getpid()}", 1 << 20) as region:
        assert server.shm is not None
        server.shm.register("ov", {"key": region.key, "byte_size": 1 << 20}, os.getuid())
        small = _frames(1)[0]
        for output_at in (0, 34):
            shm = {"shared_memory_region": "ov", "shared_memory_offset": 0}
            doc = {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                            "parameters": {**shm, "shared_memory_byte_size": 32}}],
                "outputs": [{"name": "y", "parameters": {
                    **shm, "shared_memory_offset": output_at, "shared_memory_byte_size": 24}}],
            }  # fmt: skip
            body = json.dumps(doc).encode()
            memo.clear()
            for i in range(4):
                frame = small + i
                region.write(0, frame.tobytes())
                request = Request(
                    b"POST", URL, body, True, False, None, os.getuid(), time.monotonic(), memo
                )
                assert router.dispatch(request).status == 200
                got = np.frombuffer(region.buffer[output_at : output_at + 24], np.float32)
                np.testing.assert_array_equal(got.reshape(2, 3), linear.infer({"x": frame})["y"])
            assert isinstance(memo[URL], Repeat) and not linear.bound_runs
        server.shm.unregister("ov", os.getuid())


def test_a_bound_run_past_its_deadline_is_503_and_the_next_is_bound_again(
    tmp_path: Path,
) -> None:
    slow_onnx = make_misbehaving_model(tmp_path / "slow.onnx", seed=3, kind="slow")
    slow = load_model(*make_model_dir(tmp_path / "slow", slow_onnx, name="slow"))
    registry = ModelRegistry()
    registry.activate(slow)
    deadline_s = 30.0
    batch = np.ones((1024, 4), np.float32)  # each run takes ~0.6 s here (see test_server_limits)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1024, 4],
                       "parameters": {"binary_data_size": batch.nbytes}}],
           "parameters": {"binary_data_output": True}}  # fmt: skip
    header = json.dumps(doc).encode()
    header += b" " * (-len(header) % 64)
    url = b"/v2/models/slow/infer"
    memo: dict[bytes, object] = {}

    def request(received: float) -> Request:
        body = memoryview(bytearray(header + batch.tobytes()))
        return Request(b"POST", url, body, True, False, len(header), 0, received, memo)

    with serving(registry, request_deadline_s=deadline_s) as server:
        router = server._router
        router._infer_urls[url] = ("slow", None, False)  # as the first request of a connection
        for _ in range(2):
            assert router.dispatch(request(time.monotonic())).status == 200
        assert isinstance(memo[url], Repeat)
        # Received long ago: 0.05 s of its deadline left, the run is cut while bound.
        response = router.dispatch(request(time.monotonic() - deadline_s + 0.05))
        assert response.status == 503 and b"deadline" in bytes(response.body)  # type: ignore[arg-type]
        assert len(slow.bound_runs) == 1
        assert router.dispatch(request(time.monotonic())).status == 200
        assert len(slow.bound_runs) == 1


def test_a_model_failing_on_a_bound_run_is_reported_as_on_the_full_path(
    tmp_path: Path,
) -> None:
    """The bound run fails; the request runs again unbound, which reports the model's
    own error (500, counted once), and the repeat stops binding."""
    failing_onnx = make_misbehaving_model(tmp_path / "err.onnx", seed=4, kind="errors")
    failing = load_model(*make_model_dir(tmp_path / "err", failing_onnx, name="err"))
    registry = ModelRegistry()
    registry.activate(failing)
    x = _frames(1, LARGE)[0] / 10  # |x| < 8: the model answers
    with serving(registry) as server, InferenceClient(server.socket_path) as client:
        for _ in range(3):
            client.infer("err", {"x": x})
        assert len(failing.bound_runs) == 1
        bad = x.copy()
        bad[0, 0] = 9.0
        with pytest.raises(InferenceError, match="failed to run"):
            client.infer("err", {"x": bad})
        assert not failing.bound_runs
        got = client.infer("err", {"x": x})["y"]
        np.testing.assert_array_equal(got, failing.infer({"x": x})["y"])
        assert 'infer_errors_total{kind="model_error",model="err",version="1.0.0"} 1.0' in (
            client.metrics()
        )


def test_a_binding_onnx_runtime_refuses_leaves_runs_unbound(
    linear: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused binding (here an input name the model lacks) is no error for the
    request: ``bind`` says None, the repeat runs unbound, and the version is logged once."""
    x, y = np.ones((2, 4), np.float32), np.zeros((2, 3), np.float32)
    output = [Bound("y", y.dtype, y.shape, y.ctypes.data)]
    unknown = [Bound("nope", x.dtype, x.shape, x.ctypes.data)]
    runtime._BIND_REFUSED.discard(("linear", "1.0.0"))  # another test's refusal, if any
    with caplog.at_level(logging.WARNING, logger="agent.runtime.models"):
        for key in (1, 2):
            assert linear.bind(key, unknown, output) is None
    assert not linear.bound_runs
    assert [r.getMessage() for r in caplog.records].count(
        "linear 1.0.0: runs stay unbound (RuntimeError('Error when binding input: Failed to "
        "find input name in the mapping: nope'))"
    ) == 1
    bound = linear.bind(3, [Bound("x", x.dtype, x.shape, x.ctypes.data)], output)
    assert bound is not None and linear.bound_runs == {3: bound}
    bound.run(None)
    np.testing.assert_array_equal(y, linear.infer({"x": x})["y"])
