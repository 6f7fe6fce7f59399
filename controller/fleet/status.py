"""What the fleet is doing: device health, the ``fleet status`` table and its JSON, and
``device show``.

Pure functions of store rows and an injected ``now`` (epoch seconds). The Prometheus
rendering of ``/metrics`` is ``controller.serve.metrics``'s; it judges health here.

Health of a device:
- ``offline``: its last status says offline (a goodbye or the broker's last will);
- ``stale``: nothing heard for more than ``stale_after`` heartbeat intervals (the
  device's own interval, from its heartbeats, else the configured default), even
  when the broker still calls it online: a hung agent or a half-open connection;
- ``online`` otherwise.

Marks beside the health (``device_marks``): ``revoked`` (the device registry says so,
when the command was given the repository) and ``identity conflict?`` (ingest saw two
agents using the device's identity, ``controller.fleet.conflicts``, within the last
``CONFLICT_SHOWN_S``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from agent.contracts import Waiting, waiting_doc
from controller.fleet.drift import DriftAlert, DriftPolicy, drift_cell
from controller.fleet.records import DeviceRow, EventRow, HeartbeatRow, ModelRow

HEALTH_STATES: Final = ("online", "stale", "offline")
# An identity conflict is marked this long after ingest last saw it.
CONFLICT_SHOWN_S: Final = 86400.0


@dataclass(frozen=True)
class StalePolicy:
    default_interval_s: float = 10.0
    stale_after: float = 3.0


def health(row: DeviceRow, now: float, policy: StalePolicy) -> str:
    """``online``, ``stale`` or ``offline`` (see the module docstring)."""
    if row.online is False:
        return "offline"
    interval = row.interval_s or policy.default_interval_s
    if now - row.last_seen > policy.stale_after * interval:
        return "stale"
    return "online"


def device_marks(row: DeviceRow, now: float, revoked: Collection[str] = ()) -> list[str]:
    """``revoked`` and ``identity conflict?``, those that apply (module docstring)."""
    marks = ["revoked"] if row.device in revoked else []
    at = row.identity_conflict_at
    if row.identity_conflict and at is not None and now - at <= CONFLICT_SHOWN_S:
        marks.append("identity conflict?")
    return marks


def _marked(state: str, marks: Sequence[str]) -> str:
    return " ".join([state, *(f"[{m}]" for m in marks)])


def error_rate(requests: int, errors: int, client_errors: int) -> float | None:
    served = requests - client_errors
    return errors / served if served > 0 else None


def device_json(
    row: DeviceRow,
    now: float,
    policy: StalePolicy,
    revoked: Collection[str] | None = None,
    alerts: Mapping[tuple[str, str], DriftAlert] | None = None,
) -> dict[str, Any]:
    """One device as ``fleet status --json`` prints it; ``revoked`` is None when the
    registry was not read (no repository given); ``alerts``: the drift alerts of the
    fleet (``controller.fleet.drift.drift_alerts``)."""
    conflict = None
    if row.identity_conflict:
        conflict = {"what": row.identity_conflict, "at": _iso(row.identity_conflict_at)}
    return {
        "fleet": row.fleet,
        "device": row.device,
        "health": health(row, now, policy),
        "online": row.online,
        "last_seen": _iso(row.last_seen),
        "last_seen_s_ago": round(now - row.last_seen, 1),
        "agent_version": row.agent_version,
        "heartbeat_interval_s": row.interval_s,
        "system": row.system,
        "outbox": {"pending": row.outbox_pending, "dropped": row.outbox_dropped},
        "revoked": None if revoked is None else row.device in revoked,
        "identity_conflict": conflict,
        "models": {
            m.model: {
                "version": m.version,
                "state": m.state,
                "requests": m.requests,
                "errors": m.errors,
                "error_rate": error_rate(m.requests, m.errors, m.client_errors),
                "p99_s": m.p99_s,
                "waiting": waiting_doc(m.waiting) if m.waiting else None,
                **_drift_json(row, m, alerts),
            }
            for m in row.models
        },
    }


def _drift_json(
    row: DeviceRow, m: ModelRow, alerts: Mapping[tuple[str, str], DriftAlert] | None
) -> dict[str, Any]:
    """A model's drift fields in JSON (issue 23): ``drift_alert`` None when not marked."""
    alert = (alerts or {}).get((row.device, m.model))
    return {
        "drift": m.drift,
        "input_drift": m.input_drift,
        "drift_samples": m.drift_samples,
        "drift_alert": None
        if alert is None
        else {"since": _iso(alert.since), "drift": alert.drift},
    }


