"""agent.client.inference: the socket client against a real server, and input files."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.base.errors import InferenceError, InvalidRequestError
from agent.client.http import UnixHTTPConnection, _set_kernel_timeouts, parse_head
from agent.client.inference import AgentUnreachableError, InferenceClient, load_input_file
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import ServerThread, serving, short_socket_dir

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


@pytest.fixture
def model(tmp_path: Path, linear_model: Path) -> LoadedModel:
    """The linear model, loaded from a bundle folder."""
    return load_model(*make_model_dir(tmp_path / "v1", linear_model))


@pytest.fixture
def registry(model: LoadedModel) -> ModelRegistry:
    """A registry serving ``model``."""
    registry = ModelRegistry()
    registry.activate(model)
    return registry


def test_client_reconnects_once_after_the_server_restarts(registry: ModelRegistry) -> None:
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
    tmp_path: Path,
    registry: ModelRegistry,
    model: LoadedModel,
    how: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agent.cli import main

    np.save(tmp_path / "x.npy", X.astype(np.float64))  # cast to the model's FP32
    with serving(registry) as server:
        argv = ["infer", "linear", "--input", str(tmp_path / "x.npy"), "--socket"]
        assert main([*argv, str(server.socket_path), *how]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["y"]["shape"] == [1, 3] and printed["y"]["dtype"] == "float32"
        np.testing.assert_allclose(printed["y"]["data"], model.infer({"x": X})["y"], rtol=1e-6)
        assert main([*argv, str(server.socket_path), "--version", "9.9.9", *how]) == 1
        assert "version '9.9.9' is not served" in capsys.readouterr().err


# ---------------------------------------------------------------------------- per-call fast path


def test_repeated_signatures_send_each_call_s_data_and_results_stay_independent(
    registry: ModelRegistry, model: LoadedModel
) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(rows, 4)).astype(np.float32) for rows in (1, 3, 1, 3, 2)]
    with serving(registry) as server, InferenceClient(server.socket_path) as client:
        got = [client.infer("linear", {"x": x}) for x in batches]
        for x, result in zip(batches, got, strict=True):  # earlier results were not overwritten
            np.testing.assert_allclose(result["y"], model.infer({"x": x})["y"], rtol=1e-6)
        got[0]["y"][0, 0] = 42.0  # a result is the caller's own, writable memory
        assert got[2]["y"][0, 0] != 42.0
        fortran = np.asfortranarray(rng.normal(size=(3, 4)).astype(np.float32))
        strided = rng.normal(size=(3, 8)).astype(np.float32)[:, ::2]
        for value in (fortran, fortran, strided, strided.copy()):
            expected = model.infer({"x": value})["y"]
            got_y = client.infer("linear", {"x": value}, outputs=["y"])["y"]
            np.testing.assert_allclose(got_y, expected, rtol=1e-6)
        for request_id in ("a", None, "b"):
            got_y = client.infer("linear", {"x": batches[1]}, request_id=request_id)["y"]
            np.testing.assert_allclose(got_y, model.infer({"x": batches[1]})["y"], rtol=1e-6)
        with pytest.raises(InvalidRequestError, match="datatype expected FP32"):
            client.infer("linear", {"x": batches[0].astype(np.float64)})
        with pytest.raises(InvalidRequestError, match="datatype expected FP32"):
            client.infer("linear", {"x": batches[0].astype(np.float64)})  # remembered: same


def test_shared_memory_results_are_copies_of_the_region(
    registry: ModelRegistry, model: LoadedModel
) -> None:
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(3)]
    with (
        serving(registry) as server,
        SharedMemoryRegion(f"ef-client-{os.getpid()}", 1 << 12) as region,
        InferenceClient(server.socket_path) as client,
    ):
        client.register_shared_memory("r", region)
        got = [client.infer("linear", {"x": x}, shm=region)["y"] for x in batches]
        for x, y in zip(batches, got, strict=True):
            np.testing.assert_allclose(y, model.infer({"x": x})["y"], rtol=1e-6)
        np.testing.assert_allclose(  # shapes the region cannot hold come back as binary
            client.infer("linear", {"x": np.ones((200, 4), np.float32)}, shm=region)["y"],
            model.infer({"x": np.ones((200, 4), np.float32)})["y"],
            rtol=1e-6,
        )


def test_inputs_living_in_the_region_are_not_copied(
    registry: ModelRegistry, model: LoadedModel
) -> None:
    rng = np.random.default_rng(5)
    with (
        serving(registry) as server,
        SharedMemoryRegion(f"ef-client-{os.getpid()}-p", 1 << 12) as region,
        InferenceClient(server.socket_path) as client,
    ):
        client.register_shared_memory("r", region)
        sentinel = region.ndarray(0, np.uint8, (1024,))
        sentinel[:] = 0xAB  # where a copied input would go
        frame = region.ndarray(1024, np.float32, (2, 4))
        for _ in range(3):  # the first call builds the request, the others reuse it
            x = rng.normal(size=(2, 4)).astype(np.float32)
            frame[:] = x  # the application writes its input in place
            y = client.infer("linear", {"x": frame}, shm=region)["y"]
            np.testing.assert_allclose(y, model.infer({"x": x})["y"], rtol=1e-6)
        assert bool((sentinel == 0xAB).all())  # nothing was copied below the frame
        copied = rng.normal(size=(2, 4)).astype(np.float32)  # an input from elsewhere
        y = client.infer("linear", {"x": copied}, shm=region)["y"]
        np.testing.assert_allclose(y, model.infer({"x": copied})["y"], rtol=1e-6)
        del sentinel, frame


def test_spinning_on_the_response_gives_the_same_answers(
    registry: ModelRegistry, model: LoadedModel
) -> None:
    with (
        serving(registry) as server,
        InferenceClient(server.socket_path, spin_s=0.0005) as client,
    ):
        for _ in range(3):
            np.testing.assert_allclose(
                client.infer("linear", {"x": X})["y"], model.infer({"x": X})["y"], rtol=1e-6
            )
        assert client.live()


def test_response_heads_are_read_in_any_order_and_case() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12") == (200, 12, None, False)
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\nCONNECTION: Close\r\n"
        b"inference-header-CONTENT-length:  7 \r\ncontent-length:9\r\nContent-Length: 10"
    )
    assert parse_head(head) == (503, 10, 7, True)  # a repeated field: the last one counts
    assert parse_head(b"HTTP/1.1 204 No Content") == (204, 0, None, False)
    for bad in (b"HTTP/1.1\r\nContent-Length: 1", b"HTTP/1.1 200 OK\r\nContent-Length: x"):
        with pytest.raises(InferenceError, match="malformed head"):
            parse_head(bad)


def _peer(connection: UnixHTTPConnection) -> socket.socket:
    """A connected peer for ``connection``, set up as ``connect`` would."""
    ours, theirs = socket.socketpair()
    _set_kernel_timeouts(ours, connection.timeout)
    connection.sock = ours
    return theirs


def test_a_response_split_anywhere_is_read_whole() -> None:
    body = b'{"a":1}' + bytes(range(256)) * 300
    response = (
        b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: 7\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
    for cut in (1, 20, len(response) - len(body) - 2, len(response) - 5):
        connection = UnixHTTPConnection(Path("/nonexistent"))
        peer = _peer(connection)

        def answer(peer: socket.socket = peer, cut: int = cut) -> None:
            peer.recv(65536)
            peer.sendall(response[:cut])
            time.sleep(0.01)
            peer.sendall(response[cut:])

        thread = threading.Thread(target=answer)
        thread.start()
        status, header_length, got = connection.send(b"GET / HTTP/1.1\r\n\r\n")
        thread.join()
        assert (status, header_length, bytes(got)) == (200, 7, body)
        assert connection.sock is None  # Connection: close was honoured
        peer.close()


def test_a_head_that_differs_from_the_last_one_is_read_afresh() -> None:
    def response(body: bytes, extra: bytes = b"") -> bytes:
        length = str(len(body)).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n" + extra + b"\r\n" + body

    connection = UnixHTTPConnection(Path("/nonexistent"))
    peer = _peer(connection)
    answers = [
        (response(b"abcd"), (200, None, b"abcd")),
        (response(b"efgh"), (200, None, b"efgh")),  # the same head: remembered
        (response(b"efghi"), (200, None, b"efghi")),  # the same but for one digit
        (response(b"jklm", b"Inference-Header-Content-Length: 2\r\n"), (200, 2, b"jklm")),
        (response(b"jklm"), (200, None, b"jklm")),  # a prefix of the last head
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno", (404, None, b"no")),
    ]
    for data, expected in answers:
        peer.sendall(data)
        status, header_length, body = connection.send(b"GET / HTTP/1.1\r\n\r\n")
        assert (status, header_length, bytes(body)) == expected
        peer.recv(65536)
    # The remembered head split across reads: the first read holds only part of it, the
    # scratch buffer behind it still the whole last response; read afresh all the same.
    for cut in (5, len(response(b"wxyz")) - 6):

        def answer(cut: int = cut) -> None:
            peer.recv(65536)
            peer.sendall(response(b"wxyz")[:cut])
            time.sleep(0.01)
            peer.sendall(response(b"wxyz")[cut:])

        thread = threading.Thread(target=answer)
        thread.start()
        status, header_length, body = connection.send(b"GET / HTTP/1.1\r\n\r\n")
        thread.join()
        assert (status, header_length, bytes(body)) == (200, None, b"wxyz")
    peer.sendall(response(b"ab", b"Connection: close\r\n"))
    assert bytes(connection.send(b"GET / HTTP/1.1\r\n\r\n")[2]) == b"ab"
    assert connection.sock is None  # the last head's Connection: close was honoured
    peer.close()


def test_a_body_that_disagrees_with_the_remembered_plan_is_refused() -> None:
    header = (
        b'{"model_name":"m","model_version":"1","outputs":[{"name":"y","datatype":"FP32",'
        b'"shape":[1,3],"parameters":{"binary_data_size":12}}]}'
    )

    def response(data: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: "
            + str(len(header)).encode()
            + b"\r\nContent-Length: "
            + str(len(header) + len(data)).encode()
            + b"\r\n\r\n"
            + header
            + data
        )

    client = InferenceClient(Path("/nonexistent"))
    peer = _peer(client._connection)
    values = np.array([[1.0, 2.0, 3.0]], np.float32)
    for _ in range(2):  # the second time through the remembered plan
        peer.sendall(response(values.tobytes()))
        np.testing.assert_array_equal(client.infer("m", {"x": X})["y"], values)
    peer.sendall(response(values.tobytes()[:8]))
    with pytest.raises(InferenceError, match="needs 12 bytes, got 8"):
        client.infer("m", {"x": X})
    client.close()
    peer.close()


def _answer(client: InferenceClient, respond: Callable[[bytes], bytes]) -> list[bytes]:
    """Answer each of ``client``'s requests with ``respond(request)``, in a thread; the
    returned list collects the requests."""
    peer = _peer(client._connection)
    requests: list[bytes] = []

    def serve() -> None:
        data = b""
        with peer:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = peer.recv(1 << 16)
                    if not chunk:
                        return
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(rest) < length:
                    rest += peer.recv(1 << 16)
                request, data = head + b"\r\n\r\n" + rest[:length], rest[length:]
                requests.append(request)
                peer.sendall(respond(request))

    threading.Thread(target=serve, daemon=True).start()
    return requests


def _response(doc: dict[str, Any], binary: bytes = b"") -> bytes:
    header = json.dumps(doc).encode()
    extra = b""
    if binary:
        extra = b"Inference-Header-Content-Length: " + str(len(header)).encode() + b"\r\n"
    return (
        b"HTTP/1.1 200 OK\r\n"
        + extra
        + b"Content-Length: "
        + str(len(header) + len(binary)).encode()
        + b"\r\n\r\n"
        + header
        + binary
    )


def _outputs(*outputs: tuple[str, list[int], dict[str, Any]]) -> dict[str, Any]:
    return {
        "model_name": "m",
        "outputs": [
            {"name": name, "datatype": "FP32", "shape": shape, "parameters": params}
            for name, shape, params in outputs
        ],
    }


def test_a_remembered_request_s_answer_is_decoded_by_its_own_header() -> None:
    values = np.arange(6, dtype=np.float32)
    binary = {"binary_data_size": 24}
    answers = iter(
        [
            _response(_outputs(("y", [2, 3], binary)), values.tobytes()),
            _response(_outputs(("y", [2, 3], binary)), values[::-1].tobytes()),  # remembered
            _response(_outputs(("y", [3, 2], binary)), values.tobytes()),  # as long, other shape
            _response(_outputs(("z", [2, 3], binary)), values.tobytes()),  # another name
            _response(
                _outputs(
                    ("y", [1, 3], {"binary_data_size": 12}), ("z", [1, 3], {"binary_data_size": 12})
                ),
                values.tobytes(),
            ),
            _response(_outputs(("y", [2, 3], binary)), values.tobytes()),  # the first again
        ]
    )
    client = InferenceClient(Path("/nonexistent"))
    _answer(client, lambda _: next(answers))
    expected = [
        {"y": values.reshape(2, 3)},
        {"y": values[::-1].reshape(2, 3)},
        {"y": values.reshape(3, 2)},
        {"z": values.reshape(2, 3)},
        {"y": values[:3].reshape(1, 3), "z": values[3:].reshape(1, 3)},
        {"y": values.reshape(2, 3)},
    ]
    for want in expected:
        got = client.infer("m", {"x": X})
        assert got.keys() == want.keys()
        for name, array in want.items():
            assert got[name].shape == array.shape
            np.testing.assert_array_equal(got[name], array)
    client.close()


def test_inputs_in_the_region_are_placed_by_where_each_array_lies_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metadata = {"name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
    out_at = [4096]  # where the answer says the output is

    def respond(request: bytes) -> bytes:
        if request.startswith(b"GET "):
            return _response(metadata)
        params = {
            "shared_memory_region": "r",
            "shared_memory_offset": out_at[0],
            "shared_memory_byte_size": 12,
        }
        return _response(_outputs(("y", [1, 3], params)))

    def placed(request: bytes) -> tuple[str, int]:
        params = json.loads(request.partition(b"\r\n\r\n")[2])["inputs"][0]["parameters"]
        return params["shared_memory_region"], params["shared_memory_offset"]

    client = InferenceClient(Path("/nonexistent"))
    requests = _answer(client, respond)
    name = f"ef-client-{os.getpid()}-places"
    with (
        SharedMemoryRegion(name, 1 << 13) as region,
        SharedMemoryRegion(name + "2", 1 << 13) as other,
    ):
        region.name, other.name = "r", "r2"
        y = np.array([[1.0, 2.0, 3.0]], np.float32)
        region.write(4096, y.tobytes())
        region.write(4160, (y * 2).tobytes())
        frame = region.ndarray(1024, np.float32, (1, 4))
        for _ in range(2):  # the second call through the remembered request
            np.testing.assert_array_equal(client.infer("m", {"x": frame}, shm=region)["y"], y)
            assert placed(requests[-1]) == ("r", 1024)
        assert requests[-1] == requests[-2]
        out_at[0] = 4160  # the same request answered with another place: read there
        np.testing.assert_array_equal(client.infer("m", {"x": frame}, shm=region)["y"], y * 2)
        out_at[0] = 4096
        for offset in (2048, 1024, 3072):  # new arrays, likely at the old one's id
            del frame
            frame = region.ndarray(offset, np.float32, (1, 4))
            np.testing.assert_array_equal(client.infer("m", {"x": frame}, shm=region)["y"], y)
            assert placed(requests[-1]) == ("r", offset)
        # Strides changed in place (deprecated, still possible): no longer contiguous,
        # so no longer sent from where it lies but copied (to the region's start).
        square = region.ndarray(1024, np.float32, (2, 2))
        client.infer("m", {"x": square}, shm=region)
        assert placed(requests[-1]) == ("r", 1024)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            square.strides = (4, 8)
        client.infer("m", {"x": square}, shm=region)
        assert placed(requests[-1]) == ("r", 0)
        del square
        # The same array with another region is copied into that region (whose output
        # the answer's offset names there).
        other.write(4096, (y * 3).tobytes())
        np.testing.assert_array_equal(client.infer("m", {"x": frame}, shm=other)["y"], y * 3)
        assert placed(requests[-1]) == ("r2", 0)
        np.testing.assert_array_equal(other.array(0, np.dtype(np.float32), (1, 4)), frame)
        monkeypatch.setattr("agent.client.shm_requests._FIXED_DATA", False)  # nothing remembered
        client._shm._placed.clear()
        for offset in (512, 1024):
            del frame
            frame = region.ndarray(offset, np.float32, (1, 4))
            np.testing.assert_array_equal(client.infer("m", {"x": frame}, shm=region)["y"], y)
            assert placed(requests[-1]) == ("r", offset)
        assert not client._shm._placed
        del frame
    client.close()


def test_an_agent_that_does_not_answer_times_out() -> None:
    connection = UnixHTTPConnection(Path("/nonexistent"), timeout=0.2)
    peer = _peer(connection)
    started = time.monotonic()
    with pytest.raises(InferenceError, match=r"GET /slow on .* within the timeout of 0.2 s"):
        connection.send(b"GET /slow HTTP/1.1\r\n\r\n")
    assert 0.15 < time.monotonic() - started < 5
    assert connection.sock is None
    peer.close()
