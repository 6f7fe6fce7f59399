"""TensorFlow Serving's predict requests and responses, translated to and from what the
OIP path runs: pure functions, no I/O.

A TensorFlow Serving client (``POST /v1/models/<name>:predict``) sends its tensors in the
row format (``{"instances": [...]}``: one item per batch row; objects keyed by input name
when the model has several inputs) or the columnar format (``{"inputs": ...}``: the whole
tensor, or an object of them). ``parse_predict`` turns either into the same input arrays
an OIP request gives (checked with ``agent.oip.tensors``' checks, so datatypes, ranges
and their messages are the OIP path's), and ``encode_predict`` writes the outputs back as
TensorFlow Serving does (``predictions`` / ``outputs``). The status and metadata
documents are ``agent.oip.tfs``'.

Invariants:
- Every rejection is an ``InvalidRequestError`` naming the input (or field), what was
  expected and what came; the HTTP edge maps it to 400.
- A large body whose tensor is one regularly nested list of numbers (a single-input
  model's) is read from its text straight into a numpy buffer
  (``agent.oip.tensors.tensor_from_json_text``, the fast path of OIP JSON ``data``);
  whenever that path cannot say, the body is parsed the plain way, so what is accepted,
  and every message, is the plain path's.
"""

from __future__ import annotations

import base64
import binascii
import json
import mmap
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import numpy as np

from agent.base.errors import InvalidRequestError
from agent.contracts import Manifest, TensorSpec
from agent.oip.request import _findable
from agent.oip.tensors import (
    SMALL_JSON_BYTES,
    Written,
    check_shape,
    dump_json,
    load_json,
    nested_json,
    nested_tensor_from_json_text,
    shape_fits,
    tensor_from_json,
)
from agent.oip.tfs import SIGNATURE, TF_DTYPES

# The one tensor of a body that a fast read can take: the key, then its list's opening.
_TENSOR_LIST: Final = re.compile(rb'"(instances|inputs)"\s*:\s*\[')
_FIELDS: Final = frozenset({"signature_name", "instances", "inputs"})


class Predict(NamedTuple):
    """A checked predict request: its input arrays (in manifest order) and whether it came
    in the row format (answered with ``predictions``) or the columnar one (``outputs``)."""

    inputs: dict[str, np.ndarray]
    row: bool


# ---------------------------------------------------------------------------- requests


