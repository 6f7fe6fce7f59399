"""``edgectl fleet status`` and ``edgectl device show``: what the devices report.

Both read the telemetry store ``edgectl serve`` fills (found through ``--store``,
``--repo`` or ``--config``); ``device show`` adds the device's certificates from the
registry when ``--repo`` names the repository. Read only: nothing here writes.

This module owns the ``fleet`` group (``add_parser``) and the ``show`` command of the
``device`` group, whose parser ``controller.commands.device`` builds and hands to
``add_device_show_parser``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from controller.base.errors import ControllerError, UsageError
from controller.commands.common import RAW, print_json

if TYPE_CHECKING:
    from controller.commands.common import Subparsers
    from controller.fleet.drift import DriftAlert, DriftPolicy
    from controller.fleet.records import DeviceRow
    from controller.fleet.status import StalePolicy
    from controller.fleet.store import TelemetryStore
    from controller.identity.devices import DeviceRecord


def _open_view(args: argparse.Namespace) -> tuple[TelemetryStore, StalePolicy, str | None]:
    """The store, the staleness policy and the repository, if one was named (``--repo``,
    ``EDGECTL_REPO``, ``[serve] repo``)."""
    from controller.fleet.status import StalePolicy
    from controller.fleet.stores import open_store
    from controller.serve.config import load_view_config

    view = load_view_config(
        Path(args.config) if args.config else None,
        os.environ,
        {"store": args.store, "repo": args.repo},
    )
    if "://" not in view.store and "=" not in view.store and not Path(view.store).exists():
        raise UsageError(
            f"no telemetry store at {view.store}: is `edgectl serve` running with this "
            "repository, or pass --store PATH|DSN"
        )
    policy = StalePolicy(view.heartbeat_interval_s, view.stale_after_heartbeats)
    return open_store(view.store), policy, view.repo


def _revoked(repo: str | None) -> frozenset[str] | None:
    """The ids the repository's device registry marks revoked (none when no device was
    ever enrolled there); None without a repository. Raises RepositoryError for a
    registry it cannot read."""
    from controller.identity.registry import load_registry

    if not repo:
        return None
    registry = load_registry(Path(repo))
    return frozenset(device for device, record in registry.items() if record.revoked_at)


def _cmd_fleet_status(args: argparse.Namespace) -> int:
    import time

    from controller.fleet.lease import LEASE_NAME, leader_line
    from controller.fleet.status import device_json, render_fleet_table

    store, policy, repo = _open_view(args)
    drift_policy = _drift_policy(args)
    try:
        lease = store.lease_read(LEASE_NAME)
        rows = store.devices(fleet=args.fleet, model=args.model)
        alerts = _drift_alerts(store, rows, drift_policy, time.time(), fleet=args.fleet)
        if args.fleet and not rows:
            known = _known_fleets(store, args.repo or os.environ.get("EDGECTL_REPO"))
            if args.fleet not in known:
                raise ControllerError(
                    f"no fleet {args.fleet!r}: "
                    + (
                        f"the fleets known are {', '.join(sorted(known))}"
                        if known
                        else "no fleet is known yet (no device enrolled or reporting, "
                        "no release published)"
                    )
                    + " (from the telemetry store"
                    + (", the device registry and the repository)" if args.repo else ")")
                )
    finally:
        store.close()
    now = time.time()
    revoked = _revoked(repo)
    if args.json:
        print_json([device_json(r, now, policy, revoked, alerts) for r in rows])
    else:
        print(
            render_fleet_table(
                rows,
                now,
                policy,
                model=args.model,
                revoked=revoked or (),
                alerts=alerts,
                drift_policy=drift_policy,
            )
        )
        for line in _active_rollout_lines(args):
            print(line)
        if lease is not None:  # some edgectl serve took the lease in this store
            print(leader_line(lease))
    return 0


def _cmd_fleet_leader(args: argparse.Namespace) -> int:
    from controller.fleet.lease import LEASE_NAME, leader_json, leader_line

    store, _policy, _repo = _open_view(args)
    try:
        lease = store.lease_read(LEASE_NAME)
    finally:
        store.close()
    if args.json:
        print_json(leader_json(lease))
    else:
        print(leader_line(lease))
    return 0


def _drift_policy(args: argparse.Namespace) -> DriftPolicy:
    """``--drift-threshold`` and ``--drift-window`` (UsageError when out of range)."""
    from controller.fleet.drift import DEFAULT_THRESHOLD, DEFAULT_WINDOW_S, DriftPolicy

    threshold = getattr(args, "drift_threshold", None)
    window = getattr(args, "drift_window", None)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    window = DEFAULT_WINDOW_S if window is None else window
    if not threshold > 0:
        raise UsageError(f"--drift-threshold must be a PSI > 0, got {threshold:g}")
    if not window >= 0:
        raise UsageError(f"--drift-window must be 0 or more, got {window:g}")
    return DriftPolicy(threshold, window)


def _drift_alerts(
    store: TelemetryStore,
    rows: list[DeviceRow],
    policy: DriftPolicy,
    now: float,
    fleet: str | None = None,
    device: str | None = None,
) -> dict[tuple[str, str], DriftAlert]:
    """The drift alerts of ``rows`` (``controller.fleet.drift``), from the drift the store
    kept of the last two windows (a run that started before is as long as the window)."""
    from controller.fleet.drift import drift_alerts

    if not any(m.drift_samples is not None for r in rows for m in r.models):
        return {}  # no model with a reference: nothing to read
    points = store.drift_history(fleet, now - 2 * policy.window_s - 1, device=device)
    versions = {(r.device, m.model): m.version for r in rows for m in r.models}
    return drift_alerts(points, now, policy, versions)


def _duration(text: str) -> float:
    """``600``, ``90s``, ``10m``, ``1h`` -> seconds (argparse type)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    scale = units.get(text[-1:], 1.0)
    try:
        return float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 600, 90s, 10m or 1h, got {text!r}"
        ) from None


