"""File errors end ``edgectl`` with one line, never a traceback (issue 19, defect 10).

Every ``OSError`` a command meets (a missing repository, a read-only folder, a full disk,
a file-size limit) prints ``edgectl: error: <path>: <cause>; <what to do>`` and exits 1.
The repository stays consistent: a device's python-tuf client verifies it afterwards
(its trust kept from before the fault, and a fresh one from the first root), and the
same command succeeds once the cause is gone.

The faults are real: a read-only bind mount (``mount -o remount,bind,ro``: root ignores
file modes, not a read-only mount), a 16 MiB tmpfs filled to its last byte, and
``RLIMIT_FSIZE`` in a subprocess with SIGXFSZ ignored (writes past it fail with EFBIG).
Mounting needs root and CAP_SYS_ADMIN; without them those cases skip, saying so.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from controller.cli import main
from controller.rollout.store import RolloutStore
from tests.controller.conftest import MODEL, edgectl_cmd
from tests.controller.device_view import device_desired, trusted_updater

if TYPE_CHECKING:
    from tests.chaos.fleet import StateDisk

FLEET = "lab"


# ---------------------------------------------------------------------------- helpers


def _versions(repo_dir: Path) -> dict[str, int]:
    """The repository's published metadata versions, as ``edgectl`` reports them."""
    from controller.repository.repo import Repository

    return Repository.open(repo_dir).versions()


def _one_line_error(code: int, err: str) -> str:
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgectl: error: "), err
    return lines[0]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _verifies(repo_dir: Path, device: Path, fresh: Path) -> str:
    """The fleet's version as a device that trusted the repository before the fault sees
    it, checked against a client bootstrapped from the first root now."""
    seen = device_desired(repo_dir, device, FLEET).models[MODEL]
    again = device_desired(repo_dir, fresh, FLEET).models[MODEL]
    assert seen == again
    return seen.version


def _start(repo_dir: Path, bundle: Path) -> list[str]:
    return ["rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo", str(repo_dir),
            "--bundle", str(bundle), "--stages", "5,100", "--wait", "60s"]  # fmt: skip


# What each command is run with, and what runs first once the repository exists (so the
# command has something to act on).
COMMANDS: dict[str, tuple[Callable[[Path, dict[str, Path]], list[str]], list[str]]] = {
    "release": (
        lambda r, b: ["release", str(b["v2"]), "--fleet", FLEET, "--repo", str(r)],
        [],
    ),
    "rollout-start": (lambda r, b: _start(r, b["v2"]), []),
    "rollout-pause": (
        lambda r, b: ["rollout", "pause", MODEL, "--fleet", FLEET, "--repo", str(r)],
        ["start"],
    ),
    "keys-rotate": (lambda r, b: ["keys", "rotate", "timestamp", "--repo", str(r)], []),
}


def _prepare(repo_dir: Path, bundles: dict[str, Path], steps: list[str]) -> None:
    assert main(["init", str(repo_dir)]) == 0
    assert main(["release", str(bundles["v1"]), "--fleet", FLEET, "--repo", str(repo_dir)]) == 0
    if "start" in steps:
        assert main(_start(repo_dir, bundles["v2"])) == 0


class ReadOnly:
    """Makes folders read-only for root too: each is bind-mounted onto itself, then the
    bind is remounted read-only. ``writable`` undoes it (so does the fixture's end)."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def __call__(self, folder: Path) -> None:
        bind = subprocess.run(
            ["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True
        )
        if bind.returncode != 0:
            pytest.skip(f"cannot bind-mount {folder} here (no CAP_SYS_ADMIN?): {bind.stderr}")
        self.mounted.append(folder)
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True
        )

    def writable(self, folder: Path) -> None:
        self.mounted.remove(folder)
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


@pytest.fixture
def read_only() -> Iterator[ReadOnly]:
    from tests.chaos.fleet import have_root

    if not have_root():
        pytest.skip("needs root and mount(8) to make a folder read-only for root itself")
    mounts = ReadOnly()
    try:
        yield mounts
    finally:
        for folder in reversed(mounts.mounted):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# ---------------------------------------------------------------------------- cases


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_repository_says_how_to_create_one(
    tmp_path: Path, bundles: dict[str, Path], command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo_dir = tmp_path / "repo"
    argv, steps = COMMANDS[command]
    line = _one_line_error(*_run(argv(repo_dir, bundles), capsys))
    assert str(repo_dir) in line and f"`edgectl init {repo_dir}`" in line, line
    assert not repo_dir.exists()  # nothing was created on the way
    _prepare(repo_dir, bundles, steps)
    assert _run(argv(repo_dir, bundles), capsys)[0] == 0


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_read_only_repository_is_one_line_and_nothing_changes(
    tmp_path: Path,
    bundles: dict[str, Path],
    read_only: ReadOnly,
    command: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo_dir = tmp_path / "repo"
    argv, steps = COMMANDS[command]
    _prepare(repo_dir, bundles, steps)
    device = tmp_path / "device"
    version = _verifies(repo_dir, device, tmp_path / "fresh-1")
    versions = _versions(repo_dir)
    read_only(repo_dir)
    line = _one_line_error(*_run(argv(repo_dir, bundles), capsys))
    assert str(repo_dir) in line and "Read-only file system (EROFS)" in line, line
    assert "remount it read-write" in line, line
    assert _versions(repo_dir) == versions
    assert _verifies(repo_dir, device, tmp_path / "fresh-2") == version
    read_only.writable(repo_dir)
    assert _run(argv(repo_dir, bundles), capsys)[0] == 0
    trusted_updater(repo_dir, device)  # the device follows what the command signed
    _verifies(repo_dir, device, tmp_path / "fresh-3")


def test_a_read_only_metadata_folder_stops_a_release_half_way_and_nothing_is_published(
    tmp_path: Path,
    bundles: dict[str, Path],
    read_only: ReadOnly,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bundle is stored, then signing fails: no snapshot names anything new, and the
    release run again publishes it."""
    repo_dir = tmp_path / "repo"
    _prepare(repo_dir, bundles, [])
    device = tmp_path / "device"
    assert _verifies(repo_dir, device, tmp_path / "fresh-1") == "1.0.0"
    versions = _versions(repo_dir)
    metadata = repo_dir / "metadata"
    read_only(metadata)
    release = ["release", str(bundles["v2"]), "--fleet", FLEET, "--repo", str(repo_dir)]
    line = _one_line_error(*_run(release, capsys))
    assert re.search(rf"{metadata}/[0-9]+\.targets\.json: Read-only file system \(EROFS\)", line), (
        line
    )
    assert any((repo_dir / "targets" / "bundles" / MODEL).glob("*.2.0.0.bundle"))
    assert _versions(repo_dir) == versions
    assert _verifies(repo_dir, device, tmp_path / "fresh-2") == "1.0.0"
    read_only.writable(metadata)
    assert _run(release, capsys)[0] == 0
    assert _verifies(repo_dir, device, tmp_path / "fresh-3") == "2.0.0"


