"""What the ``edgectl`` command modules share: the help formatter, the subparsers type,
JSON output and the probation options every path to a new release takes.

Each ``controller/commands/*.py`` module owns one command group and exposes
``add_parser(sub)``; ``controller.cli`` assembles them and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from agent.contracts import ProbationPolicy
from controller.base.errors import UsageError

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

RAW = argparse.RawDescriptionHelpFormatter


def print_json(doc: object) -> None:
    """Print ``doc`` as indented JSON on stdout (the ``--json`` output of every command)."""
    print(json.dumps(doc, indent=2))


def probation_policy(args: argparse.Namespace) -> ProbationPolicy:
    """The ``--probation-*`` options as a policy; raises ``UsageError`` when out of range."""
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


def delta_from_argument(parser: argparse.ArgumentParser) -> None:
    """``--delta-from K`` (release, rollout start)."""
    from controller.repository.release import DEFAULT_DELTA_FROM

    parser.add_argument(
        "--delta-from",
        type=int,
        default=DEFAULT_DELTA_FROM,
        metavar="K",
        help="also publish deltas from the K highest earlier versions of the model, kept "
        "when at most 80%% of the bundle (default %(default)s; 0: none)",
    )
