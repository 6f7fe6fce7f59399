"""TensorFlow Serving's REST API on the agent's socket: the request and response examples
of TensorFlow Serving's REST API documentation (tensorflow_serving/g3doc/api_rest.md),
sent byte for byte where the documentation gives bytes; its errors; and the same
statistics and metrics moving for a TensorFlow Serving request as for an OIP one.

Real server on a real Unix socket, real ONNX Runtime on models built here."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.base.errors import InvalidRequestError
from agent.client import InferenceClient
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
from agent.oip.tensors import nested_tensor_from_json_text
from agent.oip.tfs import model_status, names_version, tfs_version, version_text
from agent.oip.tfs_predict import _parse_fast, encode_predict, parse_predict
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer
from agent.serving.triton import READY, UNAVAILABLE, IndexEntry
from tests.agent._serving import StdlibUnixConnection, read_responses, serving

# ---------------------------------------------------------------------------- models


def _bundle_dir(
    directory: Path,
    graph: Any,
    name: str,
    version: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    golden: dict[str, np.ndarray],
) -> LoadedModel:
    """An unpacked bundle of ``graph`` with one golden case (``golden``: its inputs, with
    the case axis), loaded into ONNX Runtime."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / BUNDLE_MODEL))
    session = ort.InferenceSession(
        str(directory / BUNDLE_MODEL), providers=["CPUExecutionProvider"]
    )
    names = [t.name for t in outputs]
    got = session.run(names, {k: v[0] for k, v in golden.items()})
    arrays: dict[str, Any] = {GOLDEN_INPUT_PREFIX + k: v for k, v in golden.items()}
    for n, g in zip(names, got, strict=True):
        arrays[GOLDEN_OUTPUT_PREFIX + n] = np.asarray(g)[np.newaxis]
    np.savez(directory / BUNDLE_GOLDEN, **arrays)

    def member(path: Path) -> dict[str, object]:
        data = path.read_bytes()
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    manifest = Manifest(
        name=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=1e-5, atol=1e-6),
        members={
            BUNDLE_MODEL: member(directory / BUNDLE_MODEL),
            BUNDLE_GOLDEN: member(directory / BUNDLE_GOLDEN),
        },
    )
    (directory / BUNDLE_MANIFEST).write_bytes(manifest.to_json_bytes())
    return load_model(directory, manifest)


