"""One tensor between numpy and the Open Inference Protocol v2: pure functions, no I/O.

A tensor travels as JSON ``data`` (flat or nested, row-major) or as raw bytes (the
binary tensor and shared-memory extensions). Binary layout: row-major, little-endian,
no padding; BOOL is one byte 0 or 1; BYTES is, per element, a little-endian uint32
length followed by that many bytes. ``agent.oip.request`` and ``agent.oip.response`` build
whole request and response documents from these.

Invariants:
- Every rejection is an ``InvalidRequestError`` that names the tensor and says what was
  expected and what was got.
- Values are never silently changed: floats are refused for integer tensors, integers out
  of the datatype's range are refused, only ``true``/``false`` (or bytes 0/1) make a BOOL.
- A shape is a list of integers >= 0 whose non-zero dimensions multiply to at most
  ``MAX_ELEMENTS``: any such shape makes an array (numpy counts a tensor's bytes without
  its zero dimensions, in 64 bits), so a shape like ``[0, 10**20]`` is a 400, not a
  numpy error.
- A binary tensor's size must match its shape exactly; fixed-size types share the
  buffer's memory instead of copying it, and ``tensor_to_bytes`` hands out a view of an
  array whose memory already is the wire form (little-endian, C-contiguous).
- JSON is read with the standard library's meaning (``load_json``: values and error
  messages are ``json.loads``'), and JSON ``data`` never passes through Python lists
  where a faster path gives the same array: a flat list of numbers goes straight from its
  text into a numpy buffer (``tensor_from_json_text``), and numeric outputs go from their
  array into the JSON text (``dump_json``), floats written so they read back to the same
  values.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import numpy as np
import orjson
import simdjson

from agent.base.errors import InvalidRequestError
from agent.contracts import NUMPY_TO_OIP, OIP_TO_NUMPY

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
# Little-endian wire dtypes of the fixed-size datatypes.
_WIRE: Final[Mapping[str, np.dtype[Any]]] = {
    name: np.dtype(numpy_name).newbyteorder("<")
    for name, numpy_name in OIP_TO_NUMPY.items()
    if name not in ("BYTES", "BOOL")
}
_LENGTH: Final = struct.Struct("<I")
# Elements of a shape, its zero dimensions left out: times the widest element (8 bytes:
# INT64, FP64, a BYTES object) this stays within numpy's signed 64-bit byte count.
MAX_ELEMENTS: Final = 2**59
# dtypes whose memory already is the wire form (on a little-endian machine: the native
# ones); ``tensor_to_bytes`` hands out a view of such an array without converting it.
_SHAREABLE: Final = frozenset([*_WIRE.values(), np.dtype(np.bool_)])


def check_shape(name: str, shape: Any) -> list[int]:
    """``shape`` when it can be a tensor's: a list of integers >= 0 whose non-zero
    dimensions multiply to at most ``MAX_ELEMENTS``.

    Raises InvalidRequestError naming the tensor, what was expected and what came.
    """
    if not isinstance(shape, list) or not all(
        type(d) is int and d >= 0
        for d in shape  # type(): no bools
    ):
        raise InvalidRequestError(
            f"input {name!r}: shape expected a list of integers >= 0, got {shape!r}"
        )
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidRequestError(
            f"input {name!r}: shape {shape} is too large: its non-zero dimensions multiply "
            f"to more than 2**59 elements"
        )
    return shape


def shape_fits(expected: Sequence[int], got: Sequence[int]) -> bool:
    """True when ``got`` has ``expected``'s rank and every fixed dimension (-1: any)."""
    if len(expected) != len(got):
        return False
    return all(want < 0 or want == have for want, have in zip(expected, got, strict=True))


# ---------------------------------------------------------------------------- JSON text

# The one simdjson parser, taken under its lock. A parser keeps the buffers of the largest
# document it read (about 2.6 times its size), so one kept saves allocating and faulting
# them in per request, and one is enough: simdjson holds the GIL while it parses, so two
# threads never parse at once anyway. A pool of idle parsers made a new one (and threw it
# away) whenever a thread was switched out between taking and returning its parser, which
# the GIL does to a thread right after a long parse when others wait: under 4 concurrent
# CNN requests, one parse in six. Waiting on the lock lets the GIL go to the other
# connections (their model runs) meanwhile.
_PARSER: Final = simdjson.Parser()
# Smaller JSON documents are read by the standard library (see ``load_json``).
SMALL_JSON_BYTES: Final = 16 * 1024
_PARSER_LOCK: Final = threading.Lock()


