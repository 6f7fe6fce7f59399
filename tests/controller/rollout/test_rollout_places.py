"""Each device's place in a rollout, stored once per rollout so that a tick counts by an
index instead of hashing every device id (issue 21, item 5).

The agent decides by ``device_bucket`` (``resolve_release``); the controller counts by
``device_buckets`` stored in the telemetry store (``place_rollout``, then
``count_places``). Both must agree for every id and every stage: checked here on many
ids, on SQLite and PostgreSQL. And who places them: `edgectl rollout start` (then the
first tick reads no id at all), else the first tick, once (then a restarted service
does not either); the places of a rollout that ended are dropped.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import replace
from pathlib import Path

import pytest

from agent.contracts import device_bucket, device_buckets, resolve_release
from controller.cli import main as edgectl_main
from controller.fleet.records import HeartbeatFacts, IngestBatch
from controller.fleet.store import TelemetryStore
from controller.fleet.stores import open_store
from controller.repository.release import release_bundle
from controller.repository.repo import Repository
from controller.rollout.service import RolloutService, place_rollout
from controller.rollout.stages import RolloutState, desired_release
from controller.rollout.store import RolloutStore
from tests.controller.rollout.test_evidence import FLEET, MODEL, SETTINGS, T0, _rollout

# Stages an operator may give, the edges included.
PERCENTS = (0.0, 0.001, 0.5, 1.0, 5.0, 10.0, 33.3, 50.0, 66.7, 99.0, 99.999, 100.0)


def _ids(rng: random.Random, n: int) -> list[str]:
    """Device names of the shapes names allow, varied lengths (so the hashed input spans
    SHA-256 block boundaries with each rollout id)."""
    alphabet = string.ascii_lowercase + string.digits + "-_."
    out = {f"dev-{i:06d}" for i in range(n // 2)}
    while len(out) < n:
        out.add(rng.choice(string.ascii_lowercase) + "".join(
            rng.choice(alphabet) for _ in range(rng.randrange(0, 70))
        ))  # fmt: skip
    return sorted(out)


def test_device_buckets_is_device_bucket_for_every_id() -> None:
    rng = random.Random(5)
    ids = _ids(rng, 20_000)
    for rollout_id in ("", "r", "lin-2.0.0-0a1b2c3d", "x" * 55, "y" * 64, "z" * 130):
        assert device_buckets(rollout_id, ids) == [device_bucket(rollout_id, d) for d in ids]


def _fleet(store: TelemetryStore, devices: list[str], at: float = T0) -> None:
    model = (MODEL, "1.0.0", "committed", 1, 0, 0, None)
    rows = [
        (HeartbeatFacts(FLEET, d, "t", 10.0, {}, 0, 0, (model,), "t1", 1), at, "{}")
        for d in devices
    ]
    for start in range(0, len(rows), 2000):
        store.write(IngestBatch(heartbeat_facts=rows[start : start + 2000]))


def test_the_controller_counts_the_devices_the_agents_rule_gives_the_new_version(
    store: TelemetryStore,
) -> None:
    rng = random.Random(21)
    devices = _ids(rng, 12_000)
    _fleet(store, devices)
    r = _rollout(T0)
    generation, placed = place_rollout(store, r)
    assert placed == len(devices) and generation > 0
    assert store.places_generation(r.id) == generation
    canaries = (*rng.sample(devices, 5), "dev-never-seen")
    service = RolloutService(Path("unused"), store, SETTINGS)
    for percent in PERCENTS:
        staged = replace(r, stages=(percent, 100.0), stage=0, canaries=canaries)
        release = desired_release(staged)
        assert release.percent == percent and release.rollout_id == r.id
        # The agent's rule, device by device.
        given = [d for d in devices if resolve_release(release, d) == (r.version, release.target)]
        assert store.count_places(r.id, percent) == sum(
            1 for d in devices if device_bucket(r.id, d) < percent
        )
        counts = service.fleet_counts(staged)
        assert counts["devices_known"] == len(devices)
        assert counts["expected"] == len(given), percent
    assert 0 < store.count_places(r.id, 50.0) < len(devices)


def test_the_first_tick_reads_no_id_nor_writes_once_the_devices_are_placed(
    store: TelemetryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = [f"dev-{i:04d}" for i in range(500)]
    _fleet(store, devices)
    r = _rollout(T0)
    place_rollout(store, r)  # what `edgectl rollout start` does
    reads: list[str] = []
    read_ids = store.fleet_device_ids
    monkeypatch.setattr(store, "fleet_device_ids", lambda f: reads.append(f) or read_ids(f))
    # Devices added and removed after the placing are followed, not read again.
    _fleet(store, ["dev-late-1", "dev-late-2"], T0 + 10)
    store.prune_devices(T0 - 1.0, [(FLEET, "dev-0007")], T0 + 11)
    generation = store.places_generation(r.id)
    counts = RolloutService(Path("unused"), store, SETTINGS).fleet_counts(r)
    assert reads == []
    assert store.places_generation(r.id) == generation  # followed in memory only
    assert store.count_places(r.id, 100.0) == len(devices)
    now = [*(d for d in devices if d != "dev-0007"), "dev-late-1", "dev-late-2"]
    release = desired_release(r)
    assert counts["devices_known"] == len(now)
    assert counts["expected"] == sum(1 for d in now if resolve_release(release, d)[0] == "2.0.0")  # type: ignore[index]


def test_without_places_each_service_reads_the_ids_once_and_writes_nothing(
    store: TelemetryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fleet(store, [f"dev-{i:04d}" for i in range(300)])
    r = _rollout(T0)
    reads: list[str] = []
    read_ids = store.fleet_device_ids
    monkeypatch.setattr(store, "fleet_device_ids", lambda f: reads.append(f) or read_ids(f))
    service = RolloutService(Path("unused"), store, SETTINGS)
    first = service.fleet_counts(r)
    assert service.fleet_counts(r) == first
    assert reads == [FLEET] and store.places_generation(r.id) is None
    # `edgectl serve` restarted: it reads them again (nothing placed them).
    assert RolloutService(Path("unused"), store, SETTINGS).fleet_counts(r) == first
    assert reads == [FLEET, FLEET]


def test_rollout_start_places_the_devices_and_the_places_go_when_the_rollout_ends(
    repo: Repository, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    store = open_store(str(repo.path / "telemetry.sqlite"))  # where serve keeps it
    try:
        devices = [f"dev-{i:03d}" for i in range(200)]
        _fleet(store, devices)
        argv = ["rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo", str(repo.path),
                "--bundle", str(bundles["v2"]), "--stages", "10,100", "--json"]  # fmt: skip
        assert edgectl_main(argv) == 0
        rollout_id = json.loads(capsys.readouterr().out)["id"]
        assert store.placed_rollouts() == [rollout_id]
        assert store.count_places(rollout_id, 100.0) == len(devices)
        (r,) = RolloutStore(repo.path).active()
        assert r.id == rollout_id
        service = RolloutService(repo.path, store, SETTINGS)
        (ticked,) = service.tick()
        assert ticked.last_report["devices_known"] == len(devices)
        assert edgectl_main(["rollout", "abort", MODEL, "--fleet", FLEET, "--repo",
                             str(repo.path)]) == 0  # fmt: skip
        capsys.readouterr()
        assert RolloutStore(repo.path).load(rollout_id).state is RolloutState.ABORTED
        # The next rollout start drops the places of the one that ended.
        again = ["rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo",
                 str(repo.path), "--stages", "50,100", "--json"]  # fmt: skip
        assert edgectl_main(again) == 0
        second = json.loads(capsys.readouterr().out)["id"]
        assert second != rollout_id
        assert store.placed_rollouts() == [second]
        assert store.count_places(rollout_id, 100.0) == 0
    finally:
        store.close()


def test_rollout_start_says_when_it_could_not_place_the_devices(
    repo: Repository, bundles: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    release_bundle(bundles["v1"], FLEET, repo.path)
    argv = ["rollout", "start", MODEL, "2.0.0", "--fleet", FLEET, "--repo", str(repo.path),
            "--bundle", str(bundles["v2"])]  # fmt: skip
    assert edgectl_main(argv) == 0
    out = capsys.readouterr().out
    assert "devices: not placed (no telemetry store at " in out
    assert "the first rollout tick of `edgectl serve` places them" in out
