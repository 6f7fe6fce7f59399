"""An agent.toml for the config tests: the smallest valid one, and writing one."""

from __future__ import annotations

from pathlib import Path

MINIMAL = """
device_id = "dev-1"
fleet = "lab"
trusted_root = "root.json"

[repository]
url = "http://127.0.0.1:8080/"
"""


def write_config(tmp_path: Path, text: str) -> Path:
    """``text`` as ``tmp_path/agent.toml``; its path."""
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path