def load_json(text: bytes) -> Any:
    """``json.loads(text)``, faster: simdjson reads the document when it agrees with the
    standard library, which is whenever it accepts it (it refuses NaN and Infinity,
    integers beyond 64 bits, numbers beyond a double's range, lone surrogates, nesting
    deeper than 1024, where ``json.loads`` takes them or says why not); the standard
    library reads the rest. So the values, and every error (``json.JSONDecodeError``,
    ``UnicodeDecodeError``, ``RecursionError``), are ``json.loads``'.

    A document under ``SMALL_JSON_BYTES`` is read by the standard library alone: warm,
    simdjson reads a tiny request in a third of the time, yet end to end the tiny-model
    request came back ~40 % later with it (p50 ~450 against ~320 µs, side by side on
    fresh processes, a loaded 2-core VM: docs/benchmarks.md, "JSON tensors"). Why is not
    known: a change that only took work away (no statistics recorded) moved that p50 as
    much the other way, so it follows how the server's thread and its client meet on the
    VM's cores more than the server's CPU.
    """
    if len(text) < SMALL_JSON_BYTES:
        return json.loads(text)
    with _PARSER_LOCK:
        try:
            return _PARSER.parse(text, True)
        except (ValueError, RuntimeError):
            pass
    return json.loads(text)


_FLOAT_MARKS: Final = (b".", b"e", b"E")


def _numbers(text: memoryview, of_type: Literal["d", "i"]) -> Any:
    """The numbers of the flat JSON list ``text`` in a buffer of C type ``of_type``
    (``"d"``, ``"i"``: a copy, not the parser's); None when simdjson refuses it (not
    numbers, an integer beyond int64, a double's range, ...).

    The lock is released only after ``_array_buffer`` returned: simdjson refuses to
    parse again while an ``Array`` of its last document lives, so a parser handed on
    while one did (a local, or a traceback's frame) made the next thread's parse fail
    over to the plain path (~10 times the CPU)."""
    with _PARSER_LOCK:
        try:
            return _array_buffer(_PARSER, text, of_type)
        except (ValueError, TypeError, RuntimeError):
            return None  # the exception, its frame and the Array go with this handler


def _array_buffer(parser: simdjson.Parser, text: memoryview, of_type: Literal["d", "i"]) -> Any:
    parsed = parser.parse(text)
    if not isinstance(parsed, simdjson.Array):
        return None
    return parsed.as_buffer(of_type=of_type)


def tensor_from_json_text(
    datatype: str,
    shape: Sequence[int],
    text: bytes | bytearray | mmap.mmap,
    start: int = 0,
    end: int | None = None,
) -> np.ndarray | None:
    """The array ``tensor_from_json`` makes of the JSON list ``text[start:end]`` (the raw
    text of a tensor's ``data``, flat: no nested lists; read in place, not copied), read
    into a numpy buffer without Python numbers; None when this path cannot say (BOOL,
    BYTES, no values, text that is not a flat list of numbers, integers beyond int64,
    floats for an integer datatype, a count or a value the tensor refuses):
    ``tensor_from_json`` on the parsed list decides then, with its messages.

    Integers-only text is read as int64 and floats as doubles (correctly rounded, as
    Python reads them), then cast as ``tensor_from_json`` casts the array numpy makes of
    the same list, so the result is the same array.
    """
    count = math.prod(shape)
    if datatype in ("BOOL", "BYTES") or not count:
        return None
    end = len(text) if end is None else end
    floats = any(text.find(mark, start, end) >= 0 for mark in _FLOAT_MARKS)
    target = np.dtype(OIP_TO_NUMPY[datatype])
    if floats and target.kind != "f":
        return None  # tensor_from_json refuses it, naming the values
    buffer = _numbers(memoryview(text)[start:end], "d" if floats else "i")
    if buffer is None:
        return None
    return _cast_read(buffer, floats, target, shape)


