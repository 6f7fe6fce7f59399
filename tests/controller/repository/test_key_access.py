"""One bad key file never blocks a role, and keys or a lock the serving user could not
use are refused with the fix (issue 19, item 6).

Real files and modes: the tests run as root and give the repository to another real
uid (65534), the user ``edgectl serve`` would run as; what that user could read is the
kernel's rule as a pure function (``may_access``), tested on its own."""

from __future__ import annotations

import logging
import os
import pwd
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.app import _resign
from controller.base.errors import RepositoryError
from controller.cli import main
from controller.repository.access import READ, READ_WRITE, User, may_access
from controller.repository.keys import generate_key, key_files
from controller.repository.repo import Repository, resign_expiring
from controller.repository.rotation import locked_repository
from tests.controller.repository.test_keys import Client

SERVING_UID = 65534  # nobody: a real user other than root

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def _user(uid: int, gids: set[int]) -> User:
    return User(uid, min(gids), frozenset(gids), f"u{uid}", f"g{min(gids)}")


@pytest.mark.parametrize(
    ("st_uid", "st_gid", "mode", "need", "expected"),
    [
        (998, 998, 0o600, READ, True),  # its own key
        (0, 0, 0o600, READ, False),  # sudo wrote it: root's
        (0, 998, 0o640, READ, True),  # root's, but its group may read
        (0, 0, 0o644, READ, True),  # anyone may read (and is warned about)
        (998, 998, 0o044, READ, False),  # the owner's bits alone apply to the owner
        (998, 998, 0o400, READ_WRITE, False),  # read-only: a lock cannot be opened
        (0, 0, 0o644, READ_WRITE, False),  # a root-owned .lock
        (998, 5, 0o644, READ_WRITE, True),
    ],
)
def test_may_access_is_the_kernels_rule(
    st_uid: int, st_gid: int, mode: int, need: int, expected: bool
) -> None:
    assert may_access(st_uid, st_gid, mode, _user(998, {998}), need) is expected
    assert may_access(st_uid, st_gid, mode, _user(0, {0}), need)  # root may do anything


def _resign_later(repo_dir: Path, hours: float) -> dict[str, int]:
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=hours)
    with locked_repository(repo_dir) as repo:
        return resign_expiring(repo, later)


def test_a_stray_file_among_the_keys_is_ignored_with_a_warning(
    tmp_path: Path, repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    stray = repo.keys_dir / "timestamp-old.pem"
    stray.write_bytes(b"not a key\n")
    stray.chmod(0o600)
    revoked = repo.keys_dir / "timestamp-0123456789abcdef.pem"  # a key, but not current
    revoked.write_bytes(generate_key().private_bytes)
    revoked.chmod(0o600)

    with caplog.at_level(logging.WARNING):
        changed = _resign_later(repo.path, 20)  # the timestamp is due: serve re-signs it

    assert list(changed) == ["timestamp"] and changed["timestamp"] > 1
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert f"ignoring a file among the timestamp keys: cannot load the key {stray}" in warnings
    assert f"ignoring a file among the timestamp keys: {revoked}: its key" in warnings
    assert "is not one of the timestamp role's current keys" in warnings
    client.refresh()
    assert client.trusted("timestamp") == changed["timestamp"]


def _give_to(path: Path, uid: int) -> None:
    for folder, _dirs, files in os.walk(path):
        os.chown(folder, uid, uid)
        for name in files:
            os.chown(Path(folder) / name, uid, uid)


def _fix_for(path: Path) -> str:
    entry = pwd.getpwuid(SERVING_UID)
    from grp import getgrgid

    return f"chown {entry.pw_name}:{getgrgid(entry.pw_gid).gr_name} {path}"


@needs_root
def test_a_key_the_serving_user_could_not_read_is_refused_with_the_chown(
    repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    _give_to(repo.path, SERVING_UID)  # the service's repository
    (key,) = key_files(repo.keys_dir, "timestamp")
    os.chown(key, 0, 0)  # what `sudo edgectl ...` used to leave behind

    assert main(["keys", "expiry", "timestamp", "1", "--repo", str(repo.path)]) == 1
    err = capsys.readouterr().err
    assert f"{key} is owned by root (uid 0) with mode 0600" in err
    assert f"(uid {SERVING_UID}), who runs `edgectl serve`" in err
    assert f"fix: {_fix_for(key)}" in err
    with pytest.raises(RepositoryError, match="could not read"):
        _resign(repo.path)  # serve's check refuses too (and logs it)

    os.chown(key, SERVING_UID, SERVING_UID)  # the fix it named
    assert main(["keys", "expiry", "timestamp", "1", "--repo", str(repo.path)]) == 0


@needs_root
def test_a_lock_the_serving_user_could_not_open_is_refused_with_the_chown(
    repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    _give_to(repo.path, SERVING_UID)
    lock = repo.path / ".lock"
    lock.touch(mode=0o644)
    os.chown(lock, 0, 0)

    assert main(["keys", "rotate", "timestamp", "--repo", str(repo.path)]) == 1
    err = capsys.readouterr().err
    assert f"{lock} is owned by root (uid 0) with mode 0644" in err
    assert "could not open it" in err and f"fix: {_fix_for(lock)}" in err
    assert Repository.open(repo.path).root_version() == 1  # nothing was changed


@needs_root
def test_a_root_command_leaves_keys_and_lock_to_the_serving_user(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    _give_to(repo.path, SERVING_UID)
    assert not (repo.path / ".lock").exists()

    assert main(["keys", "rotate", "timestamp", "--repo", str(repo.path)]) == 0

    lock = (repo.path / ".lock").stat()
    assert (lock.st_uid, stat.S_IMODE(lock.st_mode)) == (SERVING_UID, 0o644)
    (key,) = key_files(repo.keys_dir, "timestamp")
    st = key.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (SERVING_UID, SERVING_UID, 0o600)
    serving = User(SERVING_UID, SERVING_UID, frozenset({SERVING_UID}), "nobody", "nogroup")
    assert may_access(st.st_uid, st.st_gid, st.st_mode, serving, READ)


def test_a_key_readable_by_others_is_warned_about(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    (key,) = key_files(repo.keys_dir, "snapshot")
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert main(["keys", "list", "--repo", str(repo.path)]) == 0
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert f"the key file {key} is readable by other users (mode 0644)" in warnings
    assert f"fix: chmod 600 {key}" in warnings


@pytest.mark.parametrize("role", ["timestamp", "rollout"])
def test_a_rotation_passes_over_the_key_it_revokes_without_a_warning(
    repo: Repository, role: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        assert main(["keys", "rotate", role, "--repo", str(repo.path)]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
