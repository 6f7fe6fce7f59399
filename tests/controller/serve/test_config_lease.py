"""``edgectl serve``'s lease settings: ``lease_s`` and ``instance_id``, from the file or flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from controller.base.errors import UsageError
from controller.cli import build_parser
from controller.serve.config import load_serve_config


def test_defaults_flags_and_the_file(tmp_path: Path) -> None:
    config = load_serve_config(None, {}, {"repo": "r"})
    assert config.lease_s == 15.0
    assert config.instance_id == f"{socket.gethostname()}-{os.getpid()}"
    toml = tmp_path / "c.toml"
    toml.write_text("[serve]\nlease_s = 30\ninstance_id = 'ctl-a'\n")
    config = load_serve_config(toml, {}, {"repo": "r"})
    assert (config.lease_s, config.instance_id) == (30.0, "ctl-a")
    config = load_serve_config(toml, {}, {"repo": "r", "lease_s": 6.0, "instance_id": "b"})
    assert (config.lease_s, config.instance_id) == (6.0, "b")


@pytest.mark.parametrize(
    ("value", "message"),
    [(0.5, "--lease-s expected at least 1 second, got 0.5"), (-1.0, "--lease-s expected > 0")],
)
def test_a_lease_too_short_is_refused_naming_the_flag(value: float, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_serve_config(None, {}, {"repo": "r", "lease_s": value})


def test_serve_help_names_the_options() -> None:
    parser = build_parser()
    text = (
        next(
            a
            for a in parser._subparsers._group_actions  # type: ignore[union-attr]
        )
        .choices["serve"]
        .format_help()
    )
    assert "--lease-s SECONDS" in text and "--instance-id ID" in text
    assert "Controllers that fail over" in text
