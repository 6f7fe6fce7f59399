"""agent.client: the socket client against a real server, and input files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.client import AgentUnreachableError, InferenceClient, load_input_file
from agent.errors import InvalidRequestError
from agent.runtime import ModelRegistry, load_model
from agent.server import InferenceServer
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import ServerThread, short_socket_dir

X = np.array([[0.5, -1.0, 2.0, 0.0]], dtype=np.float32)
ONE_INPUT = {
    "name": "linear",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}
TWO_INPUTS = {
    "name": "pair",
    "inputs": [
        {"name": "a", "datatype": "INT64", "shape": [-1]},
        {"name": "b", "datatype": "BYTES", "shape": [-1]},
    ],
    "outputs": [],
}


def test_client_reconnects_once_after_the_server_restarts(
    tmp_path: Path, linear_model: Path
) -> None:
    registry = ModelRegistry()
    registry.activate(load_model(*make_model_dir(tmp_path / "v1", linear_model)))
    directory = short_socket_dir()
    path = directory / "infer.sock"
    client = InferenceClient(path, timeout_s=10)
    assert client.live() is False and client.ready() is False
    with pytest.raises(AgentUnreachableError, match="cannot connect"):
        client.server_metadata()

    first = ServerThread(InferenceServer(registry, path))
    first.start()
    before = client.infer("linear", {"x": X})["y"]
    first.stop()  # closes the client's kept-alive connection
    first.close()
    second = ServerThread(InferenceServer(registry, path))
    second.start()
    try:
        np.testing.assert_array_equal(client.infer("linear", {"x": X})["y"], before)
        assert client.live()
    finally:
        client.close()
        second.stop()
        second.close()
        directory.rmdir()


def test_npy_is_the_single_input_cast_to_its_datatype(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", X.astype(np.float64))
    got = load_input_file(tmp_path / "x.npy", ONE_INPUT)
    assert list(got) == ["x"] and got["x"].dtype == np.float32
    np.testing.assert_array_equal(got["x"], X)
    with pytest.raises(InvalidRequestError, match=r"model has inputs \['a', 'b'\]"):
        load_input_file(tmp_path / "x.npy", TWO_INPUTS)


def test_npz_gives_arrays_by_input_name(tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", a=np.array([1, 2], np.int32), b=np.array(["p", "q"]))
    got = load_input_file(tmp_path / "in.npz", TWO_INPUTS)
    assert got["a"].dtype == np.int64 and got["a"].tolist() == [1, 2]
    assert got["b"].dtype == object and got["b"].tolist() == ["p", "q"]
    np.savez(tmp_path / "short.npz", a=np.array([1]))
    with pytest.raises(InvalidRequestError, match=r"missing \['b'\]"):
        load_input_file(tmp_path / "short.npz", TWO_INPUTS)


def test_json_by_name_or_as_an_oip_body(tmp_path: Path) -> None:
    (tmp_path / "named.json").write_text(json.dumps({"x": X.tolist()}))
    got = load_input_file(tmp_path / "named.json", ONE_INPUT)
    assert got["x"].dtype == np.float32 and got["x"].shape == (1, 4)
    np.testing.assert_array_equal(got["x"], X)

    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    (tmp_path / "oip.json").write_text(json.dumps(body))
    got = load_input_file(tmp_path / "oip.json", ONE_INPUT)
    assert got["x"].shape == (1, 4) and got["x"].dtype == np.float32

    (tmp_path / "floats.json").write_text(json.dumps({"a": [1.5], "b": ["s"]}))
    with pytest.raises(InvalidRequestError, match="input 'a' expects INT64, got float64"):
        load_input_file(tmp_path / "floats.json", TWO_INPUTS)
    (tmp_path / "other.json").write_text(json.dumps({"z": [1, 2, 3, 4]}))
    with pytest.raises(InvalidRequestError, match=r"missing \['x'\], unknown \['z'\]"):
        load_input_file(tmp_path / "other.json", ONE_INPUT)


def test_unknown_extension_and_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("1,2,3,4")
    with pytest.raises(InvalidRequestError, match=r"unknown input file type '\.csv'"):
        load_input_file(tmp_path / "x.csv", ONE_INPUT)
    with pytest.raises(InvalidRequestError, match="cannot read input file"):
        load_input_file(tmp_path / "absent.npy", ONE_INPUT)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(InvalidRequestError, match="cannot read input file"):
        load_input_file(tmp_path / "bad.json", ONE_INPUT)


@pytest.mark.parametrize("how", [[], ["--json"], ["--shm"]], ids=["binary", "json", "shm"])
def test_edge_agent_infer_command(
    tmp_path: Path, linear_model: Path, how: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main
    from tests.agent._serving import serving

    registry = ModelRegistry()
    model = load_model(*make_model_dir(tmp_path / "v1", linear_model))
    registry.activate(model)
    np.save(tmp_path / "x.npy", X.astype(np.float64))  # cast to the model's FP32
    with serving(registry) as server:
        argv = ["infer", "linear", "--input", str(tmp_path / "x.npy"), "--socket"]
        assert main([*argv, str(server.socket_path), *how]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["y"]["shape"] == [1, 3] and printed["y"]["dtype"] == "float32"
        np.testing.assert_allclose(printed["y"]["data"], model.infer({"x": X})["y"], rtol=1e-6)
        assert main([*argv, str(server.socket_path), "--version", "9.9.9", *how]) == 1
        assert "version '9.9.9' is not served" in capsys.readouterr().err
