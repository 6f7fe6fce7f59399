"""Every secret `edgectl` writes is never readable beyond its final mode, at no instant
(issue #18, defect 4): the signing keys (`init`, `keys rotate`), the device CA's key, an
enrollment archive holding a device key (`device add`), the broker's and controller's
keys (`broker config`), each checked at the instant its data reaches the disk."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controller.cli import main as edgectl_main
from controller.identity.ca import CREATING_DIR
from tests.secret_writes import FsyncWatch, shared_dir, watching_fsyncs


def _edgectl(*argv: str | Path) -> None:
    assert edgectl_main([str(a) for a in argv]) == 0


def _secret_writes(
    watch: FsyncWatch, target: Path, mode: int, written_as: Path | None = None
) -> None:
    """``target`` was written (once or more, as ``written_as`` when it is written there
    and then moved), each time 0``mode`` and closed to others."""
    writes = watch.temporaries_of(written_as or target)
    assert writes, f"{target} was not written"
    assert {(oct(s.mode), s.readable_by_nobody) for s in writes} == {(oct(mode), False)}
    assert oct(stat.S_IMODE(target.stat().st_mode)) == oct(mode)


def test_edgectl_writes_every_key_with_its_final_mode_from_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with shared_dir() as root, watching_fsyncs(monkeypatch, probe_under=root) as watch:
        repo, broker, archive = root / "repo", root / "broker", root / "cam-1.tar"
        _edgectl("init", repo)
        _edgectl("keys", "rotate", "targets", "--repo", repo)
        _edgectl("device", "add", "cam-1", "--fleet", "north", "--repo", repo, "-o", archive,
                 "--repository-url", "https://updates.example/", "--broker", "mq:8883")  # fmt: skip
        _edgectl("broker", "config", "--repo", repo, "-o", broker, "--host", "mq.example")

        keys = sorted((repo / "keys").iterdir())
        assert len(keys) >= 5, keys  # a key per role, and the rotated targets key
        for key in keys:
            _secret_writes(watch, key, 0o600)
        # A new CA is written in ca/.creating, then moved into place (controller.identity.ca).
        ca_key = repo / "ca" / "ca.key"
        _secret_writes(watch, ca_key, 0o600, ca_key.parent / CREATING_DIR / ca_key.name)
        _secret_writes(watch, archive, 0o600)  # it holds the device's private key
        # mosquitto reads its key after dropping to its own group: 0640, never others.
        _secret_writes(watch, broker / "broker.key", 0o640)
        _secret_writes(watch, broker / "controller.key", 0o640)
        # The probe does see what others may read: the broker's certificate, same instant.
        assert {s.readable_by_nobody for s in watch.temporaries_of(broker / "broker.crt")} == {True}
