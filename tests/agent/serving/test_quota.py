"""Pure pieces of the server's limits on local clients: quotas with a share per client,
and reading a user namespace's id map."""

from __future__ import annotations

import pytest

from agent.serving.peers import IdMap, covers_every_id
from agent.serving.quota import TCP_PEER, Quota, share_of


def test_a_client_takes_at_most_its_share_and_all_at_most_the_total() -> None:
    quota = Quota(total=10, per_peer=6, unit="units", settings="[x] keys")
    assert quota.take(1, 6) is None
    assert quota.take(1, 1) == "peer"  # its share is full; nothing taken
    assert quota.take(2, 5) == "total"  # 6 + 5 > 10
    assert quota.take(2, 4) is None and quota.held == 10
    assert quota.take(TCP_PEER, 1) == "total"
    assert "(uid 1) holds 6 units, at most 6 per client ([x] keys)" in quota.explain("peer", 1)
    assert "every TCP client" in quota.explain("peer", TCP_PEER)
    assert "10 units held by every client, at most 10 ([x] keys)" in quota.explain("total", 2)
    quota.give(1, 6)
    assert quota.held_by(1) == 0 and quota.held == 4
    assert quota.take(2, 2) is None and quota.held_by(2) == 6  # now at its share
    assert quota.take(2, 1) == "peer"
    quota.give(2, 6)
    assert quota.held == 0 and quota._held == {}  # a client holding nothing is forgotten


def test_shares_and_bad_quotas() -> None:
    assert share_of(256, 0.5) == 128 and share_of(1, 0.1) == 1 and share_of(8, 1.0) == 8
    with pytest.raises(ValueError, match="per_peer <= total"):
        Quota(total=4, per_peer=5, unit="u", settings="s")


@pytest.mark.parametrize(
    ("id_map", "complete"),
    [
        ("         0          0 4294967295\n", True),  # the initial namespace
        ("0 0 65536\n65536 65536 4294901759\n", True),  # every id, in two ranges
        ("0 0 1\n1 61184 1\n", False),  # PrivateUsers=yes: root and the service's user
        ("0 1509949440 65536\n", False),  # a container's private range
        ("", False),
    ],
)
def test_covers_every_id(id_map: str, complete: bool) -> None:
    assert covers_every_id(id_map) is complete


def test_an_incomplete_id_map_knows_no_overflow_id() -> None:
    partial = IdMap(uids_complete=False, gids_complete=True, overflow_uid=65534)
    assert not partial.is_known_uid(65534) and partial.is_known_uid(1000)
    assert partial.is_known_gid(65534) and not partial.is_complete
    assert IdMap().is_known_uid(65534)  # every id mapped: nobody is nobody
