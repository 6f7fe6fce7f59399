"""Repository mirrors (issue 24): tried in order, untrusted by design.

A device is given ``[repository] mirrors = [first]`` and ``url = second``: two real HTTP
servers on 127.0.0.1 (``HostileMirror``) serving one real repository made by the
controller. The first one is down, or tampers (the bundle's bytes, the targets or
snapshot metadata, an old timestamp, altered bytes cut half way); the check is refused
on it and the device installs the genuine release from the second, in the same check.
When every source fails, nothing is installed, the device keeps serving its last good
version and says why, naming each source. Attack class 12 of the tally.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.contracts import bundle_target_path, desired_target_path
from agent.update.journal import Phase
from controller.repository.repo import Repository
from tests.security.conftest import FLEET, MODEL, Device, quick_repository, release
from tests.security.simulator import Cut, HostileMirror, Replace
from tests.security.test_attacks import delta_length, delta_url

BUNDLES = "/targets/bundles/"


@pytest.fixture
def first(repo: Repository) -> Iterator[HostileMirror]:
    m = HostileMirror(repo.path)
    yield m
    m.close()


@pytest.fixture
def second(repo: Repository) -> Iterator[HostileMirror]:
    m = HostileMirror(repo.path)
    yield m
    m.close()


@pytest.fixture
def make_mirrored_device(
    tmp_path: Path, repo: Repository, second: HostileMirror
) -> Iterator[Callable[..., Device]]:
    """A device with ``mirrors`` before ``url`` (``second`` by default)."""
    made: list[Device] = []

    def make(*mirrors: str, url: str | None = None) -> Device:
        repository = quick_repository(second.url if url is None else url, mirrors=mirrors)
        device = Device(tmp_path / f"device-{len(made)}", repo.metadata_dir / "1.root.json",
                        repository)  # fmt: skip
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.fixture
def serving(
    repo: Repository,
    bundles: dict[str, Path],
    first: HostileMirror,
    make_mirrored_device: Callable[..., Device],
) -> Device:
    """A device serving 1.0.0 (committed) through ``first``, behaving so far."""
    release(repo, bundles["1.0.0"])
    device = make_mirrored_device(first.url)
    result = device.check()
    assert result.installed == {MODEL: "1.0.0"}, result
    assert result.source_failures == []
    assert first.fetched(bundle_url(repo, "1.0.0")) == [""]
    return device


def bundle_url(repo: Repository, version: str) -> str:
    path = bundle_target_path(MODEL, version)
    target = repo.load("targets").signed.targets[path]
    return "/" + str(repo.target_file_path(path, target).relative_to(repo.path))


def altered(data: bytes) -> bytes:
    """``data`` with its signed part changed and its signatures kept."""
    doc = json.loads(data)
    doc["signed"]["expires"] = doc["signed"]["expires"].replace("20", "21", 1)
    return json.dumps(doc).encode()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def assert_second_served(device: Device, first: HostileMirror, *reasons: str) -> None:
    """A check installs 2.0.0 from the second source, naming the first one's failure."""
    result = device.check()
    assert result.installed == {MODEL: "2.0.0"}, result
    assert result.refused == {} and result.error is None, result
    (failure,) = result.source_failures
    assert failure.startswith(first.url), failure
    for reason in reasons:
        assert reason in failure, failure
    assert device.serving() == "2.0.0"
    assert device.updates.source_failures == result.source_failures
    assert not list((device.config.state_dir / "staging").glob("*.part"))


# ---------------------------------------------------------------------------- reachability


def test_an_unreachable_first_mirror_hands_the_check_to_the_next(
    repo: Repository,
    bundles: dict[str, Path],
    second: HostileMirror,
    make_mirrored_device: Callable[..., Device],
) -> None:
    release(repo, bundles["1.0.0"])
    dead = closed_port_url()
    device = make_mirrored_device(dead)
    assert device.updates.sources == (dead, second.url + "/")

    result = device.check()
    assert result.installed == {MODEL: "1.0.0"}, result
    (failure,) = result.source_failures
    assert failure.startswith(dead) and "metadata refresh" in failure, failure
    assert device.serving() == "1.0.0"


