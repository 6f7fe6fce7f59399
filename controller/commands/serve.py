"""``edgectl serve``: the long-running controller (HTTP repository, MQTT announcer)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from controller.commands.common import RAW

if TYPE_CHECKING:
    from controller.commands.common import Subparsers


def _cmd_serve(args: argparse.Namespace) -> int:
    from controller.app import run_serve
    from controller.serve.config import load_serve_config

    config = load_serve_config(
        Path(args.config) if args.config else None,
        os.environ,
        {
            "repo": args.repo,
            "listen": args.listen,
            "mqtt": args.mqtt,
            "lease_s": args.lease_s,
            "instance_id": args.instance_id,
        },
    )
    run_serve(config)
    return 0


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(
        "serve",
        help="serve the repository over HTTP and announce releases over MQTT",
        description="Serve REPO_DIR/metadata and REPO_DIR/targets over HTTP, announce new "
        "metadata to each fleet on MQTT (retained) and re-sign online metadata before it "
        "expires. Flags override the config file, which overrides defaults.\n\n"
        "Several serve processes may share one store (PostgreSQL) and broker: all serve "
        "HTTP, /metrics and ingest; one at a time, the holder of a lease in the store, runs "
        'rollouts, announces and signs (docs/operations.md, "Controllers that fail over").',
        epilog="example:\n  edgectl serve --repo ./repo --mqtt 127.0.0.1:1883 "
        "--listen 0.0.0.0:8080",
        formatter_class=RAW,
    )
    s.add_argument("--repo", metavar="REPO_DIR")
    s.add_argument("--mqtt", metavar="HOST:PORT", help="broker ('' disables announcements)")
    s.add_argument("--listen", metavar="HOST:PORT", help="HTTP address (port 0: any free)")
    s.add_argument(
        "--lease-s",
        type=float,
        metavar="SECONDS",
        help="how long the leader's lease lasts without a renewal (default 15): a leader "
        "that stops or loses the store is replaced within about this",
    )
    s.add_argument(
        "--instance-id",
        metavar="ID",
        help="this process's name in the lease and /metrics (default HOSTNAME-PID)",
    )
    s.add_argument("--config", metavar="controller.toml")
    s.set_defaults(func=_cmd_serve)
