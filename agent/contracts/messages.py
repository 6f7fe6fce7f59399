"""The MQTT payloads: announcements, status, telemetry heartbeats and events.

Builders produce the bytes the agent publishes; parsers (used by the controller) raise
``PayloadError`` naming what is wrong and ignore fields they do not know, so a minor
revision may add some. ``parse_device_topic`` reads a device topic back into its parts.

Invariant: what a parser accepts, the controller's telemetry stores (SQLite and
PostgreSQL) can hold, so one device's message cannot fail the transaction of a batch:
the parsers refuse NaN and infinite numbers, lone surrogates anywhere in the document,
NUL characters in the text they return, text they return for a name, version, time or
id longer than ``MAX_TEXT`` characters (PostgreSQL indexes them, and an index entry
holds at most 2,704 bytes), counts beyond ``MAX_COUNT`` (32-bit columns) and sequence
numbers beyond ``MAX_SEQ`` (64-bit). Nesting deeper than the parser can follow is not
valid JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from agent.base.errors import BundleError
from agent.contracts._fields import _require
from agent.contracts.names import TOPIC_ROOT, InvalidNameError, check_name, is_name

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
    "shadow": "shadow_started",
    "active": "activated",
    "committed": "committed",
    "rolled_back": "rolled_back",
    "failed": "install_failed",
}
EVENT_KINDS: Final = frozenset({*EVENT_KIND_BY_PHASE.values(), "agent_started"})


class PayloadError(ValueError):
    """A telemetry, event or status payload that does not follow its schema."""


# What the controller's stores hold (module docstring): larger values are refused.
MAX_SEQ: Final = 2**63 - 1  # BIGINT
MAX_COUNT: Final = 2**31 - 1  # INTEGER on PostgreSQL
MAX_TEXT: Final = 256  # characters of a name, version, time or id; 4 bytes each at most
# A system figure beyond these is not an integer to orjson, the controller's hot path
# (controller.fleet.payloads): it reads as None (not measured) on both paths.
_SYSTEM_INT_RANGE: Final = (-(2**63), 2**64 - 1)
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


# Why a device does not install the version desired state names for it (``Waiting.code``):
# docs/rollouts.md says what each means and what the operator can do about it.
WAITING_CODES: Final = frozenset(
    {
        "probation",  # the version serving now is on probation; the next waits for its end
        "shadow",  # this version is in shadow beside the one serving, not answering yet
        "failed",  # this version failed to install here for this rollout: not retried
        "rolled_back",  # this version was rolled back here for this rollout: not retried
        "no_space",  # not enough free disk for the bundle and its unpacked copy
        "storage",  # the device's disk refused a write (full, read-only)
        "fetch_failed",  # the bundle's download failed (network, repository)
        "refused",  # the download or its metadata failed verification
        "check_failed",  # the update check could not read the repository
        "untrusted",  # the repository's metadata was refused (expired, bad signature, ...)
    }
)
# Characters of a waiting reason's detail kept (the agent cuts longer ones).
MAX_DETAIL: Final = 1000


@dataclass(frozen=True)
class Waiting:
    """Why a device does not install (yet) the version desired state names for a model.

    ``code``: one of ``WAITING_CODES`` (a newer agent may send others: readers keep them);
    ``detail``: one line for people; ``version``: the version waited for (None when the
    device could not read desired state); ``since``: when the device first gave this code
    for this version (ISO 8601, UTC). Optional in status and heartbeat messages (``waiting``
    of a model): absent when the device runs what it should, or from an older agent.
    """

    code: str
    detail: str
    version: str | None = None
    since: str = ""


def waiting_doc(waiting: Waiting) -> dict[str, Any]:
    """The JSON object of a waiting reason, as a model's ``waiting`` field carries it."""
    return asdict(waiting)


