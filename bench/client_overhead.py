"""What the client's own code costs per repeated ``InferenceClient.infer`` call.

The agent's side is taken out: a real agent answers each case once, through a proxy that
records the exact response bytes per request line; then a "canned responder" in another
process reads each request whole (head and Content-Length body) and answers those bytes.
What is left is the client: building and sending the request, reading and decoding the
response. Cases: the tiny model (1×4 → 1×3 floats) and the CNN (1×3×224×224 floats in,
1×4 out), each with binary tensors and with shared memory "in place" (the input lives
in the registered region, ``SharedMemoryRegion.ndarray``; the responder does not write
outputs, the client copies whatever the region holds).

Reported per call: "Python only", the client thread's CPU time with a fake socket that
answers in-process (best of 20 batches of 500 calls: the steadiest figure), and, through
the responder, the median of many warm calls' thread CPU time (``time.thread_time``,
user and kernel, without waiting for the responder) and wall time.
A "socket floor" sends the recorded request and reads the response with nothing
built or parsed: what the client pays in system calls alone.
``--cold`` also sweeps a 32 MiB buffer between calls (outside the timing), as a model run
between two calls would; ``--profile CASE`` prints a cProfile of that case instead.

The recorded responses are kept in ``--responses`` (a pickle; recorded when missing), so
runs before and after a client change answer the very same bytes.

    python bench/client_overhead.py [--calls N] [--cold] [--profile cnn-shm]
"""

from __future__ import annotations

import cProfile
import os
import pickle
import pstats
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import SocketProcess, arguments
from infer_overhead import Agent, _inputs, build_models

from agent.client import InferenceClient
from agent.oip.shm import SharedMemoryRegion

CASES = ("tiny-binary", "tiny-shm", "cnn-binary", "cnn-shm")
Responses = dict[str, dict[bytes, bytes]]  # case → request line → response (or request)


