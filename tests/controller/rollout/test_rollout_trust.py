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

from agent.contracts import (
    ROLLOUT_ROLE,
    DesiredState,
    ModelRelease,
    ProbationPolicy,
    bundle_target_path,
    desired_target_path,
)
from agent.device.config import AgentConfig, InferenceConfig, RepositoryConfig
from agent.runtime.registry import ModelRegistry
from agent.telemetry.reporter import IntervalStats
from agent.update.journal import Phase, serving_version
from agent.update.lifecycle import ModelLifecycle
from agent.update.store import ModelStore
from agent.update.updater import UpdateService
from controller.build.builder import build_bundle
from controller.repository.release import publish_bundle, release_bundle
from controller.repository.repo import Repository
from tests.controller.conftest import MODEL
from tests.helpers import make_linear_model

FLEET = "lab"
OFFLINE = ("root", "targets")


class Device:
    def __init__(self, tmp: Path, repo: Path, url: str) -> None:
        self.config = AgentConfig(
            device_id="dev-1",
            fleet=FLEET,
            state_dir=tmp / "state",
            trusted_root=repo / "metadata" / "root.json",
            repository=RepositoryConfig(url=url, poll_jitter_s=0),
            inference=InferenceConfig(socket_path=tmp / "infer.sock"),
        )
        self.registry = ModelRegistry()
        self.lifecycle = ModelLifecycle(
            self.config, self.registry, ModelStore(tmp / "state" / "models"), IntervalStats()
        )
        self.updates = UpdateService(self.config, self.lifecycle)

    def check(self) -> Any:
        result = self.updates.check()
        self.lifecycle.judge_probation()  # probation of 0 s: commit now
        return result

    def running(self) -> tuple[Phase, str | None]:
        record = self.lifecycle.record(MODEL)
        return record.phase, record.version

    def serving(self) -> str | None:
        """The version the journal says serves, checked against the loaded session."""
        version = serving_version(self.lifecycle.record(MODEL))
        assert self.registry.snapshot()[MODEL].version == version
        return version


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
    entry = ModelRelease(
        version=version,
        target=bundle_target_path(MODEL, version),
        rollout_id=f"evil-{version}",
        percent=100.0,
        previous="1.0.0",
        previous_target=bundle_target_path(MODEL, "1.0.0"),
        probation=ProbationPolicy(duration_s=0),
    )
    desired = DesiredState(fleet=FLEET, models={MODEL: entry}, issued_at="x")
    path = desired_target_path(FLEET)
    changes = {path: repo.store_target(path, desired.to_json_bytes())}
    for target_path, data in extra_targets.items():
        changes[target_path] = repo.store_target(target_path, data)
    repo.update_targets(ROLLOUT_ROLE, changes, now)
    repo.publish(now)


@pytest.fixture
def device(
    tmp_path: Path, repo: Repository, bundles: dict[str, Path], start_serve: Callable[..., Any]
) -> Device:
    release_bundle(bundles["v1"], FLEET, repo.path, probation=ProbationPolicy(duration_s=0))
    served = start_serve(repo.path)
    dev = Device(tmp_path / "device", repo.path, served.url)
    dev.check()
    assert dev.running() == (Phase.COMMITTED, "1.0.0")
    return dev


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
    assert device.running() == (Phase.FAILED, "6.6.6")  # refused before any byte came
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
    assert device.running() == (Phase.FAILED, "6.6.6")  # refused before any byte came
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
    assert device.running() == (Phase.COMMITTED, "2.0.0")
