"""Shared-memory regions belong to the local user that registered them (issue 18, defect 5).

The test process (root) registers a region; a client running as another real uid
(``setpriv``) then tries everything the old single namespace let it do: list it, name it
as its input or output, unregister it one by one or all at once, take its name. Each
must fail or not touch the owner's region, and the owner keeps being served from it.
Then the same with the agent's user namespace made unable to tell that uid apart (what
``PrivateUsers=yes`` does): the peer is refused shared memory and allow-lists, not
mistaken for its owner.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from agent.runtime.registry import ModelRegistry
from agent.serving.peers import IdMap
from agent.serving.server import InferenceServer
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import (
    OTHER_UID,
    can_switch_users,
    open_to_every_user,
    run_as,
    serving,
)

pytestmark = pytest.mark.skipif(not can_switch_users(), reason="needs root and setpriv")

X = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)

# Another user's attempts on the region "cam0" it did not register (``intrude``), then
# its own "cam0". Prints, per attempt, the HTTP status and the answer.
INTRUDER = r"""
import json, os, sys
import numpy as np
from agent.client import InferenceClient
from agent.oip.shm import SharedMemoryRegion
from tests.agent._serving import intrude

path = sys.argv[1]
out = intrude(path, sys.argv[2])
# Its own object under the same name: names are per user, so this is no squat.
with SharedMemoryRegion(f"ef-intruder-{os.getpid()}", 4096) as own, \
        InferenceClient(path) as client:
    try:
        client.register_shared_memory("cam0", own)
        own.write(0, np.full((1, 4), 7, np.float32).tobytes())
        y = client.infer("linear", {"x": own.array(0, np.dtype(np.float32), (1, 4))}, shm=own)
        out["own_cam0"] = [200, y["y"].tolist()]
        out["own_status"] = [200, client.shared_memory_status()]
    except Exception as exc:
        out["own_cam0"] = [0, str(exc)]
print(json.dumps(out))
"""


@pytest.fixture
def linear(tmp_path: Path, linear_model: Path) -> LoadedModel:
    return load_model(*make_model_dir(tmp_path / "v1", linear_model))


@pytest.fixture
def owned(linear: LoadedModel) -> Iterator[tuple[InferenceServer, SharedMemoryRegion]]:
    """A server open to every local user, and root's region "cam0" holding ``X``."""
    registry = ModelRegistry()
    registry.activate(linear)
    with (
        serving(registry) as server,
        SharedMemoryRegion(f"ef-owner-{os.getpid()}", 4096) as region,
    ):
        open_to_every_user(server)
        region.write(0, X.tobytes())
        with InferenceClient(server.socket_path) as client:
            client.register_shared_memory("cam0", region)
        yield server, region


def test_another_user_cannot_see_use_unregister_or_squat_a_region(
    owned: tuple[InferenceServer, SharedMemoryRegion], linear: LoadedModel
) -> None:
    server, region = owned
    got = run_as(OTHER_UID, INTRUDER, str(server.socket_path), region.key)
    assert got["status"] == [200, []], got["status"]  # root's region is not listed
    assert got["status_one"][0] == 404, got["status_one"]
    for attempt in ("as_input", "as_output"):
        status, doc = got[attempt]
        assert status == 400 and "'cam0' is not registered" in doc["error"], (attempt, doc)
    assert got["unregister_one"][0] == got["unregister_all"][0] == 200  # nothing of theirs
    status, doc = got["register_owners_object"]
    assert status == 403 and "belongs to uid 0" in doc["error"], doc
    expected = linear.infer({"x": np.full((1, 4), 7, np.float32)})["y"]
    assert got["own_cam0"][0] == 200, got["own_cam0"]  # its own "cam0", no conflict
    np.testing.assert_allclose(got["own_cam0"][1], expected, rtol=1e-6)
    assert [r["name"] for r in got["own_status"][1]] == ["cam0"]
    assert got["own_status"][1][0]["key"] != region.key

    with InferenceClient(server.socket_path) as client:  # the owner: untouched
        [status_doc] = client.shared_memory_status()
        assert (status_doc["name"], status_doc["key"]) == ("cam0", region.key)
        y = client.infer("linear", {"x": region.array(0, np.dtype(np.float32), (1, 4))}, shm=region)
        np.testing.assert_array_equal(y["y"], linear.infer({"x": X})["y"])


# A peer asks to register its own object; prints the status and the error.
REGISTER_OWN = r"""
import json, os, sys
from agent.oip.shm import SharedMemoryRegion
from tests.agent._serving import StdlibUnixConnection

with SharedMemoryRegion(f"ef-unmapped-{os.getpid()}", 4096) as own:
    connection = StdlibUnixConnection(sys.argv[1])
    body = json.dumps({"key": own.key, "byte_size": 4096})
    connection.request("POST", "/v2/systemsharedmemory/region/r/register", body=body)
    response = connection.getresponse()
    print(json.dumps([response.status, json.loads(response.read())]))
"""


# A health check; fails (exit 1, the agent's refusal on stderr) when refused.
HEALTH = r"""
import json, sys
from agent.client import InferenceClient
print(json.dumps(InferenceClient(sys.argv[1]).server_metadata()["name"]))
"""


def test_a_uid_the_agent_cannot_tell_apart_gets_no_shared_memory_and_no_allow_list(
    linear: LoadedModel,
) -> None:
    """Under PrivateUsers=yes every other user reads as 65534 through SO_PEERCRED and
    fstat, so "the peer owns the object" was always true. Here the agent's namespace is
    told that OTHER_UID is its overflow id: that peer is refused, not trusted."""
    registry = ModelRegistry()
    registry.activate(linear)
    unmapped = IdMap(uids_complete=False, gids_complete=False, overflow_uid=OTHER_UID,
                     overflow_gid=OTHER_UID)  # fmt: skip
    with serving(registry, id_map=unmapped) as server:
        open_to_every_user(server)
        status, doc = run_as(OTHER_UID, REGISTER_OWN, str(server.socket_path))
        assert status == 403 and "cannot tell uid 4242 from other users" in doc["error"]
    with serving(registry, id_map=unmapped, allowed_uids=[OTHER_UID]) as server:
        open_to_every_user(server)
        with pytest.raises(AssertionError, match="matches no allow-list entry"):
            run_as(OTHER_UID, HEALTH, str(server.socket_path))
    with serving(registry, allowed_uids=[OTHER_UID]) as server:  # a real uid: allowed
        open_to_every_user(server)
        assert run_as(OTHER_UID, REGISTER_OWN, str(server.socket_path)) == [200, {}]


def test_supplementary_groups_come_from_the_kernel(linear: LoadedModel) -> None:
    """A member of a group the allow-list names by a supplementary group only: read with
    SO_PEERGROUPS, since ProtectProc=invisible hides /proc/<pid>/status from the agent."""
    registry = ModelRegistry()
    registry.activate(linear)
    with serving(registry, allowed_gids=[4343]) as server:
        open_to_every_user(server)
        assert run_as(OTHER_UID, HEALTH, str(server.socket_path), groups=[4343]) == "edge-agent"
        with pytest.raises(AssertionError, match="not in the allow-list"):
            run_as(OTHER_UID, HEALTH, str(server.socket_path))
