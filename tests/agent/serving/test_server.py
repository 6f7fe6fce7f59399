"""agent.serving.server over a real Unix socket, with real ONNX Runtime behind it."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import agent
from agent.base.errors import InvalidRequestError, ModelNotFoundError, NotReadyError
from agent.client import InferenceClient
from agent.contracts import GoldenSpec, Manifest, TensorSpec
from agent.oip.request import SPLIT_MIN_BYTES, parse_infer_request
from agent.oip.response import build_infer_response
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import (
    ServerThread,
    StdlibUnixConnection,
    raw,
    read_responses,
    serving,
    short_socket_dir,
)
from tests.helpers import make_linear_model

X = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)


@pytest.fixture
def model_v1(tmp_path: Path, linear_model: Path) -> LoadedModel:
    return load_model(*make_model_dir(tmp_path / "v1", linear_model, version="1.0.0"))


@pytest.fixture
def registry(model_v1: LoadedModel) -> ModelRegistry:
    registry = ModelRegistry()
    registry.activate(model_v1)
    return registry


@pytest.fixture
def server(registry: ModelRegistry) -> Iterator[InferenceServer]:
    with serving(registry, max_body_bytes=64 * 1024) as running:
        yield running


@pytest.fixture
def client(server: InferenceServer) -> Iterator[InferenceClient]:
    with InferenceClient(server.socket_path, timeout_s=10) as c:
        yield c


def infer_body(
    x: Any, datatype: str = "FP32", shape: Any = None, name: str = "x"
) -> dict[str, Any]:
    x = np.asarray(x)
    return {
        "id": "req-1",
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": list(x.shape) if shape is None else shape,
                "data": x.ravel().tolist(),
            }
        ],
    }


# ---------------------------------------------------------------------------- endpoints


def test_health_and_metadata_endpoints(server: InferenceServer, client: InferenceClient) -> None:
    assert client.live() is True
    assert client.ready() is True
    assert raw(server, "GET", "/v2/health/live") == (200, {"live": True})
    assert raw(server, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert client.server_metadata() == {
        "name": "edge-agent",
        "version": agent.__version__,
        "extensions": [
            "binary_tensor_data",
            "system_shared_memory",
            "model_configuration",
            "statistics",
            "model_repository",
        ],
    }
    expected = {
        "name": "linear",
        "versions": ["1.0.0"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert client.model_metadata("linear") == expected
    assert raw(server, "GET", "/v2/models/linear/versions/1.0.0") == (200, expected)
    assert raw(server, "GET", "/v2/models/linear/ready")[0] == 200
    assert raw(server, "GET", "/v2/models/linear/versions/1.0.0/ready")[0] == 200
    assert raw(server, "GET", "/v2/models/linear/versions/9.9.9/ready")[0] == 404
    assert raw(server, "GET", "/v2/models/nope/ready")[0] == 404


def test_infer_equals_in_process_ort(
    server: InferenceServer, client: InferenceClient, linear_model: Path
) -> None:
    reference = ort.InferenceSession(str(linear_model)).run(["y"], {"x": X})[0]
    got = client.infer("linear", {"x": X})
    np.testing.assert_array_equal(got["y"], reference)
    assert got["y"].dtype == np.float32
    np.testing.assert_array_equal(client.infer("linear", {"x": X}, version="1.0.0")["y"], reference)

    status, doc = raw(server, "POST", "/v2/models/linear/infer", infer_body(X.tolist()))
    assert status == 200
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("linear", "1.0.0", "req-1")
    [output] = doc["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("y", "FP32", [2, 3])
    np.testing.assert_array_equal(np.float32(output["data"]).reshape(2, 3), reference)


# ---------------------------------------------------------------------------- errors


def test_unknown_model_and_version_are_404(
    server: InferenceServer, client: InferenceClient
) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        client.infer("nope", {"x": X})
    with pytest.raises(ModelNotFoundError, match=r"version '2\.0\.0' is not served"):
        client.infer("linear", {"x": X}, version="2.0.0")
    with pytest.raises(ModelNotFoundError):
        client.model_metadata("nope")
    assert raw(server, "GET", "/v2/models/linear/versions/2.0.0")[0] == 404
    assert raw(server, "GET", "/nowhere")[0] == 404
    assert raw(server, "GET", "/v2/models/linear/explain")[0] == 404


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (infer_body(np.zeros((2, 5), np.float32)), "input 'x': shape expected [-1, 4], got [2, 5]"),
        (
            infer_body(np.zeros((2, 4), np.int64), "INT64"),
            "input 'x': datatype expected FP32, got INT64",
        ),
        (
            infer_body(np.zeros((2, 4)), shape=[3, 4]),
            "input 'x': shape [3, 4] needs 12 values, got 8",
        ),
        (infer_body(np.zeros((1, 4)), name="z"), "unknown input 'z'"),
        ({"inputs": []}, "missing input 'x' (expected FP32 [-1, 4])"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a"] * 4}]},
            "expects numbers, got strings",
        ),
        ({"inputs": infer_body(X)["inputs"], "outputs": [{"name": "q"}]}, "unknown output 'q'"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got a list"),
    ],
)
def test_bad_requests_are_400_naming_the_problem(
    server: InferenceServer, body: Any, expected: str
) -> None:
    status, doc = raw(server, "POST", "/v2/models/linear/infer", body)
    assert status == 400
    assert expected in doc["error"]


def test_a_large_json_request_takes_the_fast_path_and_keeps_the_answers(
    server: InferenceServer, client: InferenceClient, linear_model: Path
) -> None:
    """A flat JSON body past SPLIT_MIN_BYTES (issue 21, item 1): the same outputs as ONNX
    Runtime in-process, and a wrong count is the same 400 as for a small body."""
    x = np.random.default_rng(5).normal(size=(600, 4)).astype(np.float32)
    reference = ort.InferenceSession(str(linear_model)).run(["y"], {"x": x})[0]
    body = infer_body(x)
    assert len(json.dumps(body)) > SPLIT_MIN_BYTES
    status, doc = raw(server, "POST", "/v2/models/linear/infer", body)
    assert status == 200, doc
    [output] = doc["outputs"]
    np.testing.assert_array_equal(np.float32(output["data"]).reshape(600, 3), reference)
    np.testing.assert_array_equal(client.infer("linear", {"x": x}, binary=False)["y"], reference)
    status, doc = raw(server, "POST", "/v2/models/linear/infer", infer_body(x, shape=[601, 4]))
    assert status == 400
    assert doc["error"] == "input 'x': shape [601, 4] needs 2404 values, got 2400"


def test_client_maps_400_to_invalid_request(client: InferenceClient) -> None:
    with pytest.raises(InvalidRequestError, match=r"datatype expected FP32, got FP64 \(HTTP 400\)"):
        client.infer("linear", {"x": X.astype(np.float64)})


def test_wrong_method_is_405(server: InferenceServer) -> None:
    status, doc = raw(server, "GET", "/v2/models/linear/infer")
    assert status == 405 and "use POST" in doc["error"]
    assert raw(server, "POST", "/v2/health/live", b"{}")[0] == 405


def test_body_over_limit_is_413_and_says_the_limit(server: InferenceServer) -> None:
    big = infer_body(np.zeros((4000, 4), np.float32))
    status, doc = raw(server, "POST", "/v2/models/linear/infer", big)
    assert status == 413
    assert str(64 * 1024) in doc["error"]
    assert raw(server, "GET", "/v2/health/live")[0] == 200  # the server carries on


def test_not_ready_is_503(registry: ModelRegistry) -> None:
    ready = threading.Event()
    with serving(registry, is_ready=ready.is_set) as server:
        client = InferenceClient(server.socket_path)
        assert client.live() and not client.ready()
        assert raw(server, "GET", "/v2/health/ready") == (503, {"ready": False})
        with pytest.raises(NotReadyError, match="not ready"):
            client.infer("linear", {"x": X})
        ready.set()
        assert client.ready()
        assert client.infer("linear", {"x": X})["y"].shape == (2, 3)
        client.close()


def test_the_agent_health_endpoint_adds_the_agents_status_and_leaves_oips_alone(
    registry: ModelRegistry,
) -> None:
    """``/v2/health/agent`` (issue 20, item 3) answers 200 with live, ready and what the
    agent provides; OIP's live and ready answer exactly as before."""
    ready = threading.Event()
    status = {"broker": {"address": "127.0.0.1:1", "connected": False, "failed_attempts": 3}}
    with serving(registry, is_ready=ready.is_set, agent_status=lambda: status) as server:
        assert raw(server, "GET", "/v2/health/agent") == (
            200,
            {"live": True, "ready": False, **status},
        )
        assert raw(server, "GET", "/v2/health/live") == (200, {"live": True})
        assert raw(server, "GET", "/v2/health/ready") == (503, {"ready": False})
        ready.set()
        with InferenceClient(server.socket_path) as client:
            assert client.agent_status() == {"live": True, "ready": True, **status}
            assert client.live() and client.ready()
        assert raw(server, "POST", "/v2/health/agent", b"{}")[0] == 405
    with serving(registry) as server:  # without a provider: live and ready only
        assert raw(server, "GET", "/v2/health/agent") == (200, {"live": True, "ready": True})


