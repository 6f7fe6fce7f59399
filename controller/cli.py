"""``edgectl``: the controller's command line.

Maps errors to exit codes once, here: 0 success, 2 ``UsageError`` (and argparse's own
usage errors), 1 any other ``ControllerError``. Errors print as
``edgectl: error: <message>`` on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.contracts import ProbationPolicy
from controller.errors import ControllerError, UsageError

if TYPE_CHECKING:
    from controller.fleet import StalePolicy
    from controller.rollout import Rollout
    from controller.store import DeviceRow, TelemetryStore

logger = logging.getLogger(__name__)

_RAW = argparse.RawDescriptionHelpFormatter


def _cmd_init(args: argparse.Namespace) -> int:
    from controller.repository import ExpiryPolicy, init_repository

    policy = ExpiryPolicy(
        root_days=args.expiry_days_root,
        targets_days=args.expiry_days_targets,
        rollout_days=args.expiry_days_rollout,
        snapshot_days=args.expiry_days_snapshot,
        timestamp_days=args.expiry_days_timestamp,
    )
    repo = init_repository(Path(args.repo_dir), policy)
    print(f"initialised repository {repo.path}")
    print(f"  keys:     {repo.keys_dir} (keep root.pem and targets.pem offline when you can)")
    print(f"  metadata: {repo.metadata_dir} (enroll agents with {repo.metadata_dir}/root.json)")
    print(f"  targets:  {repo.targets_dir}")
    return 0


def _cmd_bundle_build(args: argparse.Namespace) -> int:
    from controller.build import BuildOptions, build_bundle
    from controller.evaluate import parse_gate

    options = BuildOptions(
        quantize=args.quantize,
        calibration=Path(args.calibration) if args.calibration else None,
        prune=args.prune,
        eval_data=Path(args.eval) if args.eval else None,
        gate=parse_gate(args.max_drift) if args.max_drift is not None else None,
        fallback=args.fallback,
        latency_runs=args.latency_runs,
        max_latency_ratio=args.max_latency_ratio,
    )
    result = build_bundle(
        Path(args.model),
        args.name,
        args.version,
        Path(args.output),
        golden_cases=args.golden_cases,
        seed=args.seed,
        options=options,
    )
    m = result.manifest
    print(result.table)
    print(f"built {m.name} {m.version} -> {result.path}")
    print(f"  sha256 {result.sha256}, {result.length} bytes")
    print(f"  recipe: {m.build.get('recipe')} ({result.reason})")
    pruning = m.build.get("pruning")
    if isinstance(pruning, dict):
        print(f"  pruning: sparsity reached {pruning.get('sparsity_reached')}")
    print(f"  sizes: {dict(m.sizes)}")
    print(
        f"  golden: {m.golden.cases} cases from {m.build.get('golden_source')}, "
        f"rtol {m.golden.rtol:g}, atol {m.golden.atol:g}"
    )
    return 0


def _probation_policy(args: argparse.Namespace) -> ProbationPolicy:
    values = {
        "duration_s": args.probation_s,
        "min_requests": args.probation_min_requests,
        "max_error_rate": args.probation_max_error_rate,
        "max_p99_ratio": args.probation_max_p99_ratio,
    }
    for key, value in values.items():
        if value < 0:
            raise UsageError(f"--probation option {key} must not be negative, got {value}")
    if values["max_error_rate"] > 1:
        raise UsageError(
            f"--probation-max-error-rate is a fraction (0..1), got {values['max_error_rate']}"
        )
    return ProbationPolicy(
        duration_s=float(values["duration_s"]),
        min_requests=int(values["min_requests"]),
        max_error_rate=float(values["max_error_rate"]),
        max_p99_ratio=float(values["max_p99_ratio"]),
    )


def _cmd_release(args: argparse.Namespace) -> int:
    from controller.release import release_bundle

    r = release_bundle(
        Path(args.bundle), args.fleet, Path(args.repo), probation=_probation_policy(args)
    )
    what = "published" if r.bundle_added else "already published (same bytes)"
    print(f"{r.model} {r.version}: {what} as {r.target_path}")
    print(f"  sha256 {r.sha256}, {r.length} bytes")
    if r.fleet_changed:
        print(f"  fleet {r.fleet}: desired version {r.version} (rollout {r.rollout_id})")
    else:
        print(f"  fleet {r.fleet}: already at {r.version}; nothing to change")
    print("  metadata versions: " + ", ".join(f"{k} {v}" for k, v in r.versions.items()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from controller.app import run_serve
    from controller.config import load_serve_config

    config = load_serve_config(
        Path(args.config) if args.config else None,
        os.environ,
        {"repo": args.repo, "listen": args.listen, "mqtt": args.mqtt},
    )
    run_serve(config)
    return 0


def _open_view(args: argparse.Namespace) -> tuple[TelemetryStore, StalePolicy]:
    from controller.config import load_view_config
    from controller.fleet import StalePolicy
    from controller.store import open_store

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
    return open_store(view.store), StalePolicy(
        view.heartbeat_interval_s, view.stale_after_heartbeats
    )


def _cmd_fleet_status(args: argparse.Namespace) -> int:
    import json
    import time

    from controller.fleet import device_json, render_fleet_table

    store, policy = _open_view(args)
    try:
        rows = store.devices(fleet=args.fleet, model=args.model)
    finally:
        store.close()
    now = time.time()
    if args.json:
        print(json.dumps([device_json(r, now, policy) for r in rows], indent=2))
    else:
        print(render_fleet_table(rows, now, policy, model=args.model))
        for line in _active_rollout_lines(args):
            print(line)
    return 0


def _active_rollout_lines(args: argparse.Namespace) -> list[str]:
    """One line per rollout in progress, so the table says where the fleet is heading."""
    from controller.history import is_going_back
    from controller.rollout_store import RolloutStore

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
    import json
    import time

    from controller.fleet import device_json, event_json, render_device

    store, policy = _open_view(args)
    try:
        rows = [r for r in store.devices(fleet=args.fleet) if r.device == args.device_id]
        events = store.events(device=args.device_id, fleet=args.fleet, limit=args.events)
        beats = store.heartbeats(args.device_id, limit=args.heartbeats)
    finally:
        store.close()
    if not rows and not events:
        raise UsageError(f"no device {args.device_id!r} in the telemetry store")
    now = time.time()
    if args.json:
        doc = {
            "devices": [device_json(r, now, policy) for r in rows],
            "events": [event_json(e) for e in events],
            "heartbeats": [b.payload for b in beats],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(render_device(rows, events, beats, now, policy))
    return 0


def _cmd_device_add(args: argparse.Namespace) -> int:
    from controller.broker import refresh_broker_files
    from controller.config import parse_endpoint
    from controller.devices import EnrollOptions, add_device
    from controller.fsio import atomic_write

    host, port = parse_endpoint(args.broker, "--broker")
    options = EnrollOptions(
        repository_url=args.repository_url,
        mqtt_host=host,
        mqtt_port=port,
        tls=not args.no_tls,
        cert_days=args.days,
    )
    output = Path(args.output)
    if output.exists() and not args.force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    repo = Path(args.repo)
    record, archive = add_device(repo, args.device_id, args.fleet, options)
    atomic_write(output, archive, mode=0o600)
    refreshed = refresh_broker_files(repo)
    print(f"enrolled {record.device_id} in fleet {record.fleet} -> {output}")
    print(f"  certificate serial {record.serial:x}, valid until {record.not_after}")
    print("  the archive holds the device's private key: copy it over a trusted channel")
    print(f"  on the device: edge-agent enroll {output.name} && systemctl restart edge-agent")
    if refreshed:
        print(f"  broker ACL updated in {refreshed[0].parent}: reload the broker (SIGHUP)")
    return 0


def _cmd_device_revoke(args: argparse.Namespace) -> int:
    from controller.broker import refresh_broker_files
    from controller.devices import ca_dir, revoke_device

    repo = Path(args.repo)
    record = revoke_device(repo, args.device_id)
    refreshed = refresh_broker_files(repo)
    print(f"revoked {record.device_id} (serial {record.serial:x}) at {record.revoked_at}")
    print(f"  CRL: {ca_dir(repo) / 'crl.pem'}")
    if refreshed:
        print(f"  broker CRL and ACL updated in {refreshed[0].parent}: reload the broker (SIGHUP)")
    else:
        print("  copy the CRL to the broker's crlfile and reload it (SIGHUP)")
    return 0


def _cmd_broker_config(args: argparse.Namespace) -> int:
    from controller.broker import BrokerOptions, write_broker_config

    options = BrokerOptions(
        hosts=tuple(args.host),
        port=args.port,
        bind=args.bind,
        controller_identity=args.controller_identity,
    )
    output = Path(args.output)
    write_broker_config(Path(args.repo), output, options)
    print(f"wrote a mosquitto config for TLS with client certificates to {output}")
    print(f"  run: mosquitto -c {output.resolve() / 'mosquitto.conf'}")
    print(f"  the controller's client certificate: {output / 'controller.crt'} (+ .key)")
    print("  keys are 0640: chgrp them to the broker's group (Debian: mosquitto)")
    return 0


def _add_device_enrollment(dsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    da = dsub.add_parser(
        "add",
        help="enroll a device: a client certificate, the TUF root and an agent config",
        description="Issue the device a client certificate from the controller's device CA "
        "(REPO_DIR/ca, created on first use) and write an archive with it, its key, the CA "
        "certificate, the repository's TUF root and an agent config. Install it on the "
        "device with `edge-agent enroll FILE`. The archive holds a private key.",
        epilog="example:\n  edgectl device add cam-0042 --fleet north --repo ./repo "
        "--repository-url https://updates.example.net/ --broker broker.example.net:8883 "
        "-o enroll.tar",
        formatter_class=_RAW,
    )
    da.add_argument("device_id", metavar="ID")
    da.add_argument("--fleet", required=True)
    da.add_argument("--repo", required=True, metavar="REPO_DIR")
    da.add_argument("-o", "--output", required=True, metavar="FILE", help="archive to write")
    da.add_argument(
        "--repository-url", required=True, metavar="URL", help="where the device reads the repo"
    )
    da.add_argument(
        "--broker", required=True, metavar="HOST:PORT", help="the MQTT broker the device dials"
    )
    da.add_argument("--no-tls", action="store_true", help="plain MQTT (tests only)")
    da.add_argument("--days", type=int, default=825, help="certificate lifetime (default 825)")
    da.add_argument("--force", action="store_true", help="overwrite FILE")
    da.set_defaults(func=_cmd_device_add)

    dr = dsub.add_parser(
        "revoke",
        help="revoke a device's certificate and publish a new CRL",
        description="Mark the device revoked, re-sign the CRL (REPO_DIR/ca/crl.pem) and, "
        "when `edgectl broker config` wrote a broker folder, refresh its CRL and ACL. "
        "Reload the broker afterwards.",
        epilog="example:\n  edgectl device revoke cam-0042 --repo ./repo",
        formatter_class=_RAW,
    )
    dr.add_argument("device_id", metavar="ID")
    dr.add_argument("--repo", required=True, metavar="REPO_DIR")
    dr.set_defaults(func=_cmd_device_revoke)


def _add_broker_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = sub.add_parser(
        "broker",
        help="broker configuration for per-device identities",
        description="Broker configuration.",
        formatter_class=_RAW,
    )
    bsub = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    bc = bsub.add_parser(
        "config",
        help="write a mosquitto config: TLS, client certificates, CRL and a per-device ACL",
        description="Write mosquitto.conf, an ACL file with pattern rules (a device publishes "
        "only under its own topics and reads only its fleet's announcement), the broker's "
        "server certificate and the controller's client certificate into DIR.",
        epilog="example:\n  edgectl broker config --repo ./repo --host broker.example.net "
        "-o /etc/mosquitto/edgefleet",
        formatter_class=_RAW,
    )
    bc.add_argument("--repo", required=True, metavar="REPO_DIR")
    bc.add_argument("-o", "--output", required=True, metavar="DIR")
    bc.add_argument(
        "--host",
        action="append",
        required=True,
        help="a name or address devices dial (repeatable; the certificate's SANs)",
    )
    bc.add_argument("--port", type=int, default=8883, help="TLS listener (default 8883)")
    bc.add_argument("--bind", default="", metavar="ADDRESS", help="listen address (default: all)")
    bc.add_argument(
        "--controller-identity",
        default="edgectl",
        metavar="CN",
        help="CN of the controller's client certificate (default edgectl)",
    )
    bc.set_defaults(func=_cmd_broker_config)


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


# ---------------------------------------------------------------------------- rollout


def _cmd_rollout_start(args: argparse.Namespace) -> int:
    from controller.rollout import OnFailure, parse_duration, parse_stages
    from controller.rollout_gates import parse_gates
    from controller.rollout_service import start_rollout
    from controller.rollout_view import render_rollout

    wait_s = parse_duration(args.wait, "--wait")
    deadline_s = (
        parse_duration(args.deadline, "--deadline") if args.deadline else max(3 * wait_s, 600.0)
    )
    canaries = [c.strip() for c in (args.canary or "").split(",") if c.strip()]
    r = start_rollout(
        Path(args.repo),
        fleet=args.fleet,
        model=args.model,
        version=args.version,
        stages=parse_stages(args.stages),
        wait_s=wait_s,
        deadline_s=deadline_s,
        gates=parse_gates(args.gate),
        canaries=canaries,
        on_failure=OnFailure(args.on_failure),
        probation=_probation_policy(args),
        bundle=Path(args.bundle) if args.bundle else None,
    )
    import time

    print(render_rollout(r, time.time()))
    return 0


def _cmd_rollout_status(args: argparse.Namespace) -> int:
    import json
    import time

    from controller.rollout_store import RolloutStore
    from controller.rollout_view import render_status, rollout_json

    records = RolloutStore(Path(args.repo))

    def select() -> list[Rollout]:
        found = [
            r
            for r in records.all()
            if (args.fleet is None or r.fleet == args.fleet)
            and (args.model is None or r.model == args.model)
        ]
        active = [r for r in found if r.is_active]
        return found if args.all else (active or found[-1:])

    deadline = time.monotonic() + args.watch_timeout
    while True:
        rollouts = select()
        if args.json:
            print(json.dumps([rollout_json(r) for r in rollouts], indent=2))
        else:
            if args.watch and sys.stdout.isatty():
                print("\x1b[2J\x1b[H", end="")
            print(render_status(rollouts, time.time()), flush=True)
        done = not any(r.is_active for r in rollouts)
        if not args.watch or done or time.monotonic() >= deadline:
            return 0
        time.sleep(args.interval)
        if not sys.stdout.isatty():
            print()


def _cmd_rollout_control(args: argparse.Namespace) -> int:
    import time

    from controller.rollout_service import control_rollout
    from controller.rollout_view import render_rollout

    r = control_rollout(
        Path(args.repo), args.fleet, args.model, args.rollout_command, reason=args.reason or ""
    )
    print(render_rollout(r, time.time()))
    return 0


def _add_rollout_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from controller.rollout_gates import DEFAULT_GATES

    rollout = sub.add_parser(
        "rollout",
        help="staged rollouts that promote on healthy telemetry and halt on bad",
        description="Roll a published version out to a fleet stage by stage. `edgectl "
        "serve` advances a stage once its gates hold over the wait with enough devices "
        "reporting, halts it when a gate breaks, and pauses it when too few devices "
        "report by the stage's deadline. See docs/rollouts.md.",
        formatter_class=_RAW,
    )
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="COMMAND")
    st = rsub.add_parser(
        "start",
        help="start a staged rollout of MODEL VERSION in a fleet",
        description="Write the first stage into the fleet's desired state (signed by the "
        "rollout key). Devices take the new version when they are canaries or their bucket "
        "(a hash of rollout id and device id) falls below the stage's percentage.",
        epilog="example:\n  edgectl rollout start resnet 1.3.0 --fleet lab --repo ./repo "
        "--bundle resnet-1.3.0.bundle --stages 1,10,50,100 --wait 10m \\\n"
        f'    --gate "{DEFAULT_GATES}" --canary cam-01,cam-02,cam-03',
        formatter_class=_RAW,
    )
    st.add_argument("model", metavar="MODEL")
    st.add_argument("version", metavar="VERSION")
    st.add_argument("--fleet", required=True)
    st.add_argument("--repo", required=True, metavar="REPO_DIR")
    st.add_argument("--bundle", metavar="FILE", help="publish this bundle first (release key)")
    st.add_argument(
        "--stages", default="1,10,50,100", help="percentages, ending at 100 (default %(default)s)"
    )
    st.add_argument(
        "--wait", default="10m", help="how long each stage is watched (default %(default)s)"
    )
    st.add_argument(
        "--deadline",
        help="pause a stage with too few devices reporting after this (default max(3 x wait, 10m))",
    )
    st.add_argument("--gate", default=DEFAULT_GATES, help="health gates (default %(default)s)")
    st.add_argument("--canary", metavar="DEV,...", help="devices that take every stage")
    st.add_argument(
        "--on-failure",
        choices=("pause", "abort"),
        default="pause",
        help="when a gate breaks: hold (pause) or go back to the previous version (abort); "
        "default %(default)s",
    )
    _add_probation_options(st)
    st.set_defaults(func=_cmd_rollout_start)

    ss = rsub.add_parser(
        "status",
        help="rollouts with a bar per stage",
        description="The active rollouts (or the latest one) with a bar per stage, the "
        "figures of the current stage and the halt reason.",
        epilog="example:\n  edgectl rollout status --repo ./repo --fleet lab --watch",
        formatter_class=_RAW,
    )
    ss.add_argument("--repo", required=True, metavar="REPO_DIR")
    ss.add_argument("--fleet")
    ss.add_argument("--model")
    ss.add_argument("--all", action="store_true", help="every rollout, finished ones too")
    ss.add_argument("--json", action="store_true", help="print JSON for scripts")
    ss.add_argument("--watch", action="store_true", help="redraw until no rollout is active")
    ss.add_argument("--interval", type=float, default=2.0, metavar="SECONDS")
    ss.add_argument(
        "--watch-timeout", type=float, default=86400.0, metavar="SECONDS", help=argparse.SUPPRESS
    )
    ss.set_defaults(func=_cmd_rollout_status)

    for action, text in (
        ("pause", "hold the rollout; devices keep what they run"),
        ("resume", "run a paused rollout again (its stage's wait starts over)"),
        ("promote", "go to the next stage now, whatever the gates say"),
        ("abort", "send the fleet back to the previous version; devices roll back"),
    ):
        pc = rsub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        pc.add_argument("model", metavar="MODEL")
        pc.add_argument("--fleet", required=True)
        pc.add_argument("--repo", required=True, metavar="REPO_DIR")
        pc.add_argument("--reason", help="recorded in the rollout's history")
        pc.set_defaults(func=_cmd_rollout_control)


def _add_probation_options(p: argparse.ArgumentParser) -> None:
    default = ProbationPolicy()
    prob = p.add_argument_group(
        "probation", "what each device checks after activating the release before it commits"
    )
    prob.add_argument("--probation-s", type=float, default=default.duration_s, metavar="SECONDS")
    prob.add_argument(
        "--probation-min-requests", type=int, default=default.min_requests, metavar="N"
    )
    prob.add_argument(
        "--probation-max-error-rate", type=float, default=default.max_error_rate, metavar="RATE"
    )
    prob.add_argument(
        "--probation-max-p99-ratio", type=float, default=default.max_p99_ratio, metavar="RATIO"
    )


# ---------------------------------------------------------------- release history (issue 11)

# ``edgectl release FILE`` publishes a bundle; ``edgectl release VERB ...`` with one of
# these verbs reads or retires releases (``releases`` group). A bundle file named like a
# verb is released as ``./list``.
RELEASE_VERBS = ("list", "show", "diff", "retire", "prune")


def route_release_verbs(argv: Sequence[str]) -> list[str]:
    """``release VERB ...`` → ``releases VERB ...``; anything else unchanged."""
    out = list(argv)
    for i, word in enumerate(out):
        if word.startswith("-"):
            continue
        if word == "release" and i + 1 < len(out) and out[i + 1] in RELEASE_VERBS:
            out[i] = "releases"
        break
    return out


def _store_rows(args: argparse.Namespace) -> tuple[list[DeviceRow] | None, str]:
    """The telemetry store's device rows, or None and why it was not reachable."""
    from controller.config import load_view_config
    from controller.store import StoreError, open_store

    try:
        view = load_view_config(
            Path(args.config) if args.config else None,
            os.environ,
            {"store": args.store, "repo": args.repo},
        )
    except UsageError as exc:
        return None, f"devices: unknown ({exc})"
    if "://" not in view.store and "=" not in view.store and not Path(view.store).exists():
        return None, f"devices: unknown (no telemetry store at {view.store}; pass --store)"
    try:
        store = open_store(view.store)
        try:
            return store.devices(model=getattr(args, "model", None)), ""
        finally:
            store.close()
    except StoreError as exc:
        return None, f"devices: unknown (telemetry store {view.store} unreachable: {exc})"


