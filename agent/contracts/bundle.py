"""Tensor datatypes and the bundle format: its members and its ``manifest.json``.

A bundle holds ``manifest.json``, ``model.onnx``, ``golden.npz`` and optionally
``labels.txt``; the manifest lists every other member with its size and sha256.
``parse_manifest`` raises ``BundleError`` naming the field, what was expected and what
was found.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from agent.base.errors import BundleError, NewerFormatError
from agent.contracts._fields import _require
from agent.contracts.compression import ENCODING_ZSTD, STORED_SUFFIX
from agent.contracts.names import InvalidNameError, check_name, check_version
from agent.contracts.reference import Reference, parse_reference

# ---------------------------------------------------------------------------- datatypes

# Open Inference Protocol v2 datatype → numpy dtype string.
OIP_TO_NUMPY: Final[Mapping[str, str]] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
NUMPY_TO_OIP: Final[Mapping[str, str]] = {v: k for k, v in OIP_TO_NUMPY.items()}

# ONNX Runtime's type strings (``NodeArg.type``) → OIP datatype.
ORT_TO_OIP: Final[Mapping[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# ---------------------------------------------------------------------------- bundle

BUNDLE_MANIFEST: Final = "manifest.json"
BUNDLE_MODEL: Final = "model.onnx"
BUNDLE_GOLDEN: Final = "golden.npz"
BUNDLE_REQUIRED_MEMBERS: Final = (BUNDLE_MANIFEST, BUNDLE_MODEL, BUNDLE_GOLDEN)
BUNDLE_OPTIONAL_MEMBERS: Final = ("labels.txt",)
# golden.npz holds arrays named ``input:<tensor name>`` and ``output:<tensor name>``;
# the first axis of each array indexes the golden case.
GOLDEN_INPUT_PREFIX: Final = "input:"
GOLDEN_OUTPUT_PREFIX: Final = "output:"
# /1: an uncompressed tar, members stored as they unpack. /2: every member but the
# manifest stored as one zstd frame named ``<member>.zst`` (agent.contracts.compression),
# and each ``members`` entry also gives ``encoding`` and ``stored_size``. The controller
# writes /2 unless asked for /1; the agent reads both.
MANIFEST_SCHEMA_V1: Final = "edgefleet.manifest/1"
MANIFEST_SCHEMA_V2: Final = "edgefleet.manifest/2"
MANIFEST_SCHEMA: Final = MANIFEST_SCHEMA_V2
MANIFEST_SCHEMAS: Final = (MANIFEST_SCHEMA_V1, MANIFEST_SCHEMA_V2)
# Any schema of this form that is not in MANIFEST_SCHEMAS is a format this agent does not
# read (NewerFormatError: another agent version may); anything else is malformed.
_MANIFEST_SCHEMA_RE: Final = re.compile(r"edgefleet\.manifest/[1-9][0-9]{0,8}")

# ---------------------------------------------------------------------------- source

# The manifest's optional ``source`` key: where the model came from, a flat object of
# ASCII keys to strings (docs/bundle-format.md#source-where-the-model-came-from). Keys
# starting with ``git_`` are what ``bundle build`` read from the Git work tree the model
# lay in; the others are the operator's ``--source KEY=VALUE``. Strings only, so every
# reader (the agent, a second TUF client, jq) reads it the same way.
SOURCE_KEY_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
SOURCE_GIT_PREFIX: Final = "git_"
SOURCE_MAX_ENTRIES: Final = 64
SOURCE_MAX_VALUE_CHARS: Final = 1024


def source_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be a ``source`` value (None: it can)."""
    if not value:
        return "is empty"
    if len(value) > SOURCE_MAX_VALUE_CHARS:
        return f"is {len(value)} characters long, over {SOURCE_MAX_VALUE_CHARS}"
    if not value.isprintable():
        return "holds control or unprintable characters"
    return None