def parse_waiting(value: Any, where: str) -> Waiting | None:
    """The ``waiting`` field of a model (status or heartbeat), or None when absent or not
    an object with a text ``code``. Raises PayloadError on text no store can hold."""
    if type(value) is not dict:
        return None
    code = value.get("code")
    if type(code) is not str or not code:
        return None
    detail = value.get("detail")
    since = value.get("since")
    return Waiting(
        code=_text(code, f"{where}: waiting.code"),
        detail=_text(detail, f"{where}: waiting.detail", MAX_DETAIL) if type(detail) is str else "",
        version=_text_or_none(value, "version", f"{where}: waiting"),
        since=_text(since, f"{where}: waiting.since") if type(since) is str else "",
    )


# ---- shadow evidence (a candidate compared with the serving version; issue 23 part 1)

SHADOW_STATES: Final = frozenset({"running", "passed", "failed", "cancelled"})


@dataclass(frozen=True)
class ShadowReport:
    """A model's ``shadow`` object in heartbeats: the candidate ``version`` compared with
    the ``serving`` one on copies of live requests, while in shadow (``state`` running)
    and after its verdict (passed, failed, cancelled) while the device's journal still
    names it. Figures as ``agent.runtime.shadow.ShadowFigures``: None where not measured
    (no class-score output: no ``agreement``; nothing compared yet)."""

    version: str
    serving: str | None = None
    state: str = "running"
    samples: int = 0
    agreement: float | None = None
    cosine_min: float | None = None
    max_abs: float | None = None
    latency_ratio: float | None = None
    errors: int = 0
    dropped: int = 0


def parse_shadow_report(value: Any, where: str) -> ShadowReport | None:
    """The ``shadow`` field of a heartbeat's model, or None when absent or not an object
    naming a ``version``. Raises PayloadError on text or counts no store can hold."""
    if type(value) is not dict or type(value.get("version")) is not str:
        return None
    w = f"{where}: shadow"
    return ShadowReport(
        version=_text(value["version"], f"{w}.version"),
        serving=_text_or_none(value, "serving", w),
        state=_text(value["state"], f"{w}.state") if type(value.get("state")) is str else "",
        samples=_int_within(value, "samples", MAX_COUNT, w),
        agreement=_number_or_none(value, "agreement"),
        cosine_min=_number_or_none(value, "cosine_min"),
        max_abs=_number_or_none(value, "max_abs"),
        latency_ratio=_number_or_none(value, "latency_ratio"),
        errors=_int_within(value, "errors", MAX_COUNT, w),
        dropped=_int_within(value, "dropped", MAX_COUNT, w),
    )


# ---- end of shadow evidence


@dataclass(frozen=True)
class ModelFigures:
    """One model in a heartbeat: what serves and how it did since the last heartbeat.

    ``requests``/``errors`` count the interval only; latencies are seconds (None without
    a successful request in the interval). ``waiting``: why the device does not install
    the version desired state names for it, if it does not (absent from the payload
    otherwise). ``shadow``: a candidate in shadow, or its verdict (``ShadowReport``;
    absent otherwise).
    """

    version: str | None
    state: str
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    p50_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None
    waiting: Waiting | None = None
    # The candidate in shadow, or its last verdict (absent from the payload when None).
    shadow: ShadowReport | None = None
    # -- drift (issue 23): the serving version's outputs (``drift``) and inputs
    # (``input_drift``) against its bundle's reference, as a population stability index
    # over the last ``drift_samples`` samples (agent.runtime.drift). ``drift_samples``
    # None: the version has no reference (the three fields are absent from the payload);
    # a PSI is None below the sketch's minimum of samples.
    drift: float | None = None
    input_drift: float | None = None
    drift_samples: int | None = None


# The drift fields of a heartbeat's model, all absent when the version has no reference.
DRIFT_FIELDS: Final = ("drift", "input_drift", "drift_samples")


def _model_doc(m: ModelFigures) -> dict[str, Any]:
    doc = asdict(m)
    if m.waiting is None:
        del doc["waiting"]  # as before the field existed
    if m.shadow is None:
        del doc["shadow"]  # as before the field existed
    if m.drift_samples is None:
        for key in DRIFT_FIELDS:
            del doc[key]
    return doc