def nested_tensor_from_json_text(
    datatype: str, text: bytes | bytearray | mmap.mmap, start: int, end: int
) -> np.ndarray | None:
    """The array of the regularly nested JSON list of numbers ``text[start:end]`` (a
    TensorFlow Serving tensor: its shape is its nesting), read in place into a numpy
    buffer as ``tensor_from_json_text`` reads a flat one; None when this path cannot say
    (BOOL, BYTES, an empty list, ragged or irregular nesting, not numbers, integers beyond
    int64, floats for an integer datatype, a value out of the datatype's range): the
    plain path then decides, with its messages.

    Regularity is checked on simdjson's document without touching the values: every list
    above the innermost has its level's length and only lists in it, every innermost
    list its length, and the text holds no other ``[`` (a list nested among the
    values)."""
    if datatype in ("BOOL", "BYTES"):
        return None
    floats = any(text.find(mark, start, end) >= 0 for mark in _FLOAT_MARKS)
    target = np.dtype(OIP_TO_NUMPY[datatype])
    if floats and target.kind != "f":
        return None
    brackets = _count_byte(text, start, end, ord("["))
    with _PARSER_LOCK:
        try:
            found = _nested_buffer(
                _PARSER, memoryview(text)[start:end], "d" if floats else "i", brackets
            )
        except (ValueError, TypeError, RuntimeError, IndexError):
            return None  # the exception, its frame and the Array go with this handler
    if found is None:
        return None
    buffer, shape = found
    return _cast_read(buffer, floats, target, shape)


def _cast_read(
    buffer: Any, floats: bool, target: np.dtype[Any], shape: Sequence[int]
) -> np.ndarray | None:
    """The doubles or int64s read into ``buffer`` as ``target`` in ``shape``; None when
    their count is not the shape's or a value lies outside an integer target's range."""
    values = np.frombuffer(buffer, np.float64 if floats else np.int64)
    if values.size != math.prod(shape):
        return None
    if target.kind in "iu":
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            return None
    return values.astype(target, copy=False).reshape(shape)


# Bytes compared at a time by ``_count_byte``: its scratch stays a small allocation.
_COUNT_CHUNK: Final = 1 << 16


def _count_byte(text: bytes | bytearray | mmap.mmap, start: int, end: int, byte: int) -> int:
    """How many times ``byte`` occurs in ``text[start:end]``, counted in place by numpy
    (4 times as fast as ``bytes.count``, which an mmap lacks) a chunk at a time: one
    comparison of the whole text would allocate a temporary as large as it, which the
    agent's malloc settings map and fault in afresh each time (~3 ms for a 3 MB body)."""
    data = np.frombuffer(text, np.uint8, end - start, start)
    scratch = np.empty(min(_COUNT_CHUNK, len(data)), np.bool_)
    total = 0
    for at in range(0, len(data), _COUNT_CHUNK):
        part = data[at : at + _COUNT_CHUNK]
        found = scratch[: len(part)]
        np.equal(part, byte, out=found)
        total += int(np.count_nonzero(found))
    return total


def _nested_buffer(
    parser: simdjson.Parser, text: memoryview, of_type: Literal["d", "i"], brackets: int
) -> tuple[Any, list[int]] | None:
    parsed = parser.parse(text)
    if not isinstance(parsed, simdjson.Array):
        return None
    shape: list[int] = []
    node: Any = parsed
    while isinstance(node, simdjson.Array):
        if not len(node):
            return None
        shape.append(len(node))
        node = node[0]
    if not shape or brackets != sum(math.prod(shape[:level]) for level in range(len(shape))):
        return None
    level: list[Any] = [parsed]
    for dim in shape[:-1]:
        below: list[Any] = []
        for item in level:
            if len(item) != dim:
                return None
            below.extend(item)
        if not all(isinstance(item, simdjson.Array) for item in below):
            return None
        level = below
    if any(len(item) != shape[-1] for item in level):
        return None
    return parsed.as_buffer(of_type=of_type), shape


class Written(list[Any]):
    """The values of a tensor that only the standard library writes as ``json.loads``
    reads them back (NaN, Infinity): ``dump_json`` hands the document to it."""


