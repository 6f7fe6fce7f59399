"""POSIX ACLs for shared memory: the rules as pure functions, then on a real /dev/shm object
opened by real other users, and the client granting an agent that runs as another user
(as the shipped unit's dynamic user does) so that shared-memory inference works."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.oip import acl
from agent.oip.acl import GROUP, GROUP_OBJ, MASK, NO_ID, OTHER, USER, USER_OBJ
from agent.oip.shm import SharedMemoryRegion
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import OTHER_UID, can_switch_users, run_as
from tests.helpers import make_linear_model
from tests.security.local_agent import LocalAgent

THIRD_UID = OTHER_UID + 1  # a user nobody granted anything


def test_a_file_without_an_acl_starts_from_its_mode() -> None:
    assert acl.from_mode(0o100640) == [
        (USER_OBJ, 6, NO_ID),
        (GROUP_OBJ, 4, NO_ID),
        (OTHER, 0, NO_ID),
    ]


def test_adding_a_user_gives_only_that_user_and_sets_the_mask() -> None:
    entries = acl.with_user(acl.from_mode(0o600), 4242, 0o6)
    assert sorted(entries) == sorted(
        [(USER_OBJ, 6, NO_ID), (GROUP_OBJ, 0, NO_ID), (OTHER, 0, NO_ID), (USER, 6, 4242),
         (MASK, 6, NO_ID)]
    )  # fmt: skip


def test_adding_a_user_keeps_the_others_and_replaces_its_own_entry() -> None:
    start = [*acl.from_mode(0o600), (USER, 4, 1000), (USER, 2, 4242), (GROUP, 1, 50),
             (MASK, 7, NO_ID)]  # fmt: skip
    entries = acl.with_user(start, 4242, 0o6)
    assert (USER, 4, 1000) in entries and (GROUP, 1, 50) in entries
    assert [e for e in entries if e[0] == USER and e[2] == 4242] == [(USER, 6, 4242)]
    assert [e for e in entries if e[0] == MASK] == [(MASK, 7, NO_ID)]  # 4 | 6 | 1, not the old


def test_the_attribute_round_trips_in_the_order_the_kernel_requires() -> None:
    entries = acl.with_user(acl.from_mode(0o600), 4242, 0o6)
    raw = acl.encode(entries)
    parsed = acl.parse(raw)
    assert parsed == sorted(entries, key=lambda e: (e[0], e[2]))
    assert [tag for tag, _, _ in parsed] == [USER_OBJ, USER, GROUP_OBJ, MASK, OTHER]
    with pytest.raises(ValueError, match="4 \\+ 8n bytes"):
        acl.parse(raw[:-1])
    with pytest.raises(ValueError, match="version expected 2"):
        acl.parse(b"\x01\x00\x00\x00")


_OPEN = """
import json, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDWR)
except OSError as exc:
    print(json.dumps(exc.strerror)); raise SystemExit
os.pwrite(fd, b"written by the other user", 64)
print(json.dumps(os.pread(fd, 16, 0).decode()))
"""


@pytest.mark.skipif(not can_switch_users(), reason="needs root and setpriv")
def test_grant_lets_exactly_that_user_open_the_region() -> None:
    with SharedMemoryRegion(f"ef-acl-{os.getpid()}", 4096) as region:
        region.write(0, b"the owner's data")
        path = str(region.path)
        assert run_as(OTHER_UID, _OPEN, path) == "Permission denied"
        region.grant(OTHER_UID)
        region.grant(OTHER_UID)  # again: the same one entry
        assert run_as(OTHER_UID, _OPEN, path) == "the owner's data"
        assert bytes(region.buffer[64:89]) == b"written by the other user"
        assert run_as(THIRD_UID, _OPEN, path) == "Permission denied"
        assert run_as(THIRD_UID, _OPEN, path, groups=[os.stat(path).st_gid]) == (
            "Permission denied"  # the group bits show the mask; the group has nothing
        )
        entries = acl.parse(os.getxattr(path, acl.XATTR))
        assert [e for e in entries if e[0] == USER] == [(USER, 6, OTHER_UID)]


@pytest.fixture
def agent_as_other_user() -> Iterator[tuple[LocalAgent, Path]]:
    """An inference server running as OTHER_UID, as the shipped unit runs the agent as
    a user of its own; its model in a folder that user can read."""
    base = Path(tempfile.mkdtemp(prefix="ef-acl-", dir="/tmp"))
    base.chmod(0o755)
    model_dir, _ = make_model_dir(base / "linear", make_linear_model(base / "l.onnx", seed=3))
    agent = LocalAgent(model_dir, uid=OTHER_UID)
    try:
        yield agent, model_dir
    finally:
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not can_switch_users(), reason="needs root and setpriv")
def test_the_client_lets_an_agent_of_another_user_use_its_region(
    agent_as_other_user: tuple[LocalAgent, Path],
) -> None:
    """The client's 0600 region is opened by an agent of another uid only through the ACL
    entry ``register_shared_memory`` adds for the socket's peer: before it did, this
    registration was a 400 "Permission denied"."""
    agent, _ = agent_as_other_user
    x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    with (
        InferenceClient(agent.socket_path, timeout_s=30) as client,
        SharedMemoryRegion(f"ef-acl-client-{os.getpid()}", 4096) as region,
    ):
        client.register_shared_memory("cam0", region)
        through_shm = client.infer("linear", {"x": x}, shm=region)["y"]
        np.testing.assert_array_equal(through_shm, client.infer("linear", {"x": x})["y"])
        entries = acl.parse(os.getxattr(str(region.path), acl.XATTR))
        assert (USER, 6, OTHER_UID) in entries
        assert (GROUP_OBJ, 0, NO_ID) in entries and (OTHER, 0, NO_ID) in entries
