"""A small Python client for the agent's local OIP v2 endpoint on a Unix socket.

Stdlib only (plus numpy): one persistent HTTP/1.1 connection, reopened once when the
server has closed it. Errors are mapped once, here, from the HTTP status to the agent's
error tree, carrying the server's message.

Also ``load_input_file``: read an infer input from ``.npy``, ``.npz`` or ``.json`` and
cast it to the model's signature (what ``edge-agent infer MODEL --input FILE`` uses).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.contracts import OIP_TO_NUMPY
from agent.errors import (
    AgentUnreachableError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.oip import build_infer_request, parse_infer_response


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` over an AF_UNIX stream socket."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = Path(socket_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


# Errors that mean the server closed a kept-alive connection: retry once on a new one.
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class InferenceClient:
    """OIP v2 client over the agent's Unix socket. Not thread-safe: one per thread.

    Every method raises AgentUnreachableError when nothing answers on the socket, and
    an InferenceError subclass chosen by the HTTP status otherwise: 400/405/413 →
    InvalidRequestError, 404 → ModelNotFoundError, 503 → NotReadyError, other → InferenceError.
    """

    def __init__(self, socket_path: Path, timeout_s: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self._connection = UnixHTTPConnection(self.socket_path, timeout=timeout_s)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):
            reused = self._connection.sock is not None
            try:
                self._connection.request(method, path, body=body, headers=headers)
                response = self._connection.getresponse()
                data = response.read()
            except _STALE_CONNECTION:
                self._connection.close()
                if attempt == 2 or not reused:
                    raise AgentUnreachableError(
                        f"the agent at {self.socket_path} closed the connection"
                    ) from None
                continue
            except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
                self._connection.close()
                raise AgentUnreachableError(
                    f"cannot connect to the agent at {self.socket_path}: {exc}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                self._connection.close()
                raise InferenceError(
                    f"{method} {path} on {self.socket_path} failed: {exc!r}"
                ) from None
            if response.will_close:
                self._connection.close()
            return response.status, data
        raise AssertionError("unreachable")

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        status, data = self._request(method, path, body)
        if status == 200:
            return data
        raise _error_for(status, data)

    def _get_json(self, path: str) -> dict[str, Any]:
        data = self._call("GET", path)
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise InferenceError(f"GET {path}: the agent answered invalid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InferenceError(f"GET {path}: expected a JSON object, got {doc!r}")
        return doc

    # -- endpoints

    def live(self) -> bool:
        """True when the agent answers its liveness check; False when nothing answers."""
        try:
            status, _ = self._request("GET", "/v2/health/live")
        except AgentUnreachableError:
            return False
        return status == 200

    def ready(self) -> bool:
        """True when the agent is ready to serve; False when not, or nothing answers."""
        try:
            status, _ = self._request("GET", "/v2/health/ready")
        except AgentUnreachableError:
            return False
        return status == 200

    def server_metadata(self) -> dict[str, Any]:
        return self._get_json("/v2")

    def model_metadata(self, model: str) -> dict[str, Any]:
        return self._get_json(f"/v2/models/{model}")

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], version: str | None = None
    ) -> dict[str, np.ndarray]:
        """Run ``model`` (the live version, or exactly ``version``) on ``inputs``.

        Arrays are sent as they are: their dtype must be the model's datatype.
        """
        path = f"/v2/models/{model}"
        if version is not None:
            path += f"/versions/{version}"
        data = self._call("POST", path + "/infer", build_infer_request(inputs))
        try:
            return parse_infer_response(data)
        except InvalidRequestError as exc:
            raise InferenceError(f"the agent answered {exc}") from None


def _error_for(status: int, data: bytes) -> InferenceError:
    try:
        message = str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        message = data[:200].decode("utf-8", "replace") or "(no message)"
    text = f"{message} (HTTP {status})"
    if status in (400, 405, 411, 413, 431):
        return InvalidRequestError(text)
    if status == 404:
        return ModelNotFoundError(text)
    if status == 503:
        return NotReadyError(text)
    return InferenceError(text)


# ---------------------------------------------------------------------------- input files


def load_input_file(path: Path, metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Read infer inputs from a file, cast to the datatypes of ``metadata`` (OIP model
    metadata, as ``InferenceClient.model_metadata`` returns it).

    - ``.npy``: the model's single input (an error if the model has several);
    - ``.npz``: arrays named after the inputs;
    - ``.json``: an OIP request body (``{"inputs": [...]}``) or ``{"<input>": nested list}``.

    Raises InvalidRequestError for an unknown extension, an unreadable file, missing or
    unknown input names, or values that cannot take the input's datatype (floats for an
    integer input, say).
    """
    path = Path(path)
    specs = {t["name"]: t for t in metadata.get("inputs", [])}
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            if len(specs) != 1:
                raise InvalidRequestError(
                    f"{path}: a .npy file gives one input, but the model has inputs "
                    f"{list(specs)}; use .npz or .json with one array per input"
                )
            raw: dict[str, Any] = {next(iter(specs)): np.load(path, allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = {key: npz[key] for key in npz.files}
        elif suffix == ".json":
            raw = _read_json_inputs(path)
        else:
            raise InvalidRequestError(
                f"{path}: unknown input file type {suffix or '(none)'!r}; use .npy, .npz or .json"
            )
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"cannot read input file {path}: {exc}") from None
    missing = [name for name in specs if name not in raw]
    unknown = [name for name in raw if name not in specs]
    if missing or unknown:
        raise InvalidRequestError(
            f"{path}: the model's inputs are {list(specs)}; missing {missing}, unknown {unknown}"
        )
    return {name: _cast(path, name, raw[name], specs[name]["datatype"]) for name in specs}


def _read_json_inputs(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{path}: expected a JSON object")
    if "inputs" in doc and isinstance(doc["inputs"], list):
        raw: dict[str, Any] = {}
        for index, tensor in enumerate(doc["inputs"]):
            if not isinstance(tensor, dict) or "name" not in tensor or "data" not in tensor:
                raise InvalidRequestError(f"{path}: inputs[{index}] needs 'name' and 'data'")
            array = np.asarray(tensor["data"])
            if "shape" in tensor:
                array = array.reshape(tensor["shape"])
            raw[str(tensor["name"])] = array
        return raw
    return {str(name): np.asarray(value) for name, value in doc.items()}


def _cast(path: Path, name: str, value: Any, datatype: str) -> np.ndarray:
    array = np.asarray(value)
    if datatype == "BYTES":
        if array.dtype.kind not in "USO":
            raise InvalidRequestError(f"{path}: input {name!r} expects strings, got {array.dtype}")
        return array.astype(object)
    target = np.dtype(OIP_TO_NUMPY[datatype])
    if not np.can_cast(array.dtype, target, casting="same_kind"):
        raise InvalidRequestError(
            f"{path}: input {name!r} expects {datatype}, got {array.dtype} values"
        )
    return array.astype(target)
