from __future__ import annotations

import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata

from agent.contracts import ROLLOUT_PATHS, ROLLOUT_ROLE
from controller.base.errors import RepositoryError, UsageError
from controller.repository.repo import ALL_ROLES, Repository, init_repository
from tests.controller.conftest import edgectl_cmd


def test_init_writes_private_keys(repo: Repository) -> None:
    assert stat.S_IMODE(repo.keys_dir.stat().st_mode) == 0o700
    for role in ALL_ROLES:
        key = repo.keys_dir / f"{role}.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_init_metadata_is_signed_by_the_right_keys(repo: Repository) -> None:
    md = repo.metadata_dir
    root = Metadata.from_file(str(md / "1.root.json"))
    assert (md / "root.json").read_bytes() == (md / "1.root.json").read_bytes()
    assert root.signed.consistent_snapshot is True
    root.verify_delegate("root", root)
    targets = Metadata.from_file(str(md / "1.targets.json"))
    snapshot = Metadata.from_file(str(md / "1.snapshot.json"))
    timestamp = Metadata.from_file(str(md / "timestamp.json"))
    for role, loaded in (("targets", targets), ("snapshot", snapshot), ("timestamp", timestamp)):
        root.verify_delegate(role, loaded)
        assert not loaded.signed.is_expired()
    rollout = Metadata.from_file(str(md / f"1.{ROLLOUT_ROLE}.json"))
    targets.verify_delegate(ROLLOUT_ROLE, rollout)
    delegated = targets.signed.delegations.roles[ROLLOUT_ROLE]
    assert delegated.paths == list(ROLLOUT_PATHS)
    assert delegated.terminating and delegated.threshold == 1
    assert delegated.is_delegated_path("fleets/lab/desired.json")
    assert not delegated.is_delegated_path("bundles/lin/1.0.0.bundle")
    assert not rollout.signed.is_expired()


def test_init_keys_are_not_mixed_up(repo: Repository) -> None:
    root = Metadata.from_file(str(repo.metadata_dir / "1.root.json"))
    timestamp = Metadata.from_file(str(repo.metadata_dir / "timestamp.json"))
    with pytest.raises(UnsignedMetadataError, match="0/1 keys"):
        root.verify_delegate("snapshot", timestamp)


def test_init_twice_is_refused(repo: Repository) -> None:
    before = sorted(p.name for p in repo.metadata_dir.iterdir())
    with pytest.raises(UsageError, match="already holds a repository"):
        init_repository(repo.path)
    out = subprocess.run(edgectl_cmd("init", repo.path), capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("edgectl: error: ") and "already holds" in out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == before


def test_init_cli_sets_expiries(tmp_path: Path) -> None:
    out = subprocess.run(
        edgectl_cmd("init", tmp_path / "r", "--expiry-days-timestamp", "2"),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    repo = Repository.open(tmp_path / "r")
    left = repo.load("timestamp").signed.expires - datetime.now(UTC)
    assert timedelta(days=1, hours=23) < left <= timedelta(days=2)
    assert repo.policy.timestamp_days == 2


def test_a_missing_or_damaged_metadata_file_is_named(repo: Repository) -> None:
    timestamp = repo.metadata_dir / "timestamp.json"
    saved = timestamp.read_bytes()
    timestamp.unlink()
    with pytest.raises(RepositoryError, match=f"metadata file missing: {timestamp}"):
        repo.load("timestamp")
    timestamp.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(RepositoryError, match=f"cannot load {timestamp}"):
        repo.load("timestamp")
    timestamp.write_bytes(saved)
    assert repo.load("timestamp").signed.version >= 1
