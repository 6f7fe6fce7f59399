"""The contracts the agent and the controller share, owned by the agent.

The controller imports this module to produce exactly what the agent accepts; the agent
never imports the controller. Everything here is pure: names, target paths, MQTT topics,
the bundle manifest, the fleet's desired state and the payloads of announcements and
status messages.

Invariants:
- Fleet, model and device names are ASCII, start with a letter or digit, and hold no
  ``/`` and no MQTT wildcard, so they are safe in topics, TUF target paths and file names.
- Versions are semantic versions (semver 2.0) and order as semver says.
- Every JSON document carries a ``schema`` field ``edgefleet.<kind>/<major>``; a reader
  refuses a major version it does not know.
- Parsers raise ``ValueError`` subclasses from ``agent.errors`` (``BundleError``,
  ``DesiredStateError``) naming the field, what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from agent.errors import BundleError, DesiredStateError

# ---------------------------------------------------------------------------- names

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SEMVER_RE: Final = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)


class InvalidNameError(ValueError):
    """A fleet, model or device name, or a version, is not acceptable."""


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid ``kind`` name (fleet, model, device).

    Raises InvalidNameError naming the rule that was broken.
    """
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidNameError(
            f"invalid {kind} name {value!r}: expected 1-64 ASCII letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (no '/', no leading '.')"
        )
    return value


def check_version(value: str) -> str:
    """Return ``value`` if it is a semantic version; raise InvalidNameError otherwise."""
    if not isinstance(value, str) or not _SEMVER_RE.match(value):
        raise InvalidNameError(
            f"invalid version {value!r}: expected a semantic version such as 1.4.0 or 2.0.0-rc.1"
        )
    return value


def version_key(value: str) -> tuple[Any, ...]:
    """A sort key that orders versions as semver 2.0 does (build metadata ignored)."""
    match = _SEMVER_RE.match(value)
    if match is None:
        raise InvalidNameError(f"invalid version {value!r}")
    major, minor, patch, pre, _build = match.groups()
    release = (int(major), int(minor), int(patch))
    if pre is None:
        return (*release, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*release, 0, parts)


# ---------------------------------------------------------------------------- TUF target paths


def bundle_target_path(model: str, version: str) -> str:
    """The TUF target path of a model's release: ``bundles/<model>/<version>.bundle``."""
    return f"bundles/{check_name('model', model)}/{check_version(version)}.bundle"


def desired_target_path(fleet: str) -> str:
    """The TUF target path of a fleet's desired state: ``fleets/<fleet>/desired.json``."""
    return f"fleets/{check_name('fleet', fleet)}/desired.json"


# Delegation pattern of the online rollout role: one ``*`` matches one path segment.
ROLLOUT_ROLE: Final = "rollout"
ROLLOUT_PATHS: Final = ("fleets/*/*",)
BUNDLE_PATHS: Final = ("bundles/*/*",)

# ---------------------------------------------------------------------------- MQTT topics

TOPIC_ROOT: Final = "edgefleet/v1"


def announce_topic(fleet: str) -> str:
    """Retained, controller → agents: new metadata exists for this fleet (a hint only)."""
    return f"{TOPIC_ROOT}/fleets/{check_name('fleet', fleet)}/announce"


def device_topic(fleet: str, device: str, kind: str) -> str:
    """A device's own topic: ``kind`` is ``status``, ``telemetry`` or ``events``."""
    if kind not in ("status", "telemetry", "events"):
        raise ValueError(f"unknown device topic kind {kind!r}")
    return (
        f"{TOPIC_ROOT}/fleets/{check_name('fleet', fleet)}"
        f"/devices/{check_name('device', device)}/{kind}"
    )


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
MANIFEST_SCHEMA: Final = "edgefleet.manifest/1"


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
    bytes and sha256, so unpacking can refuse anything unexpected or oversized.
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
    schema: str = MANIFEST_SCHEMA

    def to_json_bytes(self) -> bytes:
        doc = asdict(self)
        doc["inputs"] = [t.to_json() for t in self.inputs]
        doc["outputs"] = [t.to_json() for t in self.outputs]
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True).encode()


