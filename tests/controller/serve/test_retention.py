"""``edgectl serve``'s pruning pass applies every retention rule with its ``[serve]``
settings (issue 19, item 9): a real repository with an enrolled and a revoked device,
rollout records and many metadata versions, and a real SQLite store."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from agent.contracts import Event
from controller.app import prune_once
from controller.fleet.records import HeartbeatFacts, IngestBatch
from controller.fleet.stores import open_store
from controller.identity.devices import add_device, revoke_device
from controller.repository.repo import Repository
from controller.rollout.stages import RolloutState
from controller.rollout.store import RolloutStore
from controller.serve.config import ServeConfig, load_serve_config
from tests.controller.enroll_support import OPTIONS
from tests.controller.repository.test_retention import change_desired_state, versions
from tests.controller.rollout.test_retention import record

DAY = 86400.0


def beat(device: str, at: float) -> IngestBatch:
    model = ("lin", "1.0.0", "committed", 1, 0, 0, None)
    facts = HeartbeatFacts("lab", device, "0.1.0", 10.0, {}, 0, 0, (model,))
    return IngestBatch(heartbeat_facts=[(facts, at, "{}")])


def test_one_pass_prunes_every_kind(repo: Repository, tmp_path: Path) -> None:
    now = time.time() + 2 * DAY  # every file written below is two days old by then
    add_device(repo.path, "cam-live", "lab", OPTIONS)
    add_device(repo.path, "cam-revoked", "lab", OPTIONS)
    revoke_device(repo.path, "cam-revoked")
    store = open_store(str(tmp_path / "telemetry.sqlite"))
    try:
        store.write(beat("cam-live", now - 60.0))
        store.write(beat("cam-revoked", now - 2 * DAY))
        store.write(beat("cam-gone", now - 100 * DAY))
        old = Event("cam-gone", "lab", "s", 1, "t", "install_started", "lin", "1.0.0")
        store.write(IngestBatch(events=[(old, now - 100 * DAY)]))
        records = RolloutStore(repo.path)
        for n in range(1, 5):
            records.save(
                replace(
                    record(n, RolloutState.COMPLETED, 200 + n), updated_at=now - (200 + n) * DAY
                )
            )
        change_desired_state(repo, "lab", 10)
        config = replace(
            ServeConfig(repo_dir=repo.path),
            rollout_keep_per_model=2,
            metadata_keep_versions=3,
        )

        prune_once(store, config, now, 0.0)

        assert [d.device for d in store.devices()] == ["cam-live"]  # silent, revoked: gone
        assert store.count("events") == 0 and store.count("heartbeats") == 1
        assert [r.version for r in records.all()] == ["2.0.0", "1.0.0"]
        current = Repository.open(repo.path).versions()["snapshot"]
        assert versions(repo, "snapshot") == list(range(current - 3, current + 1))
    finally:
        store.close()


def test_the_retention_settings_are_serve_keys(tmp_path: Path) -> None:
    keys = {
        "device_retention_s": 100.0,
        "revoked_device_retention_s": 200.0,
        "model_retention_s": 300.0,
        "rollout_retention_s": 400.0,
        "rollout_keep_per_model": 5,
        "metadata_keep_versions": 6,
        "metadata_min_age_s": 700.0,
    }
    toml = tmp_path / "controller.toml"
    toml.write_text('[serve]\nrepo = "r"\n' + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    config = load_serve_config(toml, {}, {})
    assert {k: getattr(config, k) for k in keys} == keys
    default = load_serve_config(None, {}, {"repo": "r"})
    assert (default.device_retention_s, default.metadata_keep_versions) == (90 * DAY, 20)