def parse_predict(body: bytes | bytearray | memoryview, manifest: Manifest) -> Predict:
    """Check a predict request body against ``manifest``: its input arrays, and its format.

    Raises InvalidRequestError for a body that is not a JSON object, an unknown field or
    signature, both or neither of ``instances`` and ``inputs``, a missing or unknown input,
    ragged instances, values of the wrong kind or out of range for the input's datatype,
    a shape that does not fit the manifest's, a ``b64`` value that is not base64 or not
    for a string input.
    """
    view = memoryview(body)
    if len(view) >= SMALL_JSON_BYTES:
        fast = _parse_fast(_findable(view), manifest)
        if fast is not None:
            return fast
    try:
        doc = load_json(body if isinstance(body, bytes) else view.tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deeply") from None
    return _from_document(doc, manifest)


def _check_fields(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise InvalidRequestError(
            'request body expected a JSON object such as {"instances": [...]}, got '
            + type(doc).__name__
        )
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise InvalidRequestError(
            f"unknown field(s) {unknown} in a predict request: expected signature_name and "
            "one of instances (row format) or inputs (columnar format)"
        )
    signature = doc.get("signature_name")
    if signature not in (None, "", SIGNATURE):
        raise InvalidRequestError(
            f"signature {signature!r} not found: the model has one signature, {SIGNATURE!r}"
        )
    if "instances" in doc and "inputs" in doc:
        raise InvalidRequestError(
            "give either instances (row format) or inputs (columnar format), not both"
        )
    if "instances" not in doc and "inputs" not in doc:
        raise InvalidRequestError(
            "missing instances (row format) or inputs (columnar format) in a predict request"
        )


def _from_document(doc: Any, manifest: Manifest) -> Predict:
    _check_fields(doc)
    specs = manifest.inputs
    names = [t.name for t in specs]
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidRequestError(
                "instances expected a non-empty list (one item per batch row), got "
                + (repr(instances) if not isinstance(instances, list) else "[]")
            )
        keyed = [isinstance(item, dict) and "b64" not in item for item in instances]
        if all(keyed):
            columns: dict[str, Any] = {}
            for index, item in enumerate(instances):
                if set(item) != set(names):
                    raise InvalidRequestError(
                        f"instances[{index}] has inputs {sorted(item)}, expected {names} "
                        "(every instance names every input)"
                    )
            for name in names:
                columns[name] = [item[name] for item in instances]
        elif any(keyed):
            raise InvalidRequestError(
                "instances mix objects keyed by input name and bare values: use one form"
            )
        elif len(specs) == 1:
            columns = {names[0]: instances}
        else:
            raise InvalidRequestError(
                f"the model has {len(specs)} inputs {names}: give each instance as an object "
                "keyed by input name, or use the columnar format (inputs)"
            )
        return Predict(_arrays(columns, specs, row=True), row=True)
    raw = doc["inputs"]
    if isinstance(raw, dict) and "b64" not in raw:
        if set(raw) != set(names):
            missing = [n for n in names if n not in raw]
            extra = sorted(set(raw) - set(names))
            raise InvalidRequestError(
                f"inputs: expected the model's inputs {names}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {extra}" if extra else "")
            )
        return Predict(_arrays(raw, specs, row=False), row=False)
    if len(specs) != 1:
        raise InvalidRequestError(
            f"the model has {len(specs)} inputs {names}: give inputs as an object keyed by "
            "input name"
        )
    return Predict(_arrays({names[0]: raw}, specs, row=False), row=False)


def _arrays(
    values: Mapping[str, Any], specs: Sequence[TensorSpec], *, row: bool
) -> dict[str, np.ndarray]:
    return {t.name: _tensor(t, values[t.name], row) for t in specs}


def _tensor(spec: TensorSpec, value: Any, row: bool) -> np.ndarray:
    """The array of one input's JSON value (nested lists, ``b64`` objects for strings)."""
    name = spec.name
    if spec.datatype == "BYTES":
        value = _decode_b64(name, value)
    shape = _first_shape(value)
    check_shape(name, shape)
    if not shape_fits(spec.shape, shape):
        raise InvalidRequestError(
            f"input {name!r}: shape expected {list(spec.shape)} (-1: any), got {shape}"
            + (" (the row format adds the batch axis: one instance per row)" if row else "")
        )
    try:
        return tensor_from_json(name, spec.datatype, shape, value)
    except InvalidRequestError:
        if spec.datatype != "BYTES" and _has_object(value):
            raise InvalidRequestError(
                f'input {name!r}: {{"b64": ...}} and other objects are only values of string '
                f"(DT_STRING) inputs, this input is {TF_DTYPES[spec.datatype]}"
            ) from None
        try:
            np.asarray(value)
        except (ValueError, TypeError, OverflowError, RecursionError):
            what = "instances" if row else "its value"
            raise InvalidRequestError(
                f"input {name!r}: {what} must be regularly nested lists (ragged: rows of "
                "different lengths)"
            ) from None
        raise


def _first_shape(value: Any) -> list[int]:
    """The shape of nested lists, read along their first items (a ragged value is found
    when its array is made)."""
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _has_object(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and any(_has_object(v) for v in value)


def _decode_b64(name: str, value: Any) -> Any:
    """``value`` with each ``{"b64": text}`` replaced by its bytes as UTF-8 text (string
    tensors are UTF-8 text here, as on the OIP path)."""
    if isinstance(value, list):
        return [_decode_b64(name, v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise InvalidRequestError(
            f'input {name!r}: a binary value is {{"b64": "<base64 text>"}}, got {value!r}'
        )
    try:
        raw = base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"input {name!r}: b64 value is not base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(
            f"input {name!r}: the b64 value's bytes are not UTF-8 text, which the model's "
            "string tensors need"
        ) from None


# ---------------------------------------------------------------------------- fast path


def _parse_fast(text: bytes | bytearray | mmap.mmap, manifest: Manifest) -> Predict | None:
    """A single-input model's tensor read from its text when the body is
    ``{"instances"|"inputs": <nested list of numbers>[, "signature_name": ...]}``; None
    when this path cannot say (the plain path then decides, with its messages)."""
    if len(manifest.inputs) != 1:
        return None
    spec = manifest.inputs[0]
    if spec.datatype in ("BOOL", "BYTES"):
        return None
    found = _TENSOR_LIST.search(text)
    if found is None:
        return None
    start = found.end() - 1
    # The list ends at the last "]" before the document's closing "}" (found from the
    # end, not by scanning the list): anything else in between (a string holding "]",
    # another list) leaves text simdjson refuses as one list of numbers.
    end = text.rfind(b"]", start, max(text.rfind(b"}"), start)) + 1
    if end <= start:
        return None
    head, tail = bytes(text[:start]), bytes(text[end:])
    if _TENSOR_LIST.search(head) or _TENSOR_LIST.search(tail):
        return None  # another tensor (the plain path says what is wrong)
    try:
        rest = load_json(head + b"null" + tail)
        _check_fields(rest)
    except (InvalidRequestError, ValueError, RecursionError):
        return None
    row = found.group(1) == b"instances"
    if rest.get("instances" if row else "inputs", 0) is not None:
        return None
    array = nested_tensor_from_json_text(spec.datatype, text, start, end)
    if array is None or not shape_fits(spec.shape, array.shape):
        return None
    return Predict({spec.name: array}, row)


# ---------------------------------------------------------------------------- responses


def _json_value(name: str, array: np.ndarray) -> Any:
    """An output as ``dump_json`` writes it: numeric arrays as they are (nested lists),
    strings as text, or ``{"b64": ...}`` for a string output whose name ends in
    ``_bytes`` (TensorFlow Serving's rule for binary outputs)."""
    if array.dtype.kind not in "OSU":
        return nested_json(array)
    binary = name.endswith("_bytes")

    def one(value: Any) -> Any:
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        if binary:
            return {"b64": base64.b64encode(raw).decode("ascii")}
        return raw.decode("utf-8", "replace")

    return np.vectorize(one, otypes=[object])(array).tolist() if array.size else array.tolist()


def _plain(value: Any) -> Any:
    """``value`` in Python lists, to be cut into rows (numpy's scalars are not written)."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def encode_predict(outputs: Mapping[str, np.ndarray], row: bool) -> bytes:
    """The body of a predict response: ``{"predictions": ...}`` for the row format (one
    output: its value; several: one object per batch row), ``{"outputs": ...}`` for the
    columnar format (one output: its value; several: an object by output name).

    Raises InvalidRequestError when a row-format answer's outputs do not share their
    first axis (the columnar format has no such need).
    """
    if len(outputs) == 1:
        ((name, array),) = outputs.items()
        return dump_json({"predictions" if row else "outputs": _json_value(name, array)})
    if not row:
        return dump_json({"outputs": {n: _json_value(n, a) for n, a in outputs.items()}})
    batch = {a.shape[0] if a.ndim else -1 for a in outputs.values()}
    if len(batch) != 1 or -1 in batch:
        shapes = {n: list(a.shape) for n, a in outputs.items()}
        raise InvalidRequestError(
            f"the model's outputs {shapes} do not share a batch axis, so they cannot be "
            'answered row by row: send the request in the columnar format ({"inputs": ...})'
        )
    values = {n: _json_value(n, a) for n, a in outputs.items()}
    # Cut into rows, which only the standard library writes right if any value is not
    # finite (orjson would write null).
    kind = Written if any(isinstance(v, Written) for v in values.values()) else list
    columns = {n: _plain(v) for n, v in values.items()}
    (rows,) = batch
    return dump_json(
        {"predictions": kind({n: v[i] for n, v in columns.items()} for i in range(rows))}
    )