def test_empty_registry_is_not_ready(tmp_path: Path) -> None:
    with serving(ModelRegistry()) as server:
        assert raw(server, "GET", "/v2/health/ready") == (503, {"ready": False})
        assert raw(server, "GET", "/v2/models/linear")[0] == 404


# ---------------------------------------------------------------------------- the wire


def test_keep_alive_and_pipelining_answer_in_order(server: InferenceServer) -> None:
    body = json.dumps(infer_body(X)).encode()
    infer = (
        b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [(r[0], r[2]) for r in read_responses(sock, 1)] == [(200, b'{"live":true}')]
        # Pipelined: an infer (runs in a thread) then a health check must come back in order.
        sock.sendall(infer + b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n" + infer)
        responses = read_responses(sock, 3)
        assert [status for status, _, _ in responses] == [200, 200, 200]
        assert "outputs" in json.loads(responses[0][2])
        assert json.loads(responses[1][2])["name"] == "edge-agent"
        assert "outputs" in json.loads(responses[2][2])


@pytest.mark.parametrize(
    ("request_head", "answer"),
    [
        (b"GET /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n", b'{"live":true}'),
        (b"POST /v2/systemsharedmemory/unregister HTTP/1.1\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n", b"{}"),
        (b"GET /v2/health/live HTTP/1.0\r\n\r\n", b'{"live":true}'),
    ],
)  # fmt: skip
def test_a_request_without_a_body_that_asks_to_close_is_answered_then_closed(
    server: InferenceServer, request_head: bytes, answer: bytes
) -> None:
    """llhttp forgets ``Connection: close`` once a message is complete, and a request
    with no body is complete with its head: the server must still close after it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)  # the server's idle timeout is longer: a wait means no close
        sock.connect(str(server.socket_path))
        sock.sendall(request_head)
        [(status, headers, body)] = read_responses(sock, 1)
        assert (status, body) == (200, answer)
        assert headers.get("connection") == "close"
        assert sock.recv(1) == b""  # closed, not kept alive


def test_a_repeated_head_is_answered_from_its_own_body(
    server: InferenceServer, model_v1: LoadedModel
) -> None:
    """A connection remembers heads it parsed; the same head with other bodies (same
    length) still answers each body, and a bad header stays a 400 every time."""
    xs = [np.full((1, 4), v, np.float32) for v in (1.0, 2.0, 3.0)]
    bodies = [json.dumps(infer_body(x)).encode() for x in xs]
    assert len({len(b) for b in bodies}) == 1  # one head for all three
    head = (
        b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Length: {len(bodies[0])}\r\n\r\n".encode()
    )
    bad = b"POST /v2/models/linear/infer HTTP/1.1\r\nInference-Header-Content-Length: x\r\n"
    bad += f"Content-Length: {len(bodies[0])}\r\n\r\n".encode() + bodies[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        for x, body in zip(xs, bodies, strict=True):
            sock.sendall(head + body)
            [(status, _, answer)] = read_responses(sock, 1)
            got = json.loads(answer)["outputs"][0]["data"]
            np.testing.assert_allclose(got, model_v1.infer({"x": x})["y"].ravel(), rtol=1e-6)
        for _ in range(2):
            sock.sendall(bad)
            [(status, _, answer)] = read_responses(sock, 1)
            assert status == 400 and b"Inference-Header-Content-Length" in answer


def test_malformed_request_line_is_400_not_a_crash(server: InferenceServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        [(status, _, body)] = read_responses(sock, 1)
        assert status == 400 and b"malformed HTTP request" in body
        assert sock.recv(1) == b""  # then the connection is closed
    assert raw(server, "GET", "/v2/health/live") == (200, {"live": True})


def test_socket_mode_stale_socket_and_cleanup(registry: ModelRegistry) -> None:
    directory = short_socket_dir()
    path = directory / "infer.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file nobody listens on, as a crashed agent leaves
    stale.close()
    thread = ServerThread(InferenceServer(registry, path))
    try:
        thread.start()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert InferenceClient(path).live()
        second = ServerThread(InferenceServer(registry, path))
        try:
            with pytest.raises(Exception, match="already serving"):
                second.start()
        finally:
            second.close()
        thread.stop()
        assert not path.exists()
    finally:
        thread.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


# ---------------------------------------------------------------------------- hot swap


def test_hot_swap_under_load_fails_no_request(
    tmp_path: Path, registry: ModelRegistry, model_v1: LoadedModel, server: InferenceServer
) -> None:
    v2 = load_model(
        *make_model_dir(
            tmp_path / "v2", make_linear_model(tmp_path / "m2.onnx", seed=2), version="1.1.0"
        )
    )
    expected = {
        "1.0.0": model_v1.infer({"x": X})["y"],
        "1.1.0": v2.infer({"x": X})["y"],
    }
    versions = [model_v1, v2]
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[str, int] = {"1.0.0": 0, "1.1.0": 0}
    lock = threading.Lock()
    body = infer_body(X)

    def send() -> None:
        connection = StdlibUnixConnection(server.socket_path, timeout=10)
        for _ in range(3000):  # bounded even if the clock stalls
            if stop.is_set():
                break
            try:
                connection.request("POST", "/v2/models/linear/infer", body=json.dumps(body))
                response = connection.getresponse()
                doc = json.loads(response.read())
                version = doc["model_version"]
                y = np.float32(doc["outputs"][0]["data"]).reshape(2, 3)
                if response.status != 200 or not np.array_equal(y, expected[version]):
                    raise AssertionError(f"{response.status} {doc}")
                with lock:
                    seen[version] += 1
            except Exception as exc:
                with lock:
                    failures.append(repr(exc))
        connection.close()

    senders = [threading.Thread(target=send) for _ in range(4)]
    for t in senders:
        t.start()
    deadline = time.monotonic() + 1.0
    swaps = 0
    while time.monotonic() < deadline:
        time.sleep(0.02)
        swaps += 1
        registry.activate(versions[swaps % 2])
    stop.set()
    for t in senders:
        t.join(timeout=10)
    assert failures == []
    assert seen["1.0.0"] > 0 and seen["1.1.0"] > 0, seen
    assert swaps > 10


def test_oversized_head_is_431_and_chunked_body_over_limit_is_413(server: InferenceServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        [(status, _, _)] = read_responses(sock, 1)
        assert status == 431
    chunk = b"x" * 40_000
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(
            b"POST /v2/models/linear/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + framed * 2
            + b"0\r\n\r\n"
        )
        [(status, _, body)] = read_responses(sock, 1)
        assert status == 413 and b"65536" in body


# ---------------------------------------------------------------------------- the codec


def _manifest(datatype: str, shape: tuple[int, ...]) -> Manifest:
    return Manifest(
        name="m",
        version="1.0.0",
        inputs=(TensorSpec("t", datatype, shape),),
        outputs=(TensorSpec("o", datatype, shape),),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=0.0, atol=0.0),
        members={},
    )


def _request(datatype: str, shape: list[int], data: Any) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "t", "datatype": datatype, "shape": shape, "data": data}]}
    ).encode()


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("BOOL", [True, False], np.array([[True, False]])),
        ("INT8", [[-128, 127]], np.array([[-128, 127]], np.int8)),
        ("FP16", [0.5, 2], np.array([[0.5, 2.0]], np.float16)),
        ("BYTES", ["a", "bc"], np.array([["a", "bc"]], dtype=object)),
    ],
)
def test_codec_accepts_every_kind(datatype: str, data: Any, expected: np.ndarray) -> None:
    request = parse_infer_request(_request(datatype, [1, 2], data), _manifest(datatype, (-1, 2)))
    got = request.inputs["t"]
    assert got.dtype == expected.dtype and got.tolist() == expected.tolist()
    body = build_infer_response("m", "1.0.0", {"o": got}, "id-7")
    doc = json.loads(body)
    assert doc["id"] == "id-7" and doc["outputs"][0]["datatype"] == datatype
    assert doc["outputs"][0]["data"] == expected.ravel().tolist()


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("INT8", [1, 300], "INT8 holds -128..127, got values in 1..300"),
        ("INT32", [1.5, 2], "expects integers, got floats"),
        ("BOOL", [1, 0], "expects true/false, got integers"),
        ("FP32", [[1, 2], [3]], "regularly nested"),
        ("FP32", [1, None], "expects numbers"),
    ],
)
def test_codec_refuses_values_it_would_change(datatype: str, data: Any, expected: str) -> None:
    with pytest.raises(InvalidRequestError, match="input 't'") as caught:
        parse_infer_request(_request(datatype, [1, 2], data), _manifest(datatype, (-1, 2)))
    assert expected in str(caught.value)


def _empty_tensor(shape: list[int], where: str) -> tuple[bytes, int | None]:
    """(body, header length) of a request whose one FP64 input ``t`` (the widest
    elements) has ``shape``, its values (none: a dimension is 0) as JSON or binary."""
    tensor: dict[str, Any] = {"name": "t", "datatype": "FP64", "shape": shape}
    if where == "json":
        tensor["data"] = []
        return json.dumps({"inputs": [tensor]}).encode(), None
    tensor["parameters"] = {"binary_data_size": 0}
    body = json.dumps({"inputs": [tensor]}).encode()
    return body, len(body)


@pytest.mark.parametrize("shape", [[0, 10**20], [10**20, 0], [0, 2**63], [2**31, 2**31, 0]])
@pytest.mark.parametrize("where", ["json", "binary"])
def test_codec_refuses_shapes_no_array_can_have(shape: list[int], where: str) -> None:
    """Dimensions that multiply to 0 but that numpy cannot make into an array: a 400
    naming the tensor (issue 18, defect 7: was a ValueError out of numpy, a 500)."""
    manifest = _manifest("FP64", (-1,) * len(shape))
    body, header_length = _empty_tensor(shape, where)
    with pytest.raises(InvalidRequestError, match=r"input 't': shape .* is too large"):
        parse_infer_request(body, manifest, header_length=header_length)
    at_the_bound = [0, 2**59] if len(shape) == 2 else [2**20, 2**39, 0]
    body, header_length = _empty_tensor(at_the_bound, where)
    parsed = parse_infer_request(body, manifest, header_length=header_length)
    assert parsed.inputs["t"].shape == tuple(at_the_bound)


def _make_slow_model(path: Path, width: int = 384, layers: int = 48) -> Path:
    """x float32 [-1, width] through ``layers`` dense layers: slow enough to be in flight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        weight = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_slow_model_does_not_stall_health_checks(tmp_path: Path) -> None:
    width = 384
    slow = load_model(
        *make_model_dir(
            tmp_path / "slow",
            _make_slow_model(tmp_path / "slow.onnx", width),
            name="slow",
            cases=1,
            batch=1,
            width=width,
        )
    )
    registry = ModelRegistry()
    registry.activate(slow)
    x = np.ones((512, width), np.float32)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    with serving(registry) as server:
        sent, done = threading.Event(), threading.Event()
        status: list[int] = []

        def run() -> None:
            connection = StdlibUnixConnection(server.socket_path)
            try:
                connection.request("POST", "/v2/models/slow/infer", body=body)
                sent.set()  # the whole request is in the server's socket: it runs from now on
                response = connection.getresponse()
                response.read()
                status.append(response.status)
            finally:
                connection.close()
                done.set()

        worker = threading.Thread(target=run)
        worker.start()
        assert sent.wait(30)
        answered_while_busy = 0
        for _ in range(1000):  # bounded; the infer takes a few hundred ms at least
            if done.is_set():
                break
            assert raw(server, "GET", "/v2/health/live") == (200, {"live": True})
            if not done.is_set():
                answered_while_busy += 1
        worker.join(30)
        assert done.is_set() and status == [200]
        # Health checks go one at a time, each sent after the infer request was. A loop
        # blocked by the run would hold the one sent during it until the run ends, so it
        # could count one, or two around the end, never five.
        assert answered_while_busy >= 5, answered_while_busy
