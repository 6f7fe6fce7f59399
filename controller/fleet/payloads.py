"""Devices' MQTT messages, parsed into what the telemetry store writes: pure functions of
a topic, the payload's bytes and the time it was received; no broker, no store.

``add_payload`` is the entry point ingest calls per message: it checks the topic's names
and adds the parsed message to an ``IngestBatch`` (``controller.fleet.records``).
Heartbeats are most of the traffic (a fleet of 100,000 sends 10,000 a second), so they
take a hot path: orjson decodes them and ``parse_heartbeat`` checks and keeps only what
the store writes (``HeartbeatFacts``), accepting exactly what the contract's
``parse_telemetry`` accepts, minus what no store can hold (see its docstring). Events
and status messages go through the contract's parsers (``parse_message``).

Invariants:
- A message that breaks the contract raises PayloadError and adds nothing to the batch.
- A message's payload must name the fleet and device of its topic (the broker's ACL binds
  a device to its topics, so the topic is what identifies the sender).
- Nothing that parses can fail the store's transaction: counts beyond the store's 32-bit
  columns, NaN, NUL characters, over-long names and the like are refused, here for
  heartbeats and by the contract's parsers for events and status messages.
- With an ``Admission`` (what ``edgectl serve`` passes): a message whose device the
  registry does not admit on its topic's fleet, and a heartbeat whose counts no device
  can serve (``check_plausible``), raise ``RefusedMessage`` (a PayloadError with a
  reason), checked before the payload is parsed and after, respectively.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from agent.contracts import (
    MAX_COUNT,
    MAX_SEQ,
    MAX_TEXT,
    TELEMETRY_SCHEMA,
    TOPIC_ROOT,
    Event,
    Heartbeat,
    InvalidNameError,
    PayloadError,
    Status,
    check_name,
    parse_device_topic,
    parse_drift,
    parse_event,
    parse_shadow_report,
    parse_status,
    parse_telemetry,
    parse_waiting,
)
from agent.contracts.names import NAME_PATTERN
from controller.fleet.records import (
    DriftFacts,
    HeartbeatFacts,
    IngestBatch,
    ModelFacts,
    shadow_json,
    waiting_json,
)
from controller.fleet.roster import IMPLAUSIBLE, RefusedMessage, Roster

Message = Heartbeat | Event | Status
_PARSERS: Final[dict[str, Callable[[bytes], Message]]] = {
    "telemetry": parse_telemetry,
    "events": parse_event,
    "status": parse_status,
}


def parse_message(topic: str, payload: bytes) -> Message:
    """Parse a device message; raise PayloadError when it breaks the contract.

    The device and fleet in the payload must be those of the topic: the broker's ACL
    binds a device to its topics, so the topic is what identifies the sender.
    """
    fleet, device, kind = parse_device_topic(topic)
    message: Message = _PARSERS[kind](payload)
    if (message.fleet, message.device) != (fleet, device):
        raise PayloadError(
            f"payload names {message.fleet}/{message.device} but arrived on {topic!r}"
        )
    return message


def add_to_batch(batch: IngestBatch, message: Message, received_at: float) -> None:
    """Add a parsed message to the batch of its kind."""
    if isinstance(message, Heartbeat):
        batch.heartbeats.append((message, received_at))
    elif isinstance(message, Event):
        batch.events.append((message, received_at))
    else:
        batch.statuses.append((message, received_at))


def parse_heartbeat(fleet: str, device: str, raw: bytes) -> HeartbeatFacts:
    """Check a heartbeat that arrived on ``fleet``/``device``'s topic; keep what is stored.

    Accepts what ``agent.contracts.parse_telemetry`` accepts and yields the same figures
    (tests/controller/fleet/test_ingest_hot_path.py holds them side by side), except that it
    refuses what the contract refuses for the stores' sake (``agent.contracts.messages``):
    NaN or infinite numbers, lone surrogates, NUL characters or more than ``MAX_TEXT``
    characters in stored text, counts beyond ``MAX_COUNT`` and a ``seq`` beyond
    ``MAX_SEQ``; and JSON that is not UTF-8. (An integer beyond 64 bits is a float to
    orjson: not an integer here, where the contract refuses it as a count.)
    The topic's names must be valid (``check_name``) and the payload must name the same
    fleet and device. Raises PayloadError naming the field.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"telemetry: not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise PayloadError(f"telemetry: expected a JSON object, got {type(doc).__name__}")
    get = doc.get
    if get("schema") != TELEMETRY_SCHEMA:
        raise PayloadError(f"schema expected {TELEMETRY_SCHEMA!r}, got {get('schema')!r}")
    if get("device") != device or get("fleet") != fleet:
        raise PayloadError(
            f"telemetry: payload names {get('fleet')!r}/{get('device')!r} but "
            f"arrived on the topic of {fleet}/{device}"
        )
    at = get("at")
    if type(at) is not str:
        raise PayloadError(f"telemetry: field 'at' expected str, got {at!r}")
    interval = get("interval_s")
    if not isinstance(interval, int | float):  # bool too, as parse_telemetry does
        raise PayloadError(f"telemetry: field 'interval_s' expected a number, got {interval!r}")
    models = get("models")
    if type(models) is not dict:
        raise PayloadError(f"telemetry: field 'models' expected an object, got {models!r}")
    # Checked inline, in the order of HeartbeatFacts' fields: this runs for every
    # heartbeat; the helpers (_text, _count) run only for what is not plainly good.
    version = get("agent_version")
    if type(version) is not str:
        version = ""
    elif "\x00" in version or len(version) > MAX_TEXT:
        _text(version, "agent_version")
    outbox = get("outbox")
    if type(outbox) is dict:
        pending, dropped = outbox.get("pending"), outbox.get("dropped")
        if type(pending) is not int or not -MAX_COUNT <= pending <= MAX_COUNT:
            pending = _count(pending, "outbox.pending")
        if type(dropped) is not int or not -MAX_COUNT <= dropped <= MAX_COUNT:
            dropped = _count(dropped, "outbox.dropped")
    else:
        pending = dropped = 0
    system = _system(get("system"))
    figures = []
    waiting = shadowed = drift = False
    for name, entry in sorted(models.items()) if len(models) > 1 else models.items():
        figures.append(_model(name, entry))
        if not waiting and type(entry) is dict and entry.get("waiting") is not None:
            waiting = True
        if not shadowed and type(entry) is dict and entry.get("shadow") is not None:
            shadowed = True
        if not drift and type(entry) is dict and entry.get("drift_samples") is not None:
            drift = True
    if "\x00" in at or len(at) > MAX_TEXT:
        _text(at, "at")
    seq = get("seq")
    if type(seq) is not int:
        seq = 0
    elif not -MAX_SEQ <= seq <= MAX_SEQ:
        _count(seq, "seq", MAX_SEQ)
    return HeartbeatFacts(
        fleet,
        device,
        version,
        float(interval),
        system,
        pending,
        dropped,
        tuple(figures),
        at,
        seq,
        _waiting(models) if waiting else (),
        _shadows(models) if shadowed else (),
        _drift(models) if drift else (),
    )


