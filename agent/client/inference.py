"""A lean Python client for the agent's local OIP v2 endpoint (Unix socket or loopback TCP).

Built for per-call CPU, not generality: one persistent HTTP/1.1 connection
(``agent.client.http``), tensors sent with the binary tensor extension by default (no
JSON encoding of data, the arrays' memory goes to the socket as it is), or through
system shared memory when asked (``agent.client.shm_requests``); binary tensors and
shared-memory tensors start on 64-byte boundaries. Errors are mapped once, here, from the
HTTP status to the agent's error tree, carrying the server's message.

Most callers send identically shaped tensors on every call, so the client remembers:

- per request signature (model, version, requested outputs, each input's name, dtype and
  shape), the request's bytes up to the tensor data: HTTP head and JSON header. A call
  then looks the signature up and sends those bytes and the arrays' memory in one write
  (one ``sendmsg`` when large). Calls through shared memory remember their requests in
  ``agent.client.shm_requests`` (the whole request, and where inputs are copied).
- per response JSON header (the exact bytes), a decode plan: each output's name, dtype,
  shape and where its bytes lie. A call then skips ``json.loads`` and builds each array
  over the body (binary) or copies it out of the region (shared memory). A remembered
  request also keeps its last response's header and plan: a response starting with the
  very same header is recognised by comparing bytes, before any copy or hash.

Invariants:
- A remembered request is only ever the bytes the uncached path would build for the same
  signature; requests with an ``id``, with BYTES tensors or non-native byte order are
  built afresh each call (their bytes vary). Responses to requests with an ``id`` are
  decoded afresh (the echoed id makes each header unique).
- A plan is only used when the body's size is exactly the JSON header plus the binary
  sizes the plan expects; otherwise the response is decoded the slow way, whose errors
  are the ones callers see.
- Returned arrays never alias memory the client reuses: binary outputs live in the
  response's own fresh buffer, shared-memory outputs are copied out of the region once.
- The caches are bounded (cleared when full); the shared-memory requests are forgotten
  with the model's output metadata when the agent refuses one (a new version may have
  other output shapes).

Requests are built by ``agent.client.requests``, responses decoded by
``agent.client.decode``; ``load_input_file`` (re-exported here) lives in
``agent.client.input_files``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.base.errors import (
    AgentUnreachableError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    NotReadyError,
)
from agent.client.decode import Plan, apply_plan, decode_slowly, plan_response
from agent.client.http import UnixHTTPConnection, request_head
from agent.client.input_files import load_input_file
from agent.client.requests import (
    JOIN_BELOW,
    SENT_AS_IS,
    RememberedRequest,
    RememberedShmRequest,
    Signature,
    binary_headers,
    bounded_put,
    bytes_of,
    json_header,
    model_path,
    request_doc,
    signature_of,
)
from agent.client.shm_requests import ShmRequests
from agent.oip.response import build_infer_request
from agent.oip.shm import SharedMemoryRegion
from agent.oip.tensors import tensor_head, tensor_to_bytes

__all__ = ["AgentUnreachableError", "InferenceClient", "load_input_file"]


class InferenceClient:
    """OIP v2 client over the agent's socket. Not thread-safe: one per thread.

    ``address`` is the Unix socket path, or ``(host, port)`` for the loopback TCP
    listener. ``binary`` (default True) sends and receives tensors with the binary tensor
    extension; False uses JSON. ``infer(..., shm=region)`` passes tensors through a
    registered ``SharedMemoryRegion`` instead. ``spin_s`` (default 0: off) polls for
    each response without blocking for up to that long before sleeping on the socket:
    lower latency where waking a sleeping thread is slow, paid for in CPU.

    Every method raises AgentUnreachableError when nothing answers (or the agent refuses
    this peer, 403), and an InferenceError subclass chosen by the HTTP status otherwise:
    400/405/408/413/431 → InvalidRequestError, 404 → ModelNotFoundError, 503 →
    NotReadyError, other → InferenceError.
    """

    def __init__(
        self,
        address: Path | tuple[str, int],
        timeout_s: float = 30.0,
        *,
        binary: bool = True,
        spin_s: float = 0.0,
    ) -> None:
        self.address: Path | tuple[str, int] = (
            address if isinstance(address, tuple) else Path(address)
        )
        self.socket_path = self.address  # the name older callers use
        self.timeout_s = timeout_s
        self.binary = binary
        self._connection = UnixHTTPConnection(self.address, timeout=timeout_s, spin_s=spin_s)
        self._requests: dict[Signature, RememberedRequest] = {}
        self._shm = ShmRequests(self.model_metadata)
        self._plans: dict[bytes, Plan] = {}

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
    ) -> tuple[int | None, bytearray]:
        status, header_length, data = self._connection.request(method, path, parts, extra)
        if status == 200:
            return header_length, data
        raise _error_for(status, data)

    def _send(
        self, head: bytes, parts: Sequence[bytes | memoryview] = ()
    ) -> tuple[int | None, bytearray]:
        status, header_length, data = self._connection.send(head, parts)
        if status == 200:
            return header_length, data
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

    def agent_status(self) -> dict[str, Any]:
        """The agent's own status (``GET /v2/health/agent``): live, ready, the device and
        its broker connection."""
        return self._get_object("/v2/health/agent")

    def server_metadata(self) -> dict[str, Any]:
        return self._get_object("/v2")

    def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return self._get_object(model_path(model, version))

    def model_ready(self, model: str, version: str | None = None) -> bool:
        """True when the model (version) serves; raises ModelNotFoundError when unknown."""
        return bool(self._get_object(model_path(model, version) + "/ready").get("ready"))

    def metrics(self) -> str:
        """The agent's Prometheus metrics, as text."""
        _, data = self._call("GET", "/metrics")
        return data.decode()

    def register_shared_memory(self, name: str, region: SharedMemoryRegion) -> None:
        """Register ``region`` under ``name`` (POST .../region/<name>/register).

        The agent opens the region's object with its own rights: when it runs as another
        user (the shipped unit's dynamic user), that user, and only it, is let open it
        first (``SharedMemoryRegion.grant``: an ACL entry for the socket's peer uid).
        Raises InferenceError when that cannot be done, and as every call."""
        agent_uid = self._connection.peer_uid()
        if agent_uid is not None and agent_uid != os.geteuid():
            region.grant(agent_uid)
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
        if shm is not None:
            return self._infer_shm(model, version, inputs, outputs, shm, request_id)
        if not (self.binary if binary is None else binary):
            path = model_path(model, version) + "/infer"
            _, data = self._call("POST", path, [build_infer_request(inputs, outputs, request_id)])
            return decode_slowly(data, None, None)
        signature, arrays = signature_of((model, version, outputs), inputs)
        remembered = self._requests.get(signature) if request_id is None else None
        if remembered is None:
            head, payloads = self._binary_request(signature, inputs, arrays, outputs, request_id)
            header_length, data = self._send(head, payloads)
        elif remembered.joined:
            # numpy arrays are buffers; its stubs say so only from Python 3.12 on.
            joined = b"".join((remembered.head, *arrays))  # type: ignore[arg-type]
            header_length, data = self._send(joined)
        else:
            header_length, data = self._send(remembered.head, [bytes_of(a) for a in arrays])
        return self._decode(data, header_length, None, request_id is None, remembered)

    # -- binary requests

    def _binary_request(
        self,
        signature: Signature,
        inputs: Mapping[str, np.ndarray],
        arrays: list[np.ndarray],
        outputs: Sequence[str] | None,
        request_id: str | None,
    ) -> tuple[bytes, list[bytes | memoryview]]:
        """A binary request's head (HTTP head and padded JSON header) and tensor bytes;
        remembered under ``signature`` when its bytes cannot vary."""
        model, version = signature[0], signature[1]
        tensors: list[dict[str, Any]] = []
        payloads: list[bytes | memoryview] = []
        for name, array in zip(inputs, arrays, strict=True):
            payload = tensor_to_bytes(array)
            tensors.append(tensor_head(name, array, {"binary_data_size": len(payload)}))
            payloads.append(payload)
        doc = request_doc(tensors, outputs, request_id, {"binary_data": True})
        header = json_header(doc, padded=bool(payloads))
        length = len(header) + sum(len(p) for p in payloads)
        path = model_path(model, version) + "/infer"
        head = request_head("POST", path, length, binary_headers(len(header))) + header
        if request_id is None and all(a.dtype in SENT_AS_IS for a in arrays):
            bounded_put(
                self._requests,
                signature,
                RememberedRequest(head, len(head) - len(header) + length < JOIN_BELOW),
            )
        return head, payloads

    # -- responses

    def _decode(
        self,
        data: bytearray,
        header_length: int | None,
        region: SharedMemoryRegion | None,
        remember: bool,
        request: RememberedRequest | RememberedShmRequest | None = None,
    ) -> dict[str, np.ndarray]:
        """The outputs of an infer response: through the plan of its JSON header when
        ``remember`` (and the body fits the plan), else parsed afresh. A remembered
        ``request`` keeps its last response's header and plan: the same header again is
        recognised by comparing bytes, without copying or hashing them."""
        end = len(data) if header_length is None else header_length
        if remember and 0 <= end <= len(data):
            answer = None if request is None else request.answer
            if answer is not None and len(answer[0]) == end and data.startswith(answer[0]):
                plan: Plan | None = answer[1]
            else:
                header = bytes(memoryview(data)[:end])
                plan = self._plans.get(header)
                if plan is None:
                    plan = plan_response(header)
                    if plan is not None:
                        bounded_put(self._plans, header, plan)
                if plan is not None and request is not None:
                    request.answer = (header, plan)
            if plan is not None and len(data) - end == plan.binary_bytes:
                return apply_plan(plan, data, end, region)
        return decode_slowly(data, header_length, region)

    # -- shared memory

    def _infer_shm(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        region: SharedMemoryRegion,
        request_id: str | None,
    ) -> dict[str, np.ndarray]:
        if region.name is None:
            raise InvalidRequestError("register the region first: register_shared_memory(...)")
        try:
            data, remembered = self._shm.request(
                model, version, inputs, outputs, region, request_id
            )
            header_length, body = self._send(data)
        except InvalidRequestError:
            self._shm.forget(model)  # a new version may have other output shapes
            raise
        return self._decode(body, header_length, region, request_id is None, remembered)


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