def test_a_mirror_missing_the_bundle_hands_the_check_to_the_next(
    repo: Repository, serving: Device, first: HostileMirror, bundles: dict[str, Path]
) -> None:
    """HTTP 404 for the bundle (a mirror behind): the next source, in the same check."""
    release(repo, bundles["2.0.0"])
    url = bundle_url(repo, "2.0.0")
    first.repo_dir = _copy(repo)
    (first.repo_dir / url.lstrip("/")).unlink()
    assert_second_served(serving, first, "HTTP 404")
    assert first.fetched(url) == [""]


def test_every_source_unreachable_installs_nothing_and_names_each(
    repo: Repository, bundles: dict[str, Path], make_mirrored_device: Callable[..., Device]
) -> None:
    release(repo, bundles["1.0.0"])
    one, two = closed_port_url(), closed_port_url()
    device = make_mirrored_device(one, url=two)
    result = device.check()
    assert result.installed == {} and result.error is not None
    assert "every repository source failed (2)" in result.error, result.error
    assert one in result.error and two in result.error, result.error
    failures = device.updates.source_failures
    assert [f.split(": ", 1)[0] for f in failures] == [one, two]
    assert device.updates.waiting.snapshot() == {}  # no model known yet


# ---------------------------------------------------------------------------- tampering (12)


@pytest.mark.attack(12)
def test_12_a_mirror_altering_the_bundle_is_refused_and_the_next_serves_it(
    repo: Repository, serving: Device, first: HostileMirror, bundles: dict[str, Path]
) -> None:
    release(repo, bundles["2.0.0"])
    first.tamper_prefix = BUNDLES
    assert_second_served(serving, first, "length or hash mismatch")
    # The altered bytes were fetched once, from the first source only.
    assert first.fetched(bundle_url(repo, "2.0.0")) == [""]


@pytest.mark.attack(12)
@pytest.mark.parametrize("role", ["targets", "snapshot"])
def test_12_a_mirror_serving_altered_metadata_is_refused_and_the_next_serves(
    role: str,
    repo: Repository,
    serving: Device,
    first: HostileMirror,
    bundles: dict[str, Path],
) -> None:
    release(repo, bundles["2.0.0"])
    if role == "targets":
        version = repo.load("snapshot").signed.meta["targets.json"].version
    else:
        version = repo.load("timestamp").signed.snapshot_meta.version
    path = f"/metadata/{version}.{role}.json"
    first.set(path, Replace(altered((repo.metadata_dir / path.rsplit("/", 1)[1]).read_bytes())))
    before = serving.trusted_version(role)

    assert_second_served(serving, first, "rejected")
    assert first.fetched(path), first.requests
    # What the device trusts now is the genuine metadata, not the altered copy.
    assert serving.trusted_version(role) == version > before
    trusted = (serving.config.state_dir / "tuf" / f"{role}.json").read_bytes()
    assert trusted == (repo.metadata_dir / f"{version}.{role}.json").read_bytes()


@pytest.mark.attack(12)
def test_12_a_mirror_replaying_an_old_timestamp_cannot_roll_back_the_next(
    repo: Repository,
    bundles: dict[str, Path],
    first: HostileMirror,
    make_mirrored_device: Callable[..., Device],
) -> None:
    """An old, validly signed timestamp from the first source is refused as a rollback;
    it is not persisted, so the second source's check runs against what the device
    trusted before and moves it forward."""
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    release(repo, bundles["1.0.0"])
    device = make_mirrored_device(first.url)
    assert device.check().installed == {MODEL: "1.0.0"}
    trusted = device.trusted_version("timestamp")
    release(repo, bundles["2.0.0"])
    first.set("/metadata/timestamp.json", Replace(old_timestamp))

    assert_second_served(device, first, "version mismatch (rollback or mix-and-match)")
    assert device.trusted_version("timestamp") == repo.load("timestamp").signed.version > trusted


@pytest.mark.attack(12)
def test_12_altered_bytes_cut_half_way_are_not_resumed_from_by_the_next_mirror(
    repo: Repository, serving: Device, first: HostileMirror, second: HostileMirror,
    bundles: dict[str, Path],
) -> None:  # fmt: skip
    """The first source sends altered bytes and hangs up half way (a transfer error,
    whose part would be resumed): the second source starts its own part from byte 0."""
    release(repo, bundles["2.0.0"])
    url = bundle_url(repo, "2.0.0")
    first.repo_dir = _copy(repo)
    stored = first.repo_dir / url.lstrip("/")
    genuine = stored.read_bytes()
    stored.write_bytes(bytes([genuine[0] ^ 0xFF]) + genuine[1:])  # within the first half
    first.set(url, Cut(0.5))

    assert_second_served(serving, first, "transfer failed")
    assert first.fetched(url) == [""]
    assert second.fetched(url) == [""]  # no Range: nothing of the first source's bytes
    assert serving.phase() == (Phase.COMMITTED, "2.0.0")


