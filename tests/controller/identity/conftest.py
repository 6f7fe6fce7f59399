"""Fixtures of the identity tests: the repository as a folder, as the CLIs take it."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.repository.repo import init_repository


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An initialised repository's folder (the controller's ``repo`` fixture, as a path)."""
    init_repository(tmp_path / "repo")
    return tmp_path / "repo"
