"""A key rotation never strands the fleet (issue 19, item 1).

Real repositories, the real CLI (``controller.cli.main``), and a python-tuf client
bootstrapped with root v1 as a device is."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.contracts import ROLLOUT_ROLE
from controller.base.fsio import repo_lock
from controller.cli import main
from controller.repository.keys import key_files, load_key_file
from controller.repository.repo import Repository, resign_expiring
from tests.controller.repository.test_keys import Client

ONLINE = ["timestamp", "snapshot", ROLLOUT_ROLE]


def _key_ids(folder: Path, role: str) -> list[str]:
    return [str(load_key_file(p).public_key.keyid) for p in key_files(folder, role)]


def _serve_resigns_later(repo_dir: Path, hours: float) -> dict[str, int]:
    """What ``serve``'s re-sign check does ``hours`` from now (no --key-dir: serve has
    none), through the same way in as ``controller.app._resign``."""
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=hours)
    with repo_lock(repo_dir):
        return resign_expiring(Repository.open(repo_dir), later)


# ---------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("role", ONLINE)
def test_an_online_key_rotated_with_key_dir_stays_where_serve_signs(
    tmp_path: Path, repo: Repository, role: str
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    usb = tmp_path / "usb"
    usb.mkdir()
    shutil.move(repo.keys_dir / "root.pem", usb / "root.pem")  # root offline, as advised
    shutil.move(repo.keys_dir / "targets.pem", usb / "targets.pem")

    argv = ["keys", "rotate", role, "--repo", str(repo.path), "--key-dir", str(usb)]
    assert main(argv) == 0

    new_keyids, _ = Repository.open(repo.path).role_keys(role)
    assert _key_ids(repo.keys_dir, role) == new_keyids  # in keys/, where serve signs
    assert key_files(usb, role) == []  # never on the offline medium
    # serve, without the medium, re-signs the online roles when they are due (rollout
    # after 20 days: past half of its 30), and a device follows.
    changed = _serve_resigns_later(repo.path, 24 * 20)
    assert set(changed) == {ROLLOUT_ROLE, "snapshot", "timestamp"}
    client.refresh()
    assert client.trusted("timestamp") == Repository.open(repo.path).versions()["timestamp"]


def test_an_offline_key_rotated_with_key_dir_goes_onto_the_medium(
    tmp_path: Path, repo: Repository
) -> None:
    usb = tmp_path / "usb"
    assert main(["keys", "rotate", "targets", "--repo", str(repo.path), "--key-dir", str(usb)]) == 0
    assert key_files(repo.keys_dir, "targets") == []
    assert _key_ids(usb, "targets") != []
