"""Open Inference Protocol v2 responses: encoding an infer response (the server) and
decoding one (the client). Pure functions, no I/O; requests are ``agent.oip.request``'s.

Each output travels as its request asked: JSON, binary data after the JSON header, or
written into the client's shared memory. A request plan (``RequestPlan``, made by
``agent.oip.request``) keeps the response headers built for it as ``ResponseTemplate``s
(both are ``agent.oip.documents``'), so a repeat request with the same output signature
only fills in the outputs' bytes.

Invariants:
- A template is only used for the exact plan, outputs (names, dtypes, shapes, in order)
  and id it was built for; an output that does not fit its shared memory is refused on
  every request (InvalidRequestError).
- Decoding refuses anything that is not an OIP infer response (InvalidRequestError).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from agent.base.errors import InvalidRequestError
from agent.contracts import OIP_TO_NUMPY
from agent.oip.documents import InferRequest, ResponseTemplate, SharedMemory, ShmRef
from agent.oip.tensors import (
    datatype_of,
    dump_json,
    load_json,
    tensor_from_bytes,
    tensor_head,
    tensor_to_bytes,
    tensor_to_json,
)

# Response templates kept per plan: distinct output shapes of one header are few.
_MAX_TEMPLATES: Final = 8


def _write_shm(
    name: str, array: np.ndarray, payload: bytes | memoryview, ref: ShmRef, shm: SharedMemory
) -> None:
    """Copy an output into shared memory; InvalidRequestError when it does not fit."""
    if len(payload) > ref.byte_size:
        raise InvalidRequestError(
            f"output {name!r}: {datatype_of(array)} {list(array.shape)} needs {len(payload)} "
            f"bytes, shared_memory_byte_size is {ref.byte_size}"
        )
    shm.view(ref.region, ref.offset, len(payload))[:] = payload


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
    memory. A request parsed from a plan reuses the response header built for the same
    model, version and output names, dtypes and shapes when no output travels as JSON or
    is BYTES (whose sizes depend on the values). Raises InvalidRequestError when an
    output does not fit its shared memory.
    """
    plan = request.plan
    responses = None if plan is None else plan.responses
    key: tuple[Any, ...] | None = None
    if (
        plan is not None
        and responses is not None
        and request.id == plan.id  # the same request as the plan's, not a changed copy
        and request.outputs is plan.outputs
        and request.binary_output == plan.binary_output
    ):
        key = template_key(model_name, model_version, outputs)
        template = responses.get(key)
        if template is not None:
            return _fill(template, outputs, shm)
    wanted = {o.name: o for o in request.outputs or ()}
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    tensors: list[dict[str, Any]] = []
    payloads: list[bytes | memoryview] = []
    refs: list[ShmRef | None] = []
    for name, array in outputs.items():
        choice = wanted.get(name)
        payload: bytes | memoryview | None = None
        if choice is not None and choice.shm is not None:
            assert shm is not None  # _parse_outputs refused shm references without access
            payload = tensor_to_bytes(array)
            _write_shm(name, array, payload, choice.shm, shm)
            tensors.append(tensor_head(name, array, _shm_parameters(choice.shm, len(payload))))
        elif choice.binary if choice is not None else request.binary_output:
            payload = tensor_to_bytes(array)
            tensors.append(tensor_head(name, array, {"binary_data_size": len(payload)}))
            payloads.append(payload)
        else:
            tensors.append(tensor_to_json(name, array))
            key = None  # its values are in the header
        if tensors[-1]["datatype"] == "BYTES":
            key = None  # its size is in the header
        refs.append(choice.shm if choice is not None else None)
    doc["outputs"] = tensors
    header = dump_json(doc)
    if key is not None and responses is not None and len(responses) < _MAX_TEMPLATES:
        all_binary = len(payloads) == len(refs)
        responses[key] = ResponseTemplate(
            header, None if all_binary else tuple(refs), len(header) if payloads else None
        )
    if not payloads:
        return [header], None
    return [header, *payloads], len(header)


def template_key(
    model_name: str, model_version: str, outputs: Mapping[str, np.ndarray]
) -> tuple[Any, ...]:
    """What a response template is kept under in its plan: the model, its version, and
    each output's name, dtype and shape, in order."""
    return (model_name, model_version, *[(n, a.dtype, a.shape) for n, a in outputs.items()])


def _shm_parameters(ref: ShmRef, byte_size: int) -> dict[str, Any]:
    return {
        "shared_memory_region": ref.region,
        "shared_memory_offset": ref.offset,
        "shared_memory_byte_size": byte_size,
    }


def _fill(
    template: ResponseTemplate, outputs: Mapping[str, np.ndarray], shm: SharedMemory | None
) -> tuple[list[bytes | memoryview], int | None]:
    """A response from a cached header: the outputs' bytes follow it or go to shared
    memory (its bounds checked now: a region can change between requests). ``outputs``
    has the template's signature (its key)."""
    parts: list[bytes | memoryview] = [template.header]
    if template.shm_refs is None:
        parts += [tensor_to_bytes(array) for array in outputs.values()]
        return parts, template.header_length
    for ref, (name, array) in zip(template.shm_refs, outputs.items(), strict=True):
        payload = tensor_to_bytes(array)
        if ref is None:
            parts.append(payload)
        else:
            assert shm is not None  # _parse_outputs refused shm references without access
            _write_shm(name, array, payload, ref, shm)
    return parts, template.header_length


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
    return dump_json(doc)


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
        doc = load_json(bytes(header))
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