def _cmd_releases_list(args: argparse.Namespace) -> int:
    import json

    from controller.history import load_releases, release_json, render_list

    rows, note = _store_rows(args)
    releases = load_releases(Path(args.repo), args.model, rows)
    if args.json:
        doc = {"releases": [release_json(r) for r in releases], "store": note or "ok"}
        print(json.dumps(doc, indent=2))
    else:
        print(render_list(releases, note) if releases else "no releases")
    return 0


def _cmd_releases_show(args: argparse.Namespace) -> int:
    import json

    from controller.history import find_release, release_json, render_show

    rows, note = _store_rows(args)
    r = find_release(Path(args.repo), args.model, args.version, rows)
    if args.json:
        print(json.dumps(release_json(r), indent=2))
    else:
        print(render_show(r) + (f"\n  {note}" if note else ""))
    return 0


def _cmd_releases_diff(args: argparse.Namespace) -> int:
    import json

    from controller.history import diff_json, diff_releases, render_diff

    d = diff_releases(Path(args.repo), args.model, args.old, args.new)
    if args.json:
        print(json.dumps(diff_json(d), indent=2))
    else:
        print(render_diff(d))
    for warning in d.warnings:
        print(f"edgectl: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_releases_retire(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from controller.history import retire_release

    if args.grace_days < 0:
        raise UsageError(f"--grace-days must not be negative, got {args.grace_days}")
    r = retire_release(
        Path(args.repo), args.model, args.version, grace=timedelta(days=args.grace_days)
    )
    print(
        f"retired {r.model} {r.version}: removed {r.target_path} from targets v{r.targets_version}"
    )
    print(f"  its bundle file is pruned from {r.prune_after:%Y-%m-%dT%H:%M:%SZ} on")
    for path in r.pruned:
        print(f"  pruned the bundle file of {path} (grace period over)")
    return 0


def _cmd_releases_prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from controller.history import prune_retired

    if args.grace_days < 0:
        raise UsageError(f"--grace-days must not be negative, got {args.grace_days}")
    pruned = prune_retired(Path(args.repo), grace=timedelta(days=args.grace_days))
    for path in pruned:
        print(f"pruned the bundle file of {path}")
    if not pruned:
        print("nothing to prune")
    return 0


def _add_releases_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from controller.history import DEFAULT_GRACE

    grace_days = DEFAULT_GRACE.total_seconds() / 86400
    releases = sub.add_parser(
        "releases",
        help="release history: list, show, diff, retire, prune (also `edgectl release VERB`)",
        description="What the repository has shipped, how good each build was, who runs "
        "it, and retiring old releases. See docs/releases.md.",
        formatter_class=_RAW,
    )
    rsub = releases.add_subparsers(dest="releases_command", required=True, metavar="COMMAND")

    def repo_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repo", required=True, metavar="REPO_DIR")

    def store_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store",
            metavar="PATH|DSN",
            help="telemetry store (default: REPO_DIR/telemetry.sqlite; env EDGECTL_STORE)",
        )
        p.add_argument("--config", metavar="controller.toml", help="read [serve] store here")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

    ls = rsub.add_parser(
        "list",
        help="every release: version, date, size, recipe, quality, fleets, devices",
        description="Every release in the signed targets with its build date, bundle size, "
        "quantization recipe, measured quality (top-1 agreement and cosine against the "
        "original model), the fleets whose desired state names it ((prev): as the version "
        "an abort goes back to) and how many devices report running it (? when the "
        "telemetry store is not reachable).",
        epilog="example:\n  edgectl release list resnet --repo ./repo",
        formatter_class=_RAW,
    )
    ls.add_argument("model", nargs="?", metavar="MODEL")
    repo_option(ls)
    store_options(ls)
    ls.set_defaults(func=_cmd_releases_list)

    sh = rsub.add_parser(
        "show",
        help="one release's manifest in readable form and where it is deployed",
        description="Signature, opset, what the build did, the quality of every candidate "
        "it tried, the golden-vector tolerance, and the fleets and devices running it.",
        epilog="example:\n  edgectl release show resnet 1.2.0 --repo ./repo",
        formatter_class=_RAW,
    )
    sh.add_argument("model", metavar="MODEL")
    sh.add_argument("version", metavar="VERSION")
    repo_option(sh)
    store_options(sh)
    sh.set_defaults(func=_cmd_releases_show)

    df = rsub.add_parser(
        "diff",
        help="what changed between two releases; warns when the signature differs",
        description="Signature, opset, recipe, sizes and measured quality of OLD and NEW. "
        "A changed input/output signature is warned about on stderr: clients on the "
        "device would break.",
        epilog="example:\n  edgectl release diff resnet 1.2.0 1.3.0 --repo ./repo",
        formatter_class=_RAW,
    )
    df.add_argument("model", metavar="MODEL")
    df.add_argument("old", metavar="OLD")
    df.add_argument("new", metavar="NEW")
    repo_option(df)
    df.add_argument("--json", action="store_true", help="print JSON for scripts")
    df.set_defaults(func=_cmd_releases_diff)

    rt = rsub.add_parser(
        "retire",
        help="remove a release from the targets so no fleet can be pointed at it",
        description="Remove MODEL VERSION from the signed targets (release key), refused "
        "while any fleet's desired state names it as its version or previous version. "
        "The bundle file stays for the grace period, then `release retire` or `release "
        "prune` deletes it.",
        epilog="example:\n  edgectl release retire resnet 1.0.0 --repo ./repo",
        formatter_class=_RAW,
    )
    rt.add_argument("model", metavar="MODEL")
    rt.add_argument("version", metavar="VERSION")
    repo_option(rt)
    rt.add_argument(
        "--grace-days",
        type=float,
        default=grace_days,
        metavar="DAYS",
        help="keep retired bundle files this long (default %(default)g)",
    )
    rt.set_defaults(func=_cmd_releases_retire)

    pr = rsub.add_parser(
        "prune",
        help="delete bundle files of releases retired longer than the grace period",
        description="Delete the bundle files of releases retired at least DAYS ago.",
        epilog="example:\n  edgectl release prune --repo ./repo",
        formatter_class=_RAW,
    )
    repo_option(pr)
    pr.add_argument(
        "--grace-days", type=float, default=grace_days, metavar="DAYS", help="default %(default)g"
    )
    pr.set_defaults(func=_cmd_releases_prune)


