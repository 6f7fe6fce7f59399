"""The requests the client remembers, and how it builds them: the signature a call is
remembered under, the JSON header and HTTP head of a binary or shared-memory infer
request, and where each tensor goes. Pure functions and two small records, no I/O;
``agent.client.inference`` (binary requests) and ``agent.client.shm_requests``
(shared-memory requests) keep the caches and decide when a remembered request applies.

Invariants:
- A signature names everything a request's bytes before the tensor data depend on
  (prefix, then each input's name, dtype and shape); ``signature_of`` hands back the
  inputs as C-contiguous arrays, copying those that are not.
- Binary tensors and shared-memory tensors start on ``ALIGN``-byte boundaries (the JSON
  header is padded with JSON whitespace for binary data).
- ``bounded_put`` bounds a cache at ``MAX_REMEMBERED`` entries (cleared when full).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from agent.client.decode import Plan
from agent.contracts import OIP_TO_NUMPY
from agent.oip.shm import SharedMemoryRegion

ALIGN: Final = 64  # binary data and shared-memory tensors start on this boundary
JOIN_BELOW: Final = 64 * 1024  # smaller requests go out as one joined buffer
MAX_REMEMBERED: Final = 256  # entries per cache before it is cleared
_BINARY_HEADERS: Final = (
    b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: "
)
# Native dtypes whose memory is the tensor's wire form (fixed size, little-endian here).
SENT_AS_IS: Final = frozenset(
    np.dtype(name) for oip, name in OIP_TO_NUMPY.items() if oip != "BYTES"
)
Signature = tuple[Any, ...]


class RememberedRequest:
    """A remembered binary request: its bytes before the tensor data, and the JSON header
    of its last response with that header's plan."""

    __slots__ = ("answer", "head", "joined")

    def __init__(self, head: bytes, joined: bool) -> None:
        self.head = head
        self.joined = joined  # small enough to send head and data as one joined buffer
        self.answer: tuple[bytes, Plan] | None = None


class RememberedShmRequest:
    """A remembered shared-memory request: the whole request, which inputs are copied
    and where (the others live in the region already), and the JSON header of its last
    response with that header's plan."""

    __slots__ = ("answer", "copies", "data")

    def __init__(self, data: bytes, copies: tuple[tuple[int, int], ...]) -> None:
        self.data = data
        self.copies = copies  # (input index, offset in the region)
        self.answer: tuple[bytes, Plan] | None = None


def model_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{model}"
    return path if version is None else f"{path}/versions/{version}"


def signature_of(
    prefix: tuple[Any, ...], inputs: Mapping[str, np.ndarray]
) -> tuple[Signature, list[np.ndarray]]:
    """The request's signature (``prefix``, then each input's name, dtype and shape) and
    the inputs as C-contiguous arrays. A list of outputs counts as its tuple."""
    key: list[Any] = list(prefix)
    outputs = key[-1]
    if outputs is not None and not isinstance(outputs, tuple):
        key[-1] = tuple(outputs)
    arrays: list[np.ndarray] = []
    for name, value in inputs.items():
        array = value if type(value) is np.ndarray else np.asarray(value)
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        arrays.append(array)
        key += (name, array.dtype, array.shape)
    return tuple(key), arrays


def bytes_of(array: np.ndarray) -> memoryview | bytes:
    """A C-contiguous array's memory as bytes (its wire form when its dtype is sent as is)."""
    return array.data.cast("B") if array.size else b""


def bounded_put(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= MAX_REMEMBERED:
        cache.clear()
    cache[key] = value


def json_header(doc: dict[str, Any], *, padded: bool) -> bytes:
    """Compact JSON; ``padded`` with JSON whitespace so tensor bytes after it align."""
    header = json.dumps(doc, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % ALIGN) if padded else header


def binary_headers(header_length: int) -> bytes:
    return _BINARY_HEADERS + str(header_length).encode() + b"\r\n"


def request_doc(
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


def shm_params(region: SharedMemoryRegion, offset: int, size: int) -> dict[str, Any]:
    return {
        "shared_memory_region": region.name,
        "shared_memory_offset": offset,
        "shared_memory_byte_size": size,
    }


def predicted_bytes(spec: Mapping[str, Any], batch: int | None) -> int | None:
    """An output's size from its metadata, a leading -1 taken as the inputs' batch."""
    datatype, shape = spec.get("datatype"), list(spec.get("shape", []))
    if not isinstance(datatype, str) or datatype == "BYTES" or datatype not in OIP_TO_NUMPY:
        return None
    if shape and shape[0] == -1 and batch is not None:
        shape[0] = batch
    if any(d < 0 for d in shape):
        return None
    return int(math.prod(shape)) * np.dtype(OIP_TO_NUMPY[datatype]).itemsize