def half_plus_three(directory: Path, version: str = "0.0.123") -> LoadedModel:
    """The documentation's toy model: y = 0.5 * x + 3, x and y float32 [-1]."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "half"], ["xh"]),
            helper.make_node("Add", ["xh", "three"], ["y"]),
        ],
        "half_plus_three",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        initializer=[
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        ],
    )
    return _bundle_dir(
        directory,
        graph,
        "half_plus_three",
        version,
        (TensorSpec("x", "FP32", (-1,)),),
        (TensorSpec("y", "FP32", (-1,)),),
        {"x": np.array([[1.0, 2.0]], np.float32)},
    )


def tag_signal_sensor(directory: Path) -> LoadedModel:
    """The documentation's three named inputs: tag (string [-1]), signal (int [-1, 5]),
    sensor (float [-1, 2, 2]); outputs: the tag back, each signal's sum, the sensor
    doubled."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["tag"], ["tag_out"]),
            helper.make_node("ReduceSum", ["signal", "axes"], ["signal_sum"], keepdims=0),
            helper.make_node("Add", ["sensor", "sensor"], ["sensor_twice"]),
        ],
        "tss",
        [
            helper.make_tensor_value_info("tag", TensorProto.STRING, ["N"]),
            helper.make_tensor_value_info("signal", TensorProto.INT64, ["N", 5]),
            helper.make_tensor_value_info("sensor", TensorProto.FLOAT, ["N", 2, 2]),
        ],
        [
            helper.make_tensor_value_info("tag_out", TensorProto.STRING, ["N"]),
            helper.make_tensor_value_info("signal_sum", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("sensor_twice", TensorProto.FLOAT, ["N", 2, 2]),
        ],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    return _bundle_dir(
        directory,
        graph,
        "sensors",
        "2.1.0",
        (
            TensorSpec("tag", "BYTES", (-1,)),
            TensorSpec("signal", "INT64", (-1, 5)),
            TensorSpec("sensor", "FP32", (-1, 2, 2)),
        ),
        (
            TensorSpec("tag_out", "BYTES", (-1,)),
            TensorSpec("signal_sum", "INT64", (-1,)),
            TensorSpec("sensor_twice", "FP32", (-1, 2, 2)),
        ),
        {
            "tag": np.array([["a"]]),
            "signal": np.arange(5, dtype=np.int64).reshape(1, 1, 5),
            "sensor": np.ones((1, 1, 2, 2), np.float32),
        },
    )


def echo_bytes(directory: Path) -> LoadedModel:
    """A string model whose output's name ends in ``_bytes``: answered as ``{"b64": ...}``."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["image_bytes"])],
        "echo",
        [helper.make_tensor_value_info("image", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("image_bytes", TensorProto.STRING, ["N"])],
    )
    return _bundle_dir(
        directory,
        graph,
        "echo",
        "1.0.0-rc.1",
        (TensorSpec("image", "BYTES", (-1,)),),
        (TensorSpec("image_bytes", "BYTES", (-1,)),),
        {"image": np.array([["x"]])},
    )


def pairs(directory: Path) -> LoadedModel:
    """x float32 [-1, 1, 2] → y = x + 1 (the documentation's "2 tensors each of [1, 2]")."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "pairs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 2])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    return _bundle_dir(
        directory,
        graph,
        "pairs",
        "1.2.0",
        (TensorSpec("x", "FP32", (-1, 1, 2)),),
        (TensorSpec("y", "FP32", (-1, 1, 2)),),
        {"x": np.zeros((1, 1, 1, 2), np.float32)},
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("tfs")
    return {
        "half_plus_three": half_plus_three(root / "hpt"),
        "sensors": tag_signal_sensor(root / "tss"),
        "echo": echo_bytes(root / "echo"),
        "pairs": pairs(root / "pairs"),
    }


def _index(models: dict[str, LoadedModel]) -> list[IndexEntry]:
    entries = [IndexEntry(n, m.version, READY, "") for n, m in models.items()]
    entries.append(IndexEntry("pairs", "1.1.0", UNAVAILABLE, "previous version, kept for rollback"))
    return entries


@pytest.fixture
def server(models: dict[str, LoadedModel]) -> Iterator[InferenceServer]:
    registry = ModelRegistry()
    for model in models.values():
        registry.activate(model)
    with serving(
        registry,
        max_body_bytes=256 * 1024,
        max_json_bytes=128 * 1024,
        repository=lambda: _index(models),
    ) as running:
        yield running


def http(
    server: InferenceServer, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request, its body sent as these exact bytes: (status, headers, body bytes)."""
    connection = StdlibUnixConnection(server.socket_path)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        connection.close()


def call(
    server: InferenceServer, method: str, path: str, body: bytes | None = None
) -> tuple[int, Any]:
    status, _, payload = http(server, method, path, body)
    return status, json.loads(payload)


# ------------------------------------------------------------------ the documentation's examples


def test_model_status_example(server: InferenceServer) -> None:
    """``curl http://localhost:8501/v1/models/half_plus_three`` (version 123: ours is 0.0.123)."""
    status, headers, body = http(server, "GET", "/v1/models/half_plus_three")
    documented = """{
 "model_version_status": [
  {
   "version": "123",
   "state": "AVAILABLE",
   "status": {
    "error_code": "OK",
    "error_message": ""
   }
  }
 ]
}"""
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads(documented)
    assert call(server, "GET", "/v1/models/half_plus_three/versions/123") == (
        200,
        json.loads(documented),
    )
    assert call(server, "GET", "/v1/models/half_plus_three/versions/0.0.123")[0] == 200


def test_predict_example(server: InferenceServer) -> None:
    """``curl -d '{"instances": [1.0,2.0,5.0]}' -X POST .../half_plus_three:predict``."""
    status, headers, body = http(
        server, "POST", "/v1/models/half_plus_three:predict", b'{"instances": [1.0,2.0,5.0]}'
    )
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == json.loads('{\n    "predictions": [3.5, 4.0, 5.5]\n}')
    assert body == b'{"predictions":[3.5,4.0,5.5]}'
    # The same on the versioned URL, and in the columnar format.
    assert call(
        server,
        "POST",
        "/v1/models/half_plus_three/versions/123:predict",
        b'{"instances": [1.0,2.0,5.0]}',
    ) == (200, {"predictions": [3.5, 4.0, 5.5]})
    assert call(
        server, "POST", "/v1/models/half_plus_three:predict", b'{"inputs": [1.0,2.0,5.0]}'
    ) == (200, {"outputs": [3.5, 4.0, 5.5]})


def test_regress_example_is_not_implemented(server: InferenceServer) -> None:
    """The documentation's ``:regress`` call: a clear 501 here (one signature per model)."""
    status, headers, body = http(
        server,
        "POST",
        "/v1/models/half_plus_three:regress",
        b'{"signature_name": "tensorflow/serving/regress", "examples": [{"x": 1.0}, {"x": 2.0}]}',
    )
    assert status == 501
    assert headers["content-type"] == "application/json"
    assert "serving_default" in json.loads(body)["error"]
    assert call(server, "POST", "/v1/models/half_plus_three:classify", b"{}")[0] == 501


def test_not_found_example(server: InferenceServer) -> None:
    """``curl -i -d '{"instances": [1.0,5.0]}' -X POST .../v1/models/half:predict``."""
    status, headers, body = http(
        server, "POST", "/v1/models/half:predict", b'{"instances": [1.0,5.0]}'
    )
    assert status == 404
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error.startswith("Servable not found for request: Latest(half)")
    assert "half_plus_three" in error  # and what this device does serve


def test_single_input_instance_examples(server: InferenceServer) -> None:
    """ "List of 3 scalar tensors" and "List of 2 tensors each of [1, 2] shape"."""
    assert call(
        server, "POST", "/v1/models/echo:predict", b'{\n  "instances": [ "foo", "bar", "baz" ]\n}'
    ) == (
        200,
        {"predictions": [{"b64": "Zm9v"}, {"b64": "YmFy"}, {"b64": "YmF6"}]},
    )
    assert call(
        server, "POST", "/v1/models/pairs:predict", b'{\n  "instances": [ [[1, 2]], [[3, 4]] ]\n}'
    ) == (200, {"predictions": [[[2.0, 3.0]], [[4.0, 5.0]]]})


SENSORS_ROW = b"""{
 "instances": [
   {
     "tag": "foo",
     "signal": [1, 2, 3, 4, 5],
     "sensor": [[1, 2], [3, 4]]
   },
   {
     "tag": "bar",
     "signal": [3, 4, 1, 2, 5]],
     "sensor": [[4, 5], [6, 8]]
   }
 ]
}"""

SENSORS_COLUMNAR = b"""{
 "inputs": {
   "tag": ["foo", "bar"],
   "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
   "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]
 }
}"""


def test_multiple_named_inputs_examples(server: InferenceServer) -> None:
    """The row example as printed (its stray ``]`` makes it invalid JSON: a 400 naming
    that), then corrected; and the columnar example. Same tensors, same answers."""
    status, document = call(server, "POST", "/v1/models/sensors:predict", SENSORS_ROW)
    assert status == 400
    assert "not valid JSON" in document["error"]
    fixed = SENSORS_ROW.replace(b"[3, 4, 1, 2, 5]],", b"[3, 4, 1, 2, 5],")
    status, document = call(server, "POST", "/v1/models/sensors:predict", fixed)
    assert status == 200
    assert document == {
        "predictions": [
            {"tag_out": "foo", "signal_sum": 15, "sensor_twice": [[2.0, 4.0], [6.0, 8.0]]},
            {"tag_out": "bar", "signal_sum": 15, "sensor_twice": [[8.0, 10.0], [12.0, 16.0]]},
        ]
    }
    status, document = call(server, "POST", "/v1/models/sensors:predict", SENSORS_COLUMNAR)
    assert status == 200
    assert document == {
        "outputs": {
            "tag_out": ["foo", "bar"],
            "signal_sum": [15, 15],
            "sensor_twice": [[[2.0, 4.0], [6.0, 8.0]], [[8.0, 10.0], [12.0, 16.0]]],
        }
    }


def test_binary_values_example(server: InferenceServer) -> None:
    """``{ "b64": "aW1hZ2UgYnl0ZXM=" }`` in, and back out of an output named ``*_bytes``."""
    body = (
        b'{"instances": [{ "b64": "aW1hZ2UgYnl0ZXM=" }, { "b64": "YXdlc29tZSBpbWFnZSBieXRlcw==" }]}'
    )
    assert call(server, "POST", "/v1/models/echo:predict", body) == (
        200,
        {"predictions": [{"b64": "aW1hZ2UgYnl0ZXM="}, {"b64": "YXdlc29tZSBpbWFnZSBieXRlcw=="}]},
    )


def test_non_finite_floats_pass_both_ways(server: InferenceServer) -> None:
    """The JSON conformance section: NaN and Infinity tokens are accepted and answered."""
    status, _, body = http(
        server, "POST", "/v1/models/half_plus_three:predict", b'{"instances": [1.0, NaN, Infinity]}'
    )
    assert status == 200
    assert body == b'{"predictions":[3.5,NaN,Infinity]}'


def test_metadata_is_the_signature_def(server: InferenceServer) -> None:
    status, document = call(server, "GET", "/v1/models/half_plus_three/metadata")
    assert status == 200
    assert document == {
        "model_spec": {"name": "half_plus_three", "signature_name": "", "version": "123"},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    "serving_default": {
                        "inputs": {
                            "x": {
                                "dtype": "DT_FLOAT",
                                "tensor_shape": {
                                    "dim": [{"size": "-1", "name": ""}],
                                    "unknown_rank": False,
                                },
                                "name": "x",
                            }
                        },
                        "outputs": {
                            "y": {
                                "dtype": "DT_FLOAT",
                                "tensor_shape": {
                                    "dim": [{"size": "-1", "name": ""}],
                                    "unknown_rank": False,
                                },
                                "name": "y",
                            }
                        },
                        "method_name": "tensorflow/serving/predict",
                    }
                }
            }
        },
    }
    status, document = call(server, "GET", "/v1/models/sensors/versions/2001000/metadata")
    inputs = document["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert status == 200
    assert {n: t["dtype"] for n, t in inputs.items()} == {
        "tag": "DT_STRING",
        "signal": "DT_INT64",
        "sensor": "DT_FLOAT",
    }
    assert [d["size"] for d in inputs["sensor"]["tensor_shape"]["dim"]] == ["-1", "2", "2"]


def test_status_lists_every_version_held(server: InferenceServer) -> None:
    assert call(server, "GET", "/v1/models/pairs") == (
        200,
        {
            "model_version_status": [
                {
                    "version": "1002000",
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                },
                {
                    "version": "1001000",
                    "state": "END",
                    "status": {
                        "error_code": "OK",
                        "error_message": "previous version, kept for rollback",
                    },
                },
            ]
        },
    )
    # A pre-release has no integer: it is named by its semver text.
    status, document = call(server, "GET", "/v1/models/echo/versions/1.0.0-rc.1")
    assert status == 200
    assert document["model_version_status"][0]["version"] == "1.0.0-rc.1"


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path", "body", "expected", "says"),
    [
        (
            "POST",
            "/v1/models/half_plus_three:predict",
            b'{"instances": [1.0,',
            400,
            "not valid JSON",
        ),
        ("POST", "/v1/models/half_plus_three:predict", b"[1.0]", 400, "JSON object"),
        (
            "POST",
            "/v1/models/half_plus_three:predict",
            b'{"instances": [[1.0]]}',
            400,
            "shape expected [-1]",
        ),
        ("POST", "/v1/models/pairs:predict", b'{"instances": [[[1, 2]], [[3]]]}', 400, "ragged"),
        (
            "POST",
            "/v1/models/pairs:predict",
            b'{"instances": [[[1, 2, 3]], [[3, 4, 5]]]}',
            400,
            "shape expected",
        ),
        ("POST", "/v1/models/half_plus_three:predict", b'{"instances": []}', 400, "non-empty"),
        (
            "POST",
            "/v1/models/half_plus_three:predict",
            b'{"instances": [1], "inputs": [1]}',
            400,
            "not both",
        ),
        (
            "POST",
            "/v1/models/half_plus_three:predict",
            b'{"signature_name": "serving_default"}',
            400,
            "missing",
        ),
        (
            "POST",
            "/v1/models/half_plus_three:predict",
            b'{"signature_name": "x", "instances": [1]}',
            400,
            "signature",
        ),
        (
            "POST",
            "/v1/models/half_plus_three:predict",
            b'{"examples": [{"x": 1}]}',
            400,
            "unknown field",
        ),
        ("POST", "/v1/models/half_plus_three:predict", b'{"instances": ["a"]}', 400, "numbers"),
        (
            "POST",
            "/v1/models/half_plus_three:predict",
            b'{"instances": [{"b64": "AA=="}]}',
            400,
            "b64",
        ),
        ("POST", "/v1/models/echo:predict", b'{"instances": [{"b64": "%%%"}]}', 400, "not base64"),
        ("POST", "/v1/models/echo:predict", b'{"instances": [{"b64": "/w=="}]}', 400, "UTF-8"),
        ("POST", "/v1/models/sensors:predict", b'{"instances": [1, 2]}', 400, "3 inputs"),
        ("POST", "/v1/models/sensors:predict", b'{"inputs": {"tag": ["a"]}}', 400, "missing"),
        ("POST", "/v1/models/sensors:predict", b'{"instances": [{"tag": "a"}, 3]}', 400, "mix"),
        (
            "POST",
            "/v1/models/half_plus_three/versions/7:predict",
            b'{"instances": [1]}',
            404,
            "Specific(half_plus_three, 7)",
        ),
        ("GET", "/v1/models/half_plus_three/versions/7", None, 404, "Could not find version 7"),
        ("GET", "/v1/models/nope", None, 404, "Could not find any versions of model nope"),
        ("GET", "/v1/models/nope/metadata", None, 404, "Servable not found"),
        ("GET", "/v1/models/half_plus_three/labels/stable", None, 404, "labels are not supported"),
        ("GET", "/v1/models/half_plus_three:predict", None, 405, "use POST"),
        ("POST", "/v1/models/half_plus_three", b"{}", 405, "use GET"),
        ("POST", "/v1/models/half_plus_three:explain", b"{}", 404, "no such endpoint"),
        ("GET", "/v1/other", None, 404, "/v1/models/<name>"),
    ],
)
def test_bad_requests_get_a_4xx_with_an_error(
    server: InferenceServer, method: str, path: str, body: bytes | None, expected: int, says: str
) -> None:
    status, headers, payload = http(server, method, path, body)
    assert status == expected, payload
    assert headers["content-type"] == "application/json"
    assert says in json.loads(payload)["error"]


