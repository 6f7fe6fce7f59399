"""Triton's documents from the agent's values (pure), and the repository index's body
over the real socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contracts import GoldenSpec, Manifest, TensorSpec
from agent.runtime.loading import load_model
from agent.runtime.registry import ModelRegistry
from agent.runtime.stats import Execution
from agent.serving.server import InferenceServer
from agent.serving.triton import (
    IndexEntry,
    model_config,
    model_stat,
    repository_index,
    triton_datatype,
)
from tests.agent._model_dir import ALL_DATATYPES, make_model_dir
from tests.agent._serving import raw, serving


def test_datatypes_take_tritons_names() -> None:
    names = {dt: triton_datatype(dt) for dt in ALL_DATATYPES}
    assert names["FP32"] == "TYPE_FP32" and names["BYTES"] == "TYPE_STRING"
    assert names["BOOL"] == "TYPE_BOOL" and names["UINT64"] == "TYPE_UINT64"


def test_config_has_the_whole_shape_without_a_batcher() -> None:
    manifest = Manifest(
        name="cnn",
        version="3.1.0",
        inputs=(TensorSpec("image", "FP32", (1, 3, 224, 224)),),
        outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("name", "BYTES", (-1, 1))),
        opset=17,
        min_ort_version="1.17.0",
        golden=GoldenSpec(cases=1, rtol=1e-4, atol=1e-5),
        members={},
    )
    config = model_config(manifest)
    assert config["max_batch_size"] == 0 and config["platform"] == "onnxruntime_onnx"
    assert config["input"] == [
        {"name": "image", "data_type": "TYPE_FP32", "dims": [1, 3, 224, 224],
         "is_shape_tensor": False, "format": "FORMAT_NONE", "allow_ragged_batch": False,
         "optional": False},
    ]  # fmt: skip
    assert [(o["data_type"], o["dims"]) for o in config["output"]] == [
        ("TYPE_INT64", [-1]),
        ("TYPE_STRING", [-1, 1]),
    ]


def test_a_version_without_requests_has_zero_figures_and_no_batches() -> None:
    stat = model_stat("m", "1.0.0", Execution())
    assert stat["inference_count"] == stat["execution_count"] == stat["last_inference"] == 0
    assert all(d == {"count": 0, "ns": 0} for d in stat["inference_stats"].values())
    assert stat["batch_stats"] == []
    stat = model_stat("m", "1.0.0", Execution(2, 900, 1, 50, 2, 4, 6, 800, 10, 7))
    assert stat["inference_stats"]["queue"] == {"count": 2, "ns": 4}
    assert stat["inference_stats"]["fail"] == {"count": 1, "ns": 50}
    assert stat["batch_stats"] == [
        {"batch_size": 1, "compute_input": {"count": 2, "ns": 6},
         "compute_infer": {"count": 2, "ns": 800}, "compute_output": {"count": 2, "ns": 10}}
    ]  # fmt: skip


def test_index_is_sorted_and_filters_ready() -> None:
    entries = [IndexEntry("b", "1", "READY", ""), IndexEntry("a", "2", "LOADING", "installing")]
    assert [e["name"] for e in repository_index(entries, ready_only=False)] == ["a", "b"]
    assert repository_index(entries, ready_only=True) == [
        {"name": "b", "version": "1", "state": "READY", "reason": ""}
    ]


@pytest.fixture
def server(tmp_path: Path, linear_model: Path) -> Iterator[InferenceServer]:
    registry = ModelRegistry()
    registry.activate(load_model(*make_model_dir(tmp_path / "lin", linear_model)))
    with serving(registry) as running:
        yield running


def test_index_body_and_refusals_over_the_socket(server: InferenceServer) -> None:
    ready = [{"name": "linear", "version": "1.0.0", "state": "READY", "reason": ""}]
    assert raw(server, "POST", "/v2/repository/index") == (200, ready)
    assert raw(server, "POST", "/v2/repository/index", {"ready": True}) == (200, ready)
    status, body = raw(server, "POST", "/v2/repository/index", {"ready": "yes"})
    assert status == 400 and "ready to be true or false" in body["error"]
    status, body = raw(server, "POST", "/v2/repository/index", b"[")
    assert status == 400 and "not valid JSON" in body["error"]
    assert raw(server, "GET", "/v2/repository/index")[0] == 405
    status, body = raw(server, "POST", "/v2/repository/models/linear/load", {})
    assert status == 403 and "edgectl rollout" in body["error"]
    assert raw(server, "GET", "/v2/models/stats")[1]["model_stats"][0]["name"] == "linear"
    assert raw(server, "GET", "/v2/models/linear/config")[1]["name"] == "linear"
