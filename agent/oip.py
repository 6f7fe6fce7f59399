"""The Open Inference Protocol v2 codec (JSON tensors): pure functions, no I/O.

It turns an infer request body into numpy arrays checked against a model's manifest, and
arrays back into a response body; it also shapes the metadata documents.

Invariants:
- Every rejection is an ``InvalidRequestError`` whose message names the tensor (or the
  field) and says what was expected and what was got; the HTTP edge maps it to 400.
- A parsed input has exactly the manifest's datatype and a shape that fits the manifest's
  (``-1`` is a wildcard); every manifest input is present, no other is.
- Values are never silently changed: floats are refused for integer tensors, integers out
  of the datatype's range are refused, and only ``true``/``false`` make a BOOL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from agent.contracts import NUMPY_TO_OIP, OIP_TO_NUMPY, Manifest, TensorSpec
from agent.errors import InvalidRequestError

PLATFORM: Final = "onnxruntime_onnx"

# Which numpy kinds (of the array JSON data makes) each OIP datatype accepts.
_ACCEPTED_KINDS: Final[Mapping[str, str]] = {
    "BOOL": "b",
    "UINT8": "iu",
    "UINT16": "iu",
    "UINT32": "iu",
    "UINT64": "iu",
    "INT8": "iu",
    "INT16": "iu",
    "INT32": "iu",
    "INT64": "iu",
    "FP16": "iuf",
    "FP32": "iuf",
    "FP64": "iuf",
    "BYTES": "U",
}
_KIND_NAMES: Final[Mapping[str, str]] = {
    "b": "booleans",
    "i": "integers",
    "u": "integers",
    "f": "floats",
    "U": "strings",
    "O": "mixed values",
}


@dataclass(frozen=True)
class InferRequest:
    """A checked infer request: inputs by name, the outputs asked for (None: all)."""

    inputs: dict[str, np.ndarray]
    output_names: list[str] | None
    id: str | None
    parameters: Mapping[str, Any]


# ---------------------------------------------------------------------------- requests


def parse_infer_request(body: bytes, manifest: Manifest) -> InferRequest:
    """Parse an OIP v2 JSON infer request body against ``manifest``'s signature.

    Raises InvalidRequestError naming the tensor and expected vs got: bad JSON, a body
    that is not an object, an unknown, duplicate or missing input, a datatype or shape
    that does not match the manifest, data whose count differs from the shape's, values
    of the wrong kind or out of range, an unknown output.
    """
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"request body expected a JSON object, got {_json_type(doc)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequestError(f"'id' expected a string, got {_json_type(request_id)}")
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"'parameters' expected an object, got {_json_type(parameters)}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidRequestError(
            f"'inputs' expected a list of tensors, got {_json_type(raw_inputs)}"
        )
    specs = {t.name: t for t in manifest.inputs}
    inputs: dict[str, np.ndarray] = {}
    for index, raw in enumerate(raw_inputs):
        name, array = _parse_input(index, raw, specs)
        if name in inputs:
            raise InvalidRequestError(f"input {name!r} is given more than once")
        inputs[name] = array
    missing = [t for t in manifest.inputs if t.name not in inputs]
    if missing:
        raise InvalidRequestError(
            "missing input "
            + ", ".join(f"{t.name!r} (expected {t.datatype} {list(t.shape)})" for t in missing)
        )
    return InferRequest(
        inputs=inputs,
        output_names=_parse_outputs(doc.get("outputs"), manifest.outputs),
        id=request_id,
        parameters=parameters,
    )


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


def _parse_input(index: int, raw: Any, specs: Mapping[str, TensorSpec]) -> tuple[str, np.ndarray]:
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
    params = raw.get("parameters")
    if isinstance(params, dict) and "binary_data_size" in params:
        raise InvalidRequestError(
            f"input {name!r}: the binary tensor extension is not supported yet; send JSON data"
        )
    if "data" not in raw:
        raise InvalidRequestError(f"input {name!r}: missing 'data'")
    return name, tensor_from_json(name, datatype, shape, raw["data"])


def shape_fits(expected: Sequence[int], got: Sequence[int]) -> bool:
    """True when ``got`` has ``expected``'s rank and every fixed dimension (-1: any)."""
    if len(expected) != len(got):
        return False
    return all(want < 0 or want == have for want, have in zip(expected, got, strict=True))


