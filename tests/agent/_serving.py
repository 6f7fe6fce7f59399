"""Run a real InferenceServer on a real Unix socket in a background event loop (tests),
talk to it raw, and run a client as another local user."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.runtime.registry import ModelRegistry
from agent.serving.server import InferenceServer


class ServerThread:
    """An InferenceServer whose event loop runs in a daemon thread."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, make: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout=10)

    def start(self) -> None:
        self.call(self.server.start)

    def stop(self) -> None:
        self.call(self.server.stop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def short_socket_dir() -> Path:
    """A directory short enough for a Unix socket path (pytest's tmp_path can be too long)."""
    return Path(tempfile.mkdtemp(prefix="ef-", dir="/tmp"))


@contextmanager
def serving(registry: ModelRegistry, **kwargs: Any) -> Iterator[InferenceServer]:
    """Start a server on a fresh socket; stop it, remove the socket and its directory after."""
    directory = short_socket_dir()
    thread = ServerThread(InferenceServer(registry, directory / "infer.sock", **kwargs))
    try:
        thread.start()
        yield thread.server
    finally:
        try:
            thread.stop()
        finally:
            thread.close()
        shutil.rmtree(directory, ignore_errors=True)


class StdlibUnixConnection(http.client.HTTPConnection):
    """The standard library's HTTP client over AF_UNIX: a second, independent peer."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.socket_path))
        self.sock = sock


def raw(
    server: InferenceServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request on a fresh stdlib connection: (status, decoded JSON body or text)."""
    connection = StdlibUnixConnection(server.socket_path)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload.decode("utf-8", "replace")
    finally:
        connection.close()


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read ``count`` Content-Length framed responses from a raw socket."""
    buffer = b""
    responses: list[tuple[int, dict[str, str], bytes]] = []
    while len(responses) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return responses
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        while len(buffer) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        responses.append((int(lines[0].split()[1]), headers, buffer[:length]))
        buffer = buffer[length:]
    return responses


# ---------------------------------------------------------------------------- other users

OTHER_UID = 4242  # a uid with no process of the test's: "another local user"
_TREE = Path(__file__).resolve().parents[2]


def can_switch_users() -> bool:
    """Whether the tests may run a client as another uid (root, with setpriv)."""
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def open_to_every_user(server: InferenceServer) -> None:
    """Let any local user reach ``server``'s socket (its folder is the test's, 0700)."""
    server.socket_path.parent.chmod(0o755)
    server.socket_path.chmod(0o666)


def run_as(
    uid: int, script: str, *args: str, groups: Sequence[int] = (), timeout_s: float = 60.0
) -> Any:
    """Run ``script`` (Python, this tree importable, ``sys.argv[1:]`` = ``args``) as
    ``uid`` (group ``uid``, supplementary ``groups``) in a fresh process (setpriv); the
    JSON it prints last.

    Raises AssertionError with its stderr when it fails.
    """
    supplementary = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", supplementary,
         sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=timeout_s, cwd="/",
        env={**os.environ, "PYTHONPATH": str(_TREE), "HOME": "/"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def intrude(path: str, owners_key: str) -> dict[str, Any]:
    """What a local user that did not register the region "cam0" tries on it, through
    the socket at ``path``: list it, name it as input and output, unregister it (and
    all), register its owner's object (key ``owners_key``). Per attempt, the HTTP status
    and the JSON answer."""

    def call(method: str, url: str, body: Any = None) -> list[Any]:
        connection = StdlibUnixConnection(Path(path))
        try:
            connection.request(method, url, body=None if body is None else json.dumps(body))
            response = connection.getresponse()
            return [response.status, json.loads(response.read())]
        finally:
            connection.close()

    infer = "/v2/models/linear/infer"
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4]}
    region = {"shared_memory_region": "cam0", "shared_memory_byte_size": 16}
    output = {"name": "y", "parameters": {**region, "shared_memory_byte_size": 12}}
    return {
        "status": call("GET", "/v2/systemsharedmemory/status"),
        "status_one": call("GET", "/v2/systemsharedmemory/region/cam0/status"),
        "as_input": call("POST", infer, {"inputs": [{**tensor, "parameters": region}]}),
        "as_output": call("POST", infer, {"inputs": [{**tensor, "data": [1, 2, 3, 4]}],
                                          "outputs": [output]}),
        "unregister_one": call("POST", "/v2/systemsharedmemory/region/cam0/unregister"),
        "unregister_all": call("POST", "/v2/systemsharedmemory/unregister"),
        "register_owners_object": call("POST", "/v2/systemsharedmemory/region/cam0/register",
                                       {"key": owners_key, "byte_size": 64}),
    }  # fmt: skip
