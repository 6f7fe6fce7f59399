"""The rollout job under the controller lease (controller.fleet.lease): a follower writes
nothing, a leader that lost the lease writes nothing, each promotion is claimed once in
the store, and a promotion claimed by a leader that stopped before writing it is written
once by the next. Real repository, real SQLite store; the lease's clock is injected."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.fleet.lease import LEASE_NAME, Leadership, NotLeaderError
from controller.fleet.store import Claim, TelemetryStore
from controller.fleet.stores import open_store
from controller.repository.release import release_bundle
from controller.repository.repo import Repository
from controller.rollout.service import RolloutService, promotion_of
from controller.rollout.stages import RolloutState
from tests.controller.rollout.test_service import T0, _percent, _report_fleet, _start


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = open_store(str(tmp_path / "telemetry.sqlite"))
    yield s
    s.close()


def _lead(store: TelemetryStore, name: str, clock: Clock) -> Leadership:
    lead = Leadership(name, 30.0, clock)
    lead.renewed(clock.t, store.lease_claim(LEASE_NAME, name, 30.0))
    return lead


def test_only_the_leader_promotes_and_each_promotion_is_claimed_once(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], "lab", repo.path)
    r = _start(repo.path, bundles["v2"])
    clock = Clock()
    leader = _lead(store, "a", clock)
    follower = _lead(store, "b", clock)
    assert leader.is_leader and not follower.is_leader
    _report_fleet(store, repo.path, T0 + 10)
    # the follower's job does nothing, even when a promotion is due
    RolloutService(repo.path, store, leadership=follower).run_once()
    assert _percent(repo.path) == 5
    with pytest.raises(NotLeaderError):
        RolloutService(repo.path, store, leadership=follower).tick(T0 + 61)
    assert _percent(repo.path) == 5 and store.promotions() == []
    (after,) = RolloutService(repo.path, store, leadership=leader).tick(T0 + 61)
    assert after.stage == 1 and _percent(repo.path) == 25
    (claim,) = store.promotions(r.id)
    assert (claim.stage, claim.percent, claim.holder, claim.epoch) == (1, 25.0, "a", 1)


def test_a_leader_past_its_lease_by_its_own_clock_writes_nothing(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], "lab", repo.path)
    _start(repo.path, bundles["v2"])
    clock = Clock()
    leader = _lead(store, "a", clock)
    service = RolloutService(repo.path, store, leadership=leader)
    _report_fleet(store, repo.path, T0 + 10)
    clock.t += 24.0  # lease 30 s, margin 6 s: no longer leading (the row still says a)
    service.run_once()
    with pytest.raises(NotLeaderError):
        service.tick(T0 + 61)
    assert _percent(repo.path) == 5 and store.promotions() == []


def test_a_claim_the_database_refuses_writes_nothing(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], "lab", repo.path)
    _start(repo.path, bundles["v2"])
    clock = Clock()
    leader = _lead(store, "a", clock)
    # someone took the lease over in the store (a released lease, then b)
    store.lease_release(LEASE_NAME, "a", 1)
    assert store.lease_claim(LEASE_NAME, "b", 30.0)[:2] == ("b", 2)
    assert leader.is_leader  # by its own clock, still: the database fences the claim
    _report_fleet(store, repo.path, T0 + 10)
    with pytest.raises(NotLeaderError, match="refused epoch 1"):
        RolloutService(repo.path, store, leadership=leader).tick(T0 + 61)
    assert _percent(repo.path) == 5 and store.promotions() == []


def test_a_promotion_claimed_by_a_leader_that_stopped_before_writing_it_is_written_once(
    repo: Repository, bundles: dict[str, Path], store: TelemetryStore
) -> None:
    release_bundle(bundles["v1"], "lab", repo.path)
    r = _start(repo.path, bundles["v2"])
    clock = Clock()
    _lead(store, "a", clock)
    # a claimed stage 2 and died before writing desired state
    assert store.claim_promotion(r.id, 1, 25.0, LEASE_NAME, "a", 1) is Claim.CLAIMED
    store.lease_release(LEASE_NAME, "a", 1)
    successor = _lead(store, "b", clock)
    _report_fleet(store, repo.path, T0 + 10)
    (after,) = RolloutService(repo.path, store, leadership=successor).tick(T0 + 61)
    assert after.stage == 1 and _percent(repo.path) == 25
    assert [(p.stage, p.holder) for p in store.promotions(r.id)] == [(1, "a")]


def test_promotion_of_names_the_stage_moved_to() -> None:
    from dataclasses import replace

    from agent.contracts import ProbationPolicy
    from controller.rollout.gates import parse_gates
    from controller.rollout.stages import OnFailure, new_rollout

    r = new_rollout(
        rollout_id="r", fleet="f", model="m", version="2", previous="1", stages=(10, 100),
        wait_s=1, deadline_s=9, gates=parse_gates("min_devices=1"), now=0.0, canaries=(),
        on_failure=OnFailure.PAUSE, probation=ProbationPolicy(),
    )  # fmt: skip
    assert promotion_of(r, replace(r, stage=1)) == 1
    assert promotion_of(r, replace(r, state=RolloutState.COMPLETED)) == 2
    assert promotion_of(r, replace(r, state=RolloutState.PAUSED)) is None
    assert promotion_of(r, r) is None
    assert promotion_of(replace(r, state=RolloutState.PAUSED), replace(r, stage=1)) is None