def tensor_from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """Build the array of one JSON tensor (``data`` flat or nested, row-major).

    Raises InvalidRequestError when the count of values differs from the shape's
    product, or the values are not of the datatype's kind or out of its range.
    """
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidRequestError(
            f"input {name!r}: data must be a flat or regularly nested list of values"
        ) from None
    if values.size != count:
        raise InvalidRequestError(
            f"input {name!r}: shape {list(shape)} needs {count} values, got {values.size}"
        )
    if count == 0:
        return np.empty(shape, dtype=OIP_TO_NUMPY[datatype])
    kind = values.dtype.kind
    if kind not in _ACCEPTED_KINDS[datatype]:
        raise InvalidRequestError(
            f"input {name!r}: datatype {datatype} expects "
            f"{_expected_values(datatype)}, got {_KIND_NAMES.get(kind, values.dtype.name)}"
        )
    target = np.dtype(OIP_TO_NUMPY[datatype])
    if kind in "iu" and target.kind in "iu":
        info = np.iinfo(target)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise InvalidRequestError(
                f"input {name!r}: datatype {datatype} holds {info.min}..{info.max}, "
                f"got values in {low}..{high}"
            )
    return values.astype(target, copy=False).reshape(shape)


def _expected_values(datatype: str) -> str:
    if datatype == "BOOL":
        return "true/false"
    if datatype == "BYTES":
        return "strings"
    if datatype.startswith("FP"):
        return "numbers"
    return "integers"


def _parse_outputs(raw: Any, specs: Sequence[TensorSpec]) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequestError(f"'outputs' expected a list, got {_json_type(raw)}")
    known = [t.name for t in specs]
    names: list[str] = []
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError(f"outputs[{index}] expected an object with a 'name'")
        if name not in known:
            raise InvalidRequestError(f"unknown output {name!r}: the model's outputs are {known}")
        if name not in names:
            names.append(name)
    return names or None


# ---------------------------------------------------------------------------- responses


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of an array (numpy strings and objects are BYTES)."""
    if array.dtype.kind in "USO":
        return "BYTES"
    try:
        return NUMPY_TO_OIP[array.dtype.name]
    except KeyError:
        raise InvalidRequestError(f"numpy dtype {array.dtype} has no OIP datatype") from None


def tensor_to_json(name: str, array: np.ndarray) -> dict[str, Any]:
    """One OIP JSON tensor: ``{name, datatype, shape, data}`` with flat row-major data."""
    datatype = datatype_of(array)
    data = array.ravel().tolist()
    if datatype == "BYTES":
        data = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in data]
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def build_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    request_id: str | None = None,
) -> bytes:
    """The JSON body of an infer response, outputs in the given order."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = [tensor_to_json(name, array) for name, array in outputs.items()]
    return json.dumps(doc, separators=(",", ":")).encode()


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


def parse_infer_response(body: bytes) -> dict[str, np.ndarray]:
    """The outputs of an infer response body, by name.

    Raises InvalidRequestError when the body is not an OIP infer response.
    """
    try:
        doc = json.loads(body)
        tensors = doc["outputs"]
        result: dict[str, np.ndarray] = {}
        for tensor in tensors:
            name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
            dtype = OIP_TO_NUMPY[datatype]
            result[name] = np.asarray(tensor["data"], dtype=dtype).reshape(shape)
        return result
    except (ValueError, TypeError, KeyError) as exc:
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
