"""``edgectl``: the controller's command line.

This module assembles the parser from one module per command group in
``controller.commands`` (``repo``: init and keys; ``bundle``; ``release``: release and
releases; ``rollout``; ``serve``; ``fleet``: fleet status; ``device``: device and
broker; ``gateway``: site gateways), each exposing ``add_parser(sub)``, and maps errors
to exit codes once, here (docs/cli.md has the table):

- 0 success
- 1 any other ``ControllerError`` (the message says why), and any ``OSError`` (a missing
  repository, a full disk, a file-size limit, a read-only or unreadable folder): one
  line naming the file, the cause and what to do (``describe_os_error``)
- 2 ``UsageError`` and argparse's own usage errors
- 3 ``keys rotate``: the new root waits for offline signatures
- 130 interrupted (Ctrl-C)

Errors print as ``edgectl: error: <message>`` on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.base.completion import add_completion_parser, completion_script
from controller.base.errors import ControllerError, UsageError
from controller.base.fsio import install_step_hook_from_env
from controller.commands import bundle, device, fleet, gateway, release, repo, rollout, serve
from controller.commands.common import RAW
from controller.commands.release import RELEASE_VERBS, route_release_verbs

__all__ = ["RELEASE_VERBS", "build_parser", "describe_os_error", "main", "route_release_verbs"]

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
    for group in (repo, bundle, release, serve, fleet, device, gateway, rollout):
        group.add_parser(sub)
    add_completion_parser(sub, "edgectl").set_defaults(func=_cmd_completion)
    return parser


def _cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser(), args.shell), end="")
    return 0


# What to do about a file error, by errno (the default: FIX_OTHER).
FIXES = {
    errno.ENOSPC: "the disk holding it is full: free space there, then run the command again",
    errno.EDQUOT: "the disk quota of this user is used up: free space or raise the quota, "
    "then run the command again",
    errno.EFBIG: "a file-size limit stopped the write (`ulimit -f`, or LimitFSIZE= in the "
    "service's unit): raise it, then run the command again",
    errno.EROFS: "the file system holding it is mounted read-only: remount it read-write "
    "(`mount -o remount,rw`) or point edgectl at a folder on a writable disk, then run the "
    "command again",
    errno.EACCES: "this user may not use it: run edgectl as the user that owns the "
    "repository, or fix the owner and mode (`ls -l`, `chown`), then run the command again",
    errno.EIO: "the disk reported an I/O error: check the disk (`dmesg`) before running "
    "the command again",
}
FIXES[errno.EPERM] = FIXES[errno.EACCES]
FIX_MISSING = "check the path (a typo in --repo, --key-dir or a file argument?)"
FIX_OTHER = "fix the cause, then run the command again"
# controller.repository.repo.SETTINGS_FILE (the CLI imports nothing below the commands).
_SETTINGS = "edgectl.json"


def describe_os_error(exc: OSError, repo: str | None = None) -> str:
    """One line for a file error: the path, the cause and what the operator should do.

    ``repo`` is the command's ``--repo``: a missing repository says how to create one.
    The repository's own writes are atomic and signed bottom-up, so a failed command
    leaves it as it was or with unpublished files the next command overwrites.
    """
    path = exc.filename if exc.filename is not None else "a file"
    cause = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0)
    cause = f"{cause} ({code})" if code else cause
    if exc.errno == errno.ENOENT and repo is not None and not Path(repo, _SETTINGS).exists():
        fix = (
            f"{repo} is not an edgectl repository: pass the right --repo, or create one "
            f"with `edgectl init {repo}`"
        )
    elif exc.errno == errno.ENOENT:
        fix = FIX_MISSING
    else:
        fix = FIXES.get(exc.errno or 0, FIX_OTHER)
    return f"{path}: {cause}; {fix}"


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
    # APScheduler logs two INFO lines per run of every job (each 5 s in serve): its
    # chatter waits for -v; its warnings and errors always show.
    logging.getLogger("apscheduler").setLevel(logging.NOTSET if args.verbose else logging.WARNING)
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
    except OSError as exc:
        logger.debug("file error", exc_info=True)
        repo = getattr(args, "repo", None)
        print(f"edgectl: error: {describe_os_error(exc, repo)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