def parse_source(doc: Any, where: str = "manifest.json source") -> dict[str, str]:
    """A manifest's ``source``: at most 64 keys matching ``SOURCE_KEY_RE``, each to a
    printable string of 1 to 1024 characters. Raises BundleError naming the key."""
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: expected an object of strings, got {type(doc).__name__}")
    if len(doc) > SOURCE_MAX_ENTRIES:
        raise BundleError(f"{where}: {len(doc)} keys, at most {SOURCE_MAX_ENTRIES}")
    for key, value in doc.items():
        if not SOURCE_KEY_RE.fullmatch(key):
            raise BundleError(f"{where}: key {key!r} does not match {SOURCE_KEY_RE.pattern}")
        if not isinstance(value, str):
            raise BundleError(f"{where}[{key!r}]: expected a string, got {type(value).__name__}")
        problem = source_value_problem(value)
        if problem is not None:
            raise BundleError(f"{where}[{key!r}]: the value {problem}")
    return dict(doc)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, OIP datatype and shape (-1 for a dynamic axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GoldenSpec:
    """How many golden cases the bundle carries and the tolerance they must meet.

    An output matches when ``|got - expected| <= atol + rtol * |expected|`` elementwise.
    """

    cases: int
    rtol: float
    atol: float


@dataclass(frozen=True)
class Manifest:
    """The bundle's ``manifest.json``: what the model is, how it was built, how good it is.

    ``members`` maps every file of the bundle (other than the manifest) to its size in
    bytes and sha256 (unpacked), so unpacking can refuse anything unexpected or
    oversized; schema /2 adds ``encoding`` (``zstd``) and ``stored_size`` (in the tar).
    A Manifest made without a ``schema`` is /1 (members as they unpack): the builder
    says /2 when it compresses.
    """

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    min_ort_version: str
    golden: GoldenSpec
    members: Mapping[str, Mapping[str, Any]]
    build: Mapping[str, Any] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=dict)
    quality: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    schema: str = MANIFEST_SCHEMA_V1
    # The drift reference (agent.contracts.reference), recorded by builds with eval
    # data; None (and absent from the JSON) without.
    reference: Reference | None = None
    # Where the model came from (``parse_source``): the Git work tree it lay in and the
    # operator's --source entries; None (and absent from the JSON) when nothing is known.
    source: Mapping[str, str] | None = None

    @property
    def compressed(self) -> bool:
        """True when the members are stored as zstd frames (schema /2)."""
        return self.schema == MANIFEST_SCHEMA_V2

    def stored_name(self, member: str) -> str:
        """The name of ``member`` inside the tar: ``model.onnx.zst`` under /2."""
        return member + STORED_SUFFIX if self.compressed else member

    def to_json_bytes(self) -> bytes:
        doc = asdict(self)
        doc["inputs"] = [t.to_json() for t in self.inputs]
        doc["outputs"] = [t.to_json() for t in self.outputs]
        if self.reference is None:
            del doc["reference"]  # as before the key existed
        else:
            doc["reference"] = self.reference.to_json()
        if self.source is None:
            del doc["source"]  # as before the key existed
        else:
            doc["source"] = dict(self.source)
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True).encode()


