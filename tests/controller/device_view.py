"""What a device trusts: a python-tuf client bootstrapped with the repository's first root
reads a fleet's desired state and checks the bundles it names.

The fetcher reads the repository folder (what ``edgectl serve`` serves over HTTP): the
transport is not the point where this is used, the signed metadata is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from agent.contracts import (
    DesiredState,
    ModelRelease,
    bundle_target_path,
    desired_target_path,
    parse_desired_state,
)

BASE = "http://repo.invalid/"


class DirFetcher(FetcherInterface):
    """Serves a repository folder to a TUF client (404 for what is not there)."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.repo_dir / url.removeprefix(BASE)
        if not path.is_file():
            raise DownloadHTTPError(f"{url} not found", 404)
        return iter([path.read_bytes()])


def trusted_updater(repo_dir: Path, client_dir: Path) -> Updater:
    """A refreshed TUF client; its trust starts at ``1.root.json`` the first time and is
    kept in ``client_dir`` (a device's metadata folder) after that."""
    client_dir.mkdir(parents=True, exist_ok=True)
    (client_dir / "dl").mkdir(exist_ok=True)
    first = not (client_dir / "root.json").exists()
    updater = Updater(
        metadata_dir=str(client_dir),
        metadata_base_url=BASE + "metadata/",
        target_dir=str(client_dir / "dl"),
        target_base_url=BASE + "targets/",
        fetcher=DirFetcher(repo_dir),
        bootstrap=(repo_dir / "metadata" / "1.root.json").read_bytes() if first else None,
    )
    updater.refresh()
    return updater


def device_desired(repo_dir: Path, client_dir: Path, fleet: str) -> DesiredState:
    """The fleet's desired state as a device verifies it, with every bundle it names
    (``version`` and ``previous``) present in the signed top-level targets."""
    updater = trusted_updater(repo_dir, client_dir)
    info = updater.get_targetinfo(desired_target_path(fleet))
    assert info is not None, f"no signed desired state for fleet {fleet}"
    path = updater.download_target(info)
    desired = parse_desired_state(Path(path).read_bytes(), fleet)
    for model, entry in desired.models.items():
        for version in (entry.version, entry.previous):
            if version is not None:
                target = bundle_target_path(model, version)
                assert updater.get_targetinfo(target) is not None, f"{target} is not signed"
    return desired


def device_entry(repo_dir: Path, client_dir: Path, fleet: str, model: str) -> ModelRelease:
    return device_desired(repo_dir, client_dir, fleet).models[model]