_NUMBERS: Final = (int, float)


def _system(doc: Any) -> dict[str, Any]:
    if type(doc) is not dict:
        doc = {}
    get = doc.get
    cpu, load, temperature = get("cpu_percent"), get("load_1m"), get("temperature_c")
    disk, total, used = get("disk_free_bytes"), get("memory_total_bytes"), get("memory_used_bytes")
    return {
        "cpu_percent": float(cpu) if type(cpu) in _NUMBERS else None,
        "load_1m": float(load) if type(load) in _NUMBERS else None,
        "temperature_c": float(temperature) if type(temperature) in _NUMBERS else None,
        "disk_free_bytes": disk if type(disk) is int else None,
        "memory_total_bytes": total if type(total) is int else None,
        "memory_used_bytes": used if type(used) is int else None,
    }


def _model(name: str, entry: Any) -> ModelFacts:
    if type(entry) is not dict:
        raise PayloadError(f"telemetry: models[{name!r}] expected an object")
    get = entry.get
    if "\x00" in name or len(name) > MAX_TEXT:
        _text(name, "model name")
    version, state = get("version"), get("state")
    if type(version) is not str:
        version = None
    elif "\x00" in version or len(version) > MAX_TEXT:
        _text(version, "version")
    if type(state) is not str or not state:
        state = "unknown"
    elif "\x00" in state or len(state) > MAX_TEXT:
        _text(state, "state")
    requests, errors, client_errors = get("requests"), get("errors"), get("client_errors")
    if type(requests) is not int or not -MAX_COUNT <= requests <= MAX_COUNT:
        requests = _count(requests, "requests")
    if type(errors) is not int or not -MAX_COUNT <= errors <= MAX_COUNT:
        errors = _count(errors, "errors")
    if type(client_errors) is not int or not -MAX_COUNT <= client_errors <= MAX_COUNT:
        client_errors = _count(client_errors, "client_errors")
    p99: Any = get("p99_s")
    return (
        name,
        version,
        state,
        requests,
        errors,
        client_errors,
        float(p99) if type(p99) in _NUMBERS else None,
    )


