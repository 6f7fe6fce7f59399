"""The limits that keep a device alive, peer checks, the TCP listener, admission and
deadlines.

A gated session (a hook around the real ONNX Runtime session) holds a run until the test
lets it go, so overload and deadline cases are deterministic, not timing races.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.base.errors import AgentUnreachableError, ConfigError, NotReadyError
from agent.client import InferenceClient
from agent.device.config import InferenceConfig, memory_without_models_bytes, parse_config
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.memory import rss_bytes
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer, may_poll
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import (
    OTHER_UID,
    ServerThread,
    can_switch_users,
    open_to_every_user,
    raw,
    read_responses,
    run_as,
    serving,
    short_socket_dir,
)
from tests.helpers import make_misbehaving_model

X = np.ones((1, 4), np.float32)


class GatedSession:
    """Wraps a real session; ``run`` waits for ``gate`` (a test hook)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def run(self, names: Any, feeds: Any, options: Any = None) -> Any:
        self.entered.release()
        self.gate.wait(10)
        return self.session.run(names, feeds, options)


@pytest.fixture
def linear(tmp_path: Path, linear_model: Path) -> LoadedModel:
    return load_model(*make_model_dir(tmp_path / "v1", linear_model))


@pytest.fixture
def gated(linear: LoadedModel) -> tuple[ModelRegistry, GatedSession]:
    session = GatedSession(linear.session)
    registry = ModelRegistry()
    registry.activate(dataclasses.replace(linear, session=session))
    return registry, session


def _infer_in_thread(path: Path, results: list[Any]) -> threading.Thread:
    def run() -> None:
        with InferenceClient(path) as client:
            try:
                results.append(client.infer("linear", {"x": X})["y"].shape)
            except Exception as exc:
                results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_queue_is_503_with_retry_after(gated: tuple[ModelRegistry, GatedSession]) -> None:
    registry, session = gated
    with serving(registry, max_concurrency=1, max_queue=1) as server:
        results: list[Any] = []
        first = _infer_in_thread(server.socket_path, results)
        assert session.entered.acquire(timeout=10)  # running: holds the only slot
        second = _infer_in_thread(server.socket_path, results)
        for _ in range(1000):  # until the second waits in the queue
            if server.admitted == 2:
                break
            time.sleep(0.005)
        status, doc = raw(
            server,
            "POST",
            "/v2/models/linear/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]},
        )
        assert status == 503 and "overloaded" in doc["error"]
        assert raw(server, "GET", "/v2/health/live")[0] == 200  # the loop is free
        metrics = InferenceClient(server.socket_path).metrics()
        assert "edge_agent_infer_queue_depth 1.0" in metrics
        assert 'kind="overloaded"' in metrics
        session.gate.set()
        first.join(10)
        second.join(10)
        assert results == [(1, 3), (1, 3)]
        # Triton's statistics: the refusal is a failure; the wait in the queue is counted.
        figures = server.stats.execution("linear", "1.0.0")
        assert (figures.success, figures.fail, figures.timed) == (2, 1, 2)
        assert figures.queue_ns > 0


def test_request_past_its_deadline_is_503_and_never_runs(
    gated: tuple[ModelRegistry, GatedSession],
) -> None:
    registry, session = gated
    with serving(registry, max_concurrency=1, max_queue=4, request_deadline_s=0.2) as server:
        results: list[Any] = []
        first = _infer_in_thread(server.socket_path, results)
        assert session.entered.acquire(timeout=10)
        with (
            InferenceClient(server.socket_path) as client,
            pytest.raises(NotReadyError, match="deadline"),
        ):
            client.infer("linear", {"x": X})
        session.gate.set()
        first.join(10)
        assert len(results) == 1 and isinstance(results[0], NotReadyError)  # past 0.2 s too
        time.sleep(0.05)
        assert not session.entered.acquire(timeout=0.2)  # the queued request never ran
        assert 'kind="deadline"' in InferenceClient(server.socket_path).metrics()


def _connect(server: InferenceServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.socket_path))
    return sock