def test_too_large_bodies_get_413(server: InferenceServer) -> None:
    values = ",".join(["1.5"] * 40_000)  # ~160 kB: past max_json_bytes (128 kB)
    status, document = call(
        server,
        "POST",
        "/v1/models/half_plus_three:predict",
        f'{{"instances": [{values}]}}'.encode(),
    )
    assert status == 413
    assert "max_json_bytes" in document["error"]
    values = ",".join(["1.5"] * 80_000)  # ~320 kB: past max_body_bytes (256 kB)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(server.socket_path))
        body = f'{{"instances": [{values}]}}'.encode()
        sock.sendall(
            b"POST /v1/models/half_plus_three:predict HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        ((status, _, payload),) = read_responses(sock, 1)
    finally:
        sock.close()
    assert status == 413
    assert "error" in json.loads(payload)


def test_a_header_length_does_not_bypass_the_json_limit(server: InferenceServer) -> None:
    """Inference-Header-Content-Length means nothing to a TensorFlow Serving request: its
    whole body is JSON, counted against max_json_bytes."""
    values = ",".join(["1.5"] * 40_000)
    connection = StdlibUnixConnection(server.socket_path)
    try:
        connection.request(
            "POST",
            "/v1/models/half_plus_three:predict",
            body=f'{{"instances": [{values}]}}'.encode(),
            headers={"Inference-Header-Content-Length": "10"},
        )
        response = connection.getresponse()
        assert response.status == 413
        response.read()
    finally:
        connection.close()


# ------------------------------------------------------------------------------ one path inside


def test_a_tfs_request_moves_the_same_counters_as_an_oip_one(
    server: InferenceServer, models: dict[str, LoadedModel]
) -> None:
    """Statistics (what probation reads), Prometheus metrics and Triton's statistics: one
    OIP request, then one TensorFlow Serving request; each moves every counter the same."""
    stats = server.stats

    def figures() -> tuple[Any, ...]:
        snap = stats.snapshot("half_plus_three", "0.0.123")
        execution = stats.execution("half_plus_three", "0.0.123")
        text = server.metrics.render().decode()
        line = [
            ln
            for ln in text.splitlines()
            if ln.startswith("edge_agent_infer_requests_total{") and '"half_plus_three"' in ln
        ]
        errors = sorted(
            ln
            for ln in text.splitlines()
            if ln.startswith("edge_agent_infer_errors_total{") and '"half_plus_three"' in ln
        )
        return (
            snap.requests,
            snap.errors,
            snap.client_errors,
            execution.success,
            execution.fail,
            line,
            errors,
        )

    before = figures()
    with InferenceClient(server.socket_path, timeout_s=10) as client:
        client.infer("half_plus_three", {"x": np.array([1.0, 2.0], np.float32)})
    after_oip = figures()
    assert (
        call(server, "POST", "/v1/models/half_plus_three:predict", b'{"instances": [1.0, 2.0]}')[0]
        == 200
    )
    after_tfs = figures()
    assert after_oip[:5] == (before[0] + 1, before[1], before[2], before[3] + 1, before[4])
    assert after_tfs[:5] == (
        after_oip[0] + 1,
        after_oip[1],
        after_oip[2],
        after_oip[3] + 1,
        after_oip[4],
    )
    assert after_tfs[5] != after_oip[5] != before[5]  # the requests counter moved each time
    # A client error counts as one for each dialect too.
    with (
        InferenceClient(server.socket_path, timeout_s=10) as client,
        pytest.raises(InvalidRequestError),
    ):
        client.infer("half_plus_three", {"x": np.array([[1.0]], np.float32)})
    after_oip_error = figures()
    assert (
        call(server, "POST", "/v1/models/half_plus_three:predict", b'{"instances": ["x"]}')[0]
        == 400
    )
    after_tfs_error = figures()
    # Both 400s are refused while parsing, inside admission: one client error each.
    assert after_oip_error[2] == after_tfs[2] + 1
    assert after_tfs_error[2] == after_oip_error[2] + 1
    assert after_oip_error[4] == after_tfs[4] + 1 and after_tfs_error[4] == after_oip_error[4] + 1
    assert server.admitted == 0


def test_a_repeated_url_takes_the_remembered_route(server: InferenceServer) -> None:
    """The second request on a URL skips parsing its path; the answer is the same, and
    a model or version gone in between is still a 404 (not a stale route)."""
    for _ in range(3):
        assert call(
            server, "POST", "/v1/models/half_plus_three:predict", b'{"instances": [1.0]}'
        ) == (
            200,
            {"predictions": [3.5]},
        )
    for _ in range(2):
        assert (
            call(
                server,
                "POST",
                "/v1/models/half_plus_three/versions/9:predict",
                b'{"instances": [1.0]}',
            )[0]
            == 404
        )


# ---------------------------------------------------------------------------- pure parts


def test_versions_map_to_integers_in_semver_order() -> None:
    assert tfs_version("1.2.0") == 1_002_000
    assert tfs_version("0.0.123") == 123
    assert tfs_version("12.999.999") == 12_999_999
    assert tfs_version("1.1000.0") is None
    assert tfs_version("2.0.0-rc.1") is None
    assert tfs_version("2.0.0+build.5") is None
    ordered = ["0.0.1", "0.1.0", "0.9.999", "1.0.0", "1.2.3", "10.0.0"]
    numbers = [tfs_version(v) for v in ordered]
    assert numbers == sorted(n for n in numbers if n is not None)
    assert version_text("1.2.0") == "1002000" and version_text("1.0.0-rc.1") == "1.0.0-rc.1"
    assert names_version("1002000", "1.2.0") and names_version("1.2.0", "1.2.0")
    assert not names_version("1002001", "1.2.0") and not names_version("x", "1.2.0")
    assert model_status([("1.2.0", "AVAILABLE", "")]) == {
        "model_version_status": [
            {
                "version": "1002000",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


def test_nested_lists_are_read_only_when_regular() -> None:
    def read(text: bytes) -> list[int] | None:
        array = nested_tensor_from_json_text("FP32", text, 0, len(text))
        return None if array is None else list(array.shape)

    assert read(b"[1, 2, 3]") == [3]
    assert read(b"[[1, 2], [3, 4], [5, 6]]") == [3, 2]
    assert read(b"[[[1, 2]], [[3, 4]]]") == [2, 1, 2]
    assert read(b"[[1, 2], [3], [4, 5, 6]]") is None  # ragged, the count of [3, 2]
    assert read(b"[[1, [2]], [3, 4]]") is None  # a list among the values
    assert read(b"[[1, 2], 3]") is None
    assert read(b"[[], []]") is None
    assert read(b"[1, 2") is None
    assert read(b'[1, "a"]') is None
    # Past the first 64 KiB the brackets are still all counted: a list among the values
    # of the last row is found.
    rows = ", ".join(["[1.5, 2.5]"] * 20_000)
    assert read(f"[{rows}]".encode()) == [20_000, 2]
    assert read(f"[{rows[:-5]}[2.5]]]".encode()) is None
    with tempfile.TemporaryFile() as file:  # as the server may hold a large body
        file.write(b"  [[1, 2], [3, 4]]  [[1, [2]], [3, 4]]")
        file.flush()
        with mmap.mmap(file.fileno(), 0) as mapped:
            got = nested_tensor_from_json_text("FP32", mapped, 2, 18)
            assert got is not None and got.tolist() == [[1.0, 2.0], [3.0, 4.0]]
            assert nested_tensor_from_json_text("INT32", mapped, 20, 38) is None


def _manifest(shape: tuple[int, ...], datatype: str = "FP32") -> Manifest:
    return Manifest(
        name="m",
        version="1.0.0",
        inputs=(TensorSpec("x", datatype, shape),),
        outputs=(TensorSpec("y", datatype, shape),),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=0.0, atol=0.0),
        members={},
    )


@pytest.mark.parametrize("key", ["instances", "inputs"])
def test_large_bodies_take_the_fast_path_to_the_same_arrays(key: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 3, 32)).astype(np.float32)
    body = json.dumps({"signature_name": "serving_default", key: x.tolist()}).encode()
    assert len(body) > 16 * 1024
    parsed = parse_predict(body, _manifest((-1, 3, 32)))
    assert _parse_fast(body, _manifest((-1, 3, 32))) is not None  # (it did take it)
    assert parsed.row == (key == "instances")
    np.testing.assert_array_equal(parsed.inputs["x"], x)
    # As the server hands a large body over: a buffer, not bytes.
    from_buffer = parse_predict(memoryview(bytearray(body)), _manifest((-1, 3, 32)))
    np.testing.assert_array_equal(from_buffer.inputs["x"], x)
    ints = rng.integers(-1000, 1000, size=(700, 4))
    got = parse_predict(json.dumps({key: ints.tolist()}).encode(), _manifest((-1, 4), "INT32"))
    np.testing.assert_array_equal(got.inputs["x"], ints.astype(np.int32))
    assert got.inputs["x"].dtype == np.int32


def test_large_bodies_the_fast_path_cannot_take_get_the_plain_answer() -> None:
    rows = [[1.0, 2.0, 3.0]] * 2000
    ragged = json.dumps({"instances": [*rows, [1.0, 2.0]]}).encode()
    with pytest.raises(InvalidRequestError, match="ragged"):
        parse_predict(ragged, _manifest((-1, 3)))
    floats_for_ints = json.dumps({"instances": rows}).encode()
    with pytest.raises(InvalidRequestError, match="integers"):
        parse_predict(floats_for_ints, _manifest((-1, 3), "INT32"))
    wrong_shape = json.dumps({"instances": rows}).encode()
    with pytest.raises(InvalidRequestError, match=r"shape expected \[-1, 4\]"):
        parse_predict(wrong_shape, _manifest((-1, 4)))
    tricky = json.dumps({"instances": rows, "signature_name": "serving_default"}).encode()
    assert _parse_fast(tricky, _manifest((-1, 3))) is not None
    bracket_in_string = tricky.replace(b'"serving_default"', b'"a]b"')
    with pytest.raises(InvalidRequestError, match="signature 'a]b' not found"):
        parse_predict(bracket_in_string, _manifest((-1, 3)))
    two_lists = json.dumps({"inputs": rows, "instances": rows}).encode()
    with pytest.raises(InvalidRequestError, match="not both"):
        parse_predict(two_lists, _manifest((-1, 3)))
    with_nan = b'{"instances": [' + b",".join([b"[1.0, NaN, 2.0]"] * 2000) + b"]}"
    assert np.isnan(parse_predict(with_nan, _manifest((-1, 3))).inputs["x"][:, 1]).all()


def test_row_answers_need_a_shared_batch_axis() -> None:
    outputs = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3,), np.float32)}
    with pytest.raises(InvalidRequestError, match="columnar"):
        encode_predict(outputs, row=True)
    assert json.loads(encode_predict(outputs, row=False)) == {
        "outputs": {"a": [[0.0] * 3] * 2, "b": [0.0] * 3}
    }