# ---------------------------------------------------------------------------- keys (issue 8)


def _open_for_keys(args: argparse.Namespace) -> tuple[Path, tuple[Path, ...]]:
    extra = tuple(Path(d) for d in (getattr(args, "key_dir", None) or []))
    return Path(args.repo), extra


def _print_ceremony(result: object) -> None:
    from controller.key_ceremony import CeremonyResult

    assert isinstance(result, CeremonyResult)
    for keyid, path in zip(result.new_keyids, result.key_files, strict=False):
        print(f"  new {result.role} key {keyid[:16]}… -> {path}")
    if result.root_version is not None:
        print(
            f"  published root version {result.root_version} "
            "(devices follow it on their next check)"
        )
    if result.resigned:
        print("  re-signed: " + ", ".join(f"{r} v{v}" for r, v in result.resigned.items()))
    for keyid in result.revoked:
        print(f"  revoked key {keyid[:16]}… (its file is deleted)")
    if result.pending is not None:
        print(f"  root waits for signatures: {result.missing or 'complete'}")
        print(
            "  next: edgectl keys export-root --repo REPO -o root.json, sign it offline with "
            "edgectl keys sign-root root.json --key KEY.pem, then edgectl keys import-root "
            "root.json --repo REPO"
        )


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from controller.key_ceremony import key_status
    from controller.repository import Repository

    repo_dir, extra = _open_for_keys(args)
    rows = key_status(Repository.open(repo_dir, extra))
    for row in rows:
        print(
            f"{row.role:<10} v{row.version:<4} threshold {row.threshold}/{len(row.keyids)}  "
            f"expires {row.expires:%Y-%m-%dT%H:%M:%SZ}  keys here {len(row.present)}"
        )
        for keyid in row.keyids:
            where = "here" if keyid in row.present else "offline"
            print(f"    {keyid[:16]}… ({where})")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from controller.fsio import repo_lock
    from controller.key_ceremony import rotate
    from controller.repository import Repository

    repo_dir, extra = _open_for_keys(args)
    with repo_lock(repo_dir):
        result = rotate(
            Repository.open(repo_dir, extra),
            args.role,
            count=args.keys,
            threshold=args.threshold,
            key_out=extra[0] if extra else None,
        )
    print(f"rotated the {args.role} key" + (" (root pending)" if result.pending else ""))
    _print_ceremony(result)
    return 0 if result.pending is None else 3


