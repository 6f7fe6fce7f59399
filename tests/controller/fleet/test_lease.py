"""The controller lease: the pure rule on an injected clock, and the store's lease row
(SQLite and PostgreSQL) with its epochs and the fenced promotion claim."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.fleet.lease import (
    Leadership,
    LeaseKeeper,
    LeaseRow,
    NotLeaderError,
    dead_local_holder,
    holds,
    leader_json,
    leader_line,
    safety_margin,
)
from controller.fleet.store import Claim
from controller.fleet.stores import open_store
from controller.serve.metrics import render_leadership
from tests.controller.test_store_support import store_for

BACKENDS = ["sqlite", "postgres"]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_rule_leads_only_until_lease_less_margin_after_the_renewal_was_sent() -> None:
    assert not holds(None, 5.0, 15.0, 3.0)
    assert holds(100.0, 100.0, 15.0, 3.0)
    assert holds(100.0, 111.9, 15.0, 3.0)
    assert not holds(100.0, 112.0, 15.0, 3.0)
    assert safety_margin(15.0) == 3.0


def test_a_holder_whose_renewals_fail_gives_up_before_the_lease_can_be_taken() -> None:
    clock = Clock()
    lead = Leadership("a", 15.0, clock)
    assert lead.token() is None
    assert lead.renewed(clock.t, LeaseRow("a", 1, 15.0))  # gained: epoch 1
    assert lead.check("x").epoch == 1
    sent = clock.t
    clock.t += 5.0
    assert not lead.renewed(sent + 0.5, LeaseRow("a", 1, 15.0))  # a renewal: same epoch
    # every renewal now fails (store gone, process stopped): nothing updates the view
    clock.t = sent + 0.5 + 11.9
    assert lead.is_leader
    clock.t = sent + 0.5 + 12.0  # lease_s - margin after the last renewal was SENT
    assert not lead.is_leader
    with pytest.raises(NotLeaderError, match="does not hold the controller lease"):
        lead.check("promoting")
    # the store's deadline is at least 15 s after the renewal was sent: 3 s later still


def test_a_slow_renewal_counts_from_when_it_was_sent() -> None:
    clock = Clock()
    lead = Leadership("a", 10.0, clock)
    sent = clock.t
    clock.t += 7.9  # the statement took 7.9 s to come back
    lead.renewed(sent, LeaseRow("a", 3, 10.0))
    assert lead.is_leader
    clock.t = sent + 8.0
    assert not lead.is_leader


def test_the_old_leader_continued_after_a_stop_does_not_act_and_follows_the_new_epoch() -> None:
    clock = Clock()
    lead = Leadership("a", 15.0, clock)
    lead.renewed(clock.t, LeaseRow("a", 4, 15.0))
    clock.t += 60.0  # SIGSTOP for a minute: the monotonic clock kept counting
    assert lead.token() is None
    assert not lead.renewed(clock.t, LeaseRow("b", 5, 14.0))  # b took over: epoch 5
    assert lead.token() is None and lead.epoch == 5
    # it takes the lease back later only with a new epoch
    assert lead.renewed(clock.t, LeaseRow("a", 6, 15.0))
    token = lead.token()
    assert token is not None and token.epoch == 6
    assert lead.takeovers == 2


def test_an_expired_row_read_back_is_no_leadership() -> None:
    clock = Clock()
    lead = Leadership("a", 15.0, clock)
    assert not lead.renewed(clock.t, LeaseRow("a", 2, -1.0))
    assert not lead.is_leader


def test_leader_views() -> None:
    assert leader_json(None) == {"leader": None, "epoch": 0, "expires_in_s": None}
    assert leader_json(LeaseRow("h-1", 3, 9.96)) == {
        "leader": "h-1",
        "epoch": 3,
        "expires_in_s": 10.0,
        "last_holder": "h-1",
    }
    assert leader_json(LeaseRow("h-1", 3, -2.0))["leader"] is None
    assert leader_line(LeaseRow("h-1", 3, 4.0)) == "leader: h-1 (epoch 3, lease expires in 4.0 s)"
    assert "expired" in leader_line(LeaseRow("h-1", 3, -4.0))
    assert "none" in leader_line(None)


def test_monotonic_clock_counts_while_a_process_is_stopped() -> None:
    """The rule relies on it: CLOCK_MONOTONIC (time.monotonic) is not paused by SIGSTOP."""
    code = (
        "import sys, time\n"
        "t = time.monotonic()\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "sys.stdin.readline()\n"
        "print(time.monotonic() - t, flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        elapsed = float(proc.stdout.readline())
        assert elapsed >= time.monotonic() - stopped - 0.5 >= 0.5  # the stop was counted
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_store_gives_the_lease_to_one_holder_and_a_new_epoch_at_each_takeover(
    backend: str, tmp_path: Path
) -> None:
    with store_for(backend, tmp_path) as store:
        assert store.lease_read("controller") is None
        first = store.lease_claim("controller", "a", 2.0)
        assert (first.holder, first.epoch) == ("a", 1) and 0 < first.remaining_s <= 2.0
        # b finds it held; a renews (same epoch)
        assert store.lease_claim("controller", "b", 2.0)[:2] == ("a", 1)
        assert store.lease_claim("controller", "a", 2.0)[:2] == ("a", 1)
        # a stops renewing: b takes it once expired, with epoch 2
        deadline = time.monotonic() + 10
        while (row := store.lease_claim("controller", "b", 2.0)).holder != "b":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert row.epoch == 2
        # a's renewal fails now: the row has another holder
        assert store.lease_claim("controller", "a", 2.0)[:2] == ("b", 2)
        # a clean release lets a take it at once, with a new epoch
        store.lease_release("controller", "b", 2)
        assert store.lease_claim("controller", "a", 2.0)[:2] == ("a", 3)
        read = store.lease_read("controller")
        assert read is not None and read[:2] == ("a", 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_promotion_is_claimed_once_and_only_under_the_held_epoch(
    backend: str, tmp_path: Path
) -> None:
    with store_for(backend, tmp_path) as store:
        store.lease_claim("controller", "a", 30.0)
        assert store.claim_promotion("r1", 1, 10.0, "controller", "a", 1) is Claim.CLAIMED
        assert store.claim_promotion("r1", 1, 10.0, "controller", "a", 1) is Claim.CLAIMED_BEFORE
        # a stale epoch or another holder: refused by the database
        assert store.claim_promotion("r1", 2, 50.0, "controller", "a", 0) is Claim.NOT_LEADER
        assert store.claim_promotion("r1", 2, 50.0, "controller", "b", 1) is Claim.NOT_LEADER
        assert store.claim_promotion("r1", 2, 50.0, "controller", "a", 1) is Claim.CLAIMED
        rows = store.promotions("r1")
        assert [(p.stage, p.percent, p.holder, p.epoch) for p in rows] == [
            (1, 10.0, "a", 1),
            (2, 50.0, "a", 1),
        ]
        assert store.promotions("other") == []


def test_a_dead_holder_of_this_host_is_told_from_a_live_or_foreign_one() -> None:
    def alive(pid: int) -> bool:
        return pid == 42

    assert dead_local_holder("box-7", "box", alive)
    assert not dead_local_holder("box-42", "box", alive)  # still runs
    assert not dead_local_holder("other-7", "box", alive)  # another host: wait for expiry
    assert not dead_local_holder("ctl-a", "box", alive)  # not HOSTNAME-PID
    assert dead_local_holder("my-box-7", "my-box", alive)


def test_keepers_on_one_store_elect_one_leader_and_a_clean_stop_hands_over_at_once(
    tmp_path: Path,
) -> None:
    store = open_store(str(tmp_path / "t.sqlite"))
    gained: list[tuple[str, int]] = []
    try:
        a = LeaseKeeper(store, Leadership("a", 5.0), lambda t: gained.append((t.holder, t.epoch)))
        b = LeaseKeeper(store, Leadership("b", 5.0), lambda t: gained.append((t.holder, t.epoch)))
        a.renew_once()
        b.renew_once()
        assert a.leadership.is_leader and not b.leadership.is_leader
        assert b.leadership.seen is not None and b.leadership.seen.holder == "a"
        a.stop()  # releases: b takes it at its next try, epoch 2
        b.renew_once()
        assert b.leadership.is_leader and not a.leadership.is_leader
        assert gained == [("a", 1), ("b", 2)]
    finally:
        store.close()


def test_a_lease_held_by_a_dead_process_of_this_host_is_taken_at_once(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "t.sqlite"))
    try:
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait(10)  # its pid is free now (reuse within the test is all but impossible)
        dead = f"{socket.gethostname()}-{proc.pid}"
        store.lease_claim("controller", dead, 60.0)
        keeper = LeaseKeeper(store, Leadership("me", 60.0))
        keeper.renew_once()
        token = keeper.leadership.token()
        assert token is not None and token.epoch == 2
        # the row moved only from that holder
        assert store.lease_take_from("controller", dead, "x", 60.0)[:2] == ("me", 2)
    finally:
        store.close()


def test_leadership_in_metrics() -> None:
    text = render_leadership("host-1", True, 7)
    assert 'edgefleet_leader{holder="host-1"} 1\n' in text
    assert "edgefleet_leader_epoch 7\n" in text
    assert "# TYPE edgefleet_leader gauge" in text
    assert 'edgefleet_leader{holder="b"} 0' in render_leadership("b", False, 0)