def _known_fleets(store: TelemetryStore, repo: str | None) -> set[str]:
    """Every fleet the operator could mean: those that report to the store, and, with a
    repository, those enrolled in its device registry and those it publishes to."""
    from controller.base.errors import RepositoryError
    from controller.identity.registry import load_registry
    from controller.repository.repo import Repository

    known = {r.fleet for r in store.devices()}
    if repo:
        try:
            known |= {record.fleet for record in load_registry(Path(repo)).values()}
            known |= set(Repository.open(Path(repo)).fleets())
        except (RepositoryError, OSError):
            pass  # no registry or no repository there: the store's fleets are all we know
    return known


def _active_rollout_lines(args: argparse.Namespace) -> list[str]:
    """One line per rollout in progress, so the table says where the fleet is heading."""
    from controller.repository.history import is_going_back
    from controller.rollout.store import RolloutStore

    if not args.repo:
        return []
    lines = []
    for r in RolloutStore(Path(args.repo)).active():
        if (args.fleet and r.fleet != args.fleet) or (args.model and r.model != args.model):
            continue
        back = " (going back)" if is_going_back(r.version, r.previous) else ""
        lines.append(
            f"rollout {r.fleet}/{r.model}: {r.previous or '(nothing)'} -> {r.version}{back}, "
            f"{r.state.value} at {r.percent:g}%"
        )
    return lines


def _cmd_device_show(args: argparse.Namespace) -> int:
    import time

    from controller.fleet.status import device_json, event_json, render_device

    store, policy, repo = _open_view(args)
    try:
        rows = store.devices(fleet=args.fleet, device=args.device_id)
        alerts = _drift_alerts(
            store, rows, _drift_policy(args), time.time(), args.fleet, args.device_id
        )
        events = store.events(device=args.device_id, fleet=args.fleet, limit=args.events)
        beats = store.heartbeats(args.device_id, limit=args.heartbeats)
    finally:
        store.close()
    record = _registry_record(args)
    if not rows and not events and record is None:
        raise UsageError(f"no device {args.device_id!r} in the telemetry store")
    now = time.time()
    revoked = _revoked(repo)
    if args.json:
        doc = {
            "devices": [device_json(r, now, policy, revoked, alerts) for r in rows],
            "events": [event_json(e) for e in events],
            "heartbeats": [b.payload for b in beats],
            "certificates": None if record is None else certificates_json(record),
        }
        print_json(doc)
    else:
        text = (
            render_device(rows, events, beats, now, policy, revoked or (), alerts)
            if rows or events
            else ""
        )
        if record is not None:
            text = "\n".join(filter(None, [text, *render_certificates(record)]))
        print(text)
    return 0


def _registry_record(args: argparse.Namespace) -> DeviceRecord | None:
    """The device's registry entry when ``--repo`` names a repository (None otherwise)."""
    from controller.identity.devices import load_registry

    if not args.repo:
        return None
    return load_registry(Path(args.repo)).get(args.device_id)


