"""Parsing an Open Inference Protocol v2 infer request: pure functions (and one cache), no I/O.

It turns an infer request body into numpy arrays checked against a model's manifest: an
``InferRequest`` (the values it makes, and the plan below, are ``agent.oip.documents``').
Converting one tensor is ``agent.oip.tensors``'s job; this module owns the checks of the
document around the tensors and where each tensor's data travels, per tensor:

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
  (``-1`` is a wildcard) and that an array can have (``agent.oip.tensors.check_shape``:
  ``[0, 10**20]`` is refused, not left to numpy); every manifest input is present, no
  other is.
- Values are never silently changed (``agent.oip.tensors`` refuses what does not fit).
- Binary sections are accounted for exactly: a size that disagrees with the shape, or
  bytes left over or missing, is refused.

Plans: parsing checks a request's JSON header into a ``RequestPlan`` (where each input's
bytes are, the outputs asked for, id, parameters), then builds the arrays from it. A
``PlanCache`` (in ``agent.oip.documents``: no numpy; bounded; the server's router owns one)
keeps plans by manifest identity, whether shared memory is available and the header's
exact bytes, so a repeated header skips the
JSON and its checks: the same bytes against the same manifest pass the same checks. Only
headers whose inputs carry no JSON ``data`` are kept. What depends on a request's own
bytes is checked on every request, plan or not: the binary section's length, BOOL bytes,
BYTES elements, and each shared-memory reference against its region as it is now. A plan
also keeps the response headers built for it (``agent.oip.response``); the outputs'
bytes, and their fit in shared memory, are per request. Responses (encoding them, and
decoding them for the client) live in ``agent.oip.response``, the metadata and error
documents in ``agent.oip.documents``.

Large JSON bodies: the raw text of each flat ``"data": [...]`` list is cut out of the body
before the JSON is parsed (``_split_data``) and read straight into a numpy buffer
(``agent.oip.tensors.tensor_from_json_text``); the rest of the document is parsed and
checked as usual. Whenever that path cannot say (a nested or non-numeric list, a ``data``
key that is not an input's, any refusal), the whole body is parsed again the plain way,
so what is accepted, and every error message, is the plain path's.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import secrets
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

import numpy as np

from agent.base.errors import InvalidRequestError
from agent.contracts import Manifest, TensorSpec
from agent.oip.documents import (
    HEADER_LENGTH,
    InferRequest,
    InputPlan,
    OutputRequest,
    PlanCache,
    RequestPlan,
    SharedMemory,
    ShmRef,
)
from agent.oip.tensors import (
    check_binary_size,
    check_shape,
    load_json,
    shape_fits,
    tensor_from_bytes,
    tensor_from_json,
    tensor_from_json_text,
    wire_dtype,
)

# Bodies from this size on try the fast path for their ``data`` lists (below it, cutting
# the lists out costs about what it saves).
SPLIT_MIN_BYTES: Final = 16 * 1024
# A ``"data"`` key whose value is a list; the list's text runs to the first ``]`` after it.
_DATA_LIST: Final = re.compile(rb'"data"\s*:\s*\[')
# What a flat list of numbers has none of: a nested list, a string, an object.
_NOT_FLAT: Final = (b"[", b'"', b"{")
# A placeholder for a cut-out list is this process's secret plus its number: a client
# cannot write one, so a placeholder found is one this module put there.
_MARK: Final = "edgefleet-data-" + secrets.token_hex(8) + "-"

# ---------------------------------------------------------------------------- requests


def parse_infer_request(
    body: bytes | bytearray | memoryview,
    manifest: Manifest,
    *,
    header_length: int | None = None,
    shm: SharedMemory | None = None,
    plans: PlanCache | None = None,
) -> InferRequest:
    """Parse an OIP v2 infer request body against ``manifest``'s signature.

    ``header_length`` (from ``Inference-Header-Content-Length``) splits the JSON header
    from the binary tensor data after it; ``shm`` resolves shared-memory references
    (None: refuse them). A header seen before for this manifest reuses its checked plan
    from ``plans`` (None: check it afresh). Raises InvalidRequestError naming the tensor
    and expected vs got: bad JSON, a body that is not an object, an unknown, duplicate or
    missing input, a datatype or shape that does not match the manifest, data whose
    count or size differs from the shape's, values of the wrong kind or out of range,
    binary sections that do not add up, an unknown output.
    """
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)  # all JSON: no binary section
    elif not 0 <= header_length <= len(view):
        raise InvalidRequestError(
            f"{HEADER_LENGTH} expected 0..{len(view)} (the body's length), got {header_length}"
        )
    binary = view[header_length:]
    shm_available = shm is not None
    if header_length == len(view) and header_length >= SPLIT_MIN_BYTES:
        fast = _parse_split(_findable(view), manifest, shm)
        if fast is not None:
            return fast
    if plans is None or header_length > plans.max_header_bytes:
        header = body if header_length == len(view) else view[:header_length]
        plan = _plan(_load_json_object(header), manifest, shm_available)
    else:
        # bytes: one copy (none for a whole bytes body), no view in between
        key = body[:header_length] if type(body) is bytes else bytes(view[:header_length])
        found = plans.get(manifest, shm_available, key)
        if found is None:
            plan = _plan(_load_json_object(key), manifest, shm_available)
            # A header with an id is one request's: a client that numbers its requests
            # would only push the others' plans out.
            if plan.is_reusable and plan.id is None:
                plans.put(shm_available, key, plan)
        else:
            plan = found
    return InferRequest(
        _inputs(plan, binary, shm),
        plan.outputs,
        plan.id,
        plan.parameters,
        plan.binary_output,
        plan,
    )


def _findable(view: memoryview) -> bytes | bytearray | mmap.mmap:
    """The bytes ``view`` shows, as an object with ``find``: the bytes, bytearray or mmap
    it covers whole (the server's receive buffer of a large body), else a copy. A copy of
    a 3 MB body costs ~750 page faults under the agent's malloc settings."""
    whole = view.obj
    if (
        isinstance(whole, (bytes, bytearray, mmap.mmap))
        and view.ndim == 1
        and view.itemsize == 1
        and view.c_contiguous
        and len(view) == len(whole)  # then it starts at 0: no offset, no stride
    ):
        return whole
    return view.tobytes()


def _split_data(
    body: bytes | bytearray | mmap.mmap, most: int
) -> tuple[bytes, list[tuple[int, int]]] | None:
    """``body`` with the text of each flat ``"data": [...]`` list replaced by a placeholder
    string (``_MARK`` and its index), and where those texts are in ``body`` (start, end:
    not copied; each large copy costs page faults under the agent's malloc settings,
    agent/runtime/memory.py); None when ``body`` has more than
    ``most`` ``"data"`` lists (the model's inputs: then not all are inputs' data, and a
    body made of ``"data"`` lists costs a few loops here, not one per list). Only a list
    without ``[``, ``"`` or ``{`` in it is cut out, so its text ends at the first ``]``. A
    match inside a string or under another key is harmless: its placeholder does not land
    on an input's ``data`` and ``_parse_split`` gives up."""
    pieces: list[bytes | bytearray] = []
    texts: list[tuple[int, int]] = []
    done = 0
    seen = 0
    found = _DATA_LIST.search(body)
    while found is not None:
        seen += 1
        if seen > most:
            return None
        start = found.end() - 1
        end = body.find(b"]", start) + 1
        if not end:
            break
        if not any(body.find(mark, start + 1, end) >= 0 for mark in _NOT_FLAT):
            pieces += (body[done:start], b'"', f"{_MARK}{len(texts)}".encode(), b'"')
            texts.append((start, end))
            done = end
        found = _DATA_LIST.search(body, end)
    pieces.append(body[done:])
    return b"".join(pieces), texts


def _parse_split(
    body: bytes | bytearray | mmap.mmap, manifest: Manifest, shm: SharedMemory | None
) -> InferRequest | None:
    """A whole-JSON request read with its flat ``data`` lists cut out (``_split_data``)
    and read into arrays directly; None when that cannot decide: then the plain path
    parses the body again and says what, if anything, is wrong."""
    split = _split_data(body, len(manifest.inputs))
    if split is None or not split[1]:
        return None
    rest, texts = split
    try:
        doc = load_json(rest)
        if not isinstance(doc, dict):
            return None
        plan = _plan(doc, manifest, shm is not None)
    except (InvalidRequestError, ValueError, RecursionError):
        return None
    inputs: dict[str, np.ndarray] = {}
    used = 0
    for p in plan.inputs:
        if not (isinstance(p.data, str) and p.data.startswith(_MARK)):
            continue
        start, end = texts[int(p.data[len(_MARK) :])]
        array = tensor_from_json_text(p.datatype, p.shape, body, start, end)
        if array is None:
            return None
        inputs[p.name] = array
        used += 1
    if used != len(texts):
        return None  # a list under another key (or twice under one): read it the plain way
    try:
        rest_inputs = _inputs(
            plan._replace(inputs=tuple(p for p in plan.inputs if p.name not in inputs)),
            memoryview(b""),
            shm,
        )
    except InvalidRequestError:
        return None
    ordered = {
        p.name: inputs[p.name] if p.name in inputs else rest_inputs[p.name] for p in plan.inputs
    }
    return InferRequest(
        ordered,
        plan.outputs,
        plan.id,
        plan.parameters,
        plan.binary_output,
        plan,
    )


def _plan(doc: dict[str, Any], manifest: Manifest, shm_available: bool) -> RequestPlan:
    """Check a request's JSON against ``manifest``; say where each input's values are."""
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
    inputs: dict[str, InputPlan] = {}
    cursor = 0
    reusable = True
    for index, raw in enumerate(raw_inputs):
        planned = _plan_input(index, raw, specs, cursor, shm_available)
        if planned.size > 0:
            cursor += planned.size
        if planned.name in inputs:
            raise InvalidRequestError(f"input {planned.name!r} is given more than once")
        inputs[planned.name] = planned
        reusable = reusable and (planned.size >= 0 or planned.shm is not None)
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
    outputs = _parse_outputs(doc.get("outputs"), manifest.outputs, binary_output, shm_available)
    return RequestPlan(
        manifest=manifest,
        inputs=tuple(inputs.values()),
        binary_size=cursor,
        outputs=outputs,
        id=request_id,
        parameters=MappingProxyType(parameters),
        binary_output=binary_output,
        responses={} if reusable and not _has_json_output(outputs, binary_output) else None,
        is_reusable=reusable,
    )


def _has_json_output(outputs: list[OutputRequest] | None, binary_default: bool) -> bool:
    """True when some output of the response travels as JSON ``data``."""
    if outputs is None:
        return not binary_default
    return any(not o.binary and o.shm is None for o in outputs)


def _inputs(
    plan: RequestPlan, binary: memoryview, shm: SharedMemory | None
) -> dict[str, np.ndarray]:
    """The input arrays of one request from its plan: what depends on its own bytes.

    Raises InvalidRequestError when the binary section's length differs from the sum of
    the inputs' binary_data_size, a BOOL byte is not 0 or 1, a BYTES element is
    truncated or not UTF-8, a shared-memory reference does not fit its region, JSON data
    does not fit its tensor.
    """
    if len(binary) != plan.binary_size:
        _refuse_binary_length(plan, len(binary))
    inputs: dict[str, np.ndarray] = {}
    for p in plan.inputs:
        if p.size >= 0:
            if p.wire is not None:  # fixed-size: its size was checked with the plan
                inputs[p.name] = np.frombuffer(binary, p.wire, p.n_values, p.offset).reshape(
                    p.shape
                )
            else:
                chunk = binary[p.offset : p.offset + p.size]
                inputs[p.name] = tensor_from_bytes(p.name, p.datatype, p.shape, chunk)
        elif p.shm is not None:
            assert shm is not None  # a plan with shared memory is only made with access
            buffer = shm.view(p.shm.region, p.shm.offset, p.shm.byte_size)
            if p.wire is not None:
                inputs[p.name] = np.frombuffer(buffer, p.wire).reshape(p.shape)
            else:
                inputs[p.name] = tensor_from_bytes(p.name, p.datatype, p.shape, buffer)
        else:
            inputs[p.name] = tensor_from_json(p.name, p.datatype, p.shape, p.data)
    return inputs


def _refuse_binary_length(plan: RequestPlan, length: int) -> None:
    """Raise the InvalidRequestError that says how the binary section does not add up."""
    for p in plan.inputs:
        if p.size >= 0 and p.offset + p.size > length:
            raise InvalidRequestError(
                f"input {p.name!r}: binary_data_size {p.size} runs past the end of the body "
                f"({length - p.offset} bytes left after the JSON header)"
            )
    raise InvalidRequestError(
        f"binary tensor data: the inputs' binary_data_size add up to {plan.binary_size} "
        f"bytes, the body carries {length} after the JSON header"
    )


def _load_json_object(header: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        doc = load_json(header if isinstance(header, bytes) else bytes(header))
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


def _plan_input(
    index: int,
    raw: Any,
    specs: Mapping[str, TensorSpec],
    cursor: int,
    shm_available: bool,
) -> InputPlan:
    """Check one input's JSON; ``cursor``: where its binary data would start."""
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
    shape = check_shape(name, raw.get("shape"))
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
        check_binary_size(name, datatype, shape, size)
        return InputPlan(
            name, datatype, tuple(shape), cursor, size, None, wire_dtype(datatype), math.prod(shape)
        )
    if ref is not None:
        if "data" in raw:
            raise InvalidRequestError(f"{where}: give one of 'data' or shared memory")
        if not shm_available:
            raise InvalidRequestError(f"{where}: shared memory is not available on this listener")
        check_binary_size(name, datatype, shape, ref.byte_size)
        return InputPlan(name, datatype, tuple(shape), shm=ref, wire=wire_dtype(datatype))
    if "data" not in raw:
        raise InvalidRequestError(f"{where}: missing 'data'")
    return InputPlan(name, datatype, tuple(shape), data=raw["data"])


def _parse_outputs(
    raw: Any, specs: Sequence[TensorSpec], binary_default: bool, shm_available: bool
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
        if ref is not None and not shm_available:
            raise InvalidRequestError(f"{where}: shared memory is not available on this listener")
        outputs.setdefault(name, OutputRequest(name, binary, ref))
    return list(outputs.values()) or None
