"""The values the telemetry store takes and gives, and the rows an ingest batch writes.

Pure data, no SQL connection: what ingest hands the store (``HeartbeatFacts``, the
contract's messages, gathered in an ``IngestBatch``); what the store's reads return
(``DeviceRow`` with its ``ModelRow``s, ``EventRow``, ``HeartbeatRow``,
``FleetAggregates``); and how a batch becomes the parameter rows of the store's write
statements (``heartbeat_rows``, ``status_rows``, ``event_rows``), which
``controller.fleet.store.TelemetryStore.write`` runs in one transaction.

Invariants:
- A heartbeat's identity is (``at``, ``seq``), the agent's time and number of it; without a
  non-empty ``at`` and a ``seq`` of 1 or more it has none (``HeartbeatFacts.identity``).
- Of a device's several heartbeats (or statuses) in one batch, the one received last is
  the one its ``devices`` and ``device_models`` rows carry; every heartbeat is a history row.
- Device, model and heartbeat history rows are sorted by key (fleet, device, ...), so two
  workers writing the same devices on PostgreSQL wait for each other instead of
  deadlocking. Event rows keep the batch's order.
- A row's columns are in the order of the ``?`` parameters of the statement in
  ``controller.fleet.store`` that takes it (named in each builder's docstring).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from typing import Any, Final, NamedTuple

import orjson

from agent.contracts import (
    Event,
    Heartbeat,
    ShadowReport,
    Status,
    Waiting,
    telemetry_payload,
    waiting_doc,
)

# One model's drift in a heartbeat: (model, version, drift, input drift, samples).
DriftFacts = tuple[str, str | None, float | None, float | None, int]

# One model of a heartbeat as the store keeps it:
# (name, version, state, requests, errors, client_errors, p99_s).
ModelFacts = tuple[str, str | None, str, int, int, int, float | None]


# ---- shadow reports (a candidate compared in shadow on the device; issue 23 part 1)


def shadow_json(report: ShadowReport) -> str:
    """How ingest carries a model's shadow report to the store: compact JSON."""
    return orjson.dumps(asdict(report), option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class ShadowRow:
    """The latest shadow report a device sent for one candidate version of a model."""

    fleet: str
    device: str
    model: str
    version: str
    received_at: float
    report: ShadowReport


def shadow_rows(batch: IngestBatch) -> list[tuple[Any, ...]]:
    """The rows of ``shadow_reports`` (``_SHADOW_UPSERT``) the heartbeats of ``batch``
    carry: the latest per (fleet, device, model, version), in key order."""
    latest: dict[tuple[str, str, str, str], tuple[float, dict[str, Any]]] = {}
    found = [(f, r) for f, r, _payload in batch.heartbeat_facts if f.shadows]
    found += [(heartbeat_facts(b), r) for b, r in batch.heartbeats]
    for facts, received in found:
        for model, text in facts.shadows:
            doc = orjson.loads(text)
            key = (facts.fleet, facts.device, model, str(doc["version"]))
            if key not in latest or latest[key][0] <= received:
                latest[key] = (received, doc)
    rows = []
    for key, (received, doc) in sorted(latest.items()):
        rows.append(
            (
                *key,
                received,
                str(doc.get("state") or ""),
                int(doc.get("samples") or 0),
                doc.get("agreement"),
                doc.get("cosine_min"),
                doc.get("max_abs"),
                doc.get("latency_ratio"),
                int(doc.get("errors") or 0),
                int(doc.get("dropped") or 0),
                doc.get("serving"),
            )
        )
    return rows


# ---- end of shadow reports


def waiting_json(waiting: Waiting | None) -> str | None:
    """How the store keeps a model's waiting reason: compact JSON, keys sorted."""
    if waiting is None:
        return None
    return orjson.dumps(waiting_doc(waiting), option=orjson.OPT_SORT_KEYS).decode()


def waiting_from_json(text: str | None) -> Waiting | None:
    """A stored waiting reason back (None for none, or for text that is not one)."""
    if not text:
        return None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("code"), str):
        return None
    version = doc.get("version")
    return Waiting(
        code=doc["code"],
        detail=str(doc.get("detail") or ""),
        version=version if isinstance(version, str) else None,
        since=str(doc.get("since") or ""),
    )


