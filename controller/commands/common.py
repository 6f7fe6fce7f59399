"""What the ``edgectl`` command modules share: the help formatter, the subparsers type,
JSON output and the probation and shadow options every path to a new release takes.

Each ``controller/commands/*.py`` module owns one command group and exposes
``add_parser(sub)``; ``controller.cli`` assembles them and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from agent.contracts import ProbationPolicy, ShadowPolicy, check_shadow_policy
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


# ---- shadow options (release, rollout start): what each device checks in shadow


def add_shadow_options(parser: argparse.ArgumentParser) -> None:
    """``--shadow-*`` and ``--no-shadow``: the ``ShadowPolicy`` the release carries."""
    d = ShadowPolicy()
    g = parser.add_argument_group(
        "shadow",
        "what each device checks before the release answers a client: it runs beside the "
        "serving version on copies of live requests and is compared with it",
    )
    g.add_argument(
        "--no-shadow",
        action="store_true",
        help="activate at once after the golden vectors (probation only), as before shadows",
    )
    g.add_argument(
        "--shadow-samples",
        type=int,
        default=d.samples,
        metavar="N",
        help="requests compared for a verdict (default %(default)s)",
    )
    g.add_argument(
        "--shadow-duration",
        type=float,
        default=d.max_duration_s,
        metavar="SECONDS",
        help="the longest a shadow lasts; by then the rules apply to what was compared, and "
        "with no traffic at all it passes on its golden vectors (default %(default)g)",
    )
    g.add_argument(
        "--shadow-rate",
        type=float,
        default=d.sample_rate,
        metavar="SHARE",
        help="share of live requests copied, (0..1] (default %(default)g)",
    )
    g.add_argument(
        "--shadow-min-agreement",
        type=float,
        default=d.min_agreement,
        metavar="SHARE",
        help="top-1 agreement needed, class-score outputs (default %(default)g)",
    )
    g.add_argument(
        "--shadow-min-cosine",
        type=float,
        default=d.min_cosine,
        metavar="COS",
        help="lowest cosine allowed per output (default: not checked)",
    )
    g.add_argument(
        "--shadow-max-abs-diff",
        type=float,
        default=d.max_abs_diff,
        metavar="DIFF",
        help="largest absolute difference allowed (default: not checked)",
    )
    g.add_argument(
        "--shadow-max-latency-ratio",
        type=float,
        default=d.max_latency_ratio,
        metavar="RATIO",
        help="median run time vs the serving version that fails it (default %(default)g)",
    )
    g.add_argument(
        "--shadow-max-errors",
        type=int,
        default=d.max_errors,
        metavar="N",
        help="candidate runs that may fail on live requests (default %(default)s)",
    )


_SHADOW_FLAGS = {
    "samples": "--shadow-samples",
    "max_duration_s": "--shadow-duration",
    "sample_rate": "--shadow-rate",
    "min_agreement": "--shadow-min-agreement",
    "min_cosine": "--shadow-min-cosine",
    "max_abs_diff": "--shadow-max-abs-diff",
    "max_latency_ratio": "--shadow-max-latency-ratio",
    "max_errors": "--shadow-max-errors",
    "enabled": "--no-shadow",
}


def shadow_policy(args: argparse.Namespace) -> ShadowPolicy:
    """The ``--shadow-*`` options as a policy; raises ``UsageError`` naming the flag when
    one is out of range."""
    policy = ShadowPolicy(
        enabled=not args.no_shadow,
        samples=args.shadow_samples,
        max_duration_s=float(args.shadow_duration),
        sample_rate=float(args.shadow_rate),
        min_agreement=float(args.shadow_min_agreement),
        min_cosine=args.shadow_min_cosine,
        max_abs_diff=args.shadow_max_abs_diff,
        max_latency_ratio=float(args.shadow_max_latency_ratio),
        max_errors=args.shadow_max_errors,
    )
    try:
        return check_shadow_policy(policy)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        flag = _SHADOW_FLAGS.get(field, field)
        raise UsageError(f"{flag}: {str(exc).split(' ', 1)[1]}") from None


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