def _parse_tensor(doc: Any, where: str) -> TensorSpec:
    if not isinstance(doc, Mapping):
        raise BundleError(f"{where}: expected an object, got {type(doc).__name__}")
    name = _require(doc, "name", str, where)
    datatype = _require(doc, "datatype", str, where)
    if datatype not in OIP_TO_NUMPY:
        raise BundleError(f"{where}: unknown datatype {datatype!r}")
    shape = _require(doc, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
        raise BundleError(f"{where}: shape must be integers >= -1, got {shape!r}")
    return TensorSpec(name=name, datatype=datatype, shape=tuple(shape))


def parse_manifest(raw: bytes) -> Manifest:
    """Parse and validate ``manifest.json``; raise BundleError naming what is wrong."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BundleError("manifest.json: expected a JSON object")
    where = "manifest.json"
    schema = _require(doc, "schema", str, where)
    if schema not in MANIFEST_SCHEMAS:
        known = " or ".join(repr(s) for s in MANIFEST_SCHEMAS)
        error = NewerFormatError if _MANIFEST_SCHEMA_RE.fullmatch(schema) else BundleError
        raise error(f"{where}: schema expected {known}, got {schema!r}")
    try:
        name = check_name("model", _require(doc, "name", str, where))
        version = check_version(_require(doc, "version", str, where))
    except InvalidNameError as exc:
        raise BundleError(f"{where}: {exc}") from None
    inputs = tuple(
        _parse_tensor(t, f"{where} inputs[{i}]")
        for i, t in enumerate(_require(doc, "inputs", list, where))
    )
    outputs = tuple(
        _parse_tensor(t, f"{where} outputs[{i}]")
        for i, t in enumerate(_require(doc, "outputs", list, where))
    )
    if not inputs or not outputs:
        raise BundleError(f"{where}: a model needs at least one input and one output")
    golden_doc = _require(doc, "golden", dict, where)
    golden = GoldenSpec(
        cases=_require(golden_doc, "cases", int, f"{where} golden"),
        rtol=float(_require(golden_doc, "rtol", (int, float), f"{where} golden")),
        atol=float(_require(golden_doc, "atol", (int, float), f"{where} golden")),
    )
    members = _require(doc, "members", dict, where)
    for member, info in members.items():
        if member not in BUNDLE_REQUIRED_MEMBERS + BUNDLE_OPTIONAL_MEMBERS:
            raise BundleError(f"{where}: unexpected member {member!r}")
        if member == BUNDLE_MANIFEST:
            raise BundleError(f"{where}: the manifest cannot list itself")
        if not isinstance(info, dict):
            raise BundleError(f"{where}: members[{member!r}] expected an object")
        size = _require(info, "size", int, f"{where} members[{member!r}]")
        digest = _require(info, "sha256", str, f"{where} members[{member!r}]")
        if size < 0 or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(f"{where}: members[{member!r}] has a bad size or sha256")
        _check_encoding(info, schema, f"{where} members[{member!r}]")
    for required in (BUNDLE_MODEL, BUNDLE_GOLDEN):
        if required not in members:
            raise BundleError(f"{where}: members must list {required!r}")
    return Manifest(
        name=name,
        version=version,
        inputs=inputs,
        outputs=outputs,
        opset=_require(doc, "opset", int, where),
        min_ort_version=_require(doc, "min_ort_version", str, where),
        golden=golden,
        members=members,
        build=doc.get("build", {}) if isinstance(doc.get("build", {}), dict) else {},
        sizes=doc.get("sizes", {}) if isinstance(doc.get("sizes", {}), dict) else {},
        quality=doc.get("quality", {}) if isinstance(doc.get("quality", {}), dict) else {},
        created_at=str(doc.get("created_at", "")),
        schema=schema,
        reference=None if doc.get("reference") is None else parse_reference(doc["reference"]),
        source=None if doc.get("source") is None else parse_source(doc["source"]),
    )


def _check_encoding(info: Mapping[str, Any], schema: str, where: str) -> None:
    """/1 members are stored as they are; /2 members as zstd frames of a given size."""
    if schema == MANIFEST_SCHEMA_V1:
        if "encoding" in info or "stored_size" in info:
            raise BundleError(f"{where}: {MANIFEST_SCHEMA_V1} members are not compressed")
        return
    encoding = _require(info, "encoding", str, where)
    if encoding != ENCODING_ZSTD:
        raise NewerFormatError(f"{where}: encoding expected {ENCODING_ZSTD!r}, got {encoding!r}")
    if _require(info, "stored_size", int, where) < 0:
        raise BundleError(f"{where}: stored_size must be 0 or more")