def _require(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise BundleError(f"{where}: missing field {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BundleError(
            f"{where}: field {key!r} expected {_type_name(kind)}, got {type(value).__name__}"
        )
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


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
    if schema != MANIFEST_SCHEMA:
        raise BundleError(f"{where}: schema expected {MANIFEST_SCHEMA!r}, got {schema!r}")
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
    )


# ---------------------------------------------------------------------------- desired state

DESIRED_SCHEMA: Final = "edgefleet.desired/1"


@dataclass(frozen=True)
class ProbationPolicy:
    """What a new version must show after activation before the device commits it."""

    duration_s: float = 60.0
    min_requests: int = 0
    max_error_rate: float = 0.05
    max_p99_ratio: float = 2.0


@dataclass(frozen=True)
class ModelRelease:
    """One model's entry in a fleet's desired state.

    ``version`` is the new release; devices outside the rollout keep ``previous``
    (or nothing, when there is none). ``percent`` of devices (by bucket) plus every
    device in ``canaries`` take ``version``.
    """

    version: str
    target: str
    rollout_id: str
    percent: float = 100.0
    previous: str | None = None
    previous_target: str | None = None
    canaries: tuple[str, ...] = ()
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)


@dataclass(frozen=True)
class DesiredState:
    """A fleet's ``desired.json``: per model, which release its devices should run."""

    fleet: str
    models: Mapping[str, ModelRelease]
    issued_at: str = ""
    schema: str = DESIRED_SCHEMA

    def to_json_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": self.schema,
            "fleet": self.fleet,
            "issued_at": self.issued_at,
            "models": {},
        }
        for name, rel in sorted(self.models.items()):
            entry = asdict(rel)
            entry["canaries"] = list(rel.canaries)
            doc["models"][name] = entry
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True).encode()


def _desired_field(
    doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str
) -> Any:
    try:
        return _require(doc, key, kind, where)
    except BundleError as exc:
        raise DesiredStateError(str(exc)) from None


def parse_desired_state(raw: bytes, expected_fleet: str) -> DesiredState:
    """Parse ``desired.json``; raise DesiredStateError naming what is wrong."""
    where = f"fleets/{expected_fleet}/desired.json"
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DesiredStateError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DesiredStateError(f"{where}: expected a JSON object")
    schema = _desired_field(doc, "schema", str, where)
    if schema != DESIRED_SCHEMA:
        raise DesiredStateError(f"{where}: schema expected {DESIRED_SCHEMA!r}, got {schema!r}")
    fleet = _desired_field(doc, "fleet", str, where)
    if fleet != expected_fleet:
        raise DesiredStateError(f"{where}: fleet expected {expected_fleet!r}, got {fleet!r}")
    models: dict[str, ModelRelease] = {}
    for name, entry in _desired_field(doc, "models", dict, where).items():
        w = f"{where} models[{name!r}]"
        try:
            check_name("model", name)
            version = check_version(_desired_field(entry, "version", str, w))
            previous = entry.get("previous")
            if previous is not None:
                check_version(previous)
        except InvalidNameError as exc:
            raise DesiredStateError(f"{w}: {exc}") from None
        target = _desired_field(entry, "target", str, w)
        if target != bundle_target_path(name, version):
            raise DesiredStateError(
                f"{w}: target expected {bundle_target_path(name, version)!r}, got {target!r}"
            )
        percent = float(_desired_field(entry, "percent", (int, float), w))
        if not 0.0 <= percent <= 100.0:
            raise DesiredStateError(f"{w}: percent expected 0..100, got {percent}")
        canaries = _desired_field(entry, "canaries", list, w)
        prob = entry.get("probation", {})
        if not isinstance(prob, dict):
            raise DesiredStateError(f"{w}: probation expected an object")
        try:
            policy = ProbationPolicy(**prob)
        except TypeError as exc:
            raise DesiredStateError(f"{w}: probation: {exc}") from None
        models[name] = ModelRelease(
            version=version,
            target=target,
            rollout_id=str(_desired_field(entry, "rollout_id", str, w)),
            percent=percent,
            previous=previous,
            previous_target=bundle_target_path(name, previous) if previous else None,
            canaries=tuple(str(c) for c in canaries),
            probation=policy,
        )
    return DesiredState(fleet=fleet, models=models, issued_at=str(doc.get("issued_at", "")))