def parse_drift(
    entry: Mapping[str, Any], where: str
) -> tuple[float | None, float | None, int | None]:
    """(drift, input_drift, drift_samples) of a heartbeat's model: all None when
    ``drift_samples`` is absent (no reference). Raises PayloadError for a PSI that is not
    a number >= 0, or a sample count that is not a count."""
    samples = entry.get("drift_samples")
    if samples is None:
        return None, None, None
    if type(samples) is not int or not 0 <= samples <= MAX_COUNT:
        raise PayloadError(f"{where}: drift_samples expected a count, got {samples!r}")
    scores = []
    for key in ("drift", "input_drift"):
        value = entry.get(key)
        if value is not None and (type(value) not in (int, float) or not 0 <= value < math.inf):
            raise PayloadError(f"{where}: {key} expected a number >= 0 or null, got {value!r}")
        scores.append(None if value is None else float(value))
    return scores[0], scores[1], samples


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
            "models": {name: _model_doc(m) for name, m in sorted(heartbeat.models.items())},
            "outbox": {"pending": heartbeat.outbox_pending, "dropped": heartbeat.outbox_dropped},
        }
    )


def event_payload(event: Event) -> bytes:
    """The message published on the device's ``events`` topic."""
    doc = asdict(event)
    doc["schema"] = EVENT_SCHEMA
    return _compact(doc)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PayloadError(f"not valid JSON: number {text[:40]!r} is not finite")
    return value


def _constant(text: str) -> Any:
    raise PayloadError(f"not valid JSON: {text} is not a number")


def _has_lone_surrogate(doc: Any) -> bool:
    """True when a string of ``doc`` (keys too, at any depth) holds a lone surrogate:
    json.loads joins every valid pair into one character, so any left is lone."""
    stack = [doc]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is str:
            if not value.isascii() and _LONE_SURROGATE.search(value):
                return True
        elif kind is dict:
            stack += value.keys()
            stack += value.values()
        elif kind is list:
            stack += value
    return False