def test_slow_head_slow_body_and_idle_connections_are_cut(linear: LoadedModel) -> None:
    registry = ModelRegistry()
    registry.activate(linear)
    limits = {"header_timeout_s": 0.2, "body_timeout_s": 0.2, "idle_timeout_s": 0.3}
    with serving(registry, **limits) as server:
        with _connect(server) as sock:
            sock.sendall(b"GET /v2/health/li")
            [(status, _, body)] = read_responses(sock, 1)
            assert status == 408 and b"request head" in body
            assert sock.recv(1) == b""
        with _connect(server) as sock:
            sock.sendall(b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            [(status, _, body)] = read_responses(sock, 1)
            assert status == 408 and b"request body" in body
        with _connect(server) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
            assert read_responses(sock, 1)[0][0] == 200
            assert sock.recv(1) == b""  # closed once idle past 0.3 s
        assert raw(server, "GET", "/v2/health/live")[0] == 200


def test_connections_beyond_the_limit_get_503(linear: LoadedModel) -> None:
    registry = ModelRegistry()
    registry.activate(linear)
    with serving(registry, max_connections=2, peer_share=1.0) as server:  # one client: all
        held = [_connect(server), _connect(server)]
        for sock in held:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
            assert read_responses(sock, 1)[0][0] == 200
        with _connect(server) as extra:
            [(status, headers, _)] = read_responses(extra, 1)
            assert status == 503 and headers["retry-after"] == "1"
        held.pop().close()
        time.sleep(0.05)
        assert raw(server, "GET", "/v2/health/live")[0] == 200
        held[0].close()


MIB = 1024 * 1024
needs_root = pytest.mark.skipif(not can_switch_users(), reason="needs root and setpriv")
# A well-behaved client, run as another user: a health check and an inference.
WELL_BEHAVED = r"""
import json, sys
import numpy as np
from agent.client import InferenceClient
with InferenceClient(sys.argv[1]) as client:
    y = client.infer("linear", {"x": np.ones((1, 4), np.float32)})["y"]
    print(json.dumps({"live": client.live(), "shape": list(y.shape)}))
"""


def _first_status(sock: socket.socket) -> int:
    """The status of the first response line on ``sock`` (a 100 Continue counts)."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_bodies_announced_but_not_sent_take_no_memory(linear: LoadedModel) -> None:
    """Issue 18, defect 3: each head announcing a 64 MiB body used to allocate (and
    zero) 64 MiB at once and hold it for body_timeout_s. Now the body is charged to a
    budget and its memory is only touched as bytes arrive; past the client's share of the
    budget, 503 with Retry-After."""
    registry = ModelRegistry()
    registry.activate(linear)
    with serving(registry, max_body_bytes=64 * MIB) as server:
        before = rss_bytes()
        assert before is not None
        head = (
            b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: %d\r\n"
            b"Expect: 100-continue\r\n\r\n" % (64 * MIB)
        )
        socks = [_connect(server) for _ in range(8)]
        try:
            for sock in socks:
                sock.sendall(head)
            statuses = [_first_status(sock) for sock in socks]
            peak = max(_rss_now() for _ in range(20) if not time.sleep(0.05))
            assert peak - before < 48 * MIB, (statuses, (peak - before) // MIB)
            assert set(statuses) == {100, 503}, statuses  # waiting for a body, or refused
            assert raw(server, "GET", "/v2/health/live")[0] == 200
            with InferenceClient(server.socket_path) as client:
                assert client.infer("linear", {"x": X})["y"].shape == (1, 3)
        finally:
            for sock in socks:
                sock.close()


def _chunked(path: str, body: bytes, chunk: int = 16 * 1024) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + chunk]), body[i : i + chunk])
             for i in range(0, len(body), chunk)]  # fmt: skip
    head = f"POST {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    return head + b"".join(parts) + b"0\r\n\r\n"


def test_bodies_past_a_clients_share_of_the_quota_are_503_until_it_frees(
    linear: LoadedModel,
) -> None:
    """A body held (announced, waiting for its bytes) counts against its client's share:
    a second one, Content-Length or chunked, is refused at once with Retry-After; once
    the first is gone the same request is served."""
    registry = ModelRegistry()
    registry.activate(linear)
    limits = {"max_body_bytes": MIB, "max_body_buffer_bytes": 2 * MIB}  # a share: 1 MiB
    x = np.zeros((20000, 4), np.float32)  # 320 KB: more than comes in with a head
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [20000, 4],
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    head = (f"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: {len(header) + x.nbytes}"
            f"\r\nInference-Header-Content-Length: {len(header)}\r\n\r\n").encode()  # fmt: skip
    binary = head + header + x.tobytes()
    chunked = _chunked("/v2/models/linear/infer", b" " * 300_000)
    with serving(registry, **limits) as server:
        holder = _connect(server)
        holder.sendall(b"POST /v2/models/linear/infer HTTP/1.1\r\nContent-Length: %d\r\n"
                       b"Expect: 100-continue\r\n\r\n" % MIB)  # fmt: skip
        assert _first_status(holder) == 100  # its 1 MiB: the client's whole share
        assert server.body_quota.held == MIB
        for request in (binary, chunked):
            with _connect(server) as sock:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(request)
                [(status, headers, body)] = read_responses(sock, 1)
                assert status == 503 and headers["retry-after"] == "1", body
                assert b"at most 1048576 per client" in body, body
        holder.close()
        for _ in range(200):  # bounded: until its thread has seen the close
            if not server.body_quota.held:
                break
            time.sleep(0.01)
        assert server.body_quota.held == 0
        with _connect(server) as sock:
            sock.sendall(binary)
            [(status, _, body)] = read_responses(sock, 1)
            assert status == 200, body[:200]


def test_a_connection_reuses_its_large_body_buffer_and_the_quota_counts_it(
    linear: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back-to-back large bodies on one connection land in one mapping (no fresh pages
    per request), charged while the connection keeps it and given back when it closes."""
    import agent.serving.http11 as http11

    mapped: list[int] = []
    real = http11.mmap.mmap

    def counting(*args: Any, **kwargs: Any) -> Any:  # a hook around the real mmap
        mapped.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(http11.mmap, "mmap", counting)
    registry = ModelRegistry()
    registry.activate(linear)
    x = np.ones((20000, 4), np.float32)  # 320 KB: read into a large buffer
    with serving(registry) as server:
        with InferenceClient(server.socket_path) as client:
            for _ in range(5):
                assert client.infer("linear", {"x": x})["y"].shape == (20000, 3)
            assert len(mapped) == 1 and server.body_quota.held == mapped[0]
        for _ in range(200):  # bounded: until the connection's thread has closed it
            if not server.body_quota.held:
                break
            time.sleep(0.01)
        assert server.body_quota.held == 0


def test_json_past_max_json_bytes_is_413_and_not_the_models_error(linear: LoadedModel) -> None:
    """Parsing JSON takes ~12 times its size: a request's JSON is bounded on its own,
    and the same tensor as binary data passes."""
    registry = ModelRegistry()
    registry.activate(linear)
    x = np.ones((100, 4), np.float32)
    with serving(registry, max_json_bytes=1024) as server:
        tensor = {"name": "x", "datatype": "FP32", "shape": [100, 4], "data": x.ravel().tolist()}
        status, doc = raw(server, "POST", "/v2/models/linear/infer", {"inputs": [tensor]})
        assert status == 413 and "[inference] max_json_bytes" in doc["error"], doc
        status, doc = raw(server, "POST", "/v2/systemsharedmemory/region/r/register",
                          b'{"key": "' + b"k" * 5000 + b'"}')  # fmt: skip
        assert status == 413 and "at most 4096" in doc["error"], doc
        with InferenceClient(server.socket_path) as client:  # binary: the JSON is small
            assert client.infer("linear", {"x": x})["y"].shape == (100, 3)
            errors = [
                line
                for line in client.metrics().splitlines()
                if line.startswith("edge_agent_infer_errors_total{")
                and 'kind="model_error"' in line
            ]
            assert errors and all(line.endswith(" 0.0") for line in errors), errors


def _rss_now() -> int:
    rss = rss_bytes()
    assert rss is not None
    return rss


@needs_root
def test_one_user_holding_every_connection_does_not_lock_out_another(
    linear: LoadedModel,
) -> None:
    """Issue 18, defect 3: one local client holding max_connections idle connections
    locked every other client out. Now one user (uid) holds at most its share."""
    registry = ModelRegistry()
    registry.activate(linear)
    held: list[socket.socket] = []
    with serving(registry, max_connections=8) as server:
        open_to_every_user(server)
        try:
            for _ in range(16):  # until refused
                sock = _connect(server)
                held.append(sock)
                with contextlib.suppress(BrokenPipeError):  # refused: answered and closed
                    sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
                [(status, headers, body)] = read_responses(sock, 1)
                if status != 200:
                    assert status == 503 and headers["retry-after"] == "1", body
                    assert b"per client" in body, body
                    break
            assert len(held) - 1 < 8  # refused before it held them all
            assert run_as(OTHER_UID, WELL_BEHAVED, str(server.socket_path)) == {
                "live": True,
                "shape": [1, 3],
            }
        finally:
            for sock in held:
                sock.close()


def test_no_thread_for_a_connection_is_503_and_the_server_goes_on(
    linear: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry()
    registry.activate(linear)
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(thread: threading.Thread) -> None:  # fault injection: a tasks limit hit once
        if thread.name.startswith("infer-conn-") and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    with serving(registry) as server:
        monkeypatch.setattr(threading.Thread, "start", start)
        with _connect(server) as sock:
            [(status, headers, body)] = read_responses(sock, 1)
            assert status == 503 and headers["retry-after"] == "1"
            assert b"cannot take another connection" in body
        assert refused and raw(server, "GET", "/v2/health/live")[0] == 200
        for _ in range(500):  # the health check's thread closes its connection after us
            if server.metrics.connections._value.get() == 0:
                break
            time.sleep(0.01)
        assert server.metrics.connections._value.get() == 0  # the refused one is forgotten


def test_peer_allow_list_by_uid_and_gid(linear: LoadedModel) -> None:
    registry = ModelRegistry()
    registry.activate(linear)
    with (
        serving(registry, allowed_uids=[os.getuid() + 4242]) as server,
        pytest.raises(AgentUnreachableError, match="not in the allow-list"),
    ):
        InferenceClient(server.socket_path).server_metadata()
    with serving(registry, allowed_uids=[os.getuid()]) as server:
        assert InferenceClient(server.socket_path).server_metadata()["name"] == "edge-agent"
    with serving(registry, allowed_gids=[os.getgid()]) as server:
        assert InferenceClient(server.socket_path).live()


def test_socket_group_and_unknown_group(linear: LoadedModel) -> None:
    registry = ModelRegistry()
    with serving(registry, socket_group=str(os.getgid()), socket_mode=0o600) as server:
        info = os.stat(server.socket_path)
        assert info.st_gid == os.getgid() and stat.S_IMODE(info.st_mode) == 0o600
    directory = short_socket_dir()
    thread = ServerThread(
        InferenceServer(registry, directory / "s.sock", socket_group="no-such-group-ef")
    )
    try:
        with pytest.raises(ConfigError, match="groupadd --system no-such-group-ef"):
            thread.start()
    finally:
        thread.close()
        directory.rmdir()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_loopback_tcp_listener(linear: LoadedModel) -> None:
    registry = ModelRegistry()
    registry.activate(linear)
    with serving(registry, tcp_port=_free_port()) as server:
        address = server.tcp_address()
        assert address is not None and address[0] == "127.0.0.1"
        with InferenceClient(address) as client:
            assert client.live()
            expected = linear.infer({"x": X})["y"]
            np.testing.assert_array_equal(client.infer("linear", {"x": X})["y"], expected)
            with (
                SharedMemoryRegion(f"ef-tcp-{os.getpid()}", 64) as region,
                pytest.raises(AgentUnreachableError, match="only available on the Unix socket"),
            ):
                client.register_shared_memory("t", region)
    with serving(registry) as server:
        assert server.tcp_address() is None  # off by default


def test_a_run_past_its_deadline_is_503_and_frees_its_slot(
    tmp_path: Path, linear: LoadedModel
) -> None:
    slow_onnx = make_misbehaving_model(tmp_path / "slow.onnx", seed=3, kind="slow")
    slow = load_model(*make_model_dir(tmp_path / "slow", slow_onnx, name="slow"))
    registry = ModelRegistry()
    registry.activate(slow)
    registry.activate(linear)
    # A batch of 1024 makes each of the slow model's six 2048x2048 MatMuls heavy (~0.1 s
    # each here): the run outlives a 0.05 s deadline, and the watch cancels it between
    # nodes (tests/agent/serving/test_admission.py shows the cancelling itself).
    batch = np.ones((1024, 4), np.float32)
    with (
        serving(registry, max_concurrency=1, request_deadline_s=0.05) as server,
        InferenceClient(server.socket_path) as client,
    ):
        with pytest.raises(NotReadyError, match="deadline"):
            client.infer("slow", {"x": batch})
        assert server.admitted == 0  # the slot is free again
        np.testing.assert_array_equal(
            client.infer("linear", {"x": X})["y"], linear.infer({"x": X})["y"]
        )
        expected = 'infer_errors_total{kind="deadline",model="slow",version="1.0.0"} 1.0'
        assert expected in client.metrics()


@pytest.mark.parametrize("busy_poll_s", [0.0, 0.05])
def test_back_to_back_requests_with_and_without_busy_polling(
    linear: LoadedModel, busy_poll_s: float
) -> None:
    registry = ModelRegistry()
    registry.activate(linear)
    rng = np.random.default_rng(7)
    with serving(registry, busy_poll_s=busy_poll_s) as server:
        with InferenceClient(server.socket_path) as client:
            for _ in range(20):  # back to back: from the second on, the server polls
                x = rng.normal(size=(1, 4)).astype(np.float32)
                np.testing.assert_allclose(
                    client.infer("linear", {"x": x})["y"], linear.infer({"x": x})["y"], rtol=1e-6
                )
        # The client closed while its connection polled: the server serves the next one.
        assert raw(server, "GET", "/v2/health/live")[0] == 200
        with _connect(server) as sock:  # a head split across the poll and the block
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n\r\n")
            assert read_responses(sock, 1)[0][0] == 200
            sock.sendall(b"GET /v2/health/")
            time.sleep(0.1)
            sock.sendall(b"live HTTP/1.1\r\n\r\n")
            assert read_responses(sock, 1)[0][0] == 200


def test_busy_polling_only_with_a_core_to_spare(gated: tuple[ModelRegistry, GatedSession]) -> None:
    registry, session = gated
    cores = len(os.sched_getaffinity(0))
    with serving(registry) as server:
        assert server.may_busy_poll() == (cores >= 2)  # a core for the poller, one for its client
        results: list[Any] = []
        thread = _infer_in_thread(server.socket_path, results)
        assert session.entered.acquire(timeout=10)  # one run in flight
        try:
            assert server.may_busy_poll() == (cores >= 3)
        finally:
            session.gate.set()
            thread.join(10)
        assert results == [(1, 3)]
        assert server.may_busy_poll() == (cores >= 2)


def test_polling_leaves_a_core_for_the_client() -> None:
    # (runs in flight, the agent's cores, the machine's cores) → may poll
    table = {
        (0, 1, 1): False,  # one core: polling would only delay the client
        (0, 2, 2): True,
        (1, 2, 2): False,  # the run and the poller take both cores: none for the client
        (1, 4, 4): True,
        (2, 4, 4): True,
        (3, 4, 4): False,
        (0, 1, 2): True,  # pinned to one core of two: the client has the other
        (1, 1, 2): False,  # ... but not while a run holds the agent's core
        (0, 2, 8): True,
        (1, 2, 8): True,
        (2, 2, 8): False,
    }
    for (running, agent_cores, machine_cores), expected in table.items():
        assert may_poll(running, agent_cores, machine_cores) is expected, (running, agent_cores)


def test_an_agent_pinned_to_one_core_polls_when_idle(
    gated: tuple[ModelRegistry, GatedSession],
) -> None:
    registry, _ = gated
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    os.sched_setaffinity(0, cores[:1])  # the server reads the affinity it starts with
    try:
        with serving(registry) as server:
            assert server.may_busy_poll()
    finally:
        os.sched_setaffinity(0, cores)


def _config(**inference: Any) -> dict[str, Any]:
    return {
        "device_id": "d1",
        "fleet": "f1",
        "repository": {"url": "https://repo.example"},
        "inference": inference,
    }


def test_inference_config_keys_and_validation(tmp_path: Path) -> None:
    config = parse_config(
        _config(max_queue=3, tcp_port=8085, inline_max_run_s=0.0, socket_group="edge-infer"),
        tmp_path,
    ).inference  # inline_max_run_s: retired, ignored with a warning
    assert (config.max_queue, config.tcp_port, config.socket_group) == (3, 8085, "edge-infer")
    env = {"EDGE_AGENT_INFERENCE_ALLOWED_USERS": "root,1000"}
    assert parse_config(_config(), tmp_path, env).inference.allowed_users == "root,1000"
    with pytest.raises(ConfigError, match="loopback only"):
        parse_config(_config(tcp_port=8085, tcp_host="0.0.0.0"), tmp_path)
    with pytest.raises(ConfigError, match="TCP has no peer credentials"):
        parse_config(_config(tcp_port=8085, allowed_groups="edge-infer"), tmp_path)
    with pytest.raises(ConfigError, match="header_timeout_s"):
        parse_config(_config(header_timeout_s=0), tmp_path)
    with pytest.raises(ConfigError, match="busy_poll_s"):
        parse_config(_config(busy_poll_s=0.5), tmp_path)
    with pytest.raises(ConfigError, match=r"'inference.peer_share': expected 0 < share <= 1"):
        parse_config(_config(peer_share=0), tmp_path)
    with pytest.raises(ConfigError, match="no body that large would ever be accepted"):
        parse_config(_config(max_body_bytes=200, max_body_buffer_bytes=300), tmp_path)
    with pytest.raises(ConfigError, match="max_json_bytes"):
        parse_config(_config(max_json_bytes=0), tmp_path)
    limits = parse_config(_config(max_body_buffer_bytes=400, max_body_bytes=200), tmp_path)
    assert limits.inference.peer_share == 0.5 and limits.inference.max_json_bytes == 4 << 20
    assert parse_config(_config(busy_poll_s=0), tmp_path).inference.busy_poll_s == 0
    with pytest.raises(ConfigError, match="no user named"):
        InferenceServer.from_config(
            ModelRegistry(), InferenceConfig(allowed_users="no-such-user-ef")
        )
    server = InferenceServer.from_config(ModelRegistry(), InferenceConfig(allowed_users="0"))
    assert server.allowed_uids == {0} and server.max_queue == 32


UNIT = Path(__file__).resolve().parents[3] / "systemd" / "edge-agent.service"


def test_the_shipped_unit_bounds_memory_from_the_config_and_sees_real_uids() -> None:
    """MemoryMax= covers what the [inference] defaults let local clients make the agent
    take, with room for models; PrivateUsers= would make every local user 65534."""
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line[:40]
    )
    assert "PrivateUsers" not in settings
    memory_max = int(settings["MemoryMax"].removesuffix("G")) << 30
    bound = memory_without_models_bytes(InferenceConfig())
    assert bound == 672 * MIB  # the figure the unit's comment and the docs give
    assert memory_max - bound >= 256 * MIB  # left for the models


def test_stop_answers_the_request_in_flight_and_closes_every_connection(
    tmp_path: Path, linear: LoadedModel
) -> None:
    """A request running when the server stops is answered (within the grace period);
    then its connection closes, as does an idle one, without waiting for the grace."""
    slow_onnx = make_misbehaving_model(tmp_path / "slow.onnx", seed=3, kind="slow")
    slow = load_model(*make_model_dir(tmp_path / "slow", slow_onnx, name="slow"))
    registry = ModelRegistry()
    registry.activate(slow)
    batch = np.ones((1024, 4), np.float32)  # a run of ~0.6 s here
    directory = short_socket_dir()
    thread = ServerThread(InferenceServer(registry, directory / "infer.sock"))
    try:
        thread.start()
        server = thread.server
        idle = InferenceClient(server.socket_path)
        assert idle.live()  # connected, then idle
        busy = InferenceClient(server.socket_path)
        answers: list[dict[str, np.ndarray]] = []
        worker = threading.Thread(target=lambda: answers.append(busy.infer("slow", {"x": batch})))
        worker.start()
        for _ in range(1000):  # bounded: until the run is in flight
            if server.admitted:
                break
            time.sleep(0.005)
        assert server.admitted == 1
        thread.stop()
        worker.join(10)
        np.testing.assert_array_equal(answers[0]["y"], slow.infer({"x": batch})["y"])
        assert server.admitted == 0 and not server._snapshot()  # every connection closed
        assert not idle.live() and not busy.live()  # nothing listens any more
    finally:
        thread.close()
        directory.rmdir()
