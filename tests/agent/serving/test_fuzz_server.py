"""Hostile requests against a real server on a real socket (hypothesis).

At least 10,000 malformed or hostile requests — bad JSON, wrong shapes and datatypes,
hostile dimensions (huge, negative, zero beside huge, products past 2**63) on models
whose dimensions are wildcards, lying binary sizes and header lengths, bogus
shared-memory references, lying Content-Length, oversized and garbage heads, raw
garbage — plus slow senders. The server must never answer a 5xx, never log an
unexpected error, and must answer a health check after every batch. The counts are
printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.client import InferenceClient
from agent.contracts import TensorSpec
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer
from tests.agent._model_dir import ALL_DATATYPES, make_identity_model_dir, make_model_dir
from tests.agent._serving import raw, serving

BATCHES = 200
BATCH_SIZE = 50  # 10,000 requests in all
SLOW_SENDERS = 24

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_datatypes = st.sampled_from([*ALL_DATATYPES, "FP8", "", "fp32"]) | st.text(max_size=4)
# Dimensions that are legal one by one but not together (0 beside 2**63: a product of 0
# that numpy cannot make), past int64, negative, or ordinary.
_hostile_dims = st.sampled_from(
    [0, 1, 3, 4, 2**31, 2**60, 2**62, 2**63 - 1, 2**63, 2**64, 10**20, -1, -(2**63)]
)
_dims = _hostile_dims | st.integers(min_value=-(2**70), max_value=2**70) | st.integers(-3, 6)
_shapes = st.lists(_dims, max_size=4) | _json_values
_names = st.sampled_from(["x", "in_fp32", "in_bytes", "in_bool", "y", ""]) | st.text(max_size=5)
_paths = st.sampled_from(
    [
        "/v2/models/linear/infer",
        "/v2/models/echo/infer",
        "/v2/models/linear/versions/1.0.0/infer",
        "/v2/models/nope/infer",
        "/v2/models/linear/versions/9/infer",
        "/v2/models/wide/infer",
    ]
)
_any_path = (
    _paths
    | st.sampled_from(
        [
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/metrics",
            "/v2/models/linear",
            "/v2/models/linear/ready",
            "/v2/systemsharedmemory/status",
            "/v2/systemsharedmemory/region/fz/status",
            "/v2/systemsharedmemory/unregister",
            "/",
            "//v2//models",
            "/v2/models/%00/infer",
        ]
    )
    | st.text(max_size=30).map(lambda t: "/" + t.replace(" ", "%20"))
)


def _http(method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


@st.composite
def _tensor(draw: st.DrawFn) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": draw(_names), "datatype": draw(_datatypes)}
    tensor["shape"] = draw(_shapes)
    choice = draw(st.integers(0, 3))
    if choice == 0:
        tensor["data"] = draw(_json_values)
    elif choice == 1:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(-5, 200) | _json_values)}
    elif choice == 2:
        tensor["parameters"] = {
            "shared_memory_region": draw(st.sampled_from(["fz", "nope"]) | _json_values),
            "shared_memory_offset": draw(st.integers(-5, 300)),
            "shared_memory_byte_size": draw(st.integers(-5, 300) | _json_values),
        }
    if draw(st.booleans()):
        tensor.pop(draw(st.sampled_from(["name", "datatype", "shape"])), None)
    return tensor


@st.composite
def _hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(
        st.sampled_from(
            [
                "bad_json",
                "wrong_tensors",
                "binary_lies",
                "lying_length",
                "garbage_head",
                "big_head",
                "raw_garbage",
                "register",
                "wrong_method",
                "deep_json",
                "hostile_shape",
            ]
        )
    )
    path = draw(_paths)
    if kind == "bad_json":
        return kind, _http("POST", path, draw(st.binary(max_size=120)))
    if kind == "deep_json":
        depth = draw(st.integers(50, 100_000))
        return kind, _http("POST", path, b"[" * depth + b"]" * draw(st.integers(0, depth)))
    if kind in ("wrong_tensors", "binary_lies"):
        doc: dict[str, Any] = {"inputs": draw(st.lists(_tensor(), max_size=4) | _json_values)}
        if draw(st.booleans()):
            doc["outputs"] = draw(
                st.lists(st.fixed_dictionaries({"name": _names, "parameters": _json_values}))
                | _json_values
            )
        if draw(st.booleans()):
            doc["parameters"] = draw(_json_values)
        if draw(st.booleans()):
            doc["id"] = draw(_json_values)
        head = json.dumps(doc).encode()
        if kind == "wrong_tensors":
            return kind, _http("POST", path, head)
        tail = draw(st.binary(max_size=200))
        length = draw(
            st.just(str(len(head))) | st.integers(-10, 500).map(str) | st.text(max_size=4)
        )
        return kind, _http("POST", path, head + tail, {"Inference-Header-Content-Length": length})
    if kind == "hostile_shape":
        return kind, _hostile_shape(draw)
    if kind == "lying_length":
        body = draw(st.binary(max_size=100))
        claimed = draw(st.integers(0, 300).map(str) | st.sampled_from(["-1", "1e3", "x", ""]))
        head = f"POST {path} HTTP/1.1\r\nContent-Length: {claimed}\r\n\r\n".encode()
        return kind, head + body
    if kind == "garbage_head":
        headers = draw(st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=5))
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
        return kind, _http(method, draw(_any_path), draw(st.binary(max_size=40)), headers)
    if kind == "big_head":
        size = draw(st.sampled_from([1_000, 60_000, 70_000, 200_000]))
        return kind, _http("GET", "/v2", b"", {"X-Big": "a" * size})
    if kind == "raw_garbage":
        return kind, draw(st.binary(min_size=1, max_size=300))
    if kind == "register":
        name = draw(st.sampled_from(["r", "fz", "../x", "a" * 200]) | st.text(max_size=8))
        body = json.dumps(draw(_json_values | st.fixed_dictionaries({
            "key": st.sampled_from(["/ef-none", "/../etc/passwd", "/"]) | st.text(max_size=10),
            "offset": st.integers(-2, 10**12), "byte_size": st.integers(-2, 10**12)})))  # fmt: skip
        verb = draw(st.sampled_from(["register", "unregister", "status"]))
        return kind, _http("POST", f"/v2/systemsharedmemory/region/{name}/{verb}", body.encode())
    method = draw(st.sampled_from(["GET", "PUT", "PATCH", "POST"]))
    return kind, _http(method, draw(_any_path), draw(st.binary(max_size=30)))


# A real input of each model, so a request with hostile dimensions passes every other check.
_REAL_INPUTS = {
    "/v2/models/wide/infer": ("x", "FP32", 2),  # [-1, -1]
    "/v2/models/linear/infer": ("x", "FP32", 2),  # [-1, 4]
    "/v2/models/echo/infer": ("in_int64", "INT64", 2),  # [-1, 3], one input of many
}


def _hostile_shape(draw: st.DrawFn) -> bytes:
    """A well-formed infer request whose shape is hostile: its data as JSON (none, or
    what the shape asks if it is small), binary or in shared memory."""
    path = draw(st.sampled_from([*_REAL_INPUTS, "/v2/models/wide/infer"]))  # wide: twice
    name, datatype, rank = _REAL_INPUTS[path]
    shape = draw(st.lists(_hostile_dims, min_size=rank, max_size=rank))
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    where = draw(st.sampled_from(["json", "binary", "shm"]))
    count = math.prod(shape) if all(d >= 0 for d in shape) else 0
    size = count * (8 if datatype == "INT64" else 4)
    if where == "json":
        tensor["data"] = [1] * count if count <= 64 else []
        return _http("POST", path, json.dumps({"inputs": [tensor]}).encode())
    if where == "shm":
        tensor["parameters"] = {"shared_memory_region": "fz", "shared_memory_byte_size": size}
        return _http("POST", path, json.dumps({"inputs": [tensor]}).encode())
    tensor["parameters"] = {"binary_data_size": size}
    head = json.dumps({"inputs": [tensor]}).encode()
    tail = b"\0" * size if 0 <= size <= 256 else b""
    return _http("POST", path, head + tail, {"Inference-Header-Content-Length": str(len(head))})


def _statuses(server: InferenceServer, request: bytes) -> list[int]:
    """Send one hostile request on its own connection, half-close, read every answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (a head too large) and closed
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    return [
        int(line.split(b" ", 2)[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")
    ]


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _identity(path: Path) -> Path:
    """An ONNX Identity x → y whose two dimensions are both free (["N", "M"])."""
    import onnx
    from onnx import helper

    def value(name: str) -> Any:
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N", "M"])

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "wide",
                              [value("x")], [value("y")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceServer]:
    from tests.helpers import make_linear_model

    base = tmp_path_factory.mktemp("fuzz")
    registry = ModelRegistry()
    registry.activate(
        load_model(*make_model_dir(base / "lin", make_linear_model(base / "l.onnx", 1)))
    )
    registry.activate(load_model(*make_identity_model_dir(base / "echo")))
    wide = (TensorSpec("x", "FP32", (-1, -1)),), (TensorSpec("y", "FP32", (-1, -1)),)
    registry.activate(
        load_model(*make_model_dir(base / "wide", _identity(base / "id.onnx"), name="wide",
                                   inputs=wide[0], outputs=wide[1]))
    )  # fmt: skip
    limits = {
        "max_body_bytes": 64 * 1024,
        "header_timeout_s": 0.3,
        "body_timeout_s": 0.3,
        "max_connections": 64,
    }
    with (
        serving(registry, **limits) as server,
        SharedMemoryRegion(f"ef-fz-{os.getpid()}", 256) as region,
    ):
        with InferenceClient(server.socket_path) as client:
            client.register_shared_memory("fz", region)
        yield server


def test_ten_thousand_hostile_requests(hostile_server: InferenceServer) -> None:
    errors = _Errors()
    logging.getLogger("agent").addHandler(errors)
    kinds: Counter[str] = Counter()
    statuses: Counter[str] = Counter()

    @settings(
        max_examples=BATCHES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(_hostile(), min_size=BATCH_SIZE, max_size=BATCH_SIZE))
    def batch(requests: list[tuple[str, bytes]]) -> None:
        for kind, request in requests:
            got = _statuses(hostile_server, request)
            kinds[kind] += 1
            for status in got or ["closed"]:
                statuses[str(status)] += 1
            assert all(s < 500 for s in got), (kind, request[:300], got)
        assert raw(hostile_server, "GET", "/v2/health/live") == (200, {"live": True})

    try:
        batch()
    finally:
        logging.getLogger("agent").removeHandler(errors)
    total = sum(kinds.values())
    print(f"\nhostile requests: {total}; by kind {dict(sorted(kinds.items()))}")
    print(f"answers by status: {dict(sorted(statuses.items()))}")
    assert total >= BATCHES * BATCH_SIZE >= 10_000
    assert errors.records == []


def test_slow_senders_are_cut_and_others_still_served(hostile_server: InferenceServer) -> None:
    results: list[list[int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def drip() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(hostile_server.socket_path))
            data = b""
            try:
                for byte in b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 9\r\n":
                    sock.sendall(bytes([byte]))
                    if stop.wait(0.05):
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            # After the answer, a peer that closed with our late bytes unread makes the
            # next recv raise ECONNRESET instead of returning EOF: the answer came first.
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
        with lock:
            results.append(
                [int(x.split(b" ")[1]) for x in data.split(b"\r\n") if x.startswith(b"HTTP/")]
            )

    threads = [threading.Thread(target=drip) for _ in range(SLOW_SENDERS)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        assert raw(hostile_server, "GET", "/v2/health/live")[0] == 200
    for thread in threads:
        thread.join(15)
    stop.set()
    print(f"\nslow senders: {len(results)}, answers {Counter(s for r in results for s in r)}")
    assert len(results) == SLOW_SENDERS
    assert all(r in ([408], [503]) for r in results), results


def test_fuzz_helpers_see_the_real_statuses(
    hostile_server: InferenceServer, tmp_path: Path
) -> None:
    assert _statuses(hostile_server, _http("GET", "/v2/health/live", b"")) == [200]
    assert _statuses(hostile_server, b"NOT HTTP\r\n\r\n") == [400]
