"""Every datatype through JSON, the binary tensor and the shared-memory extensions, and
/metrics, against a real server on a real Unix socket with real ONNX Runtime."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.base.errors import AgentUnreachableError, InvalidRequestError
from agent.client import InferenceClient
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.runtime.stats import RequestStats
from agent.serving.metrics import InferenceMetrics
from agent.serving.server import InferenceServer
from tests.agent._model_dir import (
    ALL_DATATYPES,
    make_identity_model_dir,
    make_model_dir,
    sample_tensor,
)
from tests.agent._serving import raw, read_responses, serving

X = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(*make_identity_model_dir(tmp_path_factory.mktemp("echo") / "v1"))


@pytest.fixture
def server(echo: LoadedModel, tmp_path: Path, linear_model: Path) -> Iterator[InferenceServer]:
    registry = ModelRegistry()
    registry.activate(echo)
    registry.activate(load_model(*make_model_dir(tmp_path / "lin", linear_model)))
    with serving(registry, stats=RequestStats(), metrics=InferenceMetrics()) as running:
        yield running


def _inputs(rows: int = 2) -> dict[str, np.ndarray]:
    return {f"in_{dt.lower()}": sample_tensor(dt, rows) for dt in ALL_DATATYPES}


def _assert_echoed(got: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(n.replace("in_", "out_") for n in sent)
    for name, value in sent.items():
        out = got[name.replace("in_", "out_")]
        assert out.shape == value.shape, name
        if value.dtype.kind == "U":
            assert out.tolist() == value.tolist(), name
        else:
            assert out.dtype == value.dtype, name
            np.testing.assert_array_equal(out, value)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(server: InferenceServer, binary: bool) -> None:
    sent = _inputs()
    with InferenceClient(server.socket_path, binary=binary) as client:
        _assert_echoed(client.infer("echo", sent), sent)
        # A subset of outputs, and a request id echoed by the server.
        got = client.infer("echo", sent, outputs=["out_fp16", "out_bytes"], request_id="r9")
        assert sorted(got) == ["out_bytes", "out_fp16"]


def test_every_datatype_through_shared_memory(server: InferenceServer) -> None:
    sent = _inputs(rows=5)
    with (
        SharedMemoryRegion(f"ef-test-{os.getpid()}", 1 << 16) as region,
        InferenceClient(server.socket_path) as client,
    ):
        client.register_shared_memory("r1", region)
        assert client.shared_memory_status() == [
            {"name": "r1", "key": region.key, "offset": 0, "byte_size": 1 << 16}
        ]
        assert client.shared_memory_status("r1")[0]["name"] == "r1"
        _assert_echoed(client.infer("echo", sent, shm=region), sent)
        x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
        np.testing.assert_array_equal(
            client.infer("linear", {"x": x}, shm=region)["y"], client.infer("linear", {"x": x})["y"]
        )
        client.unregister_shared_memory("r1")
        assert client.shared_memory_status() == []
        with pytest.raises(InvalidRequestError, match="'r1' is not registered"):
            client.infer("linear", {"x": x}, shm=region)
        client.unregister_shared_memory()  # all; none left is fine


def _binary_request(header: dict[str, object], data: bytes, length: int | None = None) -> bytes:
    head = json.dumps(header).encode()
    body = head + data
    return (
        b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
        + f"Inference-Header-Content-Length: {len(head) if length is None else length}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _exchange(server: InferenceServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.socket_path))
        sock.sendall(request)
        [response] = read_responses(sock, 1)
        return response


def test_binary_extension_on_the_wire(server: InferenceServer) -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 4]}
    header = {
        "inputs": [{**tensor, "parameters": {"binary_data_size": 32}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    status, headers, body = _exchange(server, _binary_request(header, X.tobytes()))
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    length = int(headers["inference-header-content-length"])
    doc = json.loads(body[:length])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 24}
    y = np.frombuffer(body[length:], "<f4").reshape(2, 3)
    with InferenceClient(server.socket_path, binary=False) as client:
        np.testing.assert_array_equal(y, client.infer("linear", {"x": X})["y"])
    # binary_data_output asks for every output in binary; JSON inputs may mix in.
    mixed = {"inputs": [{**tensor, "data": X.ravel().tolist()}],
             "parameters": {"binary_data_output": True}}  # fmt: skip
    status, headers, body = _exchange(server, _binary_request(mixed, b""))
    assert status == 200 and "inference-header-content-length" in headers


@pytest.mark.parametrize(
    ("size", "data", "length", "expected"),
    [
        (32, X.tobytes()[:20], None, "runs past the end of the body"),
        (20, X.tobytes()[:20], None, "needs 32 bytes, got 20"),
        (32, X.tobytes() + b"junk", None, "the body carries 36"),
        (32, X.tobytes(), 10_000, "Inference-Header-Content-Length expected 0.."),
        (-1, X.tobytes(), None, "binary_data_size' expected an integer >= 0"),
    ],
)
def test_binary_sections_that_do_not_add_up_are_400(
    server: InferenceServer, size: int, data: bytes, length: int | None, expected: str
) -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4],
                          "parameters": {"binary_data_size": size}}]}  # fmt: skip
    status, _, body = _exchange(server, _binary_request(header, data, length))
    assert status == 400
    assert expected in json.loads(body)["error"]


def test_bytes_and_bool_binary_are_checked(server: InferenceServer) -> None:
    def send(dt: str, data: bytes) -> tuple[int, str]:
        inputs = [
            {"name": f"in_{d.lower()}", "datatype": d, "shape": [1, 3],
             "data": sample_tensor(d, 1).ravel().tolist()}
            for d in ALL_DATATYPES
        ]  # fmt: skip
        target = next(t for t in inputs if t["datatype"] == dt)
        del target["data"]
        target["parameters"] = {"binary_data_size": len(data)}
        head = json.dumps({"inputs": inputs}).encode()
        status, doc = raw(
            server,
            "POST",
            "/v2/models/echo/infer",
            head + data,
            {"Inference-Header-Content-Length": str(len(head))},
        )
        return status, doc.get("error", "") if isinstance(doc, dict) else doc

    ok = b"".join(struct.pack("<I", len(s)) + s for s in (b"a", b"", "é".encode()))
    assert send("BYTES", ok) == (200, "")
    assert "claims 99 bytes" in send("BYTES", struct.pack("<I", 99) + b"ab")[1]
    assert "not UTF-8" in send("BYTES", ok[:9] + struct.pack("<I", 1) + b"\xff")[1]
    assert "needs 3 BYTES elements" in send("BYTES", ok[:5])[1]
    assert send("BOOL", b"\x01\x00\x01")[0] == 200
    assert "must be 0 or 1" in send("BOOL", b"\x01\x02\x01")[1]


def test_shared_memory_refusals(server: InferenceServer, tmp_path: Path) -> None:
    path = "/v2/systemsharedmemory/region/r/register"
    with SharedMemoryRegion(f"ef-small-{os.getpid()}", 64) as region:
        key = region.key
        assert raw(server, "POST", path, {"key": "/../etc/passwd", "byte_size": 1})[0] == 400
        assert raw(server, "POST", path, {"key": "/nope-absent", "byte_size": 1})[0] == 400
        status, doc = raw(server, "POST", path, {"key": key, "byte_size": 65})
        assert status == 400 and "within the object's 64 bytes" in doc["error"]
        assert raw(server, "POST", path, {"key": key, "offset": 8, "byte_size": 56})[0] == 200
        assert raw(server, "POST", path, {"key": key, "byte_size": 8})[0] == 400  # taken
        header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": {
            "shared_memory_region": "r", "shared_memory_byte_size": 32,
            "shared_memory_offset": 40}}]}  # fmt: skip
        status, doc = raw(server, "POST", "/v2/models/linear/infer", header)
        assert status == 400 and "expected within its 56 bytes" in doc["error"]
        header["outputs"] = [{"name": "y", "parameters": {
            "shared_memory_region": "r", "shared_memory_byte_size": 4}}]  # fmt: skip
        header["inputs"][0]["parameters"]["shared_memory_offset"] = 0  # type: ignore[index]
        status, doc = raw(server, "POST", "/v2/models/linear/infer", header)
        assert status == 400 and "needs 24 bytes, shared_memory_byte_size is 4" in doc["error"]
        assert raw(server, "GET", "/v2/systemsharedmemory/region/zz/status")[0] == 404
        assert raw(server, "POST", "/v2/systemsharedmemory/region/r/unregister")[0] == 200


def test_metrics_count_requests_errors_and_latency(server: InferenceServer) -> None:
    with InferenceClient(server.socket_path) as client:
        for _ in range(3):
            client.infer("linear", {"x": X})
        with pytest.raises(InvalidRequestError):
            client.infer("linear", {"x": X.astype(np.float64)})
        server.metrics.record_swap("linear", "1.0.0")
        server.metrics.record_rollback("linear", "0.9.0")
        text = client.metrics()
    assert 'edge_agent_infer_requests_total{model="linear",version="1.0.0"} 4.0' in text
    assert (
        'edge_agent_infer_errors_total{kind="client_error",model="linear",version="1.0.0"} 1.0'
        in text
    )
    assert 'edge_agent_infer_latency_seconds_count{model="linear",version="1.0.0"} 3.0' in text
    assert "edge_agent_infer_queue_depth 0.0" in text
    assert 'edge_agent_model_swaps_total{model="linear",version="1.0.0"} 1.0' in text
    assert 'edge_agent_model_rollbacks_total{model="linear",version="0.9.0"} 1.0' in text
    assert server.stats is not None and server.stats.snapshot("linear", "1.0.0").requests == 4
    status, _ = raw(server, "GET", "/metrics")
    assert status == 200


def test_model_ready_and_metadata_by_version(server: InferenceServer) -> None:
    with InferenceClient(server.socket_path) as client:
        assert client.model_ready("linear") and client.model_ready("linear", "1.0.0")
        assert client.model_metadata("echo", "1.0.0")["inputs"][12] == {
            "name": "in_bytes", "datatype": "BYTES", "shape": [-1, 3]}  # fmt: skip
        with pytest.raises(AgentUnreachableError):
            InferenceClient(Path("/nonexistent/sock")).server_metadata()
