"""A lean Python client for the agent's local OIP v2 endpoint (Unix socket or loopback TCP).

Built for per-call overhead, not generality: one persistent HTTP/1.1 connection
(``agent.client_http``), tensors sent with the binary tensor extension by default (no
JSON encoding of data, the arrays' memory goes to the socket as it is), or through
system shared memory when asked; binary tensors and shared-memory tensors start on
64-byte boundaries. Errors are mapped once, here, from the HTTP status to the agent's
error tree, carrying the server's message.

Also ``load_input_file``: read an infer input from ``.npy``, ``.npz`` or ``.json`` and
cast it to the model's signature (what ``edge-agent infer MODEL --input FILE`` uses).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from agent.client_http import UnixHTTPConnection
from agent.contracts import OIP_TO_NUMPY
from agent.errors import (
    AgentUnreachableError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.oip import build_infer_request, parse_infer_response
from agent.shm import SharedMemoryRegion
from agent.tensors import tensor_from_bytes, tensor_head, tensor_to_bytes

__all__ = ["AgentUnreachableError", "InferenceClient", "load_input_file"]

_ALIGN: Final = 64  # binary data and shared-memory tensors start on this boundary


class InferenceClient:
    """OIP v2 client over the agent's socket. Not thread-safe: one per thread.

    ``address`` is the Unix socket path, or ``(host, port)`` for the loopback TCP
    listener. ``binary`` (default True) sends and receives tensors with the binary tensor
    extension; False uses JSON. ``infer(..., shm=region)`` passes tensors through a
    registered ``SharedMemoryRegion`` instead.

    Every method raises AgentUnreachableError when nothing answers (or the agent refuses
    this peer, 403), and an InferenceError subclass chosen by the HTTP status otherwise:
    400/405/408/413/431 → InvalidRequestError, 404 → ModelNotFoundError, 503 →
    NotReadyError, other → InferenceError.
    """

    def __init__(
        self, address: Path | tuple[str, int], timeout_s: float = 30.0, *, binary: bool = True
    ) -> None:
        self.address: Path | tuple[str, int] = (
            address if isinstance(address, tuple) else Path(address)
        )
        self.socket_path = self.address  # the name older callers use
        self.timeout_s = timeout_s
        self.binary = binary
        self._connection = UnixHTTPConnection(self.address, timeout=timeout_s)
        self._outputs: dict[str, list[dict[str, Any]]] = {}  # output metadata, for shm

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport

    def _call(
        self,
        method: str,
        path: str,
        parts: Sequence[bytes | memoryview] = (),
        extra: bytes = b"",
    ) -> tuple[dict[bytes, bytes], bytearray]:
        status, headers, data = self._connection.request(method, path, parts, extra)
        if status == 200:
            return headers, data
        raise _error_for(status, data)

    def _get_json(self, path: str) -> Any:
        _, data = self._call("GET", path)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InferenceError(f"GET {path}: the agent answered invalid JSON: {exc}") from None

    def _get_object(self, path: str) -> dict[str, Any]:
        doc = self._get_json(path)
        if not isinstance(doc, dict):
            raise InferenceError(f"GET {path}: expected a JSON object, got {doc!r}")
        return doc

    # -- endpoints

    def live(self) -> bool:
        """True when the agent answers its liveness check; False when nothing answers."""
        try:
            status, _, _ = self._connection.request("GET", "/v2/health/live")
        except AgentUnreachableError:
            return False
        return status == 200

    def ready(self) -> bool:
        """True when the agent is ready to serve; False when not, or nothing answers."""
        try:
            status, _, _ = self._connection.request("GET", "/v2/health/ready")
        except AgentUnreachableError:
            return False
        return status == 200

    def server_metadata(self) -> dict[str, Any]:
        return self._get_object("/v2")

    def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return self._get_object(_model_path(model, version))

    def model_ready(self, model: str, version: str | None = None) -> bool:
        """True when the model (version) serves; raises ModelNotFoundError when unknown."""
        return bool(self._get_object(_model_path(model, version) + "/ready").get("ready"))

    def metrics(self) -> str:
        """The agent's Prometheus metrics, as text."""
        _, data = self._call("GET", "/metrics")
        return data.decode()

    def register_shared_memory(self, name: str, region: SharedMemoryRegion) -> None:
        """Register ``region`` under ``name`` (POST .../region/<name>/register)."""
        body = json.dumps({"key": region.key, "offset": 0, "byte_size": region.byte_size})
        self._call("POST", f"/v2/systemsharedmemory/region/{name}/register", [body.encode()])
        region.name = name

    def unregister_shared_memory(self, name: str | None = None) -> None:
        """Unregister ``name`` (None: every region)."""
        where = "" if name is None else f"/region/{name}"
        self._call("POST", f"/v2/systemsharedmemory{where}/unregister")

    def shared_memory_status(self, name: str | None = None) -> list[dict[str, Any]]:
        where = "" if name is None else f"/region/{name}"
        doc = self._get_json(f"/v2/systemsharedmemory{where}/status")
        if not isinstance(doc, list):
            raise InferenceError(f"shared memory status: expected a list, got {doc!r}")
        return doc

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        version: str | None = None,
        *,
        outputs: Sequence[str] | None = None,
        binary: bool | None = None,
        shm: SharedMemoryRegion | None = None,
        request_id: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` (the live version, or exactly ``version``) on ``inputs``; return
        the outputs (``outputs``: only these) by name.

        Arrays are sent as they are: their dtype must be the model's datatype. ``binary``
        overrides the client's default; ``shm`` (a region registered with
        ``register_shared_memory``) carries the inputs, and the outputs whose size the
        model's metadata predicts, through shared memory.
        """
        path = _model_path(model, version) + "/infer"
        if shm is not None:
            return self._infer_shm(model, path, inputs, outputs, shm, request_id)
        if not (self.binary if binary is None else binary):
            _, data = self._call("POST", path, [build_infer_request(inputs, outputs, request_id)])
            return self._decode(data, None)
        tensors: list[dict[str, Any]] = []
        payloads: list[bytes | memoryview] = []
        for name, value in inputs.items():
            array = np.asarray(value)
            payload = tensor_to_bytes(array)
            tensors.append(tensor_head(name, array, {"binary_data_size": len(payload)}))
            payloads.append(payload)
        doc = _request_doc(tensors, outputs, request_id, {"binary_data": True})
        return self._send_binary(path, doc, payloads)

    def _send_binary(
        self, path: str, doc: dict[str, Any], payloads: Sequence[bytes | memoryview]
    ) -> dict[str, np.ndarray]:
        headers, data = self._post_binary(path, doc, payloads)
        raw_length = headers.get(b"inference-header-content-length")
        return self._decode(data, int(raw_length) if raw_length is not None else None)

    def _post_binary(
        self, path: str, doc: dict[str, Any], payloads: Sequence[bytes | memoryview]
    ) -> tuple[dict[bytes, bytes], bytearray]:
        header = json.dumps(doc, separators=(",", ":")).encode()
        if payloads:  # pad with JSON whitespace so the tensor bytes start aligned
            header += b" " * (-len(header) % _ALIGN)
        extra = b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: "
        return self._call(
            "POST", path, [header, *payloads], extra + str(len(header)).encode() + b"\r\n"
        )

    @staticmethod
    def _decode(data: bytearray, header_length: int | None) -> dict[str, np.ndarray]:
        try:
            return parse_infer_response(data, header_length)
        except InvalidRequestError as exc:
            raise InferenceError(f"the agent answered {exc}") from None

    def _infer_shm(
        self,
        model: str,
        path: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        region: SharedMemoryRegion,
        request_id: str | None,
    ) -> dict[str, np.ndarray]:
        if region.name is None:
            raise InvalidRequestError("register the region first: register_shared_memory(...)")
        tensors: list[dict[str, Any]] = []
        offset = 0
        batch: int | None = None
        for name, value in inputs.items():
            array = np.asarray(value)
            batch = array.shape[0] if batch is None and array.ndim else batch
            size = region.write(offset, tensor_to_bytes(array))
            tensors.append(tensor_head(name, array, _shm_params(region, offset, size)))
            offset += size + (-size % _ALIGN)
        if model not in self._outputs:
            self._outputs[model] = self.model_metadata(model).get("outputs", [])
        requested: list[dict[str, Any]] = []
        for spec in self._outputs[model]:
            name = spec["name"]
            if outputs is not None and name not in outputs:
                continue
            predicted = _predicted_bytes(spec, batch)
            if predicted is not None and offset + predicted <= region.byte_size:
                requested.append(
                    {"name": name, "parameters": _shm_params(region, offset, predicted)}
                )
                offset += predicted + (-predicted % _ALIGN)
            else:
                requested.append({"name": name, "parameters": {"binary_data": True}})
        doc: dict[str, Any] = {"inputs": tensors, "outputs": requested}
        if request_id is not None:
            doc["id"] = request_id
        try:
            headers, data = self._post_binary(path, doc, [])
        except InvalidRequestError:
            self._outputs.pop(model, None)  # a new version may have other output shapes
            raise
        raw_length = headers.get(b"inference-header-content-length")
        header_length = int(raw_length) if raw_length is not None else None
        result = self._decode(data, header_length)
        try:
            answer = json.loads(data if header_length is None else data[:header_length])
            for tensor in answer["outputs"]:
                params = tensor.get("parameters") or {}
                if "shared_memory_region" not in params:
                    continue
                start = int(params["shared_memory_offset"])
                chunk = region.buffer[start : start + int(params["shared_memory_byte_size"])]
                array = tensor_from_bytes(
                    tensor["name"], tensor["datatype"], tensor["shape"], chunk
                )
                result[tensor["name"]] = array.copy()
        except (ValueError, KeyError, TypeError, InvalidRequestError) as exc:
            raise InferenceError(f"the agent answered a malformed shm response: {exc!r}") from None
        return result


def _model_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{model}"
    return path if version is None else f"{path}/versions/{version}"


def _request_doc(
    tensors: list[dict[str, Any]],
    outputs: Sequence[str] | None,
    request_id: str | None,
    output_parameters: dict[str, Any],
) -> dict[str, Any]:
    doc: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        doc["id"] = request_id
    if outputs:
        doc["outputs"] = [{"name": n, "parameters": output_parameters} for n in outputs]
    else:
        doc["parameters"] = {"binary_data_output": True}
    return doc


def _shm_params(region: SharedMemoryRegion, offset: int, size: int) -> dict[str, Any]:
    return {
        "shared_memory_region": region.name,
        "shared_memory_offset": offset,
        "shared_memory_byte_size": size,
    }


def _predicted_bytes(spec: Mapping[str, Any], batch: int | None) -> int | None:
    """An output's size from its metadata, a leading -1 taken as the inputs' batch."""
    datatype, shape = spec.get("datatype"), list(spec.get("shape", []))
    if not isinstance(datatype, str) or datatype == "BYTES" or datatype not in OIP_TO_NUMPY:
        return None
    if shape and shape[0] == -1 and batch is not None:
        shape[0] = batch
    if any(d < 0 for d in shape):
        return None
    return int(math.prod(shape)) * np.dtype(OIP_TO_NUMPY[datatype]).itemsize


def _error_for(status: int, data: bytes | bytearray) -> InferenceError:
    try:
        message = str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        message = bytes(data[:200]).decode("utf-8", "replace") or "(no message)"
    text = f"{message} (HTTP {status})"
    if status in (400, 405, 408, 411, 413, 431):
        return InvalidRequestError(text)
    if status == 403:
        return AgentUnreachableError(text)
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
