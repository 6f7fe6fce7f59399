"""A hostile local user against the agent's inference socket (issue 18).

Each test starts the real inference server in a process of its own (``LocalAgent``,
limits below), serves a well-behaved client once, takes the agent's RSS, then mounts one
attack from another real uid (``Attacker``: setpriv, ``tests/security/local_attacker.py``).
While the attack holds, it samples the agent's RSS and serves the well-behaved client
(root: a 1 MiB binary request, a JSON one, shared memory where it matters) and checks
the answers against the model run in-process. It asserts what the attack got (refused,
or only its user's share), that the RSS growth stays within what the limits bound
(``memory_without_models_bytes``), and that the client is still served after it.

The suite prints ``N/N local attacks contained`` (tests/security/conftest.py). docs/
security.md ("A hostile local user") maps each test to the attack and the defence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.device.config import AGENT_BASE_BYTES, InferenceConfig, memory_without_models_bytes
from agent.oip.shm import SharedMemoryRegion
from agent.runtime.loading import load_model
from agent.runtime.models import LoadedModel
from tests.agent._model_dir import make_model_dir
from tests.agent._serving import OTHER_UID, can_switch_users
from tests.helpers import make_linear_model
from tests.security.local_agent import Attacker, LocalAgent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not can_switch_users(), reason="needs root and setpriv (another uid)"),
]

MIB = 1024 * 1024
# Small enough that a broken limit shows at once, large enough for real clients.
LIMITS: dict[str, Any] = {
    "max_body_bytes": 16 * MIB,
    "max_body_buffer_bytes": 64 * MIB,  # one user's share: 32 MiB, two largest bodies
    "max_json_bytes": 1 * MIB,
    "max_connections": 64,  # one user's share: 32
    "peer_share": 0.5,
}
# What the limits let local clients add to the agent's memory (136 MiB here).
RSS_BOUND = memory_without_models_bytes(InferenceConfig(**LIMITS)) - AGENT_BASE_BYTES
BATCH = np.random.default_rng(3).normal(size=(65536, 4)).astype(np.float32)  # a 1 MiB body
X = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("local-adversary")
    base.chmod(0o755)
    directory, _ = make_model_dir(base / "linear", make_linear_model(base / "l.onnx", seed=5))
    return directory


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> LoadedModel:
    from agent.contracts import BUNDLE_MANIFEST
    from agent.contracts.bundle import parse_manifest

    return load_model(model_dir, parse_manifest((model_dir / BUNDLE_MANIFEST).read_bytes()))


@pytest.fixture
def start_agent(model_dir: Path) -> Iterator[Callable[..., LocalAgent]]:
    started: list[LocalAgent] = []

    def start(**overrides: Any) -> LocalAgent:
        agent = LocalAgent(model_dir, **{**LIMITS, **overrides})
        started.append(agent)
        return agent

    yield start
    for agent in started:
        alive = agent.process.poll() is None
        agent.stop()
        assert alive, f"the agent died under attack:\n{agent.log_tail()}"


def serve_well_behaved(agent: LocalAgent, reference: LoadedModel) -> None:
    """A client that plays by the rules: health, a 1 MiB binary request, a JSON one."""
    with InferenceClient(agent.socket_path, timeout_s=30) as client:
        assert client.live() and client.ready()
        got = client.infer("linear", {"x": BATCH})["y"]
        np.testing.assert_allclose(got, reference.infer({"x": BATCH})["y"], rtol=1e-6)
        got = client.infer("linear", {"x": X}, binary=False)["y"]
        np.testing.assert_allclose(got, reference.infer({"x": X})["y"], rtol=1e-6)


class Watch:
    """The agent's RSS: before the attack (after a first well-behaved client), and the
    peak sampled while it holds."""

    def __init__(self, agent: LocalAgent, reference: LoadedModel) -> None:
        self.agent = agent
        serve_well_behaved(agent, reference)  # the client's own buffers and ORT's arena
        self.baseline = agent.rss()
        self.peak = self.baseline

    def sample(self, times: int = 10, every_s: float = 0.05) -> None:
        for _ in range(times):
            self.peak = max(self.peak, self.agent.rss())
            time.sleep(every_s)

    def check(self, record_property: Callable[[str, object], None]) -> int:
        """Assert the growth is within the bound; record it for the tally."""
        growth = self.peak - self.baseline
        record_property("rss_growth_mib", round(growth / MIB, 1))
        assert growth <= RSS_BOUND, (
            f"the agent's RSS grew {growth / MIB:.0f} MiB under attack, the limits "
            f"bound it to {RSS_BOUND / MIB:.0f} MiB"
        )
        return growth


@pytest.mark.local_attack("header-only bodies")
def test_heads_announcing_bodies_that_never_come_take_no_memory(
    start_agent: Callable[..., LocalAgent],
    reference: LoadedModel,
    record_property: Callable[[str, object], None],
) -> None:
    """Before: every head allocated and zeroed its whole body at once (64 connections ×
    16 MiB here: 1 GiB). Now a body is charged to its user's share before 100 Continue
    and its pages come only as bytes do."""
    agent = start_agent()
    watch = Watch(agent, reference)
    with Attacker(agent, "header_only", str(LIMITS["max_body_bytes"])) as attacker:
        watch.sample()
        statuses = attacker.holding["statuses"]
        # Two bodies fill the user's 32 MiB share; every other head is refused at once.
        assert statuses.get("100") == 2 and set(statuses) == {"100", "503"}, attacker.holding
        held = agent.metric("edge_agent_infer_body_buffer_bytes")
        assert held == 2 * LIMITS["max_body_bytes"]  # charged, though not one byte came
        serve_well_behaved(agent, reference)  # its own share of bodies and connections
        watch.sample()
    growth = watch.check(record_property)
    assert growth < held / 2, f"+{growth / MIB:.0f} MiB for bodies that never came"
    serve_well_behaved(agent, reference)


@pytest.mark.local_attack("connection hoarding")
def test_one_user_holding_connections_does_not_lock_others_out(
    start_agent: Callable[..., LocalAgent],
    reference: LoadedModel,
    record_property: Callable[[str, object], None],
) -> None:
    """Before: one user could hold max_connections idle connections and every other
    client got 503. Now one user holds at most its share."""
    agent = start_agent()
    watch = Watch(agent, reference)
    with Attacker(agent, "hoard") as attacker:
        watch.sample()
        assert attacker.holding["held"] == 32, attacker.holding
        status, message = attacker.holding["refusal"]
        assert status == 503 and f"(uid {OTHER_UID}) holds 32 connections" in message
        clients = [InferenceClient(agent.socket_path, timeout_s=30) for _ in range(8)]
        try:  # eight connections of the well-behaved user at once, each served
            for client in clients:
                assert client.live()
        finally:
            for client in clients:
                client.close()
        serve_well_behaved(agent, reference)
        watch.sample()
    watch.check(record_property)
    serve_well_behaved(agent, reference)


@pytest.mark.local_attack("slow senders")
def test_slow_senders_are_cut_and_hold_only_what_they_sent(
    start_agent: Callable[..., LocalAgent],
    reference: LoadedModel,
    record_property: Callable[[str, object], None],
) -> None:
    """Heads and bodies dripped below every rate: cut at their timeout (408), large
    bodies past the user's share refused at once (503); meanwhile others are served."""
    agent = start_agent(header_timeout_s=3.0, body_timeout_s=3.0)
    watch = Watch(agent, reference)
    with Attacker(agent, "slow", str(LIMITS["max_body_bytes"])) as attacker:
        watch.sample()
        serve_well_behaved(agent, reference)
        watch.sample()
        # Ends when every sender has its answer (the timeouts are 3 s).
    statuses = attacker.result["statuses"]
    assert set(statuses) <= {"408", "503"}, statuses
    assert statuses.get("408", 0) >= 8 + 2, statuses  # the head drippers, two body drippers
    watch.check(record_property)
    assert agent.metric("edge_agent_infer_body_buffer_bytes") == 0  # every charge is back
    serve_well_behaved(agent, reference)