def device_bucket(rollout_id: str, device_id: str) -> float:
    """The device's place in a rollout, in [0, 100): stable per (rollout, device)."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


def resolve_release(release: ModelRelease, device_id: str) -> tuple[str, str] | None:
    """Which (version, target) this device should run for one model, or None for nothing.

    A canary or a device whose bucket falls below ``percent`` takes the new release;
    every other device keeps the previous release, if there is one.
    """
    if (
        device_id in release.canaries
        or device_bucket(release.rollout_id, device_id) < release.percent
    ):
        return release.version, release.target
    if release.previous is not None and release.previous_target is not None:
        return release.previous, release.previous_target
    return None


# ---------------------------------------------------------------------------- MQTT payloads

ANNOUNCE_SCHEMA: Final = "edgefleet.announce/1"
STATUS_SCHEMA: Final = "edgefleet.status/1"


def announce_payload(fleet: str, timestamp_version: int, published_at: str) -> bytes:
    """The retained announcement that tells a fleet's agents to refresh (a hint only)."""
    return json.dumps(
        {
            "schema": ANNOUNCE_SCHEMA,
            "fleet": fleet,
            "timestamp_version": timestamp_version,
            "published_at": published_at,
        },
        sort_keys=True,
    ).encode()


def status_payload(
    device: str,
    fleet: str,
    online: bool,
    models: Mapping[str, Mapping[str, Any]],
    agent_version: str,
    at: str,
) -> bytes:
    """The retained status message (the last will carries ``online: false``)."""
    return json.dumps(
        {
            "schema": STATUS_SCHEMA,
            "device": device,
            "fleet": fleet,
            "online": online,
            "agent_version": agent_version,
            "models": {k: dict(v) for k, v in models.items()},
            "at": at,
        },
        sort_keys=True,
    ).encode()


# ---------------------------------------------------------------------------- telemetry and events
#
# Heartbeats (``device_topic(..., "telemetry")``, QoS 0 by default, never retained) say how
# a device is doing; events (``device_topic(..., "events")``, QoS 1, never retained) say
# what happened to it. docs/protocol.md documents every field. Events carry a ``stream``
# (random, fixed for the life of the device's outbox) and a ``seq`` (1, 2, 3, … within the
# stream): delivery is at least once, so a reader keys events on (device, stream, seq) and
# sees gaps as events the device dropped.

TELEMETRY_SCHEMA: Final = "edgefleet.telemetry/1"
EVENT_SCHEMA: Final = "edgefleet.event/1"

# The install phase a journal record entered → the event kind reported for it.
EVENT_KIND_BY_PHASE: Final[Mapping[str, str]] = {
    "idle": "install_put_back",
    "downloading": "install_started",
    "verified": "verified",
    "staged": "unpacked",
    "smoke_tested": "smoke_tested",
    "active": "activated",
    "committed": "committed",
    "rolled_back": "rolled_back",
    "failed": "install_failed",
}
EVENT_KINDS: Final = frozenset({*EVENT_KIND_BY_PHASE.values(), "agent_started"})


class PayloadError(ValueError):
    """A telemetry, event or status payload that does not follow its schema."""


@dataclass(frozen=True)
class ModelFigures:
    """One model in a heartbeat: what serves and how it did since the last heartbeat.

    ``requests``/``errors`` count the interval only; latencies are seconds (None without
    a successful request in the interval).
    """

    version: str | None
    state: str
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None


@dataclass(frozen=True)
class SystemFigures:
    """The machine: CPU %, memory, free disk of the state directory, load, temperature."""

    cpu_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    load_1m: float | None = None
    temperature_c: float | None = None


