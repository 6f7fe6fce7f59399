"""Exact repeats of an infer request (``agent.serving.repeat``): each repeat reads its own values,
and what can change between two identical requests (the live model, the shared memory,
the outputs' shapes) sends it down the full path. Real server, real Unix socket, real
ONNX Runtime."""

from __future__ import annotations

import gc
import json
import os
import time
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from agent.base.errors import InvalidRequestError
from agent.client import InferenceClient
from agent.contracts import TensorSpec
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.serving.http_messages import Request
from agent.serving.repeat import Repeat
from agent.serving.server import InferenceServer
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import serving
from tests.helpers import make_linear_model, make_nonzero_model

URL = b"/v2/models/linear/infer"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    base = tmp_path_factory.mktemp("repeat")
    found: dict[str, LoadedModel] = {}
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        onnx_path = make_linear_model(base / f"linear-{seed}.onnx", seed=seed)
        found[version] = load_model(
            *make_model_dir(base / version, onnx_path, version=version, seed=seed)
        )
    nonzero = make_nonzero_model(base / "nonzero.onnx")
    found["nonzero"] = load_model(
        *make_model_dir(
            base / "nonzero",
            nonzero,
            name="nonzero",
            outputs=(TensorSpec("y", "INT64", (2, -1)),),
        )
    )
    return found


@pytest.fixture
def server(models: dict[str, LoadedModel]) -> Iterator[InferenceServer]:
    registry = ModelRegistry()
    registry.activate(models["1.0.0"])
    registry.activate(models["nonzero"])
    with serving(registry) as running:
        yield running