def _cmd_keys_export_root(args: argparse.Namespace) -> int:
    from controller.fsio import repo_lock
    from controller.key_ceremony import export_root
    from controller.repository import Repository

    repo_dir, extra = _open_for_keys(args)
    with repo_lock(repo_dir):
        result = export_root(Repository.open(repo_dir, extra), Path(args.output))
    print(f"wrote the root waiting for signatures to {args.output}")
    print(f"  {result.missing or 'all signatures present: import it'}")
    return 0


def _cmd_keys_sign_root(args: argparse.Namespace) -> int:
    from controller.key_ceremony import sign_root_file

    signed = sign_root_file(Path(args.file), [Path(k) for k in args.key])
    for keyid in signed:
        print(f"signed {args.file} with key {keyid[:16]}…")
    return 0


def _cmd_keys_import_root(args: argparse.Namespace) -> int:
    from controller.fsio import repo_lock
    from controller.key_ceremony import import_root
    from controller.repository import Repository

    repo_dir, extra = _open_for_keys(args)
    with repo_lock(repo_dir):
        result = import_root(Repository.open(repo_dir, extra), Path(args.file))
    print(f"imported {args.file}")
    _print_ceremony(result)
    return 0


def _cmd_keys_expiry(args: argparse.Namespace) -> int:
    from controller.fsio import repo_lock
    from controller.key_ceremony import set_expiry
    from controller.repository import Repository

    repo_dir, extra = _open_for_keys(args)
    with repo_lock(repo_dir):
        _policy, resigned = set_expiry(Repository.open(repo_dir, extra), args.role, args.days)
    print(f"{args.role} metadata now lives {args.days:g} day(s) after each signature")
    if resigned:
        print("  re-signed now: " + ", ".join(f"{r} v{v}" for r, v in resigned.items()))
    elif args.role in ("root", "targets"):
        print("  takes effect the next time it is signed")
    return 0


