"""The stock Triton HTTP client (``tritonclient[http]``) against a real server on its
loopback TCP listener, with real ONNX Runtime: every call of the client that applies to a
read-only server answers, JSON and binary; what does not apply is refused with a clear
reason; the statistics count exactly the requests made."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.runtime.stats import RequestStats
from agent.serving.server import InferenceServer
from agent.serving.triton import IndexEntry
from tests.agent._model_dir import (
    ALL_DATATYPES,
    make_identity_model_dir,
    make_model_dir,
    sample_tensor,
)
from tests.agent._serving import serving
from tests.helpers import free_port

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

X = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(*make_identity_model_dir(tmp_path_factory.mktemp("echo") / "v1"))


@pytest.fixture
def linear(tmp_path: Path, linear_model: Path) -> LoadedModel:
    return load_model(*make_model_dir(tmp_path / "lin", linear_model))


def _held() -> list[IndexEntry]:
    return [
        IndexEntry("linear", "0.9.0", "UNAVAILABLE", "the previous version, kept for a rollback"),
        IndexEntry("linear", "1.0.0", "READY", "serving, on probation"),
        IndexEntry("echo", "1.0.0", "READY", "serving"),
    ]


@pytest.fixture
def server(echo: LoadedModel, linear: LoadedModel) -> Iterator[InferenceServer]:
    registry = ModelRegistry()
    registry.activate(echo)
    registry.activate(linear)
    with serving(registry, tcp_port=free_port(), stats=RequestStats(), repository=_held) as s:
        yield s


@pytest.fixture
def client(server: InferenceServer) -> Iterator[Any]:
    address = server.tcp_address()
    assert address is not None
    triton = httpclient.InferenceServerClient(f"{address[0]}:{address[1]}", network_timeout=30)
    try:
        yield triton
    finally:
        triton.close()


def _refusal(call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def test_health_metadata_config_and_repository(client: Any, linear: LoadedModel) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "edge-agent"
    for extension in (
        "binary_tensor_data",
        "model_configuration",
        "statistics",
        "model_repository",
    ):
        assert extension in metadata["extensions"]
    assert client.is_model_ready("linear") and client.is_model_ready("linear", "1.0.0")
    assert not client.is_model_ready("linear", "0.9.0")  # held, not serving
    assert not client.is_model_ready("nope")
    assert client.get_model_metadata("linear")["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 4]}
    ]
    config = client.get_model_config("linear")
    assert config == client.get_model_config("linear", "1.0.0")
    assert (config["name"], config["platform"], config["backend"]) == (
        "linear",
        "onnxruntime_onnx",
        "onnxruntime",
    )
    assert config["max_batch_size"] == 0  # no batcher: dims are the whole shape
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("x", "TYPE_FP32", [-1, 4])
    ]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
        ("y", "TYPE_FP32", [-1, 3])
    ]
    types = {t["name"]: t["data_type"] for t in client.get_model_config("echo")["input"]}
    assert types["in_bytes"] == "TYPE_STRING" and types["in_fp16"] == "TYPE_FP16"
    assert types["in_bool"] == "TYPE_BOOL" and types["in_uint64"] == "TYPE_UINT64"
    error = _refusal(client.get_model_config, "linear", "0.9.0")
    assert error.status() == "404" and "serving 1.0.0" in error.message()

    index = client.get_model_repository_index()
    assert index == [
        {"name": "echo", "version": "1.0.0", "state": "READY", "reason": "serving"},
        {"name": "linear", "version": "0.9.0", "state": "UNAVAILABLE",
         "reason": "the previous version, kept for a rollback"},
        {"name": "linear", "version": "1.0.0", "state": "READY",
         "reason": "serving, on probation"},
    ]  # fmt: skip


def test_load_and_unload_are_refused_with_the_reason(client: Any) -> None:
    for call in (client.load_model, client.unload_model):
        error = _refusal(call, "linear")
        assert error.status() == "403"
        assert "edgectl rollout" in error.message() and "'linear'" in error.message()
    assert client.is_model_ready("linear")


def test_what_a_read_only_cpu_server_lacks_is_refused_clearly(client: Any) -> None:
    error = _refusal(client.get_log_settings)
    assert error.status() == "404" and "journalctl" in error.message()
    assert "trace extension" in _refusal(client.get_trace_settings).message()
    assert "trace extension" in _refusal(client.update_trace_settings, "linear", {}).message()
    assert "journalctl" in _refusal(client.update_log_settings, {"log_info": True}).message()
    assert "system shared memory" in _refusal(client.get_cuda_shared_memory_status).message()
    # System shared memory is the Unix socket's (peer credentials): refused over TCP.
    error = _refusal(client.get_system_shared_memory_status)
    assert error.status() == "403" and "Unix socket" in error.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_json_and_binary(client: Any, linear: LoadedModel, binary: bool) -> None:
    x = httpclient.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("y", binary_data=binary)]
    for _ in range(3):  # the third is a repeat of the second on one connection
        result = client.infer("linear", [x], outputs=wanted, request_id="r1")
        np.testing.assert_allclose(result.as_numpy("y"), linear.infer({"x": X})["y"], rtol=1e-6)
        assert result.get_response()["id"] == "r1"
        assert result.get_response()["model_version"] == "1.0.0"
    result = client.infer("linear", [x], model_version="1.0.0")  # every output, by default
    assert result.as_numpy("y").shape == (2, 3)
    pending = [client.async_infer("linear", [x], outputs=wanted) for _ in range(3)]
    for call in pending:
        np.testing.assert_allclose(call.get_result().as_numpy("y"), result.as_numpy("y"))
    # A compressed response may be asked for (it comes uncompressed, which the client
    # reads as well); a compressed request is refused, saying how to send it.
    result = client.infer("linear", [x], response_compression_algorithm="gzip")
    assert result.as_numpy("y").shape == (2, 3)
    error = _refusal(client.infer, "linear", [x], request_compression_algorithm="gzip")
    assert error.status() == "415" and "request_compression_algorithm" in error.message()
    assert client.infer("linear", [x]).as_numpy("y").shape == (2, 3)  # and goes on


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_through_tritonclient(client: Any, binary: bool) -> None:
    inputs, sent = [], {}
    for datatype in ALL_DATATYPES:
        value = sample_tensor(datatype)
        if datatype == "BYTES":
            value = np.array([[s.encode() for s in row] for row in value.tolist()], dtype=object)
        sent[datatype] = value
        tensor = httpclient.InferInput(f"in_{datatype.lower()}", list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=binary)
        inputs.append(tensor)
    outputs = [
        httpclient.InferRequestedOutput(f"out_{dt.lower()}", binary_data=binary)
        for dt in ALL_DATATYPES
    ]
    result = client.infer("echo", inputs, outputs=outputs)
    for datatype, value in sent.items():
        got = result.as_numpy(f"out_{datatype.lower()}")
        if datatype == "BYTES":
            # The JSON form carries strings, the binary form bytes: both round-trip.
            got = np.array(
                [[v if isinstance(v, bytes) else v.encode() for v in row] for row in got]
            )
            assert got.tolist() == value.tolist()
        else:
            np.testing.assert_array_equal(got, value)


def _stat(client: Any, *args: str) -> dict[str, Any]:
    stats = client.get_inference_statistics(*args)["model_stats"]
    return next(s for s in stats if (s["name"], s["version"]) == ("linear", "1.0.0"))


def test_statistics_count_every_request_and_where_its_time_went(
    client: Any, server: InferenceServer
) -> None:
    before = _stat(client)
    assert before["inference_count"] == 0 and before["batch_stats"] == []
    x = httpclient.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X)
    for _ in range(5):
        client.infer("linear", [x])
    wrong = httpclient.InferInput("x", [1, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3), np.float32))
    assert _refusal(client.infer, "linear", [wrong]).status() == "400"

    every, one, version = (
        client.get_inference_statistics(),
        client.get_inference_statistics("linear"),
        client.get_inference_statistics("linear", "1.0.0"),
    )
    assert {(s["name"], s["version"]) for s in every["model_stats"]} == {
        ("echo", "1.0.0"),
        ("linear", "1.0.0"),
    }
    assert one == version and len(one["model_stats"]) == 1
    stat = one["model_stats"][0]
    assert stat["inference_count"] == stat["execution_count"] == 5
    inference = stat["inference_stats"]
    assert inference["success"]["count"] == 5 and inference["fail"]["count"] == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[phase]["count"] == 5
    for phase in ("success", "fail", "compute_input", "compute_infer", "compute_output"):
        assert inference[phase]["ns"] > 0, phase
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"]
    assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
    assert [b["batch_size"] for b in stat["batch_stats"]] == [1]
    assert stat["batch_stats"][0]["compute_infer"] == inference["compute_infer"]
    assert stat["last_inference"] >= before["last_inference"] > -1

    # The server's own client on the Unix socket, through shared memory: exact repeats
    # run bound to the region, and are counted and timed as any request.
    with (
        SharedMemoryRegion(f"ef-tri-{os.getpid()}", 1 << 12) as region,
        InferenceClient(server.socket_path) as own,
    ):
        own.register_shared_memory("r", region)
        for _ in range(4):
            own.infer("linear", {"x": X}, shm=region)
    stat = _stat(client, "linear")
    assert stat["inference_count"] == 9
    assert stat["inference_stats"]["compute_infer"]["count"] == 9

    missing = _refusal(client.get_inference_statistics, "nope")
    assert missing.status() == "404" and "unknown model 'nope'" in missing.message()
    missing = _refusal(client.get_inference_statistics, "linear", "7.0.0")
    assert missing.status() == "404" and "no version '7.0.0'" in missing.message()
