from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError

import pytest
from tuf.ngclient import Updater

from agent.contracts import (
    ProbationPolicy,
    bundle_target_path,
    desired_target_path,
    parse_desired_state,
)
from controller.base.errors import ConflictError, RepositoryError
from controller.repository.release import next_desired_state, release_bundle
from controller.repository.repo import Repository
from tests.controller.conftest import MODEL, Served, edgectl_cmd

FLEET = "lab"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _updater(repo: Repository, url: str, client: Path) -> Updater:
    (client / "meta").mkdir(parents=True, exist_ok=True)
    (client / "dl").mkdir(exist_ok=True)
    updater = Updater(
        metadata_dir=str(client / "meta"),
        metadata_base_url=f"{url}/metadata/",
        target_dir=str(client / "dl"),
        target_base_url=f"{url}/targets/",
        bootstrap=(repo.metadata_dir / "root.json").read_bytes(),
    )
    updater.refresh()
    return updater


def test_release_bumps_versions_and_sets_previous(
    repo: Repository, bundles: dict[str, Path]
) -> None:
    first = release_bundle(bundles["v1"], FLEET, repo.path)
    assert first.bundle_added and first.fleet_changed
    assert first.versions == {"root": 1, "targets": 2, "snapshot": 2, "timestamp": 2, "rollout": 2}
    second = release_bundle(bundles["v2"], FLEET, repo.path)
    assert second.versions == {"root": 1, "targets": 3, "snapshot": 3, "timestamp": 3, "rollout": 3}
    raw = repo.read_target("rollout", desired_target_path(FLEET))
    assert raw is not None
    entry = parse_desired_state(raw, FLEET).models[MODEL]
    assert (entry.version, entry.previous) == ("2.0.0", "1.0.0")
    assert entry.previous_target == bundle_target_path(MODEL, "1.0.0")
    assert entry.rollout_id.startswith(f"{MODEL}-2.0.0-") and entry.percent == 100.0


def test_same_bytes_again_is_idempotent_and_repoints(
    repo: Repository, bundles: dict[str, Path]
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    again = release_bundle(bundles["v1"], FLEET, repo.path)
    assert not again.bundle_added and not again.fleet_changed
    assert again.versions["timestamp"] == 2
    other_fleet = release_bundle(bundles["v1"], "field", repo.path)
    assert not other_fleet.bundle_added and other_fleet.fleet_changed
    assert other_fleet.versions["targets"] == 2 and other_fleet.versions["rollout"] == 3
    assert repo.fleets() == ["field", FLEET]


def test_same_version_different_bytes_is_refused(
    repo: Repository, bundles: dict[str, Path]
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    before = sorted(p.name for p in repo.metadata_dir.iterdir())
    with pytest.raises(ConflictError, match="already released with different content"):
        release_bundle(bundles["v1-other"], FLEET, repo.path)
    out = subprocess.run(
        edgectl_cmd("release", bundles["v1-other"], "--fleet", FLEET, "--repo", repo.path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "version 1.0.0 of lin is already released with different content" in out.stderr
    assert "bump the version" in out.stderr
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == before


def test_release_into_no_repository_names_init(tmp_path: Path, bundles: dict[str, Path]) -> None:
    with pytest.raises(RepositoryError, match="edgectl init"):
        release_bundle(bundles["v1"], FLEET, tmp_path / "nothing")


def test_next_desired_state_keeps_other_models() -> None:
    policy = ProbationPolicy()
    a = next_desired_state(None, FLEET, "a", "1.0.0", "r1", "t", policy)
    assert a is not None and a.models["a"].previous is None
    b = next_desired_state(a, FLEET, "b", "3.0.0", "r2", "t")
    assert b is not None and set(b.models) == {"a", "b"}
    assert next_desired_state(b, FLEET, "a", "1.0.0", "r3", "t") is None


def test_updater_downloads_desired_state_and_bundle(
    repo: Repository,
    bundles: dict[str, Path],
    start_serve: Callable[..., Served],
    tmp_path: Path,
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    served = start_serve(repo.path)
    updater = _updater(repo, served.url, tmp_path / "client")
    info = updater.get_targetinfo(desired_target_path(FLEET))
    assert info is not None
    desired = parse_desired_state(Path(updater.download_target(info)).read_bytes(), FLEET)
    assert desired.models[MODEL].version == "1.0.0"

    release_bundle(bundles["v2"], FLEET, repo.path)
    updater = _updater(repo, served.url, tmp_path / "client")
    desired_info = updater.get_targetinfo(desired_target_path(FLEET))
    assert desired_info is not None
    desired = parse_desired_state(Path(updater.download_target(desired_info)).read_bytes(), FLEET)
    entry = desired.models[MODEL]
    assert (entry.version, entry.previous) == ("2.0.0", "1.0.0")
    bundle_info = updater.get_targetinfo(entry.target)
    assert bundle_info is not None
    path = Path(updater.download_target(bundle_info))
    assert path.read_bytes() == bundles["v2"].read_bytes()


def test_serve_exposes_only_public_files(
    repo: Repository, bundles: dict[str, Path], start_serve: Callable[..., Served]
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    url = start_serve(repo.path).url
    with urllib.request.urlopen(f"{url}/metadata/timestamp.json", timeout=5) as resp:
        assert json.load(resp)["signed"]["version"] == 2
    for path in (
        "/metadata/../keys/root.pem",
        "/metadata/%2e%2e/keys/root.pem",
        "/targets/..%2Fkeys%2Froot.pem",
        "/metadata/",
        "/targets/bundles",
        "/metadata/3.root.json",
        "/keys/root.pem",
        "/edgectl.json",
    ):
        with pytest.raises(HTTPError) as err:
            urllib.request.urlopen(f"{url}{path}", timeout=5)
        assert err.value.code == 404, path
