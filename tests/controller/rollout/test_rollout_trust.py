"""A compromised rollout key cannot make a device install a bundle the release key never
signed.

The attacker holds what a compromised ``edgectl serve`` holds: the online keys (rollout,
snapshot, timestamp). The offline keys (root, targets) are moved out of the repository
for the attack, so any attempt to use them would fail. The device is the real agent
update path (``UpdateService`` + ``ModelLifecycle``: TUF refresh, desired state,
download, verify, unpack, golden vectors) against a real ``edgectl serve`` over HTTP.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import ROLLOUT_ROLE, ProbationPolicy, bundle_target_path, desired_target_path
from agent.device.config import RepositoryConfig
from agent.update.journal import Phase
from controller.build.builder import build_bundle
from controller.repository.release import publish_bundle, release_bundle
from controller.repository.repo import Repository
from tests.controller.conftest import MODEL
from tests.helpers import make_linear_model
from tests.security.conftest import FLEET, Device
from tests.security.simulator import evil_desired_state

OFFLINE = ("root", "targets")


@contextmanager
def online_keys_only(repo: Path) -> Iterator[None]:
    """What a compromised controller holds: the offline keys are not there."""
    keys = repo / "keys"
    away = repo.parent / "offline-keys"
    away.mkdir()
    for role in OFFLINE:
        shutil.move(keys / f"{role}.pem", away / f"{role}.pem")
    try:
        yield
    finally:
        for role in OFFLINE:
            shutil.move(away / f"{role}.pem", keys / f"{role}.pem")
        away.rmdir()


def sign_desired(repo_dir: Path, version: str, extra_targets: dict[str, bytes]) -> None:
    """The attacker signs a desired state naming ``version`` for everyone, and any extra
    targets, with the rollout key; then a snapshot and a timestamp (online keys)."""
    repo = Repository.open(repo_dir)
    now = datetime.now(UTC).replace(microsecond=0)
    path = desired_target_path(FLEET)
    changes = {path: repo.store_target(path, evil_desired_state(FLEET, MODEL, version))}
    for target_path, data in extra_targets.items():
        changes[target_path] = repo.store_target(target_path, data)
    repo.update_targets(ROLLOUT_ROLE, changes, now)
    repo.publish(now)


@pytest.fixture
def device(
    tmp_path: Path, repo: Repository, bundles: dict[str, Path], start_serve: Callable[..., Any]
) -> Iterator[Device]:
    release_bundle(bundles["v1"], FLEET, repo.path, probation=ProbationPolicy(duration_s=0))
    served = start_serve(repo.path)
    root = repo.path / "metadata" / "root.json"
    dev = Device(tmp_path / "device", root, RepositoryConfig(url=served.url, poll_jitter_s=0))
    dev.check()
    assert dev.phase() == (Phase.COMMITTED, "1.0.0")
    yield dev
    dev.close()


def _evil_bundle(tmp_path: Path, version: str) -> bytes:
    model = make_linear_model(tmp_path / "evil.onnx", seed=66)
    return build_bundle(model, MODEL, version, tmp_path / "evil.bundle", 4).path.read_bytes()


def test_desired_state_naming_an_unsigned_bundle_is_refused(
    tmp_path: Path, repo: Repository, device: Device
) -> None:
    evil = _evil_bundle(tmp_path, "6.6.6")
    with online_keys_only(repo.path):
        # The bytes sit in the repository's targets folder, but only the rollout role
        # signs the desired state that names them.
        repo.store_target(bundle_target_path(MODEL, "6.6.6"), evil)
        sign_desired(repo.path, "6.6.6", {})
    result = device.check()
    assert "which no signed targets list" in result.refused[MODEL]
    assert device.phase() == (Phase.FAILED, "6.6.6")  # refused before any byte came
    assert device.serving() == "1.0.0"


def test_a_bundle_signed_by_the_rollout_role_is_refused(
    tmp_path: Path, repo: Repository, device: Device
) -> None:
    evil = _evil_bundle(tmp_path, "6.6.6")
    with online_keys_only(repo.path):
        # The rollout role lists the bundle itself, with its correct hash: TUF ignores
        # it, because the delegation covers fleets/*/* only.
        sign_desired(repo.path, "6.6.6", {bundle_target_path(MODEL, "6.6.6"): evil})
    rollout_targets = Repository.open(repo.path).load(ROLLOUT_ROLE).signed.targets
    assert bundle_target_path(MODEL, "6.6.6") in rollout_targets  # the attack is in place
    result = device.check()
    assert "which no signed targets list" in result.refused[MODEL]
    assert device.phase() == (Phase.FAILED, "6.6.6")  # refused before any byte came
    assert device.serving() == "1.0.0"
    assert not list((device.config.state_dir / "models" / MODEL).glob("6.6.6*"))


def test_the_rollout_key_can_still_move_signed_bundles(
    repo: Repository, bundles: dict[str, Path], device: Device
) -> None:
    """The control case: the same attack on a version the release key published works,
    so the refusals above come from the signature split, not from a broken test."""
    publish_bundle(bundles["v2"], repo.path)  # release key, no fleet changed
    assert device.check().installed == {}
    with online_keys_only(repo.path):
        sign_desired(repo.path, "2.0.0", {})
    assert device.check().installed == {MODEL: "2.0.0"}
    assert device.phase() == (Phase.COMMITTED, "2.0.0")
