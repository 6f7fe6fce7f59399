"""Key lifecycle: rotation of every role, k-of-n root, the offline root flow, expiry per
role. A python-tuf client bootstrapped with the first root follows every change without
being touched (its fetcher reads the repository folder: the transport is not the point
here; tests/security runs the same over a real HTTP server and a real agent)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent.contracts import ROLLOUT_ROLE, desired_target_path
from controller.base.errors import UsageError
from controller.base.fsio import repo_lock
from controller.repository.ceremony import (
    export_root,
    import_root,
    key_status,
    rotate,
    set_expiry,
    sign_root_file,
)
from controller.repository.keys import key_files, load_key_file
from controller.repository.repo import (
    PENDING_ROOT_FILE,
    Repository,
    RootSignaturesMissingError,
)
from tests.controller.conftest import edgectl_cmd

BASE = "http://repo.invalid/"


class DirFetcher(FetcherInterface):
    """Serves the repository folder to a TUF client (404 for what is not there)."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.repo_dir / url.removeprefix(BASE)
        if not path.is_file():
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([path.read_bytes()])


class Client:
    """A device's trust state: bootstrapped once, refreshed by a new Updater each time."""

    def __init__(self, tmp: Path, repo: Repository) -> None:
        self.dir = tmp / "client"
        self.dir.mkdir()
        self.repo = repo
        self.bootstrap: bytes | None = (repo.metadata_dir / "1.root.json").read_bytes()

    def refresh(self) -> Updater:
        updater = Updater(
            metadata_dir=str(self.dir),
            metadata_base_url=BASE + "metadata/",
            target_base_url=BASE + "targets/",
            fetcher=DirFetcher(self.repo.path),
            bootstrap=self.bootstrap,
        )
        self.bootstrap = None
        updater.refresh()
        return updater

    def trusted(self, role: str) -> int:
        return int(Metadata.from_file(str(self.dir / f"{role}.json")).signed.version)


def _publish_desired(repo: Repository, body: bytes) -> None:
    path = desired_target_path("lab")
    repo.update_targets(ROLLOUT_ROLE, {path: repo.store_target(path, body)})
    repo.publish()


