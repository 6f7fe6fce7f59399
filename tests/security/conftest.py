"""Fixtures of the attack suites and their tallies.

Every attack test carries ``@pytest.mark.attack(N)`` (N = the class in issue 8); a class
counts as rejected when all of its tests passed. The tally is printed at the end of the
run: ``12/12 attack classes rejected`` (class 11, deltas, is issue 22's; class 12,
mirrors, issue 24's: ``test_mirrors.py``). The device adversary suite
(``test_device_adversary.py``, issue 18) marks each test ``@pytest.mark.device_attack(KEY)``
with a key of ``DEVICE_ATTACKS``: ``9/9 device attacks refused`` (``other_site``, a
site gateway's identity, is ``test_site_gateway.py``'s). The bundle attack
suite (``test_bundle_attacks.py``, issue 22) marks each test
``@pytest.mark.bundle_attack(KEY)`` of ``BUNDLE_ATTACKS``: ``4/4 bundle attacks
refused``. Every local attack test (``test_local_adversary.py``) carries
``@pytest.mark.local_attack(name)``: an attack counts as contained when its test passed,
and the run ends with ``N/N local attacks contained`` (with the agent's RSS growth each
test recorded as ``rss_growth_mib``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import ProbationPolicy, ShadowPolicy
from agent.device.config import AgentConfig, InferenceConfig, MqttConfig, RepositoryConfig
from agent.runtime.registry import ModelRegistry
from agent.telemetry.reporter import IntervalStats
from agent.update.journal import Phase, serving_version
from agent.update.lifecycle import ModelLifecycle, PhaseHook
from agent.update.store import ModelStore
from agent.update.updater import CheckResult, UpdateService
from controller.build.builder import build_bundle
from controller.repository.release import release_bundle
from controller.repository.repo import Repository, init_repository
from tests.helpers import make_linear_model
from tests.security.simulator import Forger, HostileMirror
from tests.tally import counts, write_tally

MODEL = "lin"
FLEET = "lab"
NOW_SERVING = ProbationPolicy(duration_s=0)
# Served at once, as before shadows (tests/test_shadow_e2e.py judges shadows).
NO_SHADOW = ShadowPolicy(enabled=False)
ATTACK_CLASSES = {
    1: "arbitrary bundle (not signed by the release key)",
    2: "rollback to older metadata",
    3: "freeze (expired timestamp replayed)",
    4: "mix-and-match (snapshot and targets from different versions)",
    5: "endless data (metadata and bundles)",
    6: "slow retrieval (drip under the read timeout)",
    7: "malicious mirror serving altered bytes",
    8: "signatures below the root threshold",
    9: "delegated role signing outside its paths",
    10: "root key rotation followed, attacker's root rejected",
    11: "a delta that rebuilds into something else, or declares oversized output (issue 22)",
    12: "a tampering mirror: refused, the device falls back to the next repository URL (issue 24)",
}
# What a device holding a valid certificate tries against the fleet (issue 18).
DEVICE_ATTACKS = {
    "other_fleet": "publish into another fleet's tree",
    "other_device": "publish onto another device's topics",
    "read_others": "read other devices' and fleets' topics",
    "event_flood": "flood events to push others' failures out of the gates' window",
    "impossible_counts": "report counts no device serves",
    "outweigh": "outweigh the fleet with one device's volume of clean requests",
    "chunk_flood": "flood the MQTT chunk transport with requests",
    "revoked": "keep publishing after being revoked while connected",
    "other_site": "a site gateway's bridge (or its LAN) publishing for another site's device",
}
# Signed bundles that are bad inside their compression (issue 22, bundle schema /2).
BUNDLE_ATTACKS = {
    "bomb": "a compression bomb: a member decompresses far past its declared size",
    "garbage": "a zstd frame of garbage",
    "truncated": "a truncated zstd frame",
    "hash": "a valid frame of other content (sha256 mismatch after decompression)",
}
# What a hostile local user tries against the agent's socket (issue 18).
LOCAL_ATTACKS = {
    "header-only bodies": "heads announcing the largest body, and no body",
    "connection hoarding": "idle connections, as many as the agent lets one user open",
    "slow senders": "heads and bodies dripped below every rate",
    "JSON amplification": "JSON bodies as large as a body may be, parsed at once",
    "another user's shared memory": "listing, naming, unregistering, taking a region",
}
_outcomes: dict[int, list[bool]] = {}
_device_outcomes: dict[str, list[bool]] = {}
_bundle_outcomes: dict[str, list[bool]] = {}
_local: dict[str, list[tuple[bool, float | None]]] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "attack(n): the test proves a defence of attack class n")
    config.addinivalue_line(
        "markers", "device_attack(key): the test proves a device attack of DEVICE_ATTACKS refused"
    )
    config.addinivalue_line(
        "markers", "local_attack(name): the test proves a local attack is contained"
    )
    config.addinivalue_line(
        "markers", "bundle_attack(key): the test proves a bundle attack of BUNDLE_ATTACKS refused"
    )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not counts(report):
        return
    for keyword in report.keywords:
        if keyword.startswith("attack-class-"):
            _outcomes.setdefault(int(keyword.removeprefix("attack-class-")), []).append(
                report.passed
            )
        elif keyword.startswith("device-attack-"):
            key = keyword.removeprefix("device-attack-")
            _device_outcomes.setdefault(key, []).append(report.passed)
        elif keyword.startswith("bundle-attack-"):
            key = keyword.removeprefix("bundle-attack-")
            _bundle_outcomes.setdefault(key, []).append(report.passed)
        elif keyword.startswith("local-attack-") and not report.skipped:  # skipped: "not run"
            growth = dict(report.user_properties).get("rss_growth_mib")
            _local.setdefault(keyword.removeprefix("local-attack-"), []).append(
                (report.passed, None if growth is None else float(growth))
            )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("attack")
        if marker is not None:
            item.keywords[f"attack-class-{marker.args[0]}"] = True
        marker = item.get_closest_marker("device_attack")
        if marker is not None:
            assert marker.args[0] in DEVICE_ATTACKS, marker.args[0]
            item.keywords[f"device-attack-{marker.args[0]}"] = True
        marker = item.get_closest_marker("bundle_attack")
        if marker is not None:
            assert marker.args[0] in BUNDLE_ATTACKS, marker.args[0]
            item.keywords[f"bundle-attack-{marker.args[0]}"] = True
        marker = item.get_closest_marker("local_attack")
        if marker is not None:
            assert marker.args[0] in LOCAL_ATTACKS, marker.args[0]
            item.keywords[f"local-attack-{marker.args[0]}"] = True


def pytest_terminal_summary(terminalreporter: Any) -> None:
    tr = terminalreporter
    if _outcomes:
        write_tally(tr, "attack classes (issue 8)", ATTACK_CLASSES, _outcomes, "rejected")
    if _device_outcomes:
        write_tally(tr, "device attacks (issue 18)", DEVICE_ATTACKS, _device_outcomes, "refused")
    if _bundle_outcomes:
        write_tally(tr, "bundle attacks (issue 22)", BUNDLE_ATTACKS, _bundle_outcomes, "refused")
    if _local:
        tr.section("local attacks (issue 18)")
        contained = 0
        for name, what in LOCAL_ATTACKS.items():
            results = _local.get(name)
            if not results:
                state = "not run"
            elif all(passed for passed, _ in results):
                contained += 1
                growths = [g for _, g in results if g is not None]
                state = "contained" + (f", agent RSS +{max(growths):.0f} MiB" if growths else "")
            else:
                state = "NOT CONTAINED"
            tr.write_line(f"- {name} ({what}): {state}")
        tr.write_line(f"{contained}/{len(LOCAL_ATTACKS)} local attacks contained")


# ---------------------------------------------------------------------------- the device


class Device:
    """The real update path of an agent: UpdateService + ModelLifecycle (TUF refresh,
    desired state, download, verify, unpack, golden vectors, swap), no process around."""

    def __init__(
        self,
        tmp: Path,
        trusted_root: Path,
        repository: RepositoryConfig,
        mqtt: MqttConfig | None = None,
        phase_hook: PhaseHook | None = None,
    ) -> None:
        self.config = AgentConfig(
            device_id="dev-1",
            fleet=FLEET,
            state_dir=tmp / "state",
            trusted_root=trusted_root,
            repository=repository,
            inference=InferenceConfig(socket_path=tmp / "infer.sock"),
            mqtt=mqtt or MqttConfig(),
        )
        self.registry = ModelRegistry()
        self.lifecycle = ModelLifecycle(
            self.config,
            self.registry,
            ModelStore(tmp / "state" / "models"),
            IntervalStats(),
            phase_hook=phase_hook,
        )
        self.updates = UpdateService(self.config, self.lifecycle)

    def check(self) -> CheckResult:
        result = self.updates.check()
        self.lifecycle.judge_probation()  # probation of 0 s: commit now
        return result

    def phase(self) -> tuple[Phase, str | None]:
        record = self.lifecycle.record(MODEL)
        return record.phase, record.version

    def serving(self) -> str | None:
        """The version the journal says serves, checked against the loaded session."""
        version = serving_version(self.lifecycle.record(MODEL))
        loaded = self.registry.snapshot().get(MODEL)
        assert (loaded.version if loaded else None) == version
        return version

    def trusted_version(self, role: str) -> int:
        from tuf.api.metadata import Metadata

        path = self.config.state_dir / "tuf" / f"{role}.json"
        return int(Metadata.from_file(str(path)).signed.version)

    def close(self) -> None:
        self.updates.close()


def quick_repository(url: str, **overrides: Any) -> RepositoryConfig:
    base = RepositoryConfig(
        url=url,
        poll_jitter_s=0,
        connect_timeout_s=2.0,
        read_timeout_s=2.0,
        download_deadline_s=30.0,
        min_bytes_per_s=0.0,
    )
    return replace(base, **overrides)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real bundles of one model: 1.0.0, 2.0.0, 3.0.0 (different weights), and an evil
    6.6.6 nobody released."""
    out = tmp_path_factory.mktemp("bundles")
    built = {}
    for seed, version in ((1, "1.0.0"), (2, "2.0.0"), (3, "3.0.0"), (66, "6.6.6")):
        model = make_linear_model(out / f"{version}.onnx", seed=seed)
        built[version] = build_bundle(model, MODEL, version, out / f"{version}.bundle", 4).path
    return built


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return init_repository(tmp_path / "repo")