def _waiting(models: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(model, JSON) of the models that carry a waiting reason (``HeartbeatFacts.waiting``).
    Rare (a device that waits): the contract's parser, so both paths agree."""
    found = []
    for name, entry in sorted(models.items()):
        value = entry.get("waiting") if type(entry) is dict else None
        if value is not None:
            text = waiting_json(parse_waiting(value, f"telemetry: models[{name!r}]"))
            if text is not None:
                found.append((name, text))
    return tuple(found)


def _shadows(models: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(model, JSON) of the models that carry a shadow report (``HeartbeatFacts.shadows``).
    Rare (a device with a candidate in shadow): the contract's parser, so both paths agree."""
    found = []
    for name, entry in sorted(models.items()):
        value = entry.get("shadow") if type(entry) is dict else None
        report = parse_shadow_report(value, f"telemetry: models[{name!r}]")
        if report is not None:
            found.append((name, shadow_json(report)))
    return tuple(found)


def _drift(models: dict[str, Any]) -> tuple[DriftFacts, ...]:
    """(model, version, drift, input drift, samples) of the models whose version has a
    drift reference (``HeartbeatFacts.drift``), through the contract's parser."""
    found: list[DriftFacts] = []
    for name, entry in sorted(models.items()):
        if type(entry) is not dict:
            continue
        drift, input_drift, samples = parse_drift(entry, f"telemetry: models[{name!r}]")
        if samples is not None:
            version = entry.get("version")
            found.append(
                (name, version if type(version) is str else None, drift, input_drift, samples)
            )
    return tuple(found)


def _count(value: Any, what: str, limit: int = MAX_COUNT) -> int:
    """An integer field of the contract (0 when absent or not an integer)."""
    if type(value) is not int:
        return 0
    if not -limit <= value <= limit:
        raise PayloadError(f"telemetry: {what} expected at most {limit:,}, got {value}")
    return value


def _text(value: str, what: str) -> str:
    if "\x00" in value:
        raise PayloadError(f"telemetry: {what} holds a NUL character")
    if len(value) > MAX_TEXT:
        raise PayloadError(f"telemetry: {what} expected at most {MAX_TEXT} characters")
    return value


# A device topic whose names are valid, in one match (``_topic_names``' fast path).
_DEVICE_TOPIC: Final = re.compile(
    rf"{re.escape(TOPIC_ROOT)}/fleets/({NAME_PATTERN})/devices/({NAME_PATTERN})"
    r"/(telemetry|events|status)"
)


def _topic_names(topic: str) -> tuple[str, str, str]:
    """(fleet, device, kind) of a device topic whose names are valid; PayloadError if not."""
    match = _DEVICE_TOPIC.fullmatch(topic)
    if match is not None:
        return match.group(1, 2, 3)  # type: ignore[return-value]
    fleet, device, kind = parse_device_topic(topic)
    try:
        return check_name("fleet", fleet), check_name("device", device), kind
    except InvalidNameError as exc:
        raise PayloadError(f"topic {topic!r}: {exc}") from None


# The most requests one device can plausibly serve of one model per second: about 15
# times the fastest the agent was measured to serve (a tiny model, ~3,000 a second on one
# connection, docs/benchmarks.md). ``[serve] max_requests_per_s`` sets it.
DEFAULT_MAX_REQUESTS_PER_S: Final = 50_000.0
# A heartbeat may cover up to two intervals (its scheduler runs late, or coalesces a
# missed run); an interval counts as at least 1 s and at most an hour, whatever it claims.
INTERVALS_PER_HEARTBEAT: Final = 2
MIN_INTERVAL_S: Final = 1.0
MAX_INTERVAL_S: Final = 3600.0


def most_requests(interval_s: float, max_requests_per_s: float) -> int:
    """The most requests a heartbeat claiming ``interval_s`` may report per model."""
    interval = min(max(interval_s, MIN_INTERVAL_S), MAX_INTERVAL_S)
    return int(max_requests_per_s * interval * INTERVALS_PER_HEARTBEAT)


def check_plausible(facts: HeartbeatFacts, max_requests_per_s: float) -> None:
    """Raise RefusedMessage (``implausible``) when a model's counts are negative, its
    errors and client errors outnumber its requests, or its requests exceed
    ``most_requests``: figures no device serves, sent to outweigh the fleet's."""
    most = int(
        max_requests_per_s
        * min(max(facts.interval_s, MIN_INTERVAL_S), MAX_INTERVAL_S)
        * INTERVALS_PER_HEARTBEAT
    )  # most_requests, inline: this runs for every heartbeat
    for name, _version, _state, requests, errors, client_errors, _p99 in facts.models:
        if 0 <= errors + client_errors <= requests <= most and errors >= 0 <= client_errors:
            continue
        if min(requests, errors, client_errors) < 0:
            problem = f"a negative count ({requests}, {errors}, {client_errors})"
        elif errors + client_errors > requests:
            problem = f"{errors} errors and {client_errors} client errors in {requests} requests"
        elif requests > most:
            problem = (
                f"{requests:,} requests in an interval of {facts.interval_s:g} s (at most "
                f"{most:,} at max_requests_per_s={max_requests_per_s:g})"
            )
        else:
            continue
        raise RefusedMessage(IMPLAUSIBLE, f"telemetry: models[{name!r}]: {problem}")


@dataclass(frozen=True)
class Admission:
    """What ingestion admits beyond the contract: with a ``roster``, only devices it lists
    on their own fleet's topics; heartbeats whose counts ``check_plausible`` accepts."""

    roster: Roster | None = None
    max_requests_per_s: float = DEFAULT_MAX_REQUESTS_PER_S


OPEN: Final = Admission()


def add_payload(
    batch: IngestBatch,
    topic: str,
    payload: bytes,
    received_at: float,
    admission: Admission = OPEN,
) -> None:
    """Parse one message as received and add it to ``batch``; raise PayloadError if it
    breaks the contract, RefusedMessage if ``admission`` refuses it (nothing is added
    then)."""
    fleet, device, kind = _topic_names(topic)
    if admission.roster is not None:
        admission.roster.check(fleet, device)
    if kind == "telemetry":
        facts = parse_heartbeat(fleet, device, payload)
        check_plausible(facts, admission.max_requests_per_s)
        batch.heartbeat_facts.append((facts, received_at, payload.decode()))
    else:
        add_to_batch(batch, parse_message(topic, payload), received_at)