def _since(since: str, now: float) -> str:
    """How long ago the ISO 8601 time ``since`` was ("" when it is not one)."""
    try:
        at = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return _ago(max(now - at.timestamp(), 0.0)).removesuffix(" ago")


def waiting_line(waiting: Waiting, now: float) -> str:
    """A waiting reason in one line: ``probation for 2.0.0, 30s: waits until ...``."""
    head = waiting.code + (f" for {waiting.version}" if waiting.version else "")
    lasted = _since(waiting.since, now)
    return f"{head}{f', {lasted}' if lasted else ''}: {waiting.detail}"


def render_waiting(rows: Sequence[DeviceRow], now: float, model: str | None = None) -> str:
    """The notes under the ``fleet status`` table: each (device, model) that does not
    install the version desired state names, and why ("" when none)."""
    lines = [
        f"  {row.fleet}/{row.device} {m.model}: {waiting_line(m.waiting, now)}"
        for row in rows
        for m in row.models
        if m.waiting is not None and (model is None or m.model == model)
    ]
    return (
        "\n".join(['waiting (see docs/rollouts.md, "Waiting devices"):', *lines]) if lines else ""
    )


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def render_fleet_table(
    rows: Sequence[DeviceRow],
    now: float,
    policy: StalePolicy,
    model: str | None = None,
    revoked: Collection[str] = (),
    alerts: Mapping[tuple[str, str], DriftAlert] | None = None,
    drift_policy: DriftPolicy | None = None,
) -> str:
    """The ``fleet status`` table: one line per (device, model); its marks beside its
    health (``device_marks``); a drift ``alerts`` marks with ``!`` (``drift_policy``:
    what the alerts were judged by, for the summary)."""
    alerts = alerts or {}
    header = (
        *("FLEET", "DEVICE", "HEALTH", "MODEL", "VERSION", "STATE", "ERR%", "P99"),
        "DRIFT",
        "LAST SEEN",
    )
    lines = []
    for row in rows:
        state = _marked(health(row, now, policy), device_marks(row, now, revoked))
        models: list[ModelRow | None] = [m for m in row.models if model is None or m.model == model]
        for m in models or [None]:
            rate = error_rate(m.requests, m.errors, m.client_errors) if m else None
            lines.append(
                (
                    row.fleet,
                    row.device,
                    state,
                    m.model if m else "-",
                    (m.version or "-") if m else "-",
                    m.state if m else "-",
                    f"{rate * 100:.1f}" if rate is not None else "-",
                    f"{m.p99_s * 1000:.1f}ms" if m and m.p99_s is not None else "-",
                    _drift_text(row, m, alerts),
                    _ago(now - row.last_seen),
                )
            )
    counts = Counter(health(r, now, policy) for r in rows)
    summary = ", ".join(f"{counts[s]} {s}" for s in HEALTH_STATES)
    marked = Counter(m for r in rows for m in device_marks(r, now, revoked))
    summary += "".join(f"; {n} {m}" for m, n in sorted(marked.items()))
    drifting = [k for k in alerts if model is None or k[1] == model]
    if drifting:
        rule = drift_policy or DriftPolicy()
        summary += (
            f"; {len(drifting)} drifting (!: drift above {rule.threshold:g} "
            f"for {_ago(rule.window_s).removesuffix(' ago')} or more)"
        )
    waiting = render_waiting(rows, now, model)
    return (
        _table(header, lines)
        + f"\n\n{len(rows)} device(s): {summary}"
        + (f"\n\n{waiting}" if waiting else "")
    )


