"""``edgectl release FILE`` (publish) and ``edgectl releases ...`` (history, retire, prune).

``edgectl release VERB ...`` is routed to ``releases VERB`` by :func:`route_release_verbs`
before parsing, so both spellings work.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from agent.contracts import ProbationPolicy
from controller.base.errors import UsageError
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
    from controller.fleet.records import DeviceRow


def _cmd_release(args: argparse.Namespace) -> int:
    from controller.repository.release import release_bundle

    r = release_bundle(
        Path(args.bundle),
        args.fleet,
        Path(args.repo),
        probation=probation_policy(args),
        shadow=shadow_policy(args),
        delta_from=args.delta_from,
        require_clean=args.require_clean,
    )
    if args.json:
        print_json(dataclasses.asdict(r))
        return 0
    what = "published" if r.bundle_added else "already published (same bytes)"
    print(f"{r.model} {r.version}: {what} as {r.target_path}")
    print(f"  sha256 {r.sha256}, {r.length} bytes")
    print_deltas(r.deltas, r.deltas_skipped, r.length)
    if r.fleet_changed:
        print(f"  fleet {r.fleet}: desired version {r.version} (rollout {r.rollout_id})")
    else:
        print(f"  fleet {r.fleet}: already at {r.version}; nothing to change")
    print("  metadata versions: " + ", ".join(f"{k} {v}" for k, v in r.versions.items()))
    return 0


def print_deltas(
    kept: Sequence[tuple[str, int]], skipped: Sequence[tuple[str, str]], length: int
) -> None:
    """One line per delta published with a bundle, and per delta not kept."""
    for old, size in kept:
        print(f"  delta from {old}: {size} bytes ({size / max(length, 1):.1%} of the bundle)")
    for old, why in skipped:
        print(f"  no delta from {old}: {why}")


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
    from controller.fleet.store import StoreError
    from controller.fleet.stores import open_store
    from controller.serve.config import load_view_config

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

    from controller.repository.history import load_releases
    from controller.repository.history_view import release_json, render_list

    rows, note = _store_rows(args)
    releases = load_releases(Path(args.repo), args.model, rows)
    if args.json:
        doc = {"releases": [release_json(r) for r in releases], "store": note or "ok"}
        print_json(doc)
    else:
        print(render_list(releases, note) if releases else "no releases")
    return 0


def _cmd_releases_show(args: argparse.Namespace) -> int:

    from controller.repository.history import find_release
    from controller.repository.history_view import release_json, render_show

    rows, note = _store_rows(args)
    r = find_release(Path(args.repo), args.model, args.version, rows)
    if args.json:
        print_json(release_json(r))
    else:
        print(render_show(r) + (f"\n  {note}" if note else ""))
    return 0


def _cmd_releases_diff(args: argparse.Namespace) -> int:

    from controller.repository.history import diff_releases
    from controller.repository.history_view import diff_json, render_diff

    d = diff_releases(Path(args.repo), args.model, args.old, args.new)
    if args.json:
        print_json(diff_json(d))
    else:
        print(render_diff(d))
    for warning in d.warnings:
        print(f"edgectl: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_releases_retire(args: argparse.Namespace) -> int:
    from controller.rollout.service import retire_version

    if args.grace_days < 0:
        raise UsageError(f"--grace-days must not be negative, got {args.grace_days}")
    r = retire_version(
        Path(args.repo), args.model, args.version, grace=timedelta(days=args.grace_days)
    )
    if args.json:
        print_json(
            {
                "model": r.model,
                "version": r.version,
                "target_path": r.target_path,
                "targets_version": r.targets_version,
                "prune_after": f"{r.prune_after:%Y-%m-%dT%H:%M:%SZ}",
                "pruned": list(r.pruned),
            }
        )
        return 0
    print(
        f"retired {r.model} {r.version}: removed {r.target_path} from targets v{r.targets_version}"
    )
    print(f"  its bundle file is pruned from {r.prune_after:%Y-%m-%dT%H:%M:%SZ} on")
    for path in r.pruned:
        print(f"  pruned the bundle file of {path} (grace period over)")
    return 0


def _prune_after(retired_at: object, grace: timedelta) -> str | None:
    """When a retired bundle file becomes due for pruning (None: no readable date)."""
    try:
        at = datetime.strptime(str(retired_at), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return f"{at + grace:%Y-%m-%dT%H:%M:%SZ}"


def _cmd_releases_prune(args: argparse.Namespace) -> int:
    from controller.repository.history import prune_retired, read_retired

    if args.grace_days < 0:
        raise UsageError(f"--grace-days must not be negative, got {args.grace_days}")
    grace = timedelta(days=args.grace_days)
    pruned = prune_retired(Path(args.repo), grace=grace)
    if args.json:
        kept = [
            {
                "target_path": path,
                "retired_at": info.get("retired_at"),
                "prune_after": _prune_after(info.get("retired_at"), grace),
            }
            for path, info in sorted(read_retired(Path(args.repo)).items())
        ]
        print_json({"pruned": pruned, "kept": kept})
        return 0
    for path in pruned:
        print(f"pruned the bundle file of {path}")
    if not pruned:
        print("nothing to prune")
    return 0


def _add_releases_parser(sub: Subparsers) -> None:
    from controller.repository.history import DEFAULT_GRACE

    grace_days = DEFAULT_GRACE.total_seconds() / 86400
    releases = sub.add_parser(
        "releases",
        help="release history: list, show, diff, retire, prune (also `edgectl release VERB`)",
        description="What the repository has shipped, how good each build was, who runs "
        "it, and retiring old releases. See docs/releases.md.",
        epilog="examples:\n  edgectl releases list --repo ./repo\n"
        "  edgectl release diff resnet 1.2.0 1.3.0 --repo ./repo",
        formatter_class=RAW,
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
        formatter_class=RAW,
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
        formatter_class=RAW,
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
        formatter_class=RAW,
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
        formatter_class=RAW,
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
    rt.add_argument("--json", action="store_true", help="print JSON for scripts")
    rt.set_defaults(func=_cmd_releases_retire)

    pr = rsub.add_parser(
        "prune",
        help="delete bundle files of releases retired longer than the grace period",
        description="Delete the bundle files of releases retired at least DAYS ago.",
        epilog="example:\n  edgectl release prune --repo ./repo",
        formatter_class=RAW,
    )
    repo_option(pr)
    pr.add_argument(
        "--grace-days", type=float, default=grace_days, metavar="DAYS", help="default %(default)g"
    )
    pr.add_argument("--json", action="store_true", help="print JSON for scripts")
    pr.set_defaults(func=_cmd_releases_prune)


def add_parser(sub: Subparsers) -> None:
    r = sub.add_parser(
        "release",
        help="publish a bundle and make it a fleet's desired version",
        description="Validate the bundle, add it to the signed targets, point the fleet's "
        "desired state at it and sign a new snapshot and timestamp.",
        epilog="example:\n  edgectl release resnet-1.2.0.bundle --fleet lab --repo ./repo\n"
        "history: edgectl release list|show|diff|retire|prune ... (see `edgectl releases -h`)",
        formatter_class=RAW,
    )
    r.add_argument("bundle", metavar="FILE")
    r.add_argument("--fleet", required=True)
    r.add_argument("--repo", required=True, metavar="REPO_DIR")
    delta_from_argument(r)
    r.add_argument(
        "--require-clean",
        action="store_true",
        help="refuse a bundle whose manifest does not show it was built from a clean Git "
        "work tree (no uncommitted changes, the model file committed or ignored); a bundle "
        "with no Git record is refused too. Checked before anything is written",
    )
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
    add_shadow_options(r)
    r.add_argument("--json", action="store_true", help="print JSON for scripts")
    r.set_defaults(func=_cmd_release)

    _add_releases_parser(sub)
