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
    initial = repo.versions()
    first = release_bundle(bundles["v1"], FLEET, repo.path)
    assert first.bundle_added and first.fleet_changed
    second = release_bundle(bundles["v2"], FLEET, repo.path)
    # Each release signs a higher version of every role but root (repo.next_version).
    for role in ("targets", "snapshot", "timestamp", "rollout"):
        assert initial[role] < first.versions[role] < second.versions[role], role
    assert first.versions["root"] == second.versions["root"] == 1
    raw = repo.read_target("rollout", desired_target_path(FLEET))
    assert raw is not None
    entry = parse_desired_state(raw, FLEET).models[MODEL]
    assert (entry.version, entry.previous) == ("2.0.0", "1.0.0")
    assert entry.previous_target == bundle_target_path(MODEL, "1.0.0")
    assert entry.rollout_id.startswith(f"{MODEL}-2.0.0-") and entry.percent == 100.0


def test_same_bytes_again_is_idempotent_and_repoints(
    repo: Repository, bundles: dict[str, Path]
) -> None:
    first = release_bundle(bundles["v1"], FLEET, repo.path)
    again = release_bundle(bundles["v1"], FLEET, repo.path)
    assert not again.bundle_added and not again.fleet_changed
    assert again.versions == first.versions  # nothing signed
    other_fleet = release_bundle(bundles["v1"], "field", repo.path)
    assert not other_fleet.bundle_added and other_fleet.fleet_changed
    assert other_fleet.versions["targets"] == first.versions["targets"]
    assert other_fleet.versions["rollout"] > first.versions["rollout"]
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
    released = release_bundle(bundles["v1"], FLEET, repo.path)
    url = start_serve(repo.path).url
    with urllib.request.urlopen(f"{url}/metadata/timestamp.json", timeout=5) as resp:
        assert json.load(resp)["signed"]["version"] == released.versions["timestamp"]
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


def test_release_publishes_a_delta_from_earlier_versions_and_list_shows_it(
    repo: Repository, bundles: dict[str, Path]
) -> None:
    from agent.contracts.bundle_container import read_container
    from agent.contracts.delta import apply_delta, delta_target_path
    from controller.repository.history import load_releases
    from controller.repository.history_view import release_json, render_list, render_show

    release_bundle(bundles["v1"], FLEET, repo.path)
    second = release_bundle(bundles["v2"], FLEET, repo.path)
    path = delta_target_path(MODEL, "2.0.0", "1.0.0")
    targets = repo.load("targets").signed.targets
    assert second.deltas == (("1.0.0", targets[path].length),)
    assert targets[path].length <= 0.8 * second.length
    # What is published rebuilds the released bundle from 1.0.0's members.
    delta = repo.target_file_path(path, targets[path]).read_bytes()
    base = dict(read_container(bundles["v1"].read_bytes())[1])
    rebuilt = apply_delta(
        delta, base.__getitem__, model=MODEL, old="1.0.0", new="2.0.0", max_output_bytes=1 << 30
    )
    assert rebuilt == bundles["v2"].read_bytes()

    releases = load_releases(repo.path, MODEL)
    assert [r.deltas for r in releases] == [(), (("1.0.0", targets[path].length),)]
    assert "1.0.0:" in render_list(releases).splitlines()[2]
    assert "delta    from 1.0.0:" in render_show(releases[1])
    assert release_json(releases[1])["deltas"] == [{"from": "1.0.0", "bytes": targets[path].length}]


def test_delta_from_zero_publishes_none(repo: Repository, bundles: dict[str, Path]) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    assert release_bundle(bundles["v2"], FLEET, repo.path, delta_from=0).deltas == ()
    assert not [p for p in repo.load("targets").signed.targets if p.endswith(".delta")]


def test_a_delta_over_the_margin_is_not_published(
    repo: Repository, bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from controller.repository import release as release_module

    monkeypatch.setattr(release_module, "DELTA_MAX_SHARE", 0.01)
    release_bundle(bundles["v1"], FLEET, repo.path)
    second = release_bundle(bundles["v2"], FLEET, repo.path)
    assert second.deltas == ()
    ((old, why),) = second.deltas_skipped
    assert old == "1.0.0" and "of the bundle: not kept" in why
    assert not [p for p in repo.load("targets").signed.targets if p.endswith(".delta")]


def test_deltas_are_made_before_the_lock_and_published_as_made(
    repo: Repository, bundles: dict[str, Path]
) -> None:
    from agent.contracts.delta import delta_target_path
    from controller.repository.release import prepare_deltas

    release_bundle(bundles["v1"], FLEET, repo.path)
    target = bundle_target_path(MODEL, "2.0.0")
    prepared = prepare_deltas(repo.path, target, bundles["v2"].read_bytes(), 2)
    v1 = repo.load("targets").signed.targets[bundle_target_path(MODEL, "1.0.0")]
    assert list(prepared) == [("1.0.0", v1.hashes["sha256"])]
    release_bundle(bundles["v2"], FLEET, repo.path)
    path = delta_target_path(MODEL, "2.0.0", "1.0.0")
    published = repo.load("targets").signed.targets[path]
    assert repo.target_file_path(path, published).read_bytes() == next(iter(prepared.values()))
    # Published already: nothing to prepare.
    assert prepare_deltas(repo.path, target, bundles["v2"].read_bytes(), 2) == {}
