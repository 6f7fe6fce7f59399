"""`edgectl release` and `rollout start` shadow options: each value out of range is refused
naming its flag (exit 2) before anything is read or written; good ones become the
policy the release carries."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.contracts import ShadowPolicy
from controller.cli import main
from controller.commands.common import add_shadow_options, shadow_policy


def _policy(*argv: str) -> ShadowPolicy:
    parser = argparse.ArgumentParser()
    add_shadow_options(parser)
    return shadow_policy(parser.parse_args(list(argv)))


def test_the_defaults_and_the_flags_make_the_policy() -> None:
    assert _policy() == ShadowPolicy()
    assert not _policy("--no-shadow").enabled
    got = _policy(
        "--shadow-samples", "50", "--shadow-duration", "30", "--shadow-rate", "0.25",
        "--shadow-min-agreement", "0.9", "--shadow-min-cosine", "0.99",
        "--shadow-max-abs-diff", "0.5", "--shadow-max-latency-ratio", "1.5",
        "--shadow-max-errors", "2",
    )  # fmt: skip
    assert got == ShadowPolicy(True, 50, 30.0, 0.25, 0.9, 0.99, 0.5, 1.5, 2)


@pytest.mark.parametrize("command", ["release", "rollout"])
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--shadow-rate", "1.5", "--shadow-rate: expected 0..1, got 1.5"),
        ("--shadow-rate", "0", "--shadow-rate: expected more than 0"),
        ("--shadow-samples", "0", "--shadow-samples: expected at least 1"),
        ("--shadow-min-agreement", "2", "--shadow-min-agreement: expected 0..1"),
        ("--shadow-duration", "-1", "--shadow-duration: expected >= 0"),
        ("--shadow-max-latency-ratio", "0", "--shadow-max-latency-ratio: expected more than 0"),
        ("--shadow-max-errors", "-1", "--shadow-max-errors: expected an integer >= 0"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_its_flag(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    flag: str,
    value: str,
    message: str,
) -> None:
    repo = tmp_path / "repo"
    if command == "release":
        argv = ["release", str(tmp_path / "none.bundle"), "--fleet", "lab", "--repo", str(repo)]
    else:
        argv = ["rollout", "start", "m", "1.0.0", "--fleet", "lab", "--repo", str(repo)]
    assert main([*argv, flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not repo.exists()  # nothing written
