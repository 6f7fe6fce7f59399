"""The controller's Prometheus exposition: fleet gauges and expiry gauges.

``GET /metrics`` of ``edgectl serve`` (``controller.app.add_metrics_route``) renders, in the
Prometheus text format (version 0.0.4): whether the telemetry store is reachable and its
failed operations, devices by fleet and health, devices by model,
version and install state, events stored, events devices dropped, messages this process
ingested, messages it refused by reason (``controller.fleet.roster``), and, given the
repository's ``Expiries`` (``controller.repository.expiry``), when what the operator must
renew expires; and, given ``ServeHealth`` (``render_serve_health``), whether serve's MQTT
clients are connected and whether it can sign each online role. Pure functions of their
arguments: the counts come from the telemetry store (``TelemetryStore.fleet_aggregates``, or
``aggregate_rows`` of device rows already loaded), health from
``controller.fleet.status.health``.

Invariants:
- Every metric has its HELP and TYPE lines even when it has no sample; each fleet with a
  device has a sample per health state (0 when none).
- Values are written in full (``_sample``): Prometheus never sees a counter move in steps.
- An expiry whose source is absent or unreadable is left out, never guessed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controller.fleet.records import SIGNIFICANT_DRIFT, DeviceRow, FleetAggregates
from controller.fleet.roster import REFUSAL_REASONS
from controller.fleet.status import HEALTH_STATES, StalePolicy, health
from controller.repository.expiry import Expiries


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    """One sample line. Values are written in full: an integer as it is, a float as its
    shortest exact form (``:g`` would round a counter past 999,999 or a Unix time to six
    digits, and Prometheus would see a counter move in steps)."""
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    number = str(value) if isinstance(value, int) else repr(float(value))
    return f"{name}{{{text}}} {number}" if labels else f"{name} {number}"


def aggregate_rows(rows: Iterable[DeviceRow], now: float, policy: StalePolicy) -> FleetAggregates:
    """What ``TelemetryStore.fleet_aggregates`` computes in SQL, from loaded rows."""
    by_health: Counter[tuple[str, str]] = Counter()
    by_version: Counter[tuple[str, str, str, str]] = Counter()
    dropped: Counter[str] = Counter()
    drifts: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        by_health[(row.fleet, health(row, now, policy))] += 1
        dropped[row.fleet] += row.outbox_dropped
        for m in row.models:
            by_version[(row.fleet, m.model, m.version or "", m.state)] += 1
            if m.drift is not None and m.version is not None:
                drifts.setdefault((row.fleet, m.model, m.version), []).append(m.drift)
    drift = {
        key: (max(v), sum(v) / len(v), len(v), sum(d > SIGNIFICANT_DRIFT for d in v))
        for key, v in drifts.items()
    }
    return FleetAggregates(dict(by_health), dict(dropped), dict(by_version), drift)


@dataclass(frozen=True)
class StoreHealth:
    """Whether the telemetry store answered this scrape, and its failed operations since
    ``serve`` started (``TelemetryStore.up``, ``TelemetryStore.errors``)."""

    up: bool = True
    errors: int = 0


@dataclass(frozen=True)
class ServeHealth:
    """What ``edgectl serve`` itself depends on, as its tasks last found it: each MQTT
    client's connection (``ingest``, ``announce``), whether each online role could be
    signed at the last check (``controller.app.resign_loop``), re-signs that failed."""

    mqtt_connected: Mapping[str, bool]
    signing_ready: Mapping[str, bool]
    resign_failures: int = 0


def render_serve_health(health: ServeHealth) -> str:
    """``ServeHealth`` in the Prometheus text format: appended to ``render_aggregates``."""
    out = [
        "# HELP edgefleet_mqtt_connected Whether serve's MQTT client is connected to the broker "
        "(ingest: telemetry in, announce: announcements out); 0: it reconnects by itself.",
        "# TYPE edgefleet_mqtt_connected gauge",
    ]
    for client, up in sorted(health.mqtt_connected.items()):
        out.append(_sample("edgefleet_mqtt_connected", {"client": client}, int(up)))
    out += [
        "# HELP edgefleet_signing_ready Whether serve has the keys to sign the online role "
        "(checked every resign_check_interval_s); 0: re-signing and rollout stages wait, the "
        "log names the key file.",
        "# TYPE edgefleet_signing_ready gauge",
    ]
    for role, ready in sorted(health.signing_ready.items()):
        out.append(_sample("edgefleet_signing_ready", {"role": role}, int(ready)))
    out += [
        "# HELP edgefleet_resign_failures_total Re-signing checks that failed since serve started.",
        "# TYPE edgefleet_resign_failures_total counter",
        _sample("edgefleet_resign_failures_total", {}, health.resign_failures),
    ]
    return "\n".join(out) + "\n"


def render_leadership(instance: str, leader: bool, epoch: int) -> str:
    """Whether this ``edgectl serve`` holds the controller lease (``controller.fleet.lease``)
    and the lease's epoch as it last saw it, in the Prometheus text format: appended to
    ``render_aggregates``. Across the serve processes of one store, the sum of
    ``edgefleet_leader`` is 1 (0 for longer than ``lease_s``: no one leads)."""
    return (
        "\n".join(
            [
                "# HELP edgefleet_leader 1 when this edgectl serve holds the controller lease "
                "(runs rollouts, announces, signs), else 0.",
                "# TYPE edgefleet_leader gauge",
                _sample("edgefleet_leader", {"holder": instance}, int(leader)),
                "# HELP edgefleet_leader_epoch The controller lease's fencing epoch as this serve "
                "last read it (one more at every takeover).",
                "# TYPE edgefleet_leader_epoch gauge",
                _sample("edgefleet_leader_epoch", {}, epoch),
            ]
        )
        + "\n"
    )


def render_metrics(
    rows: Sequence[DeviceRow],
    event_counts: Sequence[tuple[str, str, int]],
    ingest_counts: dict[str, int],
    now: float,
    policy: StalePolicy,
    expiries: Expiries | None = None,
    refusals: Mapping[str, int] | None = None,
    store: StoreHealth | None = None,
) -> str:
    """``render_aggregates`` of device rows already loaded."""
    return render_aggregates(
        aggregate_rows(rows, now, policy), event_counts, ingest_counts, expiries, refusals, store
    )


def render_aggregates(
    aggregates: FleetAggregates,
    event_counts: Sequence[tuple[str, str, int]],
    ingest_counts: dict[str, int],
    expiries: Expiries | None = None,
    refusals: Mapping[str, int] | None = None,
    store: StoreHealth | None = None,
) -> str:
    """Fleet aggregates in the Prometheus text format (version 0.0.4), the messages
    ingestion refused by reason (``refusals``, every reason even at 0), the store's
    health (``store``; default: up, no errors), then, given ``expiries``, when what the
    operator must renew expires (``_render_expiries``). ``/metrics`` gets the aggregates
    from ``TelemetryStore.fleet_aggregates`` (empty while the store is unreachable)."""
    health_of_store = store or StoreHealth()
    out = [
        "# HELP edgefleet_store_up Whether the telemetry store answered this scrape (1) or "
        "is unreachable (0: the fleet gauges below are missing, ingestion is held).",
        "# TYPE edgefleet_store_up gauge",
        _sample("edgefleet_store_up", {}, int(health_of_store.up)),
        "# HELP edgefleet_store_errors_total Telemetry store operations that failed since "
        "serve started (unreachable, or data the store refused).",
        "# TYPE edgefleet_store_errors_total counter",
        _sample("edgefleet_store_errors_total", {}, health_of_store.errors),
        "# HELP edgefleet_devices Devices by fleet and health (online, stale, offline).",
        "# TYPE edgefleet_devices gauge",
    ]
    fleets = sorted(aggregates.dropped)
    for fleet in fleets:
        for state in HEALTH_STATES:
            out.append(
                _sample(
                    "edgefleet_devices",
                    {"fleet": fleet, "health": state},
                    aggregates.devices.get((fleet, state), 0),
                )
            )
    out += [
        "# HELP edgefleet_model_devices Devices by fleet, model, version and install state.",
        "# TYPE edgefleet_model_devices gauge",
    ]
    for (fleet, model, version, state), n in sorted(aggregates.models.items()):
        labels = {"fleet": fleet, "model": model, "version": version, "state": state}
        out.append(_sample("edgefleet_model_devices", labels, n))
    out += [
        "# HELP edgefleet_events_total Lifecycle events stored, by fleet and kind.",
        "# TYPE edgefleet_events_total counter",
    ]
    for fleet, kind, n in sorted(event_counts):
        out.append(_sample("edgefleet_events_total", {"fleet": fleet, "kind": kind}, n))
    out += [
        "# HELP edgefleet_device_events_dropped Events devices dropped from a full outbox.",
        "# TYPE edgefleet_device_events_dropped gauge",
    ]
    for fleet in fleets:
        out.append(
            _sample("edgefleet_device_events_dropped", {"fleet": fleet}, aggregates.dropped[fleet])
        )
    out += [
        "# HELP edgefleet_ingest_messages_total Messages this process ingested, by outcome.",
        "# TYPE edgefleet_ingest_messages_total counter",
    ]
    kinds = (
        "heartbeats",
        "events",
        "statuses",
        "rejected",
        "refused",
        "lost",
        "coalesced",
        "dropped",
    )
    for kind in kinds:
        out.append(
            _sample("edgefleet_ingest_messages_total", {"kind": kind}, ingest_counts.get(kind, 0))
        )
    out += [
        "# HELP edgefleet_ingest_refused_total Messages refused because the device registry "
        "does not allow their sender (unenrolled, revoked, other_fleet) or their counts "
        "(implausible).",
        "# TYPE edgefleet_ingest_refused_total counter",
    ]
    refused = refusals or {}
    for reason in REFUSAL_REASONS:
        out.append(
            _sample("edgefleet_ingest_refused_total", {"reason": reason}, refused.get(reason, 0))
        )
    out += [
        "# HELP edgefleet_device_identity_conflicts_total Events showing two agents using "
        "one device's identity (a copied configuration): their event streams alternate, or "
        "one restarted its numbers while online (controller.fleet.conflicts).",
        "# TYPE edgefleet_device_identity_conflicts_total counter",
        _sample(
            "edgefleet_device_identity_conflicts_total",
            {},
            ingest_counts.get("identity_conflicts", 0),
        ),
    ]
    out += _render_drift(aggregates)
    if expiries is not None:
        out += _render_expiries(expiries)
    return "\n".join(out) + "\n"


def _render_drift(aggregates: FleetAggregates) -> list[str]:
    """Model-quality drift by fleet, model and version (issue 23), from each device's
    latest report (docs/operations.md, "Reading drift")."""
    series = (
        ("edgefleet_model_drift_max", "The largest drift (PSI of outputs against the "
         "bundle's reference) its devices last reported.", 0),
        ("edgefleet_model_drift_mean", "The mean drift its devices last reported.", 1),
        ("edgefleet_model_drift_devices", "Devices that reported a drift score (a "
         "reference, and enough samples).", 2),
        ("edgefleet_model_drift_significant_devices", "Devices whose last drift was above "
         f"{SIGNIFICANT_DRIFT:g} (significant).", 3),
    )  # fmt: skip
    out: list[str] = []
    for name, text, index in series:
        out += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
        for (fleet, model, version), figures in sorted(aggregates.drift.items()):
            labels = {"fleet": fleet, "model": model, "version": version}
            out.append(_sample(name, labels, figures[index]))
    return out


def _render_expiries(expiries: Expiries) -> list[str]:
    """Expiry gauges as Unix seconds (alert on ``metric - time()``); a series whose source
    is absent or unreadable is left out, its HELP and TYPE kept."""
    out = [
        "# HELP edgefleet_tuf_metadata_expires_timestamp_seconds When each TUF role's "
        "current metadata expires.",
        "# TYPE edgefleet_tuf_metadata_expires_timestamp_seconds gauge",
    ]
    for role, expires_s in expiries.roles_s.items():
        out.append(
            _sample("edgefleet_tuf_metadata_expires_timestamp_seconds", {"role": role}, expires_s)
        )
    singles = (
        (
            "edgefleet_device_ca_cert_expires_timestamp_seconds",
            "When the device CA certificate (REPO_DIR/ca/ca.crt) expires.",
            expiries.ca_not_after_s,
        ),
        (
            "edgefleet_device_crl_next_update_timestamp_seconds",
            "When the CRL (REPO_DIR/ca/crl.pem) expires: re-sign it before, or the broker "
            "refuses every client.",
            expiries.crl_next_update_s,
        ),
        (
            "edgefleet_device_certs_earliest_expires_timestamp_seconds",
            "The earliest expiry among enrolled, unrevoked devices' certificates.",
            None if expiries.device_certs is None else expiries.device_certs.earliest_not_after_s,
        ),
        (
            "edgefleet_device_certs_expiring_within_30d",
            "Enrolled, unrevoked devices whose certificate expires within 30 days (or has).",
            None if expiries.device_certs is None else expiries.device_certs.expiring,
        ),
    )
    for name, help_text, value in singles:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        if value is not None:
            out.append(_sample(name, {}, value))
    return out
