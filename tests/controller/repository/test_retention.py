"""Old metadata versions and desired-state files are deleted, never what a device may
still need (issue 19, item 9): every root version stays, the current chain and the
versions before it that a client in the middle of an update may read stay, and every
desired-state file a kept rollout version names stays. A device that trusts only the
first root still updates from the pruned repository (python-tuf over real HTTP)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from agent.contracts import (
    ROLLOUT_ROLE,
    ModelRelease,
    ProbationPolicy,
    bundle_target_path,
    desired_target_path,
)
from controller.base.fsio import repo_lock
from controller.repository.release import write_model_release
from controller.repository.repo import Repository
from controller.repository.retention import MetadataRetention, prune_metadata

DAY = 86400.0


def release(percent: float) -> ModelRelease:
    return ModelRelease(
        version="2.0.0",
        target=bundle_target_path("lin", "2.0.0"),
        rollout_id="lin-2.0.0-test",
        percent=percent,
        previous="1.0.0",
        previous_target=bundle_target_path("lin", "1.0.0"),
        canaries=(),
        probation=ProbationPolicy(),
    )


def change_desired_state(repo: Repository, fleet: str, times: int) -> None:
    for i in range(times):
        with repo_lock(repo.path):
            write_model_release(
                Repository.open(repo.path), fleet, "lin", release(1.0 + i), datetime.now(UTC)
            )


def versions(repo: Repository, role: str) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in repo.metadata_dir.glob(f"*.{role}.json"))


def desired_files(repo: Repository, fleet: str) -> set[str]:
    return {p.name for p in (repo.targets_dir / "fleets" / fleet).glob("*.desired.json")}


@pytest.fixture
def http_repo(repo: Repository) -> Iterator[str]:
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(repo.path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_old_versions_go_and_what_clients_need_stays(
    repo: Repository, http_repo: str, tmp_path: Path
) -> None:
    first_root = (repo.metadata_dir / "root.json").read_bytes()
    change_desired_state(repo, "south", 1)  # changed once, long ago: still its desired state
    change_desired_state(repo, "north", 30)
    with repo_lock(repo.path):  # a few targets versions too
        for _ in range(3):
            r = Repository.open(repo.path)
            r.update_targets("targets", {})
            r.publish()
    current = Repository.open(repo.path).versions()
    roots = versions(repo, "root")
    snapshots, targets = versions(repo, "snapshot"), versions(repo, "targets")
    assert len(versions(repo, "snapshot")) > 30 and len(desired_files(repo, "north")) == 30

    # Too young: nothing is deleted whatever its version.
    assert prune_metadata(repo.path, time.time(), MetadataRetention(keep_versions=5)) == []

    removed = prune_metadata(repo.path, time.time() + 2 * DAY, MetadataRetention(5, DAY))
    assert removed
    assert versions(repo, "root") == roots and (repo.metadata_dir / "root.json").exists()
    # The current version and the 5 before it, by rank (versions are not consecutive).
    assert versions(repo, "snapshot") == snapshots[-6:] and snapshots[-1] == current["snapshot"]
    assert versions(repo, "targets") == targets[-6:] and len(targets) == 4
    kept_rollout = versions(repo, ROLLOUT_ROLE)
    assert kept_rollout[-1] == current[ROLLOUT_ROLE] and len(kept_rollout) <= 6
    # Every kept snapshot's targets and rollout versions are there.
    kept = Repository.open(repo.path)
    for role in ("targets", ROLLOUT_ROLE, "snapshot", "timestamp"):
        kept.load(role)
    # Desired states: one file per kept rollout version of north, south's single one.
    assert len(desired_files(repo, "south")) == 1
    assert 1 <= len(desired_files(repo, "north")) <= len(kept_rollout)
    for fleet in ("north", "south"):
        assert kept.read_target(ROLLOUT_ROLE, desired_target_path(fleet)) is not None

    # A device that trusts only the first root still follows the chain and its state.
    client = tmp_path / "client"
    (client / "meta").mkdir(parents=True)
    updater = Updater(
        metadata_dir=str(client / "meta"),
        metadata_base_url=f"{http_repo}/metadata/",
        target_dir=str(client),
        target_base_url=f"{http_repo}/targets/",
        bootstrap=first_root,
    )
    updater.refresh()
    info = updater.get_targetinfo(desired_target_path("north"))
    assert info is not None
    updater.download_target(info)

    # A second pass finds nothing more to delete.
    assert prune_metadata(repo.path, time.time() + 2 * DAY, MetadataRetention(5, DAY)) == []