def test_a_candidate_in_shadow_gets_copies_and_drift_counts_tfs_requests(tmp_path: Path) -> None:
    """A TensorFlow Serving request is offered to a candidate in shadow and counted in the
    serving version's drift sketch, as an OIP request is."""
    import dataclasses

    from agent.contracts.reference import Histogram, Reference
    from agent.runtime.drift import DriftSketch
    from agent.runtime.shadow import ShadowRunner
    from tests.agent._model_dir import make_model_dir
    from tests.e2e_support import wait_until
    from tests.helpers import make_linear_model

    def linear(version: str, seed: int) -> LoadedModel:
        onnx_path = make_linear_model(tmp_path / f"linear-{version}.onnx", seed=seed)
        return load_model(*make_model_dir(tmp_path / version, onnx_path, version=version))

    sketch = DriftSketch(
        Reference(100, {"y": Histogram("classes", (1 / 3, 1 / 3, 1 / 3))}, {}), half_window=10**9
    )
    live = dataclasses.replace(linear("1.0.0", 1), drift=sketch)
    candidate = linear("2.0.0", 4)
    registry = ModelRegistry()
    registry.activate(live)
    runner = ShadowRunner(candidate, "1.0.0", 1.0)
    registry.set_shadow("linear", runner)
    rng = np.random.default_rng(7)
    frames = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(8)]
    try:
        with serving(registry) as server:
            for index, x in enumerate(frames):
                body = json.dumps({"instances" if index % 2 else "inputs": x.tolist()}).encode()
                status, document = call(server, "POST", "/v1/models/linear:predict", body)
                assert status == 200
                got = document["predictions" if index % 2 else "outputs"]
                np.testing.assert_allclose(got, live.infer({"x": x})["y"], rtol=1e-6)
                assert runner.wait_idle(10.0)
            f = runner.figures()
            assert (f.samples, f.errors, f.dropped, f.top1_rows) == (8, 0, 0, 24)
            wait_until(lambda: sketch.figures().samples == 24 or None, 10, "the drift count")
    finally:
        registry.set_shadow("linear", None)
        runner.close()


