"""The client's response decoding: plans remembered per exact JSON header, and the slow
path that reports what is wrong (``agent.client.inference`` uses both).

A plan says, for one exact response JSON header, where each output's bytes lie (in the
body's binary section or in the shared-memory region) and how to make its array.

Invariants:
- A plan is made only from a header whose outputs all travel as binary data or in shared
  memory (JSON ``data`` varies per call); anything malformed makes no plan and the slow
  path reports it.
- Returned arrays never alias memory the client reuses: binary outputs share the
  response's own fresh buffer, shared-memory outputs are copied out of the region.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import numpy as np

from agent.base.errors import InferenceError, InvalidRequestError
from agent.contracts import OIP_TO_NUMPY
from agent.oip.response import parse_infer_response
from agent.oip.shm import SharedMemoryRegion
from agent.oip.tensors import tensor_from_bytes

# Datatypes whose wire bytes an array can view directly (BOOL is checked, BYTES parsed).
_VIEWED: Final[Mapping[str, np.dtype[Any]]] = {
    oip: np.dtype(name).newbyteorder("<")
    for oip, name in OIP_TO_NUMPY.items()
    if oip not in ("BYTES", "BOOL")
}


class _Slot(NamedTuple):
    """Where one output of a response lies, and how to make its array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any] | None  # set: view the bytes as this (size checked); None: parse
    in_region: bool  # in the shared-memory region (else in the body's binary section)
    start: int
    size: int


class Plan(NamedTuple):
    """How to decode a response with one exact JSON header."""

    slots: tuple[_Slot, ...]
    binary_bytes: int  # the size of the binary section after the header


def plan_response(header: bytes) -> Plan | None:
    """The decode plan of a response's JSON header; None when it does not make one (JSON
    ``data``, which varies per call, or anything malformed: the slow path reports it)."""
    try:
        doc = json.loads(header)
        in_body: list[_Slot] = []
        in_region: list[_Slot] = []
        cursor = 0
        for tensor in doc["outputs"]:
            name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
            if not (isinstance(name, str) and isinstance(datatype, str)):
                return None
            if not all(type(d) is int and d >= 0 for d in shape):
                return None
            params = tensor.get("parameters") or {}
            if "binary_data_size" in params:
                size = int(params["binary_data_size"])
                in_body.append(_slot(name, datatype, shape, False, cursor, size))
                cursor += size
            elif "data" in tensor:
                return None
            elif "shared_memory_region" in params:
                start = int(params["shared_memory_offset"])
                size = int(params["shared_memory_byte_size"])
                in_region.append(_slot(name, datatype, shape, True, start, size))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return Plan((*in_body, *in_region), cursor)


def _slot(
    name: str, datatype: str, shape: list[int], in_region: bool, start: int, size: int
) -> _Slot:
    dtype = _VIEWED.get(datatype)
    if dtype is not None and size != math.prod(shape) * dtype.itemsize:
        dtype = None  # let tensor_from_bytes say what is wrong, each call
    return _Slot(name, datatype, tuple(shape), dtype, in_region, start, size)


def apply_plan(
    plan: Plan, data: bytearray, header_length: int, region: SharedMemoryRegion | None
) -> dict[str, np.ndarray]:
    """The outputs by ``plan``; binary ones share ``data``, the region's are copied."""
    result: dict[str, np.ndarray] = {}
    try:
        for slot in plan.slots:
            if not slot.in_region:
                start = header_length + slot.start
                if slot.dtype is not None:
                    result[slot.name] = np.ndarray(slot.shape, slot.dtype, data, start)
                else:
                    chunk = memoryview(data)[start : start + slot.size]
                    result[slot.name] = tensor_from_bytes(
                        slot.name, slot.datatype, slot.shape, chunk
                    )
            elif region is not None:
                result[slot.name] = _copy_from_region(slot, region)
    except InvalidRequestError as exc:
        raise InferenceError(f"the agent answered {exc}") from None
    return result


def _copy_from_region(slot: _Slot, region: SharedMemoryRegion) -> np.ndarray:
    end = slot.start + slot.size
    if end > region.byte_size:
        raise InferenceError(
            f"the agent answered a malformed shm response: output {slot.name!r} at "
            f"{slot.start}..{end} expected within the region's {region.byte_size} bytes"
        )
    chunk = region.buffer[slot.start : end]
    if slot.dtype is not None:
        return np.ndarray(slot.shape, slot.dtype, bytearray(chunk))
    return tensor_from_bytes(slot.name, slot.datatype, slot.shape, chunk).copy()


def decode_slowly(
    data: bytearray, header_length: int | None, region: SharedMemoryRegion | None
) -> dict[str, np.ndarray]:
    """The outputs of an infer response, parsed afresh (with ``region``: also the
    outputs the agent left there, copied out)."""
    try:
        result = parse_infer_response(data, header_length)
    except InvalidRequestError as exc:
        raise InferenceError(f"the agent answered {exc}") from None
    if region is None:
        return result
    try:
        answer = json.loads(data if header_length is None else data[:header_length])
        for tensor in answer["outputs"]:
            params = tensor.get("parameters") or {}
            if "shared_memory_region" not in params:
                continue
            start = int(params["shared_memory_offset"])
            chunk = region.buffer[start : start + int(params["shared_memory_byte_size"])]
            array = tensor_from_bytes(tensor["name"], tensor["datatype"], tensor["shape"], chunk)
            result[tensor["name"]] = array.copy()
    except (ValueError, KeyError, TypeError, InvalidRequestError) as exc:
        raise InferenceError(f"the agent answered a malformed shm response: {exc!r}") from None
    return result