def _load_doc(raw: bytes, schema: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw, parse_float=_finite, parse_constant=_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise PayloadError("not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise PayloadError(f"expected a JSON object, got {type(doc).__name__}")
    if _has_lone_surrogate(doc):
        raise PayloadError("not valid JSON: a string holds a lone surrogate")
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


def _text(value: str, what: str, limit: int | None = MAX_TEXT) -> str:
    """``value`` if a store can hold it: no NUL, at most ``limit`` characters (None: any)."""
    if "\x00" in value:
        raise PayloadError(f"{what} holds a NUL character")
    if limit is not None and len(value) > limit:
        raise PayloadError(f"{what} expected at most {limit} characters, got {len(value)}")
    return value


def _text_or_none(doc: Mapping[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    return _text(value, f"{where}: {key}") if type(value) is str else None


def _int_within(doc: Mapping[str, Any], key: str, limit: int, where: str) -> int:
    """An integer field (0 when absent or not an integer); PayloadError beyond ±limit."""
    value = doc.get(key)
    if type(value) is not int:
        return 0
    if not -limit <= value <= limit:
        raise PayloadError(f"{where}: {key} expected at most {limit:,}, got {value}")
    return value


def _system_int(doc: Mapping[str, Any], key: str) -> int | None:
    value = _int_or_none(doc, key)
    low, high = _SYSTEM_INT_RANGE
    return value if value is not None and low <= value <= high else None


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
        memory_used_bytes=_system_int(system_doc, "memory_used_bytes"),
        memory_total_bytes=_system_int(system_doc, "memory_total_bytes"),
        disk_free_bytes=_system_int(system_doc, "disk_free_bytes"),
        load_1m=_number_or_none(system_doc, "load_1m"),
        temperature_c=_number_or_none(system_doc, "temperature_c"),
    )
    models: dict[str, ModelFigures] = {}
    for name, entry in _field(doc, "models", dict, where).items():
        if not isinstance(entry, dict):
            raise PayloadError(f"{where}: models[{name!r}] expected an object")
        model = f"{where}: models[{name!r}]"
        drift, input_drift, drift_samples = parse_drift(entry, model)
        models[_text(str(name), f"{where}: model name")] = ModelFigures(
            version=_text_or_none(entry, "version", model),
            state=_text_or_none(entry, "state", model) or "unknown",
            requests=_int_within(entry, "requests", MAX_COUNT, model),
            errors=_int_within(entry, "errors", MAX_COUNT, model),
            client_errors=_int_within(entry, "client_errors", MAX_COUNT, model),
            p50_s=_number_or_none(entry, "p50_s"),
            p95_s=_number_or_none(entry, "p95_s"),
            p99_s=_number_or_none(entry, "p99_s"),
            waiting=parse_waiting(entry.get("waiting"), model),
            shadow=parse_shadow_report(entry.get("shadow"), model),
            drift=drift,
            input_drift=input_drift,
            drift_samples=drift_samples,
        )
    outbox = doc.get("outbox") if isinstance(doc.get("outbox"), dict) else {}
    assert isinstance(outbox, dict)
    return Heartbeat(
        device=device,
        fleet=fleet,
        at=_text(_field(doc, "at", str, where), f"{where}: at"),
        seq=_int_within(doc, "seq", MAX_SEQ, where),
        interval_s=float(_field(doc, "interval_s", (int, float), where)),
        agent_version=_text_or_none(doc, "agent_version", where) or "",
        uptime_s=_number_or_none(doc, "uptime_s") or 0.0,
        system=system,
        models=models,
        outbox_pending=_int_within(outbox, "pending", MAX_COUNT, f"{where}: outbox"),
        outbox_dropped=_int_within(outbox, "dropped", MAX_COUNT, f"{where}: outbox"),
    )


def parse_event(raw: bytes) -> Event:
    """Parse an event; raise PayloadError naming what is wrong."""
    where = "event"
    doc = _load_doc(raw, EVENT_SCHEMA)
    device, fleet = _identity(doc, where)
    seq = _field(doc, "seq", int, where)
    if not 1 <= seq <= MAX_SEQ:
        raise PayloadError(f"{where}: seq expected >= 1 and at most {MAX_SEQ:,}, got {seq}")
    kind = _field(doc, "kind", str, where)
    if not is_name(kind):
        raise PayloadError(f"{where}: kind expected a short name, got {kind!r}")
    return Event(
        device=device,
        fleet=fleet,
        stream=_text(_field(doc, "stream", str, where), f"{where}: stream"),
        seq=seq,
        at=_text(_field(doc, "at", str, where), f"{where}: at"),
        kind=kind,
        model=_text_or_none(doc, "model", where),
        version=_text_or_none(doc, "version", where),
        previous=_text_or_none(doc, "previous", where),
        phase=_text_or_none(doc, "phase", where),
        rollout_id=_text_or_none(doc, "rollout_id", where) or "",
        # Free text, not indexed: any length.
        reason=_text(str(_optional(doc, "reason", str) or ""), f"{where}: reason", None),
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
    models = {
        _text(str(name), f"{where}: model name"): _status_model(entry, f"{where}: models[{name!r}]")
        for name, entry in _field(doc, "models", dict, where).items()
        if isinstance(entry, dict)
    }
    return Status(
        device=device,
        fleet=fleet,
        online=bool(_field(doc, "online", bool, where)),
        agent_version=_text_or_none(doc, "agent_version", where) or "",
        models=models,
        at=_text_or_none(doc, "at", where) or "",
    )


def _status_model(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """A model of a status message, its version and state checked as the store keeps
    them (``controller.fleet.records.status_rows``: the version if text, the state as
    text), its ``waiting`` reason parsed (a ``Waiting``; dropped when not one)."""
    _text_or_none(entry, "version", where)
    _text(str(entry.get("state", "unknown")), f"{where}: state")
    model = dict(entry)
    waiting = parse_waiting(entry.get("waiting"), where)
    if waiting is None:
        model.pop("waiting", None)
    else:
        model["waiting"] = waiting
    return model


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