class HeartbeatFacts(NamedTuple):
    """What the store keeps of a heartbeat: the ingest hot path builds this straight from
    the decoded JSON (controller.fleet.payloads), without the contract's dataclasses.

    ``at`` and ``seq`` (the agent's time and number of the heartbeat) identify it: a
    redelivered copy with the same pair adds no history row. Without a non-empty ``at``
    and a ``seq`` of 1 or more it has no identity (``identity`` is None).
    """

    fleet: str
    device: str
    agent_version: str
    interval_s: float
    system: Mapping[str, Any]
    outbox_pending: int
    outbox_dropped: int
    models: tuple[ModelFacts, ...]  # sorted by name
    at: str | None = None
    seq: int = 0
    # (model, the JSON of its ``Waiting``) of the models that wait (``waiting_json``): why
    # the device does not install the version desired state names for them.
    waiting: tuple[tuple[str, str], ...] = ()
    # (model, the JSON of its ``ShadowReport``) of the models with a candidate in shadow,
    # or its verdict (``shadow_json``).
    shadows: tuple[tuple[str, str], ...] = ()
    # (model, version, drift, input drift, samples) of the models whose version has a
    # drift reference (``agent.contracts.parse_drift``), by name; issue 23.
    drift: tuple[DriftFacts, ...] = ()

    @property
    def identity(self) -> tuple[str, int] | None:
        """(at, seq), the history's key, or None when the heartbeat has none."""
        return (self.at, self.seq) if self.at and self.seq > 0 else None


def heartbeat_facts(beat: Heartbeat) -> HeartbeatFacts:
    """The facts of a parsed heartbeat (the contract's dataclass)."""
    return HeartbeatFacts(
        beat.fleet,
        beat.device,
        beat.agent_version,
        beat.interval_s,
        asdict(beat.system),
        beat.outbox_pending,
        beat.outbox_dropped,
        tuple(
            (name, m.version, m.state, m.requests, m.errors, m.client_errors, m.p99_s)
            for name, m in sorted(beat.models.items())
        ),
        beat.at,
        beat.seq,
        tuple(
            (name, text)
            for name, m in sorted(beat.models.items())
            if (text := waiting_json(m.waiting)) is not None
        ),
        tuple(
            (name, shadow_json(m.shadow))
            for name, m in sorted(beat.models.items())
            if m.shadow is not None
        ),
        tuple(
            (name, m.version, m.drift, m.input_drift, m.drift_samples)
            for name, m in sorted(beat.models.items())
            if m.drift_samples is not None
        ),
    )


@dataclass
class IngestBatch:
    """Parsed messages with the time (epoch seconds) the controller received each.

    Heartbeats come in either form: ``heartbeats`` (the contract's dataclass; its history
    is re-encoded) or ``heartbeat_facts`` (facts, received at, the payload as received,
    kept verbatim as history), which is what ingestion produces.

    ``durable``: the store must have the batch on disk when ``write`` returns, because a
    message of it is acknowledged right after (QoS 1). Ingestion clears it for a batch of
    QoS 0 messages only, which SQLite then commits without waiting for the disk.

    ``conflicts``: devices whose events showed another agent using their identity
    (``controller.fleet.conflicts``), as (fleet, device, what it showed, when received);
    the store marks their rows (``conflict_rows``). Not messages: ``len`` leaves them out.
    """

    heartbeats: list[tuple[Heartbeat, float]] = field(default_factory=list)
    events: list[tuple[Event, float]] = field(default_factory=list)
    statuses: list[tuple[Status, float]] = field(default_factory=list)
    heartbeat_facts: list[tuple[HeartbeatFacts, float, str]] = field(default_factory=list)
    durable: bool = True
    conflicts: list[tuple[str, str, str, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.heartbeats) + len(self.heartbeat_facts) + len(self.events) + len(self.statuses)
        )


@dataclass(frozen=True)
class ModelRow:
    model: str
    version: str | None
    state: str
    requests: int
    errors: int
    client_errors: int
    p99_s: float | None
    updated_at: float
    # Why the device does not install the version desired state names (None: it does).
    waiting: Waiting | None = None
    # -- drift of ``version`` against its bundle's reference (issue 23): None when it has
    # no reference (``drift_samples`` None) or too few samples yet (the PSIs None).
    drift: float | None = None
    input_drift: float | None = None
    drift_samples: int | None = None


