"""The MQTT payloads: announcements, status, telemetry heartbeats and events.

Builders produce the bytes the agent publishes; parsers (used by the controller) raise
``PayloadError`` naming what is wrong and ignore fields they do not know, so a minor
revision may add some. ``parse_device_topic`` reads a device topic back into its parts.
"""

from __future__ import annotations

import json
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
    if not is_name(kind):
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