@pytest.mark.local_attack("JSON amplification")
def test_json_as_large_as_a_body_is_refused_before_parsing(
    start_agent: Callable[..., LocalAgent],
    reference: LoadedModel,
    record_property: Callable[[str, object], None],
) -> None:
    """Parsing JSON takes ~12 times its size: six 16 MiB JSON infer requests at once
    (and a register) would take over 1 GiB. Now the JSON part is bounded
    (max_json_bytes: 413) and bodies past the user's share are refused (503)."""
    agent = start_agent()
    watch = Watch(agent, reference)
    with Attacker(agent, "json_bomb", str(LIMITS["max_body_bytes"])) as attacker:
        watch.sample(times=20)  # while the agent would be parsing
        serve_well_behaved(agent, reference)
        watch.sample()
    # Refused unparsed: past max_json_bytes (or a register body past 4 KiB), or past the
    # user's share of the body quota while two others are read.
    answers = attacker.result["answers"]
    assert len(answers) == 7 and {a[0] for a in answers} <= {413, 503}, answers
    assert any(a[0] == 413 for a in answers), answers
    watch.check(record_property)
    with InferenceClient(agent.socket_path) as client:
        counted = [  # none counted against it (each version's series start at 0)
            line
            for line in client.metrics().splitlines()
            if line.startswith("edge_agent_infer_errors_total{")
            and 'kind="model_error"' in line
            and not line.endswith(" 0.0")
        ]
        assert counted == [], counted
    serve_well_behaved(agent, reference)


@pytest.mark.local_attack("another user's shared memory")
def test_another_users_region_cannot_be_seen_used_or_taken(
    start_agent: Callable[..., LocalAgent],
    reference: LoadedModel,
    record_property: Callable[[str, object], None],
) -> None:
    """Before: one namespace for every client: anyone could list every region and key,
    name another's region as input or output, unregister it. Now a region is its
    registering user's, and another user's requests do not reach it."""
    agent = start_agent()
    watch = Watch(agent, reference)
    with (
        SharedMemoryRegion(f"ef-local-owner-{agent.process.pid}", 4096) as region,
        InferenceClient(agent.socket_path) as owner,
    ):
        owner.register_shared_memory("cam0", region)
        region.write(0, X.tobytes())
        with Attacker(agent, "intruder", region.key) as attacker:
            watch.sample()
            got = attacker.holding
            assert got["status"] == [200, []], got
            for attempt in ("as_input", "as_output"):
                assert got[attempt][0] == 400, got[attempt]
                assert "'cam0' is not registered" in got[attempt][1]["error"]
            assert got["unregister_one"][0] == got["unregister_all"][0] == 200  # theirs: none
            status, doc = got["register_owners_object"]
            assert status == 403 and "belongs to uid 0" in doc["error"], doc
            [mine] = owner.shared_memory_status()  # the owner's region is untouched
            assert (mine["name"], mine["key"]) == ("cam0", region.key)
            x = region.array(0, np.dtype(np.float32), (1, 4))
            y = owner.infer("linear", {"x": x}, shm=region)["y"]
            np.testing.assert_allclose(y, reference.infer({"x": X})["y"], rtol=1e-6)
            serve_well_behaved(agent, reference)
            watch.sample()
    watch.check(record_property)
    serve_well_behaved(agent, reference)
