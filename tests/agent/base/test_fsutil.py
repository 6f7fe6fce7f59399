"""``atomic_write``, the one durable write of the agent and the controller: a secret's
temporary file is never readable beyond the secret's mode (issue #18, defect 4), and
writers of one file never share a temporary file."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from agent.base.fsutil import atomic_write
from controller.base import fsio
from tests.secret_writes import shared_dir, watching_fsyncs


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o400], ids=oct)
def test_the_temporary_file_has_the_final_mode_when_the_data_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    target = tmp_path / "secret.key"
    with watching_fsyncs(monkeypatch) as watch:
        atomic_write(target, b"k" * 100, mode=mode)
    (synced,) = watch.temporaries_of(target)
    assert (synced.size, oct(synced.mode)) == (100, oct(mode))
    assert oct(stat.S_IMODE(target.stat().st_mode)) == oct(mode)
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077], ids=oct)
def test_the_umask_neither_widens_nor_narrows_the_mode(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a", b"x", mode=0o600)
        atomic_write(tmp_path / "b", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((tmp_path / "a").stat().st_mode)) == oct(0o600)
    assert oct(stat.S_IMODE((tmp_path / "b").stat().st_mode)) == oct(0o644)


def test_another_user_cannot_open_a_secret_while_it_is_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with shared_dir() as folder, watching_fsyncs(monkeypatch, probe_under=folder) as watch:
        atomic_write(folder / "device.key", b"-----BEGIN PRIVATE KEY-----", mode=0o600)
        atomic_write(folder / "device.crt", b"-----BEGIN CERTIFICATE-----", mode=0o644)
    (key,) = watch.temporaries_of(folder / "device.key")
    assert key.readable_by_nobody is False
    # The probe can see a readable file: the public certificate is one, at the same instant.
    (cert,) = watch.temporaries_of(folder / "device.crt")
    assert cert.readable_by_nobody is True


def test_the_temporary_file_is_created_new_never_through_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", spy)
    atomic_write(tmp_path / "device.key", b"k", mode=0o600)
    monkeypatch.undo()
    (tmp, flags, mode) = next(c for c in created if c[1] & os.O_CREAT)
    assert Path(tmp).name.startswith(".device.key.tmp-")
    assert flags & os.O_EXCL and flags & os.O_NOFOLLOW
    assert mode & ~0o600 == 0  # owner-only until the data is in and the mode is set


def test_writers_of_one_file_never_share_a_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "journal.json"
    payloads = [bytes([65 + i]) * 4096 for i in range(6)]
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            for _ in range(40):
                atomic_write(target, data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert target.read_bytes() in payloads  # whole, one writer's
    assert [p.name for p in tmp_path.iterdir()] == ["journal.json"]


def test_the_controller_writes_through_the_same_function() -> None:
    assert fsio.atomic_write is atomic_write