@pytest.fixture
def mirror(repo: Repository) -> Iterator[HostileMirror]:
    m = HostileMirror(repo.path)
    yield m
    m.close()


@pytest.fixture
def forger(repo: Repository) -> Forger:
    return Forger(repo)


def release(repo: Repository, bundle: Path, delta_from: int = 0) -> None:
    """Release ``bundle`` to the fleet; without deltas unless asked (the attacks on the
    bundle's transfer need the device to fetch the full bundle)."""
    release_bundle(
        bundle, FLEET, repo.path, probation=NOW_SERVING, shadow=NO_SHADOW, delta_from=delta_from
    )


@pytest.fixture
def make_device(tmp_path: Path, repo: Repository, mirror: HostileMirror) -> Iterator[Any]:
    made: list[Device] = []

    def make(**overrides: Any) -> Device:
        device = Device(
            tmp_path / f"device-{len(made)}",
            repo.metadata_dir / "1.root.json",
            quick_repository(mirror.url, **overrides),
        )
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.fixture
def make_serving_device(
    make_device: Any, repo: Repository, bundles: dict[str, Path]
) -> Callable[..., Device]:
    """Makes a device serving 1.0.0, committed, through the mirror (behaving, so far);
    keyword arguments override its repository config (``quick_repository``)."""

    def make(**overrides: Any) -> Device:
        release(repo, bundles["1.0.0"])
        dev: Device = make_device(**overrides)
        result = dev.check()
        assert result.installed == {MODEL: "1.0.0"}, result
        assert dev.phase() == (Phase.COMMITTED, "1.0.0")
        return dev

    return make


@pytest.fixture
def device(make_serving_device: Callable[..., Device]) -> Device:
    """A device serving 1.0.0, committed, through the mirror (behaving, so far)."""
    return make_serving_device()