def dump_json(doc: Any) -> bytes:
    """``doc`` as compact JSON; numpy arrays in it are written as flat lists.

    orjson writes it, arrays straight from their buffers, when it writes what the
    standard library would mean (every JSON tensor ``tensor_to_json`` makes is such,
    except floats that are not finite); else the standard library writes it, as before.
    """
    try:
        return orjson.dumps(
            doc,
            default=_unwritable,
            option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_PASSTHROUGH_SUBCLASS,
        )
    except orjson.JSONEncodeError:  # NaN or Infinity, a lone surrogate, a big integer
        return json.dumps(doc, default=_plain, separators=(",", ":")).encode()


def _unwritable(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is written by the standard library")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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
    except (ValueError, TypeError, OverflowError, RecursionError):
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
    if kind in "fO" and datatype.startswith(("UINT", "INT")):
        return _big_integers(name, datatype, shape, data, values.dtype)
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


def _big_integers(
    name: str, datatype: str, shape: Sequence[int], data: Any, guessed: np.dtype[Any]
) -> np.ndarray:
    """Integers numpy could not hold in int64 (UINT64 above 2**63): check them one by one."""
    flat = np.asarray(data, dtype=object).ravel().tolist()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise InvalidRequestError(
            f"input {name!r}: datatype {datatype} expects integers, got "
            f"{_KIND_NAMES.get(guessed.kind, guessed.name)}"
        )
    info = np.iinfo(np.dtype(OIP_TO_NUMPY[datatype]))
    low, high = min(flat), max(flat)
    if low < info.min or high > info.max:
        raise InvalidRequestError(
            f"input {name!r}: datatype {datatype} holds {info.min}..{info.max}, "
            f"got values in {low}..{high}"
        )
    return np.array(flat, dtype=OIP_TO_NUMPY[datatype]).reshape(shape)


def tensor_from_bytes(
    name: str, datatype: str, shape: Sequence[int], data: bytes | bytearray | memoryview
) -> np.ndarray:
    """Build the array of one binary tensor; fixed-size types share ``data``'s memory.

    Raises InvalidRequestError when the size disagrees with the shape, a BOOL byte is
    not 0 or 1, or a BYTES element is truncated or not UTF-8.
    """
    count = math.prod(shape)
    wire = _WIRE.get(datatype)
    if wire is not None:
        if len(data) != count * wire.itemsize:
            check_binary_size(name, datatype, shape, len(data))  # raises, saying why
        return np.frombuffer(data, wire).reshape(shape)
    if datatype == "BYTES":
        return _strings_from_bytes(name, shape, count, memoryview(data))
    check_binary_size(name, datatype, shape, len(data))  # BOOL: one byte each
    return bools_from_bytes(name, np.frombuffer(data, np.uint8)).reshape(shape)


def wire_dtype(datatype: str) -> np.dtype[Any] | None:
    """The little-endian dtype of a fixed-size datatype's binary form (None: BOOL, BYTES)."""
    return _WIRE.get(datatype)


def check_binary_size(name: str, datatype: str, shape: Sequence[int], size: int) -> None:
    """Refuse ``size`` bytes unless they are exactly what a ``datatype`` tensor of
    ``shape`` needs (BYTES elements vary in size: any size passes here).

    Raises InvalidRequestError naming the tensor, the bytes needed and the bytes got;
    also for a datatype the protocol does not have.
    """
    if datatype == "BYTES":
        return
    wire = _WIRE.get(datatype)
    if wire is None and datatype != "BOOL":
        raise InvalidRequestError(f"input {name!r}: unknown datatype {datatype!r}")
    needed = math.prod(shape) * (1 if wire is None else wire.itemsize)
    if size != needed:
        raise InvalidRequestError(
            f"input {name!r}: {datatype} {list(shape)} needs {needed} bytes, got {size}"
        )


def bools_from_bytes(name: str, raw: np.ndarray) -> np.ndarray:
    """BOOL values of uint8 bytes (sharing their memory); InvalidRequestError unless
    every byte is 0 or 1."""
    if raw.size and raw.max() > 1:
        raise InvalidRequestError(f"input {name!r}: BOOL bytes must be 0 or 1")
    return raw.view(np.bool_)


def _strings_from_bytes(
    name: str, shape: Sequence[int], count: int, data: memoryview
) -> np.ndarray:
    values: list[str] = []
    offset, end = 0, len(data)
    while offset < end:
        if offset + 4 > end or len(values) >= count:
            break
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > end:
            raise InvalidRequestError(
                f"input {name!r}: BYTES element {len(values)} claims {length} bytes, "
                f"{end - offset} are left"
            )
        try:
            values.append(str(data[offset : offset + length], "utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequestError(
                f"input {name!r}: BYTES element {len(values)} is not UTF-8 text"
            ) from None
        offset += length
    if len(values) != count or offset != end:
        raise InvalidRequestError(
            f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, got "
            f"{len(values)} and {end - offset} stray bytes"
        )
    return np.array(values, dtype=object).reshape(shape)


def _expected_values(datatype: str) -> str:
    if datatype == "BOOL":
        return "true/false"
    if datatype == "BYTES":
        return "strings"
    if datatype.startswith("FP"):
        return "numbers"
    return "integers"


# dtype objects hash fast; ``dtype.name`` builds a string on every call (it showed in a
# profile of the client's per-request cost).
_DTYPE_TO_OIP: Final = {np.dtype(name): oip for name, oip in NUMPY_TO_OIP.items()}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of an array (numpy strings and objects are BYTES)."""
    found = _DTYPE_TO_OIP.get(array.dtype)
    if found is not None:
        return found
    if array.dtype.kind in "USO":
        return "BYTES"
    try:  # a non-native byte order, say: same name, different dtype object
        return NUMPY_TO_OIP[array.dtype.name]
    except KeyError:
        raise InvalidRequestError(f"numpy dtype {array.dtype} has no OIP datatype") from None


def _as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def tensor_to_json(name: str, array: np.ndarray) -> dict[str, Any]:
    """One OIP JSON tensor: ``{name, datatype, shape, data}`` with flat row-major data,
    to write with ``dump_json``: ``data`` is a flat array (no Python numbers) for every
    datatype but BYTES, or a list the standard library writes (floats not all finite)."""
    datatype = datatype_of(array)
    data: Any = array.ravel()  # C-contiguous: a view when it can be, else a copy
    if datatype == "BYTES":
        data = [_as_text(v) for v in data.tolist()]
    else:
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        if data.dtype.kind == "f" and not _all_finite(data):
            data = Written(data.tolist())
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def nested_json(array: np.ndarray) -> Any:
    """A numeric array as ``dump_json`` writes it in nested lists (TensorFlow Serving's
    form): the array itself (orjson writes it from its buffer) when that writes what the
    standard library would; else nested Python values the standard library writes (NaN
    and Infinity as its tokens, a 0-d array as its one value)."""
    if (
        array.ndim
        and array.dtype.isnative
        and (array.dtype.kind != "f" or _all_finite(array.ravel()))
    ):
        return np.ascontiguousarray(array)
    values = array.tolist()
    return Written(values) if isinstance(values, list) else values


# Up to this many values, finiteness is checked on Python floats: numpy's ufunc and
# reduction machinery (``np.isfinite(a).all()``) costs more than the values, most of all
# on cold caches, which is how a small model's requests find them (it was what made the
# tiny-model answer a few percent dearer in CPU than writing it with ``json.dumps``).
_FEW: Final = 64


def _all_finite(data: np.ndarray) -> bool:
    """Whether every value of a float array is finite (no NaN, no ±infinity)."""
    if data.size <= _FEW:
        return all(map(math.isfinite, data.tolist()))
    return bool(np.isfinite(data).all())


def tensor_to_bytes(array: np.ndarray) -> bytes | memoryview:
    """The binary form of a tensor (a view of the array's memory when it can be)."""
    if array.dtype in _SHAREABLE:  # already little-endian and fixed-size: no conversion
        if not array.size:
            return b""
        try:
            return array.data.cast("B")
        except TypeError:  # not C-contiguous
            return np.ascontiguousarray(array).data.cast("B")
    if datatype_of(array) == "BYTES":
        parts: list[bytes] = []
        for value in array.ravel().tolist():
            encoded = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(_LENGTH.pack(len(encoded)))
            parts.append(encoded)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8).data if array.size else b""


def tensor_head(name: str, array: np.ndarray, parameters: dict[str, Any]) -> dict[str, Any]:
    """A tensor's JSON without its data: ``{name, datatype, shape, parameters}`` (the
    data travels as binary or in shared memory, as ``parameters`` say)."""
    return {
        "name": name,
        "datatype": datatype_of(array),
        "shape": list(array.shape),
        "parameters": parameters,
    }