# ---------------------------------------------------------------------------- hostile bodies

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=4)
    | st.just({"b64": "AA=="}),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=16,
)
_keys = st.sampled_from(["instances", "inputs", "signature_name", "examples", "x", "tag", "b64"])


@st.composite
def _big_nested(draw: st.DrawFn) -> bytes:
    """A body past the fast path's threshold: nested numbers, sometimes ragged or with a
    stray token, under instances or inputs."""
    rows = draw(st.integers(1, 3000))
    width = draw(st.sampled_from([1, 2, 4, 5]))
    row = "[" + ", ".join(["1.5"] * width) + "]"
    items = [row] * rows
    spoil = draw(st.sampled_from(["", "ragged", "deeper", "string", "nan", "int"]))
    if spoil == "ragged":
        items[-1] = "[1.5]"
    elif spoil == "deeper":
        items[0] = "[[1.5], " + ", ".join(["1.5"] * (width - 1)) + "]" if width > 1 else "[[1.5]]"
    elif spoil == "string":
        items[rows // 2] = '["a"' + ", 1.5" * (width - 1) + "]"
    elif spoil == "nan":
        items[0] = "[" + ", ".join(["NaN"] * width) + "]"
    elif spoil == "int":
        items = ["[" + ", ".join(["7"] * width) + "]"] * rows
    key = draw(st.sampled_from(["instances", "inputs"]))
    return f'{{"{key}": [{", ".join(items)}]}}'.encode()


@st.composite
def _hostile(draw: st.DrawFn) -> tuple[str, str, bytes]:
    model = draw(st.sampled_from(["half_plus_three", "sensors", "echo", "pairs", "nope"]))
    version = draw(
        st.sampled_from(["", "/versions/123", "/versions/2001000", "/versions/x", "/labels/a"])
    )
    verb = draw(st.sampled_from([":predict", ":predict", ":regress", "", "/metadata", ":x"]))
    method = "GET" if verb in ("", "/metadata") and draw(st.booleans()) else "POST"
    kind = draw(st.sampled_from(["document", "big", "garbage"]))
    if kind == "document":
        body = json.dumps(
            draw(st.dictionaries(_keys, _values, max_size=3)), allow_nan=True
        ).encode()
    elif kind == "big":
        body = draw(_big_nested())
    else:
        body = draw(st.binary(max_size=64))
    return method, f"/v1/models/{model}{version}{verb}", body


def test_hostile_tfs_requests_never_get_a_5xx(
    server: InferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    """1,500 hostile TensorFlow Serving requests (random documents, large nested bodies
    spoiled in one place, garbage) on one keep-alive connection: never a 5xx (but the
    501 of ``:regress``), always an ``{"error"}`` body on an error, and no unexpected
    error in the log."""
    connection = StdlibUnixConnection(server.socket_path)
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(st.lists(_hostile(), min_size=50, max_size=50))
    def batch(requests: list[tuple[str, str, bytes]]) -> None:
        for method, path, body in requests:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            payload = response.read()
            statuses[response.status] += 1
            allowed = 501 if path.endswith(":regress") else 499  # the one 5xx: on purpose
            assert response.status <= allowed, (path, body[:200], payload)
            if response.status >= 400:
                assert isinstance(json.loads(payload)["error"], str)

    try:
        with caplog.at_level(logging.ERROR):
            batch()
    finally:
        connection.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum(statuses.values()) == 1500
    assert statuses[200] and statuses[400] and statuses[404]


def test_a_tfs_request_is_refused_by_admission_as_an_oip_one(
    models: dict[str, LoadedModel],
) -> None:
    """While the agent is not ready, both dialects get 503 with Retry-After, and each is
    counted once as refused (statistics) and as a not_ready error (metrics)."""
    registry = ModelRegistry()
    registry.activate(models["half_plus_three"])
    with serving(registry, is_ready=lambda: False) as server:
        status, headers, body = http(
            server, "POST", "/v1/models/half_plus_three:predict", b'{"instances": [1.0]}'
        )
        assert status == 503 and headers["retry-after"] == "1"
        assert "not ready" in json.loads(body)["error"]
        after_tfs = server.stats.execution("half_plus_three", "0.0.123").fail
        oip = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}'
        assert http(server, "POST", "/v2/models/half_plus_three/infer", oip)[0] == 503
        after_oip = server.stats.execution("half_plus_three", "0.0.123").fail
        text = server.metrics.render().decode()
    assert (after_tfs, after_oip) == (1, 2)
    errors = [
        line
        for line in text.splitlines()
        if line.startswith("edge_agent_infer_errors_total{") and 'kind="not_ready"' in line
    ]
    assert len(errors) == 1 and errors[0].endswith(" 2.0"), errors