def test_a_rollout_start_that_cannot_sign_leaves_its_record_abandoned(
    tmp_path: Path,
    bundles: dict[str, Path],
    read_only: ReadOnly,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The record is saved, publishing fails: the record is discarded at once (defect 2)
    and the start run again goes ahead."""
    repo_dir = tmp_path / "repo"
    _prepare(repo_dir, bundles, [])
    assert main(["release", str(bundles["v2"]), "--fleet", "other", "--repo", str(repo_dir)]) == 0
    device = tmp_path / "device"
    metadata = repo_dir / "metadata"
    read_only(metadata)
    line = _one_line_error(*_run(_start(repo_dir, bundles["v2"]), capsys))
    assert "Read-only file system (EROFS)" in line and str(metadata) in line, line
    assert [r.state.value for r in RolloutStore(repo_dir).all()] == ["abandoned"]
    assert _verifies(repo_dir, device, tmp_path / "fresh-1") == "1.0.0"
    read_only.writable(metadata)
    assert _run(_start(repo_dir, bundles["v2"]), capsys)[0] == 0
    entry = device_desired(repo_dir, device, FLEET).models[MODEL]
    assert (entry.version, entry.percent) == ("2.0.0", 5.0)


def test_a_full_disk_is_one_line_and_the_release_goes_through_once_there_is_room(
    tmp_path: Path,
    bundles: dict[str, Path],
    small_disk: StateDisk,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo_dir = small_disk.mountpoint / "repo"
    _prepare(repo_dir, bundles, [])
    device = tmp_path / "device"
    versions = _versions(repo_dir)
    assert _verifies(repo_dir, device, tmp_path / "fresh-1") == "1.0.0"
    small_disk.fill()
    release = ["release", str(bundles["v2"]), "--fleet", FLEET, "--repo", str(repo_dir)]
    line = _one_line_error(*_run(release, capsys))
    assert str(repo_dir) in line and "No space left on device (ENOSPC)" in line, line
    assert "free space there" in line, line
    assert _versions(repo_dir) == versions
    assert _verifies(repo_dir, device, tmp_path / "fresh-2") == "1.0.0"
    small_disk.free()
    assert _run(release, capsys)[0] == 0
    assert _verifies(repo_dir, device, tmp_path / "fresh-3") == "2.0.0"


def _limited(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: both survive it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(
    ("command", "limit"),
    [("release", 4096), ("rollout-start", 512)],
    ids=["release-4KiB", "rollout-start-512B"],
)
def test_a_file_size_limit_is_one_line_and_the_command_goes_through_without_it(
    tmp_path: Path, bundles: dict[str, Path], command: str, limit: int
) -> None:
    repo_dir = tmp_path / "repo"
    argv, steps = COMMANDS[command]
    _prepare(repo_dir, bundles, steps)
    if command == "rollout-start":  # the bundle is published already: only small files
        assert (
            main(["release", str(bundles["v2"]), "--fleet", "other", "--repo", str(repo_dir)]) == 0
        )
    device = tmp_path / "device"
    versions = _versions(repo_dir)
    before = _verifies(repo_dir, device, tmp_path / "fresh-1")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        edgectl_cmd(*argv(repo_dir, bundles)),
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_limited(limit),
        timeout=120,
    )
    line = _one_line_error(proc.returncode, proc.stderr)
    assert str(repo_dir) in line and "File too large (EFBIG)" in line, line
    assert "`ulimit -f`" in line, line
    assert _versions(repo_dir) == versions
    assert _verifies(repo_dir, device, tmp_path / "fresh-2") == before
    assert not RolloutStore(repo_dir).active()  # nothing left to publish later
    proc = subprocess.run(
        edgectl_cmd(*argv(repo_dir, bundles)), capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert _verifies(repo_dir, device, tmp_path / "fresh-3") == "2.0.0"