def certificates_json(record: DeviceRecord) -> dict[str, object]:
    """``device show --json``'s ``certificates``: the current and the previous ones."""
    return {
        "fleet": record.fleet,
        "enrolled_at": record.enrolled_at,
        "renewed_at": record.renewed_at,
        "revoked_at": record.revoked_at,
        "current": record.current.to_json(),
        "previous": [c.to_json() for c in record.previous],
    }


def render_certificates(record: DeviceRecord) -> list[str]:
    state = f"revoked at {record.revoked_at}" if record.revoked_at else "active"
    lines = [
        f"certificates (registry): fleet {record.fleet}, {state}, enrolled {record.enrolled_at}"
        + (f", renewed {record.renewed_at}" if record.renewed_at else ""),
        f"  current  serial {record.serial:x}, valid until {record.not_after}",
    ]
    for cert in record.previous:
        valid = f"revoked at {cert.revoked_at}" if cert.revoked_at else "still valid"
        lines.append(f"  previous serial {cert.serial:x}, until {cert.not_after} ({valid})")
    return lines


def _add_store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="PATH|DSN",
        help="telemetry store: a SQLite file or a postgresql:// DSN (default: "
        "REPO_DIR/telemetry.sqlite; env EDGECTL_STORE)",
    )
    p.add_argument("--repo", metavar="REPO_DIR", help="find the store in this repository")
    p.add_argument("--config", metavar="controller.toml", help="read [serve] store from here")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_parser(sub: Subparsers) -> None:
    fleet = sub.add_parser(
        "fleet",
        help="what the fleet's devices run and how they do",
        description="Read the telemetry `edgectl serve` stored.",
        epilog="example:\n  edgectl fleet status --repo ./repo --fleet north --json",
        formatter_class=RAW,
    )
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    fs = fsub.add_parser(
        "status",
        help="one line per device and model: health, version, install state, error rate, p99",
        description="Every device with its health (online; stale: silent for more than "
        "stale_after_heartbeats heartbeat intervals even if the broker calls it online; "
        "offline), model versions, install state, error rate and p99 of the last heartbeat "
        "interval, and when it was last heard from.",
        epilog="examples:\n  edgectl fleet status --repo ./repo\n  edgectl fleet status "
        "--store postgresql://edgefleet@db/edgefleet --fleet north --model resnet --json",
        formatter_class=RAW,
    )
    fs.add_argument("--fleet", help="only this fleet")
    fs.add_argument("--model", help="only devices that run this model")
    fs.add_argument(
        "--drift-threshold",
        type=float,
        metavar="PSI",
        help="mark (!) a device whose drift stayed above this PSI (default 0.25: significant)",
    )
    fs.add_argument(
        "--drift-window",
        type=_duration,
        metavar="DURATION",
        help="... for at least this long: 600, 90s, 10m, 1h (default 10m)",
    )
    _add_store_options(fs)
    fs.set_defaults(func=_cmd_fleet_status)
    fl = fsub.add_parser(
        "leader",
        help="which edgectl serve leads (runs rollouts, announces, signs) and its lease",
        description="The edgectl serve holding the controller lease in the store: its "
        "instance id, the lease's epoch (one more at every takeover) and the seconds until "
        'the lease expires unless renewed (docs/operations.md, "Controllers that fail over").',
        epilog="example:\n  edgectl fleet leader --json "
        "--store postgresql://edgefleet@db/edgefleet",
        formatter_class=RAW,
    )
    _add_store_options(fl)
    fl.set_defaults(func=_cmd_fleet_leader)


def add_device_show_parser(dsub: Subparsers) -> None:
    """``device show``, in the ``device`` group ``controller.commands.device`` builds."""
    ds = dsub.add_parser(
        "show",
        help="a device's state, recent heartbeats and lifecycle events",
        description="A device's health, models and figures, its last heartbeats and its "
        "recent lifecycle events (install phases, activation, probation, rollback, reasons).",
        epilog="example:\n  edgectl device show cam-0042 --repo ./repo --events 20",
        formatter_class=RAW,
    )
    ds.add_argument("device_id", metavar="ID")
    ds.add_argument("--fleet", help="the device's fleet, when the id is used in several")
    ds.add_argument("--events", type=int, default=30, metavar="N", help="default 30")
    ds.add_argument("--heartbeats", type=int, default=5, metavar="N", help="default 5")
    _add_store_options(ds)
    ds.set_defaults(func=_cmd_device_show)