@dataclass(frozen=True)
class Heartbeat:
    """A parsed ``edgefleet.telemetry/1`` message."""

    device: str
    fleet: str
    at: str
    seq: int
    interval_s: float
    agent_version: str
    uptime_s: float
    system: SystemFigures
    models: Mapping[str, ModelFigures]
    outbox_pending: int = 0
    outbox_dropped: int = 0


@dataclass(frozen=True)
class Event:
    """A parsed ``edgefleet.event/1`` message."""

    device: str
    fleet: str
    stream: str
    seq: int
    at: str
    kind: str
    model: str | None = None
    version: str | None = None
    previous: str | None = None
    phase: str | None = None
    rollout_id: str = ""
    reason: str = ""


def _compact(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def telemetry_payload(heartbeat: Heartbeat) -> bytes:
    """The heartbeat message published on the device's ``telemetry`` topic."""
    return _compact(
        {
            "schema": TELEMETRY_SCHEMA,
            "device": heartbeat.device,
            "fleet": heartbeat.fleet,
            "at": heartbeat.at,
            "seq": heartbeat.seq,
            "interval_s": heartbeat.interval_s,
            "agent_version": heartbeat.agent_version,
            "uptime_s": round(heartbeat.uptime_s, 3),
            "system": asdict(heartbeat.system),
            "models": {name: asdict(m) for name, m in sorted(heartbeat.models.items())},
            "outbox": {"pending": heartbeat.outbox_pending, "dropped": heartbeat.outbox_dropped},
        }
    )


def event_payload(event: Event) -> bytes:
    """The message published on the device's ``events`` topic."""
    doc = asdict(event)
    doc["schema"] = EVENT_SCHEMA
    return _compact(doc)


def _load_doc(raw: bytes, schema: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError(f"expected a JSON object, got {type(doc).__name__}")
    got = doc.get("schema")
    if got != schema:
        raise PayloadError(f"schema expected {schema!r}, got {got!r}")
    return doc


def _field(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    try:
        return _require(doc, key, kind, where)
    except BundleError as exc:
        raise PayloadError(str(exc)) from None


def _optional(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    # ``type(...) in`` (not isinstance) keeps bool out of int and is fast: the controller
    # parses every heartbeat of the fleet.
    value = doc.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return value if type(value) in kinds else None


def _number_or_none(doc: Mapping[str, Any], key: str) -> float | None:
    value: Any = doc.get(key)
    return float(value) if type(value) in (int, float) else None


def _int_or_none(doc: Mapping[str, Any], key: str) -> int | None:
    value = doc.get(key)
    return value if type(value) is int else None


def _identity(doc: Mapping[str, Any], where: str) -> tuple[str, str]:
    device = _field(doc, "device", str, where)
    fleet = _field(doc, "fleet", str, where)
    try:
        return check_name("device", device), check_name("fleet", fleet)
    except InvalidNameError as exc:
        raise PayloadError(f"{where}: {exc}") from None


def parse_telemetry(raw: bytes) -> Heartbeat:
    """Parse a heartbeat; raise PayloadError naming what is wrong.

    Unknown fields are ignored (a minor revision may add some); system figures a device
    cannot measure are None.
    """
    where = "telemetry"
    doc = _load_doc(raw, TELEMETRY_SCHEMA)
    device, fleet = _identity(doc, where)
    system_doc = doc.get("system") if isinstance(doc.get("system"), dict) else {}
    assert isinstance(system_doc, dict)
    system = SystemFigures(
        cpu_percent=_number_or_none(system_doc, "cpu_percent"),
        memory_used_bytes=_int_or_none(system_doc, "memory_used_bytes"),
        memory_total_bytes=_int_or_none(system_doc, "memory_total_bytes"),
        disk_free_bytes=_int_or_none(system_doc, "disk_free_bytes"),
        load_1m=_number_or_none(system_doc, "load_1m"),
        temperature_c=_number_or_none(system_doc, "temperature_c"),
    )
    models: dict[str, ModelFigures] = {}
    for name, entry in _field(doc, "models", dict, where).items():
        if not isinstance(entry, dict):
            raise PayloadError(f"{where}: models[{name!r}] expected an object")
        models[str(name)] = ModelFigures(
            version=_optional(entry, "version", str),
            state=str(_optional(entry, "state", str) or "unknown"),
            requests=_int_or_none(entry, "requests") or 0,
            errors=_int_or_none(entry, "errors") or 0,
            client_errors=_int_or_none(entry, "client_errors") or 0,
            p50_s=_number_or_none(entry, "p50_s"),
            p95_s=_number_or_none(entry, "p95_s"),
            p99_s=_number_or_none(entry, "p99_s"),
        )
    outbox = doc.get("outbox") if isinstance(doc.get("outbox"), dict) else {}
    assert isinstance(outbox, dict)
    return Heartbeat(
        device=device,
        fleet=fleet,
        at=_field(doc, "at", str, where),
        seq=_int_or_none(doc, "seq") or 0,
        interval_s=float(_field(doc, "interval_s", (int, float), where)),
        agent_version=str(_optional(doc, "agent_version", str) or ""),
        uptime_s=_number_or_none(doc, "uptime_s") or 0.0,
        system=system,
        models=models,
        outbox_pending=_int_or_none(outbox, "pending") or 0,
        outbox_dropped=_int_or_none(outbox, "dropped") or 0,
    )


def parse_event(raw: bytes) -> Event:
    """Parse an event; raise PayloadError naming what is wrong."""
    where = "event"
    doc = _load_doc(raw, EVENT_SCHEMA)
    device, fleet = _identity(doc, where)
    seq = _field(doc, "seq", int, where)
    if seq < 1:
        raise PayloadError(f"{where}: seq expected >= 1, got {seq}")
    kind = _field(doc, "kind", str, where)
    if not _NAME_RE.match(kind):
        raise PayloadError(f"{where}: kind expected a short name, got {kind!r}")
    return Event(
        device=device,
        fleet=fleet,
        stream=_field(doc, "stream", str, where),
        seq=seq,
        at=_field(doc, "at", str, where),
        kind=kind,
        model=_optional(doc, "model", str),
        version=_optional(doc, "version", str),
        previous=_optional(doc, "previous", str),
        phase=_optional(doc, "phase", str),
        rollout_id=str(_optional(doc, "rollout_id", str) or ""),
        reason=str(_optional(doc, "reason", str) or ""),
    )


@dataclass(frozen=True)
class Status:
    """A parsed ``edgefleet.status/1`` message (retained; the last will says offline)."""

    device: str
    fleet: str
    online: bool
    agent_version: str
    models: Mapping[str, Mapping[str, Any]]
    at: str


def parse_status(raw: bytes) -> Status:
    """Parse a status message; raise PayloadError naming what is wrong."""
    where = "status"
    doc = _load_doc(raw, STATUS_SCHEMA)
    device, fleet = _identity(doc, where)
    models = _field(doc, "models", dict, where)
    return Status(
        device=device,
        fleet=fleet,
        online=bool(_field(doc, "online", bool, where)),
        agent_version=str(_optional(doc, "agent_version", str) or ""),
        models={str(k): dict(v) for k, v in models.items() if isinstance(v, dict)},
        at=str(_optional(doc, "at", str) or ""),
    )


def parse_device_topic(topic: str) -> tuple[str, str, str]:
    """``edgefleet/v1/fleets/F/devices/D/KIND`` → (fleet, device, kind); PayloadError if not."""
    parts = topic.split("/")
    if (
        len(parts) != 7
        or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT
        or parts[2] != "fleets"
        or parts[4] != "devices"
        or parts[6] not in ("status", "telemetry", "events")
    ):
        raise PayloadError(f"not a device topic: {topic!r}")
    return parts[3], parts[5], parts[6]


def device_topic_filter(kind: str = "+") -> str:
    """The subscription that matches every device's ``kind`` topic (``+``: all three)."""
    return f"{TOPIC_ROOT}/fleets/+/devices/+/{kind}"
