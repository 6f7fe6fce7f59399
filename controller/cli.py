"""``edgectl``: the controller's command line.

This module assembles the parser from one module per command group in
``controller.commands`` (``repo``: init and keys; ``bundle``; ``release``: release and
releases; ``rollout``; ``serve``; ``fleet``: fleet status; ``device``: device and
broker), each exposing ``add_parser(sub)``, and maps errors to exit codes once, here
(docs/cli.md has the table):

- 0 success
- 1 any other ``ControllerError`` (the message says why)
- 2 ``UsageError`` and argparse's own usage errors
- 3 ``keys rotate``: the new root waits for offline signatures
- 130 interrupted (Ctrl-C)

Errors print as ``edgectl: error: <message>`` on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from agent.base.completion import add_completion_parser, completion_script
from controller.base.errors import ControllerError, UsageError
from controller.base.fsio import install_step_hook_from_env
from controller.commands import bundle, device, fleet, release, repo, rollout, serve
from controller.commands.common import RAW
from controller.commands.release import RELEASE_VERBS, route_release_verbs

__all__ = ["RELEASE_VERBS", "build_parser", "main", "route_release_verbs"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgectl",
        description="Build, sign and publish ONNX model bundles for edge fleets.",
        epilog="example:\n  edgectl init ./repo && edgectl bundle build m.onnx --name m "
        "--version 1.0.0 -o m.bundle && edgectl release m.bundle --fleet lab --repo ./repo\n"
        "exit codes: 0 ok, 1 failure, 2 usage error, 3 a new root waits for offline "
        "signatures (keys rotate), 130 interrupted (docs/cli.md)",
        formatter_class=RAW,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (repo, bundle, release, serve, fleet, device, rollout):
        group.add_parser(sub)
    add_completion_parser(sub, "edgectl").set_defaults(func=_cmd_completion)
    return parser


def _cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser(), args.shell), end="")
    return 0


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
        if args.command != "serve":  # test-only hook; serve never honours it
            install_step_hook_from_env(os.environ)
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