def _signed_by(repo: Repository, role: str) -> set[str]:
    return set(repo.load(role).signatures)


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp", ROLLOUT_ROLE])
def test_rotating_a_role_revokes_its_key_and_clients_follow(
    tmp_path: Path, repo: Repository, role: str
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    old_keyids, _ = repo.role_keys(role)
    root_before = repo.root_version()
    with repo_lock(repo.path):
        result = rotate(repo, role)
    (new_keyid,) = result.new_keyids
    assert repo.role_keys(role) == ([new_keyid], 1)
    assert _signed_by(repo, role) == {new_keyid}
    assert result.revoked == old_keyids
    assert not (repo.keys_dir / f"{role}.pem").exists()  # the revoked key is gone
    assert [load_key_file(p).public_key.keyid for p in key_files(repo.keys_dir, role)] == [
        new_keyid
    ]
    # Top-level roles change in root; the delegated one in targets.
    assert repo.root_version() == root_before + (0 if role == ROLLOUT_ROLE else 1)
    # The client follows: new root (if any), then metadata signed by the new key.
    _publish_desired(repo, b'{"after": "rotation"}')
    updater = client.refresh()
    assert client.trusted("root") == repo.root_version()
    assert updater.get_targetinfo(desired_target_path("lab")) is not None


def test_rotation_refused_while_a_root_waits(tmp_path: Path, repo: Repository) -> None:
    offline = tmp_path / "offline"
    offline.mkdir()
    shutil.move(repo.keys_dir / "root.pem", offline / "root.pem")
    with repo_lock(repo.path):
        result = rotate(repo, "timestamp")
        assert result.pending == repo.path / PENDING_ROOT_FILE
        with pytest.raises(UsageError, match="already waits for signatures"):
            rotate(repo, "snapshot")


def test_k_of_n_root_and_a_root_below_threshold_is_refused(
    tmp_path: Path, repo: Repository
) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    usb = tmp_path / "usb"
    with repo_lock(repo.path):
        result = rotate(repo, "root", count=3, threshold=2, key_out=usb)
    assert result.root_version == 2
    assert repo.role_keys("root")[1] == 2 and len(result.new_keyids) == 3
    assert not (repo.keys_dir / "root.pem").exists()  # the old root key is revoked
    client.refresh()
    assert client.trusted("root") == 2

    # One holder alone cannot make root 3.
    out = tmp_path / "root-3.json"
    with repo_lock(repo.path):
        export_root(Repository.open(repo.path), out)  # no root key here: unsigned
    sign_root_file(out, [result.key_files[0]])
    with pytest.raises(RootSignaturesMissingError, match=r"previous root: 1/2"):
        import_root(repo, out)
    assert repo.root_version() == 2
    # A second holder signs: accepted, and the client follows.
    sign_root_file(out, [result.key_files[2]])
    with repo_lock(repo.path):
        imported = import_root(repo, out)
    assert imported.root_version == 3
    assert not (repo.path / PENDING_ROOT_FILE).exists()
    client.refresh()
    assert client.trusted("root") == 3


def test_offline_root_flow_export_sign_import(tmp_path: Path, repo: Repository) -> None:
    client = Client(tmp_path, repo)
    client.refresh()
    offline = tmp_path / "offline-machine"
    offline.mkdir()
    shutil.move(repo.keys_dir / "root.pem", offline / "root.pem")
    old_targets_key = repo.role_keys("targets")[0]

    # The release key is rotated; root is offline, so the new root waits.
    out = subprocess.run(
        edgectl_cmd("keys", "rotate", "targets", "--repo", repo.path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 3, out.stderr
    assert "root waits for signatures" in out.stdout and "0/1" in out.stdout
    assert Repository.open(repo.path).role_keys("targets")[0] == old_targets_key  # not yet
    assert Repository.open(repo.path).root_version() == 1

    unsigned = tmp_path / "root-unsigned.json"
    subprocess.run(
        edgectl_cmd("keys", "export-root", "--repo", repo.path, "-o", unsigned), check=True
    )
    shutil.copy(unsigned, offline / "root.json")  # carried to the offline machine
    subprocess.run(
        edgectl_cmd("keys", "sign-root", offline / "root.json", "--key", offline / "root.pem"),
        check=True,
    )
    out = subprocess.run(
        edgectl_cmd("keys", "import-root", offline / "root.json", "--repo", repo.path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "published root version 2" in out.stdout
    repo = Repository.open(repo.path)
    assert repo.role_keys("targets")[0] != old_targets_key
    assert _signed_by(repo, "targets") == set(repo.role_keys("targets")[0])
    assert not (repo.keys_dir / "targets.pem").exists()
    client.refresh()
    assert client.trusted("root") == 2
    assert client.trusted("targets") == repo.load("targets").signed.version


def test_an_unsigned_root_is_not_imported(tmp_path: Path, repo: Repository) -> None:
    out = tmp_path / "r.json"
    shutil.move(repo.keys_dir / "root.pem", tmp_path / "root.pem")
    with repo_lock(repo.path):
        export_root(repo, out)
        with pytest.raises(RootSignaturesMissingError, match="lacks signatures"):
            import_root(repo, out)
    assert repo.root_version() == 1


def test_export_root_renews_expiry(tmp_path: Path, repo: Repository) -> None:
    later = datetime.now(UTC) + timedelta(days=300)
    with repo_lock(repo.path):
        result = export_root(repo, tmp_path / "r.json", now=later)
        assert result.missing == ""  # the root key is here: fully signed
        import_root(repo, tmp_path / "r.json")
    assert repo.root_version() == 2
    assert repo.load("root").signed.expires > later + timedelta(days=364)


def test_expiry_per_role_is_kept_and_applied_now_to_online_roles(repo: Repository) -> None:
    before = repo.load("timestamp").signed.version
    with repo_lock(repo.path):
        policy, resigned = set_expiry(repo, "timestamp", 0.25)
    assert policy.timestamp_days == 0.25
    assert list(resigned) == ["timestamp"] and resigned["timestamp"] > before
    left = repo.load("timestamp").signed.expires - datetime.now(UTC)
    assert timedelta(hours=5) < left <= timedelta(hours=6)
    assert Repository.open(repo.path).policy.timestamp_days == 0.25
    with pytest.raises(UsageError, match="at least a minute"):
        set_expiry(repo, "snapshot", 0.0001)


def test_keys_list_cli(repo: Repository) -> None:
    out = subprocess.run(
        edgectl_cmd("keys", "list", "--repo", repo.path), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    for role in ("root", "targets", "snapshot", "timestamp", ROLLOUT_ROLE):
        assert role in out.stdout
    assert [row.present for row in key_status(repo)] == [row.keyids for row in key_status(repo)]