def _drift_text(
    row: DeviceRow, m: ModelRow | None, alerts: Mapping[tuple[str, str], DriftAlert]
) -> str:
    if m is None:
        return "-"
    cell = drift_cell(m.drift, m.drift_samples)
    return cell + " !" if (row.device, m.model) in alerts else cell


def render_device(
    rows: Sequence[DeviceRow],
    events: Sequence[EventRow],
    beats: Sequence[HeartbeatRow],
    now: float,
    policy: StalePolicy,
    revoked: Collection[str] = (),
    alerts: Mapping[tuple[str, str], DriftAlert] | None = None,
) -> str:
    """``device show``: the device's state, its last heartbeats and recent events."""
    out = []
    for row in rows:
        state = _marked(health(row, now, policy), device_marks(row, now, revoked))
        out.append(
            f"device {row.device} (fleet {row.fleet}): {state}, "
            f"last seen {_ago(now - row.last_seen)}, agent {row.agent_version or '?'}"
        )
        if row.identity_conflict and row.identity_conflict_at is not None:
            out.append(
                f"  {row.identity_conflict} (last seen {_ago(now - row.identity_conflict_at)})"
            )
        out.append(f"  outbox: {row.outbox_pending} pending, {row.outbox_dropped} dropped")
        if row.system:
            out.append("  system: " + json.dumps(row.system, sort_keys=True))
        for m in row.models:
            rate = error_rate(m.requests, m.errors, m.client_errors)
            out.append(
                f"  model {m.model}: {m.version or '-'} ({m.state}); last interval "
                f"{m.requests} requests, {m.errors} errors"
                + (f" ({rate * 100:.1f}%)" if rate is not None else "")
                + (f", p99 {m.p99_s * 1000:.2f} ms" if m.p99_s is not None else "")
            )
            if m.waiting is not None:
                out.append(f"    waiting: {waiting_line(m.waiting, now)}")
            if m.drift_samples is not None:
                alert = (alerts or {}).get((row.device, m.model))
                out.append(
                    f"    drift: {drift_cell(m.drift, m.drift_samples)} (PSI of outputs), "
                    f"inputs {drift_cell(m.input_drift, m.drift_samples)}, "
                    f"on {m.drift_samples} samples"
                    + (f"; above the alert threshold since {_iso(alert.since)}" if alert else "")
                )
    if beats:
        out.append("")
        out.append(
            _table(
                ("HEARTBEAT", "CPU%", "MEM USED", "DISK FREE", "REQUESTS"),
                (
                    (
                        _iso(b.received_at) or "",
                        _fmt(b.payload.get("system", {}).get("cpu_percent")),
                        _bytes(b.payload.get("system", {}).get("memory_used_bytes")),
                        _bytes(b.payload.get("system", {}).get("disk_free_bytes")),
                        str(sum(int(m.get("requests", 0)) for m in b.payload["models"].values())),
                    )
                    for b in beats
                ),
            )
        )
    if events:
        out.append("")
        out.append(
            _table(
                ("SEQ", "AT", "EVENT", "MODEL", "VERSION", "REASON"),
                (
                    (
                        str(e.seq),
                        e.at,
                        e.kind,
                        e.model or "-",
                        e.version or "-",
                        e.reason[:80],
                    )
                    for e in events
                ),
            )
        )
    return "\n".join(out)


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def _bytes(value: Any) -> str:
    if not isinstance(value, int):
        return "-"
    return f"{value / 2**20:.0f} MiB"


def event_json(e: EventRow) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "stream": e.stream,
        "at": e.at,
        "received_at": _iso(e.received_at),
        "kind": e.kind,
        "model": e.model,
        "version": e.version,
        "previous": e.previous,
        "phase": e.phase,
        "reason": e.reason,
        "rollout_id": e.rollout_id,
    }
