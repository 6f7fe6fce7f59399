"""The Open Inference Protocol v2 documents: pure functions, no I/O.

It turns an infer request body into numpy arrays checked against a model's manifest, and
arrays back into a response body; it also shapes the metadata documents. Converting one
tensor is ``agent.tensors``'s job; this module owns the documents around the tensors and
where each tensor's data travels, per tensor:

- JSON ``data`` (flat or nested, row-major);
- the binary tensor extension: the JSON header is followed by raw little-endian bytes,
  ``parameters.binary_data_size`` gives each tensor's share, in the order of the tensors
  in the JSON, and the header's length travels in ``Inference-Header-Content-Length``;
- the system shared-memory extension: ``parameters.shared_memory_region`` (plus
  ``shared_memory_offset`` and ``shared_memory_byte_size``) names bytes in a region the
  client registered; the codec reaches them only through an injected ``SharedMemory``.

Invariants:
- Every rejection is an ``InvalidRequestError`` whose message names the tensor (or the
  field) and says what was expected and what was got; the HTTP edge maps it to 400.
- A parsed input has exactly the manifest's datatype and a shape that fits the manifest's
  (``-1`` is a wildcard); every manifest input is present, no other is.
- Values are never silently changed (``agent.tensors`` refuses what does not fit).
- Binary sections are accounted for exactly: a size that disagrees with the shape, or
  bytes left over or missing, is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np

from agent.contracts import OIP_TO_NUMPY, Manifest, TensorSpec
from agent.errors import InvalidRequestError
from agent.tensors import (
    datatype_of,
    shape_fits,
    tensor_from_bytes,
    tensor_from_json,
    tensor_head,
    tensor_to_bytes,
    tensor_to_json,
)

PLATFORM: Final = "onnxruntime_onnx"
EXTENSIONS: Final = ("binary_tensor_data", "system_shared_memory")
HEADER_LENGTH: Final = "Inference-Header-Content-Length"


class SharedMemory(Protocol):
    """Access to registered shared-memory regions (``agent.shm`` implements it)."""

    def view(self, region: str, offset: int, byte_size: int) -> memoryview:
        """``byte_size`` bytes at ``offset`` in ``region``; InvalidRequestError if out of it."""
        ...


@dataclass(frozen=True)
class ShmRef:
    """Where a tensor lives in a registered shared-memory region."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class OutputRequest:
    """One requested output and how it should travel back."""

    name: str
    binary: bool
    shm: ShmRef | None = None


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request.

    ``outputs`` is None when the client asked for every output; ``binary_output`` is the
    request-wide default (``parameters.binary_data_output``).
    """

    inputs: dict[str, np.ndarray]
    outputs: list[OutputRequest] | None
    id: str | None
    parameters: Mapping[str, Any]
    binary_output: bool = False

    @property
    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [o.name for o in self.outputs]


# ---------------------------------------------------------------------------- requests


def parse_infer_request(
    body: bytes | bytearray | memoryview,
    manifest: Manifest,
    *,
    header_length: int | None = None,
    shm: SharedMemory | None = None,
) -> InferRequest:
    """Parse an OIP v2 infer request body against ``manifest``'s signature.

    ``header_length`` (from ``Inference-Header-Content-Length``) splits the JSON header
    from the binary tensor data after it; ``shm`` resolves shared-memory references
    (None: refuse them). Raises InvalidRequestError naming the tensor and expected vs
    got: bad JSON, a body that is not an object, an unknown, duplicate or missing input,
    a datatype or shape that does not match the manifest, data whose count or size
    differs from the shape's, values of the wrong kind or out of range, binary sections
    that do not add up, an unknown output.
    """
    view = memoryview(body)
    header: bytes | bytearray | memoryview
    if header_length is None:
        header, binary = body, view[:0]
    else:
        if not 0 <= header_length <= len(view):
            raise InvalidRequestError(
                f"{HEADER_LENGTH} expected 0..{len(view)} (the body's length), got {header_length}"
            )
        header, binary = view[:header_length], view[header_length:]
    doc = _load_json_object(header)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequestError(f"'id' expected a string, got {_json_type(request_id)}")
    parameters = _parameters(doc, "request")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidRequestError(
            f"'inputs' expected a list of tensors, got {_json_type(raw_inputs)}"
        )
    specs = {t.name: t for t in manifest.inputs}
    inputs: dict[str, np.ndarray] = {}
    cursor = 0
    for index, raw in enumerate(raw_inputs):
        name, array, used = _parse_input(index, raw, specs, binary, cursor, shm)
        cursor += used
        if name in inputs:
            raise InvalidRequestError(f"input {name!r} is given more than once")
        inputs[name] = array
    if cursor != len(binary):
        raise InvalidRequestError(
            f"binary tensor data: the inputs' binary_data_size add up to {cursor} bytes, "
            f"the body carries {len(binary)} after the JSON header"
        )
    missing = [t for t in manifest.inputs if t.name not in inputs]
    if missing:
        raise InvalidRequestError(
            "missing input "
            + ", ".join(f"{t.name!r} (expected {t.datatype} {list(t.shape)})" for t in missing)
        )
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidRequestError(
            f"parameter 'binary_data_output' expected true/false, got {binary_output!r}"
        )
    return InferRequest(
        inputs=inputs,
        outputs=_parse_outputs(doc.get("outputs"), manifest.outputs, binary_output, shm),
        id=request_id,
        parameters=parameters,
        binary_output=binary_output,
    )


def _load_json_object(header: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        doc = json.loads(header if not isinstance(header, memoryview) else bytes(header))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"request body expected a JSON object, got {_json_type(doc)}")
    return doc


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _parameters(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequestError(
            f"{where}: 'parameters' expected an object, got {_json_type(parameters)}"
        )
    return parameters


def _int_parameter(params: Mapping[str, Any], key: str, where: str, default: int | None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequestError(
            f"{where}: parameter {key!r} expected an integer >= 0, got {value!r}"
        )
    return value


def _shm_ref(params: Mapping[str, Any], where: str) -> ShmRef | None:
    region = params.get("shared_memory_region")
    if region is None:
        if "shared_memory_byte_size" in params or "shared_memory_offset" in params:
            raise InvalidRequestError(
                f"{where}: shared memory parameters without 'shared_memory_region'"
            )
        return None
    if not isinstance(region, str):
        raise InvalidRequestError(
            f"{where}: 'shared_memory_region' expected a string, got {_json_type(region)}"
        )
    if "shared_memory_byte_size" not in params:
        raise InvalidRequestError(
            f"{where}: 'shared_memory_region' needs 'shared_memory_byte_size'"
        )
    return ShmRef(
        region,
        _int_parameter(params, "shared_memory_offset", where, 0),
        _int_parameter(params, "shared_memory_byte_size", where, None),
    )


def _parse_input(
    index: int,
    raw: Any,
    specs: Mapping[str, TensorSpec],
    binary: memoryview,
    cursor: int,
    shm: SharedMemory | None,
) -> tuple[str, np.ndarray, int]:
    """One input: (name, array, bytes of the binary section it used)."""
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"inputs[{index}] expected an object, got {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError(f"inputs[{index}]: 'name' expected a string")
    spec = specs.get(name)
    if spec is None:
        raise InvalidRequestError(f"unknown input {name!r}: the model's inputs are {list(specs)}")
    datatype = raw.get("datatype")
    if datatype != spec.datatype:
        raise InvalidRequestError(
            f"input {name!r}: datatype expected {spec.datatype}, got {datatype!r}"
            if not isinstance(datatype, str)
            else f"input {name!r}: datatype expected {spec.datatype}, got {datatype}"
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequestError(
            f"input {name!r}: shape expected a list of integers >= 0, got {shape!r}"
        )
    if not shape_fits(spec.shape, shape):
        raise InvalidRequestError(f"input {name!r}: shape expected {list(spec.shape)}, got {shape}")
    where = f"input {name!r}"
    params = _parameters(raw, where)
    ref = _shm_ref(params, where)
    if "binary_data_size" in params:
        if ref is not None or "data" in raw:
            raise InvalidRequestError(
                f"{where}: give one of 'data', binary_data_size or shared memory"
            )
        size = _int_parameter(params, "binary_data_size", where, None)
        if cursor + size > len(binary):
            raise InvalidRequestError(
                f"{where}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - cursor} bytes left after the JSON header)"
            )
        return name, tensor_from_bytes(name, datatype, shape, binary[cursor : cursor + size]), size
    if ref is not None:
        if "data" in raw:
            raise InvalidRequestError(f"{where}: give one of 'data' or shared memory")
        if shm is None:
            raise InvalidRequestError(f"{where}: shared memory is not available on this listener")
        buffer = shm.view(ref.region, ref.offset, ref.byte_size)
        return name, tensor_from_bytes(name, datatype, shape, buffer), 0
    if "data" not in raw:
        raise InvalidRequestError(f"{where}: missing 'data'")
    return name, tensor_from_json(name, datatype, shape, raw["data"]), 0


def _parse_outputs(
    raw: Any, specs: Sequence[TensorSpec], binary_default: bool, shm: SharedMemory | None
) -> list[OutputRequest] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequestError(f"'outputs' expected a list, got {_json_type(raw)}")
    known = [t.name for t in specs]
    outputs: dict[str, OutputRequest] = {}
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError(f"outputs[{index}] expected an object with a 'name'")
        if name not in known:
            raise InvalidRequestError(f"unknown output {name!r}: the model's outputs are {known}")
        where = f"output {name!r}"
        params = _parameters(item, where)
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InvalidRequestError(f"{where}: 'binary_data' expected true/false, got {binary!r}")
        ref = _shm_ref(params, where)
        if ref is not None and shm is None:
            raise InvalidRequestError(f"{where}: shared memory is not available on this listener")
        outputs.setdefault(name, OutputRequest(name, binary, ref))
    return list(outputs.values()) or None


# ---------------------------------------------------------------------------- responses


def _shm_tensor(name: str, array: np.ndarray, ref: ShmRef, shm: SharedMemory) -> dict[str, Any]:
    payload = tensor_to_bytes(array)
    if len(payload) > ref.byte_size:
        raise InvalidRequestError(
            f"output {name!r}: {datatype_of(array)} {list(array.shape)} needs {len(payload)} "
            f"bytes, shared_memory_byte_size is {ref.byte_size}"
        )
    shm.view(ref.region, ref.offset, len(payload))[:] = payload
    parameters = {
        "shared_memory_region": ref.region,
        "shared_memory_offset": ref.offset,
        "shared_memory_byte_size": len(payload),
    }
    return tensor_head(name, array, parameters)


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    request: InferRequest,
    shm: SharedMemory | None = None,
) -> tuple[list[bytes | memoryview], int | None]:
    """The body of an infer response as parts, and the JSON header's length when binary
    tensor data follows it (None: the body is plain JSON).

    Each output travels as the request asked: JSON, binary, or written into shared
    memory. Raises InvalidRequestError when an output does not fit its shared memory.
    """
    wanted = {o.name: o for o in request.outputs or ()}
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    tensors: list[dict[str, Any]] = []
    payloads: list[bytes | memoryview] = []
    for name, array in outputs.items():
        choice = wanted.get(name)
        if choice is not None and choice.shm is not None:
            assert shm is not None  # _parse_outputs refused shm references without access
            tensors.append(_shm_tensor(name, array, choice.shm, shm))
        elif choice.binary if choice is not None else request.binary_output:
            payload = tensor_to_bytes(array)
            tensors.append(tensor_head(name, array, {"binary_data_size": len(payload)}))
            payloads.append(payload)
        else:
            tensors.append(tensor_to_json(name, array))
    doc["outputs"] = tensors
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not payloads:
        return [header], None
    return [header, *payloads], len(header)


def build_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    request_id: str | None = None,
) -> bytes:
    """The JSON body of an infer response, outputs in the given order."""
    request = InferRequest(inputs={}, outputs=None, id=request_id, parameters={})
    parts, _ = encode_infer_response(model_name, model_version, outputs, request)
    return bytes(parts[0])


def build_infer_request(
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    request_id: str | None = None,
) -> bytes:
    """The JSON body of an infer request (what a client sends)."""
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    doc["inputs"] = [tensor_to_json(name, np.asarray(a)) for name, a in inputs.items()]
    if output_names:
        doc["outputs"] = [{"name": n} for n in output_names]
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_infer_response(
    body: bytes | bytearray | memoryview, header_length: int | None = None
) -> dict[str, np.ndarray]:
    """The outputs of an infer response body, by name (binary tensors share ``body``'s
    memory; outputs left in shared memory are absent: read them from the region).

    Raises InvalidRequestError when the body is not an OIP infer response.
    """
    view = memoryview(body)
    header = view if header_length is None else view[:header_length]
    binary = view[len(header) :]
    try:
        doc = json.loads(bytes(header))
        result: dict[str, np.ndarray] = {}
        cursor = 0
        for tensor in doc["outputs"]:
            name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
            params = tensor.get("parameters") or {}
            if "binary_data_size" in params:
                size = int(params["binary_data_size"])
                chunk = binary[cursor : cursor + size]
                cursor += size
                result[name] = tensor_from_bytes(name, datatype, shape, chunk)
            elif "data" in tensor:
                dtype = OIP_TO_NUMPY[datatype]
                result[name] = np.asarray(tensor["data"], dtype=dtype).reshape(shape)
        return result
    except (ValueError, TypeError, KeyError, InvalidRequestError) as exc:
        raise InvalidRequestError(f"not an OIP infer response: {exc!r}") from None


# ---------------------------------------------------------------------------- metadata


def model_metadata(manifest: Manifest) -> dict[str, Any]:
    """The OIP model metadata document of the version ``manifest`` describes."""
    return {
        "name": manifest.name,
        "versions": [manifest.version],
        "platform": PLATFORM,
        "inputs": [t.to_json() for t in manifest.inputs],
        "outputs": [t.to_json() for t in manifest.outputs],
    }


def error_body(message: str) -> bytes:
    """The JSON body of an error response: ``{"error": message}``."""
    return json.dumps({"error": message}).encode()