@dataclass(frozen=True)
class DeviceRow:
    fleet: str
    device: str
    online: bool | None
    status_at: float | None
    last_seen: float
    agent_version: str
    interval_s: float | None
    system: dict[str, Any]
    outbox_pending: int
    outbox_dropped: int
    models: tuple[ModelRow, ...] = ()
    # What last showed two agents using this identity, and when (controller.fleet.conflicts).
    identity_conflict: str | None = None
    identity_conflict_at: float | None = None


@dataclass(frozen=True)
class FleetAggregates:
    """What ``/metrics`` counts over the devices, without loading them (``fleet_aggregates``).

    ``devices``: (fleet, health) -> devices, only the pairs that have one; ``dropped``:
    fleet -> the sum of its devices' ``outbox_dropped``, for every fleet with a device;
    ``models``: (fleet, model, version or "", install state) -> devices.
    """

    devices: dict[tuple[str, str], int]
    dropped: dict[str, int]
    models: dict[tuple[str, str, str, str], int]
    # (fleet, model, version) -> the drift its devices last reported (issue 23): max,
    # mean, devices with a score, devices above ``SIGNIFICANT_DRIFT``.
    drift: dict[tuple[str, str, str], tuple[float, float, int, int]] = field(default_factory=dict)


# A PSI above this is the usual reading of a significant shift (docs/operations.md).
SIGNIFICANT_DRIFT: Final = 0.25


@dataclass(frozen=True)
class EventRow:
    id: int
    fleet: str
    device: str
    stream: str
    seq: int
    at: str
    received_at: float
    kind: str
    model: str | None
    version: str | None
    previous: str | None
    phase: str | None
    reason: str
    rollout_id: str = ""  # the rollout the device installed under; "" if it did not say


@dataclass(frozen=True)
class HeartbeatRow:
    fleet: str
    device: str
    received_at: float
    payload: dict[str, Any]


_HISTORY_KEY: Final = itemgetter(0, 1, 4, 5)  # fleet, device, at, seq


def heartbeat_rows(batch: IngestBatch) -> dict[str, list[tuple[Any, ...]]]:
    """The heartbeat rows of ``batch``: ``history`` (``_HEARTBEAT_INSERT``), ``devices``
    (``_DEVICE_FROM_HEARTBEAT``) and ``models`` (``_MODEL_UPSERT``); and ``beats``, each
    heartbeat's (facts, received at) in batch order, for the rollup of those the history
    did not hold yet (``controller.fleet.rollup``)."""
    beats = batch.heartbeat_facts
    if batch.heartbeats:
        beats = beats + [
            (heartbeat_facts(beat), received, telemetry_payload(beat).decode())
            for beat, received in batch.heartbeats
        ]
    history = []
    latest: dict[tuple[str, str], tuple[HeartbeatFacts, float]] = {}
    keyed = True  # every heartbeat has its identity: rows sort on their columns alone
    for facts, received, payload in beats:
        key = (facts.fleet, facts.device)
        at: str | None = facts.at
        seq: int | None = facts.seq
        if not at or not facts.seq > 0:  # no identity (HeartbeatFacts.identity)
            at = seq = None
            keyed = False
        history.append((key[0], key[1], received, payload, at, seq))
        known = latest.get(key)
        if known is None or known[1] <= received:
            latest[key] = (facts, received)
    devices, models = [], []
    dumps, sort_keys = orjson.dumps, orjson.OPT_SORT_KEYS
    for (fleet, device), (facts, received) in sorted(latest.items()):
        devices.append(
            (
                fleet,
                device,
                received,
                received,
                facts.agent_version,
                facts.interval_s,
                dumps(facts.system, option=sort_keys).decode(),
                facts.outbox_pending,
                facts.outbox_dropped,
            )
        )
        if facts.waiting:
            waits = dict(facts.waiting)
            models += [
                (fleet, device, *model, waits.get(model[0]), received, received)
                for model in facts.models
            ]
        else:
            models += [(fleet, device, *model, None, received, received) for model in facts.models]
    # In key order, as the other rows: two workers given the same redelivered heartbeats
    # then wait for each other on the unique key instead of deadlocking.
    if keyed:
        history.sort(key=_HISTORY_KEY)
    else:
        history.sort(key=lambda row: (row[0], row[1], row[4] or "", row[5] or 0))
    return {
        "history": history,
        "devices": devices,
        "models": models,
        "beats": [(facts, received) for facts, received, _payload in beats],
    }