def _add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from controller.repository import ALL_ROLES

    keys = sub.add_parser(
        "keys",
        help="key lifecycle: list, rotate, offline root signing, expiry per role",
        description="Signing keys of the repository (docs/security.md: the key ceremony).",
        formatter_class=_RAW,
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    def repo_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repo", required=True, metavar="REPO_DIR")
        p.add_argument(
            "--key-dir",
            action="append",
            metavar="DIR",
            help="another folder holding private keys (an offline medium); repeatable",
        )

    ls = ksub.add_parser(
        "list",
        help="every role's keys, threshold, expiry and which private keys are here",
        description="Every role's key ids, threshold, version, expiry, and whether each "
        "private key is in keys/ (or a --key-dir).",
        epilog="example:\n  edgectl keys list --repo ./repo",
        formatter_class=_RAW,
    )
    repo_options(ls)
    ls.set_defaults(func=_cmd_keys_list)

    rot = ksub.add_parser(
        "rotate",
        help="replace a role's key and revoke the old one; devices follow untouched",
        description="Make a new key for ROLE and revoke the old one. Top-level roles change "
        "in a new root version signed by the current root keys (and, for root, by the new "
        "ones too), then the role is re-signed. When root keys are not here the new root "
        "waits in REPO_DIR/root-pending.json (exit status 3): export, sign offline, import.",
        epilog="examples:\n  edgectl keys rotate timestamp --repo ./repo\n"
        "  edgectl keys rotate root --repo ./repo --keys 3 --threshold 2 --key-dir /media/usb",
        formatter_class=_RAW,
    )
    rot.add_argument("role", metavar="ROLE", choices=ALL_ROLES)
    repo_options(rot)
    rot.add_argument("--keys", type=int, default=1, metavar="N", help="root: how many keys")
    rot.add_argument(
        "--threshold", type=int, default=1, metavar="K", help="root: signatures required (K of N)"
    )
    rot.set_defaults(func=_cmd_keys_rotate)

    ex = ksub.add_parser(
        "export-root",
        help="write the root version waiting for offline signatures (or a renewal) to a file",
        description="Write REPO_DIR/root-pending.json to FILE. With none pending, make one: "
        "the current root as the next version with a renewed expiry.",
        epilog="example:\n  edgectl keys export-root --repo ./repo -o root-unsigned.json",
        formatter_class=_RAW,
    )
    repo_options(ex)
    ex.add_argument("-o", "--output", required=True, metavar="FILE")
    ex.set_defaults(func=_cmd_keys_export_root)

    sg = ksub.add_parser(
        "sign-root",
        help="add signatures to an exported root (on the offline machine)",
        description="Sign FILE with each --key; needs no repository.",
        epilog="example:\n  edgectl keys sign-root root-unsigned.json --key /media/usb/root-1.pem",
        formatter_class=_RAW,
    )
    sg.add_argument("file", metavar="FILE")
    sg.add_argument("--key", action="append", required=True, metavar="KEY.pem")
    sg.set_defaults(func=_cmd_keys_sign_root)

    im = ksub.add_parser(
        "import-root",
        help="check a signed root (both thresholds), publish it and finish the rotation",
        description="Publish FILE as the next root version when a threshold of the current "
        "root keys and of its own keys signed it; re-sign what the rotation needs and delete "
        "revoked keys.",
        epilog="example:\n  edgectl keys import-root root-signed.json --repo ./repo",
        formatter_class=_RAW,
    )
    im.add_argument("file", metavar="FILE")
    repo_options(im)
    im.set_defaults(func=_cmd_keys_import_root)

    exp = ksub.add_parser(
        "expiry",
        help="how long a role's metadata stays valid after each signature",
        description="Set ROLE's metadata lifetime in DAYS (fractions allowed: 0.25 = 6 h). "
        "Online roles past the new lifetime are re-signed now.",
        epilog="example:\n  edgectl keys expiry timestamp 0.25 --repo ./repo",
        formatter_class=_RAW,
    )
    exp.add_argument("role", metavar="ROLE", choices=ALL_ROLES)
    exp.add_argument("days", type=float, metavar="DAYS")
    repo_options(exp)
    exp.set_defaults(func=_cmd_keys_expiry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgectl",
        description="Build, sign and publish ONNX model bundles for edge fleets.",
        epilog="example:\n  edgectl init ./repo && edgectl bundle build m.onnx --name m "
        "--version 1.0.0 -o m.bundle && edgectl release m.bundle --fleet lab --repo ./repo",
        formatter_class=_RAW,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init",
        help="create signing keys and an empty signed repository",
        description="Create Ed25519 keys (REPO_DIR/keys, 0600) and an empty TUF repository.",
        epilog="example:\n  edgectl init ./repo --expiry-days-timestamp 1",
        formatter_class=_RAW,
    )
    p.add_argument("repo_dir", metavar="REPO_DIR")
    for role, days in (
        ("root", 365),
        ("targets", 365),
        ("rollout", 30),
        ("snapshot", 7),
        ("timestamp", 1),
    ):
        p.add_argument(
            f"--expiry-days-{role}",
            type=int,
            default=days,
            metavar="DAYS",
            help=f"{role} metadata lifetime (default {days})",
        )
    p.set_defaults(func=_cmd_init)

    bundle = sub.add_parser(
        "bundle",
        help="work with bundle files",
        description="Work with bundle files.",
        epilog="example:\n  edgectl bundle build model.onnx --name m --version 1.0.0 -o m.bundle",
        formatter_class=_RAW,
    )
    bsub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    b = bsub.add_parser(
        "build",
        help="shrink a model, measure it and pack it with golden vectors into a bundle",
        description="Check the model, optionally prune it, quantize it (one recipe, or "
        "'auto': try them all and keep the smallest that passes the quality gate and is "
        "at most 10% slower), measure every candidate against the original on the eval "
        "data (size, median latency, top-1 agreement, cosine, max abs diff, accuracy "
        "with labels), record golden vectors and pack a bundle. DATA.npz holds one array "
        "per model input (samples on the first axis) and optional integer 'labels'. "
        "Set SOURCE_DATE_EPOCH and --latency-runs 0 for byte-identical bundles.",
        epilog="examples:\n  edgectl bundle build model.onnx --name resnet --version 1.2.0 "
        "-o resnet-1.2.0.bundle\n  edgectl bundle build model.onnx --name resnet --version "
        "1.3.0 -o r.bundle --quantize auto --calibration calib.npz --eval eval.npz "
        "--max-drift 0.01 --fallback fp32",
        formatter_class=_RAW,
    )
    b.add_argument("model", metavar="MODEL.onnx")
    b.add_argument("--name", required=True, help="model name (letters, digits, . _ -)")
    b.add_argument("--version", required=True, help="semantic version, e.g. 1.2.0")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="bundle file to write")
    b.add_argument("--golden-cases", type=int, default=8, metavar="N", help="default 8")
    b.add_argument("--seed", type=int, default=0, help="generated input seed (default 0)")
    b.add_argument(
        "--quantize",
        choices=("none", "dynamic", "dynamic-matmul", "static", "static-mixed", "fp16", "auto"),
        help="recipe (default dynamic-matmul); static-mixed keeps the blocks most sensitive "
        "to int8 in float (searched on the calibration data); auto tries them all under "
        "the gate",
    )
    b.add_argument(
        "--calibration",
        metavar="DATA.npz",
        help="calibration inputs for static and static-mixed (and auto)",
    )
    b.add_argument(
        "--prune",
        type=float,
        metavar="SPARSITY",
        help="prune weights to this share of zeros (0-1) by W <- W - a*sign(W)",
    )
    b.add_argument(
        "--eval",
        metavar="DATA.npz",
        help="inputs (and optional labels) to measure quality on and draw golden vectors "
        "from (default: 64 random inputs from the input signature)",
    )
    b.add_argument(
        "--max-drift",
        metavar="GATE",
        help="quality gate: a share of top-1 decisions allowed to change (0.01) or "
        "agreement=,cosine=,abs=,accuracy= limits (auto's default: agreement=0.99,"
        "cosine=0.99; explicit recipes: no gate)",
    )
    b.add_argument(
        "--fallback",
        choices=("fp32",),
        help="when nothing passes the gate, keep the original model instead of failing",
    )
    b.add_argument(
        "--latency-runs",
        type=int,
        default=20,
        metavar="N",
        help="timed runs per candidate, interleaved (default 20; 0 skips timing)",
    )
    b.add_argument(
        "--max-latency-ratio",
        type=float,
        default=1.1,
        metavar="R",
        help="auto keeps only candidates at most R times the original's latency (default 1.1)",
    )
    b.set_defaults(func=_cmd_bundle_build)

    r = sub.add_parser(
        "release",
        help="publish a bundle and make it a fleet's desired version",
        description="Validate the bundle, add it to the signed targets, point the fleet's "
        "desired state at it and sign a new snapshot and timestamp.",
        epilog="example:\n  edgectl release resnet-1.2.0.bundle --fleet lab --repo ./repo\n"
        "history: edgectl release list|show|diff|retire|prune ... (see `edgectl releases -h`)",
        formatter_class=_RAW,
    )
    r.add_argument("bundle", metavar="FILE")
    r.add_argument("--fleet", required=True)
    r.add_argument("--repo", required=True, metavar="REPO_DIR")
    default = ProbationPolicy()
    prob = r.add_argument_group(
        "probation", "what each device checks after activating the release before it commits"
    )
    prob.add_argument(
        "--probation-s",
        type=float,
        default=default.duration_s,
        metavar="SECONDS",
        help=f"how long the new version is watched (default {default.duration_s:g})",
    )
    prob.add_argument(
        "--probation-min-requests",
        type=int,
        default=default.min_requests,
        metavar="N",
        help="requests needed to judge it (default %(default)s)",
    )
    prob.add_argument(
        "--probation-max-error-rate",
        type=float,
        default=default.max_error_rate,
        metavar="RATE",
        help="errors per request that roll back (default %(default)s)",
    )
    prob.add_argument(
        "--probation-max-p99-ratio",
        type=float,
        default=default.max_p99_ratio,
        metavar="RATIO",
        help="p99 latency vs the previous version that rolls back (default %(default)s)",
    )
    r.set_defaults(func=_cmd_release)

    s = sub.add_parser(
        "serve",
        help="serve the repository over HTTP and announce releases over MQTT",
        description="Serve REPO_DIR/metadata and REPO_DIR/targets over HTTP, announce new "
        "metadata to each fleet on MQTT (retained) and re-sign online metadata before it "
        "expires. Flags override the config file, which overrides defaults.",
        epilog="example:\n  edgectl serve --repo ./repo --mqtt 127.0.0.1:1883 "
        "--listen 0.0.0.0:8080",
        formatter_class=_RAW,
    )
    s.add_argument("--repo", metavar="REPO_DIR")
    s.add_argument("--mqtt", metavar="HOST:PORT", help="broker ('' disables announcements)")
    s.add_argument("--listen", metavar="HOST:PORT", help="HTTP address (port 0: any free)")
    s.add_argument("--config", metavar="controller.toml")
    s.set_defaults(func=_cmd_serve)

    fleet = sub.add_parser(
        "fleet",
        help="what the fleet's devices run and how they do",
        description="Read the telemetry `edgectl serve` stored.",
        formatter_class=_RAW,
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
        formatter_class=_RAW,
    )
    fs.add_argument("--fleet", help="only this fleet")
    fs.add_argument("--model", help="only devices that run this model")
    _add_store_options(fs)
    fs.set_defaults(func=_cmd_fleet_status)

    device = sub.add_parser(
        "device",
        help="enroll, revoke and inspect devices",
        description="Enroll a device (add), revoke it, or read its telemetry (show).",
        formatter_class=_RAW,
    )
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    ds = dsub.add_parser(
        "show",
        help="a device's state, recent heartbeats and lifecycle events",
        description="A device's health, models and figures, its last heartbeats and its "
        "recent lifecycle events (install phases, activation, probation, rollback, reasons).",
        epilog="example:\n  edgectl device show cam-0042 --repo ./repo --events 20",
        formatter_class=_RAW,
    )
    ds.add_argument("device_id", metavar="ID")
    ds.add_argument("--fleet", help="the device's fleet, when the id is used in several")
    ds.add_argument("--events", type=int, default=30, metavar="N", help="default 30")
    ds.add_argument("--heartbeats", type=int, default=5, metavar="N", help="default 5")
    _add_store_options(ds)
    ds.set_defaults(func=_cmd_device_show)
    _add_device_enrollment(dsub)
    _add_broker_parser(sub)

    _add_rollout_parser(sub)
    _add_keys_parser(sub)
    _add_releases_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edgectl``; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(route_release_verbs(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose
        else (logging.INFO if args.command == "serve" else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
        return code
    except UsageError as exc:
        print(f"edgectl: error: {exc}", file=sys.stderr)
        return 2
    except ControllerError as exc:
        print(f"edgectl: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