def _expected(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    return model.infer({"x": x})["y"]


def _frames(count: int, rows: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(size=(rows, 4)).astype(np.float32) for _ in range(count)]


@pytest.mark.parametrize("rows", [2, 5000], ids=["small", "large"])
def test_binary_repeats_read_their_own_values(
    server: InferenceServer, models: dict[str, LoadedModel], rows: int
) -> None:
    """A large body (80 KB) is read into the connection's reused buffer, not bytes."""
    with InferenceClient(server.socket_path) as client:
        for x in _frames(20, rows):
            got = client.infer("linear", {"x": x})["y"]
            np.testing.assert_array_equal(got, _expected(models["1.0.0"], x))


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copied"])
def test_shared_memory_repeats_read_their_own_values(
    server: InferenceServer, models: dict[str, LoadedModel], in_place: bool
) -> None:
    with (
        InferenceClient(server.socket_path) as client,
        SharedMemoryRegion(f"ef-rep-{os.getpid()}", 4096) as region,
    ):
        client.register_shared_memory("rep", region)
        frame = region.ndarray(0, np.float32, (2, 4))
        for x in _frames(20):
            if in_place:
                frame[:] = x
            got = client.infer("linear", {"x": frame if in_place else x}, shm=region)["y"]
            np.testing.assert_array_equal(got, _expected(models["1.0.0"], x))


def test_a_hot_swap_reaches_the_next_repeat(
    server: InferenceServer, models: dict[str, LoadedModel]
) -> None:
    x = _frames(1)[0]
    with InferenceClient(server.socket_path) as client:
        for _ in range(3):
            np.testing.assert_array_equal(
                client.infer("linear", {"x": x})["y"], _expected(models["1.0.0"], x)
            )
        server.registry.activate(models["2.0.0"])
        for _ in range(3):
            np.testing.assert_array_equal(
                client.infer("linear", {"x": x})["y"], _expected(models["2.0.0"], x)
            )
    assert not np.array_equal(_expected(models["1.0.0"], x), _expected(models["2.0.0"], x))


def test_an_idle_connection_does_not_keep_a_replaced_version_alive(
    models: dict[str, LoadedModel],
) -> None:
    first = load_model(models["1.0.0"].directory, models["1.0.0"].manifest)
    registry = ModelRegistry()
    registry.activate(first)
    replaced = weakref.ref(first)
    del first
    x = _frames(1)[0]
    with serving(registry) as server, InferenceClient(server.socket_path) as client:
        for _ in range(3):  # the connection now keeps a repeat of this request
            client.infer("linear", {"x": x})
        registry.activate(models["2.0.0"])
        gc.collect()
        assert replaced() is None  # its session is freed while the connection idles
        np.testing.assert_array_equal(
            client.infer("linear", {"x": x})["y"], _expected(models["2.0.0"], x)
        )


def test_changed_shared_memory_is_refused_after_repeats(server: InferenceServer) -> None:
    x = _frames(1)[0]
    with (
        InferenceClient(server.socket_path) as client,
        SharedMemoryRegion(f"ef-rep-gone-{os.getpid()}", 4096) as region,
    ):
        client.register_shared_memory("gone", region)
        frame = region.ndarray(0, np.float32, (2, 4))
        frame[:] = x
        for _ in range(3):
            client.infer("linear", {"x": frame}, shm=region)
        client.unregister_shared_memory("gone")
        with pytest.raises(InvalidRequestError, match="'gone' is not registered"):
            client.infer("linear", {"x": frame}, shm=region)
        client.register_shared_memory("gone", region)
        for _ in range(3):
            client.infer("linear", {"x": frame}, shm=region)
        # The output lies after the input: cut the object short of it (the input stays).
        os.truncate(region.path, 40)
        with pytest.raises(InvalidRequestError, match="'gone' was truncated"):
            client.infer("linear", {"x": frame}, shm=region)
        os.truncate(region.path, 4096)


def test_an_output_of_another_shape_takes_the_full_encoder(server: InferenceServer) -> None:
    """Same request header, different values: NonZero's output changes shape."""
    with InferenceClient(server.socket_path) as client:
        for nonzero in (8, 8, 3, 3, 0, 5, 8):
            x = np.zeros((2, 4), np.float32)
            x.flat[:nonzero] = 1.0
            got = client.infer("nonzero", {"x": x})["y"]
            np.testing.assert_array_equal(got, np.stack(np.nonzero(x)))


def _request(body: bytes, header_length: int | None, memo: dict[bytes, object]) -> Request:
    return Request(b"POST", URL, body, True, False, header_length, 0, time.monotonic(), memo)


def _large(body: bytes, header_length: int | None, memo: dict[bytes, object]) -> Request:
    """As a large body arrives: a view of the connection's reused buffer."""
    view = memoryview(bytearray(body))
    return Request(b"POST", URL, view, True, False, header_length, 0, time.monotonic(), memo)


def _binary(doc: dict[str, object], x: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(doc).encode()
    return header + x.tobytes(), len(header)


@pytest.mark.parametrize("make", [_request, _large], ids=["bytes", "view"])
def test_only_exact_repeats_without_an_id_are_kept(
    server: InferenceServer, make: Callable[..., Request]
) -> None:
    """The connection's memo keeps one repeat per URL; the full path would replace it,
    so an unchanged entry shows a request was answered through it."""
    router = server._router  # the dispatch a connection calls, with a memo of our own
    x = _frames(1)[0]
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 4]}
    inputs = [{**tensor, "parameters": {"binary_data_size": 32}}]
    binary = {"inputs": inputs, "parameters": {"binary_data_output": True}}
    memo: dict[bytes, object] = {}

    assert router.dispatch(make(*_binary(binary, x), memo)).status == 200
    assert isinstance(memo[URL], bytes)  # seen once: only its header is noted
    assert router.dispatch(make(*_binary(binary, x + 1), memo)).status == 200
    kept = memo[URL]
    assert isinstance(kept, Repeat)  # twice in a row: kept
    assert router.dispatch(make(*_binary(binary, x + 2), memo)).status == 200
    assert memo[URL] is kept  # answered as a repeat
    # Headers of the same length but not the same bytes (an extra field differs): the
    # full path, which notes the new header, and keeps a repeat when it comes again.
    for other in ({**binary, "k": 1}, {**binary, "k": 2}):
        assert router.dispatch(make(*_binary(other, x), memo)).status == 200
        assert isinstance(memo[URL], bytes)
        assert router.dispatch(make(*_binary(other, x), memo)).status == 200
        assert isinstance(memo[URL], Repeat) and memo[URL] is not kept
        kept = memo[URL]
    named = {"inputs": inputs, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    assert router.dispatch(make(*_binary(named, x), memo)).status == 200
    assert memo[URL] is not kept  # another header: the full path

    not_kept = [
        {**binary, "id": "call-1"},  # one request's own header
        {"inputs": inputs},  # the output travels as JSON data
        {"inputs": [{**tensor, "data": x.ravel().tolist()}]},  # so does the input
    ]
    for doc in not_kept:
        memo.clear()
        if "data" in doc["inputs"][0]:  # type: ignore[index]
            body, length = json.dumps(doc).encode(), None
        else:
            body, length = _binary(doc, x)
        for _ in range(2):
            assert router.dispatch(make(body, length, memo)).status == 200
        assert memo == {}
