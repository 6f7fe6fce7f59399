"""``edgectl rollout ...``: start, watch and steer staged rollouts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.contracts import ProbationPolicy
from controller.commands.common import (
    RAW,
    add_shadow_options,
    delta_from_argument,
    print_json,
    probation_policy,
    shadow_policy,
)

if TYPE_CHECKING:
    from controller.commands.common import Subparsers
    from controller.rollout.stages import Rollout


def _cmd_rollout_start(args: argparse.Namespace) -> int:
    from controller.rollout.gates import gates_from_cli
    from controller.rollout.service import start_rollout
    from controller.rollout.stages import OnFailure, parse_duration, parse_stages

    wait_s = parse_duration(args.wait, "--wait")
    deadline_s = (
        parse_duration(args.deadline, "--deadline") if args.deadline else max(3 * wait_s, 600.0)
    )
    canaries = [c.strip() for c in (args.canary or "").split(",") if c.strip()]
    gates = gates_from_cli(args.gate)
    if not args.json:
        # The full effective set, before anything is written: a --gate that names one
        # gate keeps the others at their defaults, and the operator sees which those are.
        # On stdout like the rollout it starts (stderr stays one line on an error); with
        # --json the document's "gates" holds the same set.
        how = f"--gate {args.gate} over the defaults" if args.gate else "the defaults"
        print(f"gates {gates.to_text()} ({how})", flush=True)
    r = start_rollout(
        Path(args.repo),
        fleet=args.fleet,
        model=args.model,
        version=args.version,
        stages=parse_stages(args.stages),
        wait_s=wait_s,
        deadline_s=deadline_s,
        gates=gates,
        canaries=canaries,
        on_failure=OnFailure(args.on_failure),
        probation=probation_policy(args),
        shadow=shadow_policy(args),
        bundle=Path(args.bundle) if args.bundle else None,
        delta_from=args.delta_from,
        require_clean=args.require_clean,
    )
    note = _place_devices(args, r)
    _print_rollout(r, args.json)
    if note and not args.json:
        print(note, flush=True)
    return 0


def _place_devices(args: argparse.Namespace, r: Rollout) -> str:
    """Store each device's place in the new rollout in the telemetry store, so that the
    rollout's first tick in `edgectl serve` does not hash every device id; what was done,
    in one line. Best effort: when the store cannot be found or reached, the first tick
    places them (and says so in its log)."""
    import os

    from controller.base.errors import UsageError
    from controller.fleet.store import StoreError
    from controller.fleet.stores import open_store
    from controller.rollout.service import place_rollout
    from controller.rollout.store import RolloutStore
    from controller.serve.config import load_view_config

    later = "the first rollout tick of `edgectl serve` places them"
    try:
        view = load_view_config(
            Path(args.config) if args.config else None,
            os.environ,
            {"store": args.store, "repo": args.repo},
        )
    except UsageError as exc:
        return f"devices: not placed ({exc}); {later}"
    if "://" not in view.store and "=" not in view.store and not Path(view.store).exists():
        return f"devices: not placed (no telemetry store at {view.store}); {later}"
    try:
        store = open_store(view.store)
        try:
            ended = [x.id for x in RolloutStore(Path(args.repo)).all() if not x.is_active]
            _generation, placed = place_rollout(store, r, ended)
        finally:
            store.close()
    except StoreError as exc:
        return f"devices: not placed (telemetry store {view.store} unreachable: {exc}); {later}"
    return f"devices: {placed} placed in the rollout (telemetry store {view.store})"


def _cmd_rollout_status(args: argparse.Namespace) -> int:
    import time

    from controller.rollout.store import RolloutStore
    from controller.rollout.view import render_status, rollout_json

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
            print_json([rollout_json(r) for r in rollouts])
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

    from controller.rollout.service import control_rollout

    r = control_rollout(
        Path(args.repo), args.fleet, args.model, args.rollout_command, reason=args.reason or ""
    )
    _print_rollout(r, args.json)
    return 0


def _print_rollout(r: Rollout, as_json: bool) -> None:
    import time

    from controller.rollout.view import render_rollout, rollout_json

    if as_json:
        print_json(rollout_json(r))
    else:
        print(render_rollout(r, time.time()))


def add_parser(sub: Subparsers) -> None:
    from controller.rollout.gates import DEFAULT_GATES

    rollout = sub.add_parser(
        "rollout",
        help="staged rollouts that promote on healthy telemetry and halt on bad",
        description="Roll a published version out to a fleet stage by stage. `edgectl "
        "serve` advances a stage once its gates hold over the wait with enough devices "
        "reporting, halts it when a gate breaks, and pauses it when too few devices "
        "report by the stage's deadline. See docs/rollouts.md.",
        epilog="examples:\n  edgectl rollout start resnet 1.3.0 --fleet lab --repo ./repo "
        "--canary cam-01\n  edgectl rollout status --repo ./repo --watch\n"
        "  edgectl rollout abort resnet --fleet lab --repo ./repo --reason 'p99 doubled'",
        formatter_class=RAW,
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
        '    --gate "min_devices=2,p99_ratio<2" --canary cam-01,cam-02,cam-03\n'
        f"gates: the defaults are {DEFAULT_GATES}; --gate replaces the gates it names and\n"
        "keeps the others; NAME=off drops one (error_rate=off, min_devices=off).",
        formatter_class=RAW,
    )
    st.add_argument("model", metavar="MODEL")
    st.add_argument("version", metavar="VERSION")
    st.add_argument("--fleet", required=True)
    st.add_argument("--repo", required=True, metavar="REPO_DIR")
    st.add_argument("--bundle", metavar="FILE", help="publish this bundle first (release key)")
    st.add_argument(
        "--require-clean",
        action="store_true",
        help="with --bundle: refuse it unless its manifest shows a clean Git work tree "
        "(as `edgectl release --require-clean`)",
    )
    delta_from_argument(st)
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
    st.add_argument(
        "--gate",
        metavar="GATES",
        help=f"health gates over the defaults ({DEFAULT_GATES}): each gate given "
        "replaces that gate only, NAME=off drops one, e.g. --gate min_devices=1,p99_ratio=off",
    )
    st.add_argument("--canary", metavar="DEV,...", help="devices that take every stage")
    st.add_argument(
        "--on-failure",
        choices=("pause", "abort"),
        default="pause",
        help="when a gate breaks: hold (pause) or go back to the previous version (abort); "
        "default %(default)s",
    )
    _add_probation_options(st)
    add_shadow_options(st)
    st.add_argument(
        "--store",
        metavar="PATH|DSN",
        help="telemetry store where each device's place in the rollout is kept (default: "
        "REPO_DIR/telemetry.sqlite; env EDGECTL_STORE)",
    )
    st.add_argument("--config", metavar="controller.toml", help="read [serve] store here")
    st.add_argument("--json", action="store_true", help="print the rollout as JSON")
    st.set_defaults(func=_cmd_rollout_start)

    ss = rsub.add_parser(
        "status",
        help="rollouts with a bar per stage",
        description="The active rollouts (or the latest one) with a bar per stage, the "
        "figures of the current stage and the halt reason.",
        epilog="example:\n  edgectl rollout status --repo ./repo --fleet lab --watch",
        formatter_class=RAW,
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
        pc = rsub.add_parser(
            action,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            epilog=f"example:\n  edgectl rollout {action} resnet --fleet lab --repo ./repo "
            f"--reason 'ticket OPS-12'",
            formatter_class=RAW,
        )
        pc.add_argument("model", metavar="MODEL")
        pc.add_argument("--fleet", required=True)
        pc.add_argument("--repo", required=True, metavar="REPO_DIR")
        pc.add_argument("--reason", help="recorded in the rollout's history")
        pc.add_argument("--json", action="store_true", help="print the rollout as JSON")
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