def status_rows(batch: IngestBatch) -> dict[str, list[tuple[Any, ...]]]:
    """The status rows of ``batch``: ``devices`` (``_DEVICE_FROM_STATUS``) and ``models``
    (``_MODEL_FROM_STATUS``)."""
    latest: dict[tuple[str, str], tuple[Status, float]] = {}
    for status, received in batch.statuses:
        key = (status.fleet, status.device)
        if key not in latest or latest[key][1] <= received:
            latest[key] = (status, received)
    devices, models = [], []
    for (fleet, device), (status, received) in sorted(latest.items()):
        devices.append(
            (fleet, device, int(status.online), received, received, status.agent_version)
        )
        # The will and a clean goodbye may carry the versions too; an empty map says nothing.
        for name, entry in sorted(status.models.items()):
            version = entry.get("version")
            waiting = entry.get("waiting")
            models.append(
                (
                    fleet,
                    device,
                    name,
                    version if isinstance(version, str) else None,
                    str(entry.get("state", "unknown")),
                    waiting_json(waiting if isinstance(waiting, Waiting) else None),
                    received,
                )
            )
    return {"devices": devices, "models": models}


def conflict_rows(batch: IngestBatch) -> list[tuple[Any, ...]]:
    """The identity-conflict rows of ``batch`` (``_DEVICE_CONFLICT``): the latest of each
    device, in key order."""
    latest: dict[tuple[str, str], tuple[str, float]] = {}
    for fleet, device, what, at in batch.conflicts:
        known = latest.get((fleet, device))
        if known is None or known[1] <= at:
            latest[(fleet, device)] = (what, at)
    return [(what, at, f, d) for (f, d), (what, at) in sorted(latest.items())]


def event_rows(batch: IngestBatch) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The event rows of ``batch`` (``_EVENT_INSERT``) and when each device was last
    heard from in them (``_DEVICE_SEEN``)."""
    events = [
        (
            e.fleet,
            e.device,
            e.stream,
            e.seq,
            e.at,
            received,
            e.kind,
            e.model,
            e.version,
            e.previous,
            e.phase,
            e.reason,
            e.rollout_id,
        )
        for e, received in batch.events
    ]
    seen: dict[tuple[str, str], float] = {}
    for e, received in batch.events:
        key = (e.fleet, e.device)
        seen[key] = max(seen.get(key, received), received)
    return events, [(f, d, t) for (f, d), t in sorted(seen.items())]


# ---------------------------------------------------------------------------- drift (issue 23)


def drift_rows(
    beats: list[tuple[HeartbeatFacts, float]], fresh: set[tuple[str, str, str, int]] | None
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The drift rows of a batch's heartbeats: ``models`` (``_DRIFT_UPDATE``: the drift
    of each model of a device's latest heartbeat that carries some) and ``history``
    (``_DRIFT_HISTORY_INSERT``: every heartbeat's, once: a redelivery, a key not in
    ``fresh``, adds none; ``fresh`` None: all are new). Both sorted by key."""
    latest: dict[tuple[str, str], tuple[HeartbeatFacts, float]] = {}
    history = []
    seen: set[tuple[str, str, str, int]] = set()
    for facts, received in beats:
        if not facts.drift:
            continue
        key = (facts.fleet, facts.device)
        known = latest.get(key)
        if known is None or known[1] <= received:
            latest[key] = (facts, received)
        identity = facts.identity
        if identity is not None:
            beat = (facts.fleet, facts.device, *identity)
            if (fresh is not None and beat not in fresh) or beat in seen:
                continue
            seen.add(beat)
        for model, version, drift, input_drift, samples in facts.drift:
            if version is not None:
                history.append(
                    (
                        facts.fleet,
                        facts.device,
                        model,
                        version,
                        received,
                        drift,
                        input_drift,
                        samples,
                    )
                )
    models = [
        (version, drift, input_drift, samples, received, fleet, device, model, received)
        for (fleet, device), (facts, received) in sorted(latest.items())
        for model, version, drift, input_drift, samples in facts.drift
    ]
    history.sort(key=lambda row: row[:5])
    return models, history