def _copy(repo: Repository) -> Path:
    """A copy of the repository folder as it is now (a mirror's own files)."""
    copy = repo.path.parent / "mirror-copy"
    shutil.copytree(repo.path, copy)
    return copy


@pytest.mark.attack(12)
def test_12_every_mirror_tampering_installs_nothing_and_says_why(
    repo: Repository,
    bundles: dict[str, Path],
    first: HostileMirror,
    second: HostileMirror,
    serving: Device,
) -> None:
    release(repo, bundles["2.0.0"])
    first.tamper_prefix = second.tamper_prefix = BUNDLES

    result = serving.check()
    assert result.installed == {}, result
    reason = result.refused[MODEL]
    assert reason.startswith("every repository source failed"), reason
    assert first.url in reason and second.url in reason, reason
    assert reason.count("length or hash mismatch") == 2, reason
    assert serving.phase() == (Phase.IDLE, "1.0.0")  # put back: the next check tries again
    assert serving.serving() == "1.0.0"
    waiting = serving.updates.waiting.snapshot()[MODEL]
    assert waiting.code == "refused" and first.url in waiting.detail, waiting
    assert not list((serving.config.state_dir / "staging").glob("*.part"))

    # The next check, with the mirrors honest again, installs the release.
    first.tamper_prefix = second.tamper_prefix = None
    assert serving.check().installed == {MODEL: "2.0.0"}
    assert serving.serving() == "2.0.0"


@pytest.mark.attack(12)
def test_12_a_delta_altered_by_one_mirror_is_still_used_from_the_next(
    repo: Repository,
    serving: Device,
    first: HostileMirror,
    second: HostileMirror,
    bundles: dict[str, Path],
) -> None:
    """The first source alters the delta and the full bundle: the delta is written off
    for that source only, and the second source serves the delta, not the bundle."""
    release(repo, bundles["2.0.0"], delta_from=2)
    delta = delta_url(repo)
    first.set(delta, Replace(b"\0" * delta_length(repo)))
    first.tamper_prefix = BUNDLES

    assert_second_served(serving, first, "length or hash mismatch")
    assert first.fetched(delta) == [""] and first.fetched(bundle_url(repo, "2.0.0")) == [""]
    assert second.fetched(delta) == [""]
    assert second.fetched(bundle_url(repo, "2.0.0")) == []  # the full bundle never moved


def test_what_a_first_mirror_installed_stands_when_the_last_source_is_unreachable(
    repo: Repository,
    bundles: dict[str, Path],
    first: HostileMirror,
    make_mirrored_device: Callable[..., Device],
) -> None:
    """The first source serves desired state but not the bundle; the last source cannot
    be reached: the check reports both, and the model waits with the first one's reason."""
    release(repo, bundles["1.0.0"])
    dead = closed_port_url()
    device = make_mirrored_device(first.url, url=dead)
    first.tamper_prefix = BUNDLES

    result = device.check()
    assert result.installed == {} and result.error is None, result
    assert [f.split(": ", 1)[0] for f in result.source_failures] == [first.url + "/", dead]
    assert "length or hash mismatch" in result.refused[MODEL]
    waiting = device.updates.waiting.snapshot()[MODEL]
    assert waiting.code == "refused" and first.url in waiting.detail, waiting

    first.tamper_prefix = None
    assert device.check().installed == {MODEL: "1.0.0"}


@pytest.mark.attack(12)
def test_12_a_mirror_altering_desired_state_is_refused_and_the_next_serves(
    repo: Repository, serving: Device, first: HostileMirror, bundles: dict[str, Path]
) -> None:
    """Desired state is a signed target too: altered bytes fail its hash, and the whole
    check moves to the next source."""
    release(repo, bundles["2.0.0"])
    first.tamper_prefix = "/targets/" + desired_target_path(FLEET).rpartition("/")[0]
    assert_second_served(serving, first, "length or hash mismatch")
