"""Faults at the update path's boundaries (issue 18, defects 1 and 6), on a real device
update path (``UpdateService`` + ``ModelLifecycle``) against a real HTTP mirror.

- The delegated ``rollout`` role is loaded lazily, after the refresh: garbled, endless
  or cut at that request, the check must report it and return (not raise), the device
  keeps serving, and once the mirror behaves the release installs.
- The state folder fails under an install (read-only, out of inodes: real tmpfs
  conditions): the check returns, the journal is left in a state the next check
  recovers from, and the release installs once the disk is healthy.
- The cached TUF root is emptied or truncated, as a power cut leaves a file renamed
  before its data reached the disk: the device starts again from its enrolled root,
  walks the rotations forward and keeps following the fleet.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.contracts import ROLLOUT_ROLE
from agent.update.journal import Phase
from controller.base.fsio import repo_lock
from controller.repository.ceremony import rotate
from controller.repository.repo import Repository
from tests.security.conftest import MODEL, Device, quick_repository, release
from tests.security.simulator import Behaviour, Cut, Endless, HostileMirror, Replace


def rollout_url(repo: Repository) -> str:
    """The URL path of the rollout role the next check must fetch (consistent snapshot)."""
    return f"/metadata/{int(repo.load(ROLLOUT_ROLE).signed.version)}.{ROLLOUT_ROLE}.json"


def _garbled(repo: Repository) -> Behaviour:
    raw = (repo.metadata_dir / rollout_url(repo).rsplit("/", 1)[1]).read_bytes()
    return Replace(raw[: len(raw) // 2])


ROLLOUT_FAULTS: dict[str, Callable[[Repository], Behaviour]] = {
    "garbled": _garbled,
    "endless": lambda repo: Endless(),
    "cut": lambda repo: Cut(0.5),
}


@pytest.mark.parametrize("fault", sorted(ROLLOUT_FAULTS))
def test_a_bad_rollout_role_fails_the_check_and_the_next_one_installs(
    fault: str,
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
) -> None:
    release(repo, bundles["2.0.0"])
    url = rollout_url(repo)
    mirror.set(url, ROLLOUT_FAULTS[fault](repo))

    result = device.check()  # must return, not raise
    assert result.error is not None, result
    assert "rollout" in result.error, result.error
    assert mirror.fetched(url), "the fault was never reached"
    assert device.phase() == (Phase.COMMITTED, "1.0.0")
    assert device.serving() == "1.0.0"

    mirror.clear()
    assert device.check().installed == {MODEL: "2.0.0"}
    assert device.serving() == "2.0.0"


# ---------------------------------------------------------------------------- disk faults


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")


def _remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


@pytest.fixture
def tmpfs_device(
    tmp_path: Path, repo: Repository, mirror: HostileMirror, bundles: dict[str, Path]
) -> Iterator[Callable[[Callable[[str, Phase], None]], Device]]:
    """Makes a device whose state folder is its own small tmpfs, serving 1.0.0, with a
    phase hook (called right after each journal record is persisted)."""
    folder = tmp_path / "tmpfs-device"
    state = folder / "state"
    _mount_tmpfs(state, "size=64m,nr_inodes=400")
    made: list[Device] = []

    def make(hook: Callable[[str, Phase], None]) -> Device:
        release(repo, bundles["1.0.0"])
        device = Device(
            folder, repo.metadata_dir / "1.root.json", quick_repository(mirror.url), phase_hook=hook
        )
        made.append(device)
        assert device.check().installed == {MODEL: "1.0.0"}
        assert device.phase() == (Phase.COMMITTED, "1.0.0")
        return device

    try:
        yield make
    finally:
        for device in made:
            device.close()
        subprocess.run(["mount", "-o", "remount,rw", str(state)], check=False)
        subprocess.run(["umount", "-l", str(state)], check=False)


@pytest.mark.parametrize(
    "phase", [Phase.DOWNLOADING, Phase.VERIFIED, Phase.STAGED, Phase.SMOKE_TESTED]
)
def test_a_state_folder_gone_read_only_mid_install_is_recovered_by_the_next_check(
    phase: Phase,
    repo: Repository,
    bundles: dict[str, Path],
    tmpfs_device: Callable[[Callable[[str, Phase], None]], Device],
) -> None:
    """The state folder turns read-only right after ``phase`` is persisted: the phase's
    work and every journal write after it fail (EROFS). The check returns; the journal
    still says ``phase``; the next check, on a writable disk again, installs."""
    armed: list[Path] = []  # the state folder, once 1.0.0 serves

    def turn_read_only(model: str, entered: Phase) -> None:
        if entered is phase and armed:
            _remount(armed.pop(), "ro")

    device = tmpfs_device(turn_read_only)
    armed.append(device.config.state_dir)
    release(repo, bundles["2.0.0"])

    result = device.check()  # must return, not raise
    assert MODEL in result.refused, result
    assert "Read-only file system" in result.refused[MODEL], result.refused
    assert device.phase() == (phase, "2.0.0")  # the last record the disk took
    assert device.serving() == "1.0.0"

    _remount(device.config.state_dir, "rw")
    assert device.check().installed == {MODEL: "2.0.0"}
    assert device.phase() == (Phase.COMMITTED, "2.0.0")
    assert device.serving() == "2.0.0"


def test_no_inode_left_while_unpacking_puts_the_install_back(
    repo: Repository,
    bundles: dict[str, Path],
    tmpfs_device: Callable[[Callable[[str, Phase], None]], Device],
) -> None:
    """Right after ``verified`` is persisted, something else takes every free inode of
    the state folder: unpacking fails (ENOSPC). The install goes back to idle (a full
    disk is not the release's fault), and installs once the inodes are free again."""
    armed: list[Path] = []  # the state folder, once 1.0.0 serves
    fillers: list[Path] = []

    def take_every_inode(model: str, entered: Phase) -> None:
        if entered is not Phase.VERIFIED or not armed:
            return
        folder = armed.pop() / "filler"
        folder.mkdir()
        fillers.append(folder)
        for n in range(100_000):
            try:
                (folder / str(n)).touch()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return
        raise AssertionError("the tmpfs never ran out of inodes")

    device = tmpfs_device(take_every_inode)
    armed.append(device.config.state_dir)
    release(repo, bundles["2.0.0"])

    result = device.check()  # must return, not raise
    assert fillers, "the hook never ran"
    assert MODEL in result.refused, result
    assert "No space left on device" in result.refused[MODEL], result.refused
    phase, version = device.phase()
    assert (phase, version) == (Phase.IDLE, "1.0.0")  # put back, not failed
    assert "No space left on device" in device.lifecycle.record(MODEL).reason
    assert device.serving() == "1.0.0"

    subprocess.run(["rm", "-rf", str(fillers[0])], check=True)
    assert device.check().installed == {MODEL: "2.0.0"}
    assert device.serving() == "2.0.0"


# ---------------------------------------------------------------------------- the root cache


def _rotate_root(repo: Repository) -> None:
    with repo_lock(repo.path):
        rotate(repo, "root")


@pytest.mark.parametrize("damage", ["emptied", "truncated"])
def test_a_cached_root_damaged_by_a_power_cut_is_rebuilt_from_the_enrolled_root(
    damage: str,
    repo: Repository,
    device: Device,
    bundles: dict[str, Path],
) -> None:
    """Root rotated to v2 and trusted; then the power cut leaves ``root_history/2.root.json``
    (what ``root.json`` links to) empty or half written. The device starts again from its
    enrolled root v1, walks forward to v2 (fetched again), installs the next release, and
    follows a later rotation to v3."""
    _rotate_root(repo)
    assert device.check().error is None
    assert device.trusted_version("root") == 2
    cached = device.config.state_dir / "tuf" / "root_history" / "2.root.json"
    assert (device.config.state_dir / "tuf" / "root.json").resolve() == cached.resolve()
    raw = cached.read_bytes()
    cached.write_bytes(b"" if damage == "emptied" else raw[: len(raw) // 2])

    release(repo, bundles["2.0.0"])
    result = device.check()
    assert result.installed == {MODEL: "2.0.0"}, result
    assert device.trusted_version("root") == 2
    assert cached.read_bytes() == raw  # fetched again and verified, not trusted from disk

    _rotate_root(repo)
    release(repo, bundles["3.0.0"])
    assert device.check().installed == {MODEL: "3.0.0"}
    assert device.trusted_version("root") == 3
    assert device.serving() == "3.0.0"


def test_a_check_does_not_write_again_the_cached_metadata_it_holds(device: Device) -> None:
    """Every check persists the trusted root again. ``DurableUpdater`` (an override of
    python-tuf's ``Updater._persist_file``) writes durably, and skips bytes already there:
    the file is the same one afterwards. A python-tuf that renamed the hook would rewrite
    it through a new file, without fsync, and this would fail."""
    cached = device.config.state_dir / "tuf" / "root_history" / "1.root.json"
    before = cached.stat()
    assert device.check().error is None
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