def _read_message(sock: socket.socket, pending: bytearray) -> bytes | None:
    """One HTTP message (head and Content-Length body) from ``sock``; None at EOF.
    ``pending`` holds bytes read past the previous message."""
    while (end := pending.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        pending += chunk
    length = 0
    for line in bytes(pending[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    total = end + 4 + length
    while len(pending) < total:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        pending += chunk
    message = bytes(pending[:total])
    del pending[:total]
    return message


def _request_line(message: bytes) -> bytes:
    return message[: message.find(b"\r\n")]


class _Recorder:
    """A proxy on a Unix socket in front of the agent, recording each response under its
    request line in ``responses[case]``."""

    def __init__(self, agent_socket: Path, directory: Path) -> None:
        self.agent_socket = agent_socket
        self.path = directory / "record.sock"
        self.responses: Responses = {}
        self.requests: Responses = {}
        self.case = ""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(str(self.agent_socket))
        from_client, from_agent = bytearray(), bytearray()
        with client, upstream:
            while (request := _read_message(client, from_client)) is not None:
                upstream.sendall(request)
                response = _read_message(upstream, from_agent)
                if response is None:
                    return
                line = _request_line(request)
                self.responses.setdefault(self.case, {})[line] = response
                self.requests.setdefault(self.case, {})[line] = request
                client.sendall(response)


def _frames(region: SharedMemoryRegion) -> tuple[np.ndarray, np.ndarray]:
    """The tiny model's and the CNN's input, written in place in ``region``."""
    x_tiny, x_cnn = _inputs()
    tiny = region.ndarray(0, np.float32, x_tiny.shape)
    tiny[:] = x_tiny
    cnn = region.ndarray(4096, np.float32, x_cnn.shape)
    cnn[:] = x_cnn
    return tiny, cnn


def _call(
    case: str, socket_path: Path, region: SharedMemoryRegion, register: bool
) -> tuple[InferenceClient, Callable[[], Any]]:
    """The case's call on a client of its own. A shm case registers ``region`` first
    (``register``), or only names it (the canned responder knows no registration)."""
    client = InferenceClient(socket_path)
    model = case.split("-")[0]
    x_tiny, x_cnn = _inputs()
    if not case.endswith("shm"):
        x = x_tiny if model == "tiny" else x_cnn
        return client, lambda: client.infer(model, {"x": x})
    if register:
        client.register_shared_memory(case, region)
    else:
        region.name = case
    tiny_frame, cnn_frame = _frames(region)
    frame = tiny_frame if model == "tiny" else cnn_frame
    return client, lambda: client.infer(model, {"x": frame}, shm=region)


def record_responses(path: Path) -> tuple[Responses, Responses]:
    base = Path(tempfile.mkdtemp(prefix="ef-client-bench-"))
    agent = Agent(build_models(base / "models"), threads=1, concurrency=1)
    recorder = _Recorder(agent.socket_path, base)
    region = SharedMemoryRegion(f"ef-client-bench-{os.getpid()}", 2 << 20)
    try:
        for case in CASES:
            recorder.case = case
            _, call = _call(case, recorder.path, region, register=True)
            for _ in range(3):
                call()
    finally:
        region.close()
        agent.close()
        recorder.listener.close()
        shutil.rmtree(base, ignore_errors=True)
    path.write_bytes(pickle.dumps((recorder.responses, recorder.requests)))
    return recorder.responses, recorder.requests


def _respond(socket_path: str, responses: dict[bytes, bytes], ready: Any) -> None:
    """Answer each request with the response recorded for its request line."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen()
    ready.set()
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def serve(connection: socket.socket) -> None:
        pending = bytearray()
        with connection:
            while (request := _read_message(connection, pending)) is not None:
                connection.sendall(responses.get(_request_line(request), not_found))

    while True:
        connection, _ = listener.accept()
        threading.Thread(target=serve, args=(connection,), daemon=True).start()


class _Responder(SocketProcess):
    """The canned responder, in a process of its own."""

    def __init__(self, responses: dict[bytes, bytes]) -> None:
        super().__init__(
            "canned responder",
            _respond,
            responses,
            prefix="ef-canned-",
            socket_name="canned.sock",
            start_s=60,
        )


def _raw_call(
    socket_path: Path, case: str, requests: Responses, responses: Responses
) -> Callable[[], Any]:
    """The floor under the client: the recorded request's bytes sent, the response's
    bytes received, nothing built or parsed."""
    line = f"POST /v2/models/{case.split('-')[0]}/infer HTTP/1.1".encode()
    request, size = requests[case][line], len(responses[case][line])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(socket_path))
    buffer = bytearray(1 << 16)

    def call() -> None:
        sock.sendall(request)
        got = 0
        while got < size:
            got += sock.recv_into(buffer)

    return call


class _FakeSocket:
    """A socket that answers each request with the response recorded for its request
    line: with it the client's Python alone is timed, no system call, no other process."""

    family = socket.AF_UNIX

    def __init__(self, responses: dict[bytes, bytes]) -> None:
        self.responses = responses
        self.response = b""

    def sendall(self, data: Any) -> None:
        data = bytes(memoryview(data)[:200])
        self.response = self.responses[_request_line(data)]

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.sendall(buffers[0])
        return sum(b.nbytes for b in buffers)

    def getsockopt(self, *args: Any) -> int:
        return 1 << 30

    def recv_into(self, buffer: bytearray, *args: Any) -> int:
        size = len(self.response)  # fits the client's 64 KiB scratch buffer
        buffer[:size] = self.response
        return size


def _python_only(case: str, region: SharedMemoryRegion, responses: Responses) -> float:
    """Thread CPU seconds per call with a fake socket (best of 20 batches of 500)."""
    client, call = _call(case, Path("/nonexistent"), region, register=False)
    client._connection.sock = _FakeSocket(responses[case])  # type: ignore[assignment]
    for _ in range(500):
        call()
    best = float("inf")
    for _ in range(20):
        start = time.thread_time_ns()
        for _ in range(500):
            call()
        best = min(best, (time.thread_time_ns() - start) / 500)
    return best / 1e9


def _time(call: Callable[[], Any], count: int, cold: bool) -> tuple[float, float]:
    """Median (thread CPU, wall) seconds per call."""
    sweep = np.zeros(32 << 20, np.uint8) if cold else None
    cpu, wall = [], []
    for _ in range(count):
        if sweep is not None:
            sweep += 1
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        call()
        w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        cpu.append(c1 - c0)
        wall.append(w1 - w0)
    return statistics.median(cpu) / 1e9, statistics.median(wall) / 1e9


def _repeat(call: Callable[[], Any], count: int) -> None:
    for _ in range(count):
        call()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (best kept)")
    parser.add_argument("--cold", action="store_true", help="sweep the caches between calls")
    parser.add_argument("--profile", choices=CASES, help="cProfile this case instead")
    parser.add_argument("--no-socket", action="store_true", help="the Python-only column alone")
    parser.add_argument(
        "--responses",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ef-client-overhead-responses.pickle",
        help="recorded responses (recorded when missing)",
    )
    args = parser.parse_args()
    if args.responses.exists():
        responses, requests = pickle.loads(args.responses.read_bytes())
    else:
        responses, requests = record_responses(args.responses)
    region = SharedMemoryRegion(f"ef-client-bench-{os.getpid()}", 2 << 20)
    try:
        for case in (args.profile,) if args.profile else CASES:
            python = _python_only(case, region, responses)
            if args.no_socket:
                print(f"{case:12s} Python only {python * 1e6:5.1f} µs")
                continue
            responder = _Responder(responses[case])
            try:
                _, call = _call(case, responder.socket_path, region, register=False)
                for _ in range(200):
                    call()
                if args.profile:
                    profile = cProfile.Profile()
                    profile.runcall(_repeat, call, args.calls)
                    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
                    continue
                best = min(_time(call, args.calls, args.cold) for _ in range(args.rounds))
                raw = _raw_call(responder.socket_path, case, requests, responses)
                floor = min(_time(raw, args.calls, args.cold) for _ in range(args.rounds))
                print(
                    f"{case:12s} Python only {python * 1e6:5.1f} µs | through a socket: "
                    f"CPU {best[0] * 1e6:6.1f} µs, wall {best[1] * 1e6:6.1f} µs | socket "
                    f"floor: CPU {floor[0] * 1e6:6.1f} µs, wall {floor[1] * 1e6:6.1f} µs"
                )
            finally:
                responder.close()
    finally:
        region.close()


if __name__ == "__main__":
    main()
