"""One test per attack class of issue 8, against the real update path of a device.

Each test starts from a device serving 1.0.0 (committed) through a hostile mirror, mounts
the attack, runs an update check and asserts two things: the specific rejection, and that
the device still serves its last good version. docs/security.md maps each test to the
attack and the defence.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.contracts import ROLLOUT_ROLE, bundle_target_path, desired_target_path
from agent.contracts.bundle_container import TAR_V2_ZSTD
from agent.contracts.delta import delta_target_path, pack_delta, parse_delta_header
from agent.update.journal import Phase
from agent.update.updater import CheckResult
from controller.base.fsio import repo_lock
from controller.build.delta import make_delta
from controller.repository.ceremony import rotate
from controller.repository.keys import generate_key, load_key_file
from controller.repository.release import release_bundle
from controller.repository.repo import Repository
from tests.security.conftest import FLEET, MODEL, NO_SHADOW, NOW_SERVING, Device, release
from tests.security.simulator import (
    Behaviour,
    Cut,
    Drip,
    Endless,
    Forger,
    HostileMirror,
    Replace,
    capture_metadata,
    evil_desired_state,
)


def target_url(repo: Repository, path: str) -> str:
    """The URL path of a published target (its consistent-snapshot name)."""
    target = repo.load("targets").signed.targets[path]
    return "/" + str(repo.target_file_path(path, target).relative_to(repo.path))


def bundle_url(repo: Repository, version: str) -> str:
    """The URL path of a released bundle."""
    return target_url(repo, bundle_target_path(MODEL, version))


def release_2_0_0_served_as(
    repo: Repository, mirror: HostileMirror, bundles: dict[str, Path], behaviour: Behaviour
) -> str:
    """Release 2.0.0, its bundle served by the mirror with ``behaviour``; the bundle's URL."""
    release(repo, bundles["2.0.0"])
    url = bundle_url(repo, "2.0.0")
    mirror.set(url, behaviour)
    return url


def assert_refresh_rejected(device: Device, *reasons: str) -> None:
    """An update check fails in its metadata refresh, the error naming every one of
    ``reasons``."""
    result = device.check()
    assert result.error is not None
    for reason in reasons:
        assert reason in result.error, result.error


def assert_bundle_refused(device: Device, reason: str) -> None:
    """An update check refuses the model's bundle, saying ``reason``."""
    result = device.check()
    assert MODEL in result.refused, result
    assert reason in result.refused[MODEL], result.refused[MODEL]


def assert_still_serving(device: Device, version: str = "1.0.0") -> None:
    assert device.serving() == version
    assert not list((device.config.state_dir / "models" / MODEL).glob("6.6.6*"))


# ---------------------------------------------------------------------------- 1


@pytest.mark.attack(1)
def test_1_arbitrary_bundle_in_targets_signed_by_a_key_root_does_not_trust(
    repo: Repository, device: Device, forger: Forger, bundles: dict[str, Path]
) -> None:
    """A compromised server (online keys) adds an evil bundle to targets and signs the
    targets with a key of its own; desired state (rollout key, online) points at it."""
    evil = bundles["6.6.6"].read_bytes()
    path = bundle_target_path(MODEL, "6.6.6")
    evil_target = repo.store_target(path, evil)
    attacker = generate_key()
    targets = forger.write(
        "targets", lambda t: t.targets.__setitem__(path, evil_target), [attacker]
    )
    desired_path = desired_target_path(FLEET)
    stored = repo.store_target(desired_path, evil_desired_state(FLEET, MODEL, "6.6.6"))
    rollout = forger.write(
        ROLLOUT_ROLE,
        lambda r: r.targets.__setitem__(desired_path, stored),
        list(repo.signers(ROLLOUT_ROLE).values()),
    )
    forger.publish("targets", int(targets.signed.version))
    forger.publish(ROLLOUT_ROLE, int(rollout.signed.version))

    assert_refresh_rejected(
        device,
        "metadata refresh rejected: signature threshold not met",
        "targets was signed by 0/1 keys",
    )
    assert_still_serving(device)


# ---------------------------------------------------------------------------- 2


@pytest.mark.attack(2)
def test_2_rollback_to_older_metadata_is_refused(
    tmp_path: Path,
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
) -> None:
    """The mirror replays the whole metadata of the 1.0.0 days to a device on 2.0.0."""
    old = capture_metadata(repo, tmp_path / "metadata-1.0.0")
    release(repo, bundles["2.0.0"])
    assert device.check().installed == {MODEL: "2.0.0"}
    mirror.metadata_dir = old

    assert_refresh_rejected(
        device,
        "version mismatch (rollback or mix-and-match)",
        "New timestamp version",
        "must be >=",
    )
    assert device.phase() == (Phase.COMMITTED, "2.0.0")
    assert_still_serving(device, "2.0.0")


# ---------------------------------------------------------------------------- 3


@pytest.mark.attack(3)
def test_3_freeze_an_expired_timestamp_replayed_is_refused(
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    forger: Forger,
    bundles: dict[str, Path],
) -> None:
    """The mirror keeps serving a timestamp captured long ago (newer than what this
    device saw, since expired), hiding the 2.0.0 release from it."""
    online = list(repo.signers("timestamp").values())
    past = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
    frozen = forger.write("timestamp", lambda t: None, online, expires=past + timedelta(days=1))
    mirror.set("/metadata/timestamp.json", Replace(frozen.to_bytes()))
    release(repo, bundles["2.0.0"])  # the real repository moves on

    assert_refresh_rejected(device, "metadata expired", "timestamp.json is expired")
    assert_still_serving(device)


# ---------------------------------------------------------------------------- 4


@pytest.mark.attack(4)
def test_4_mix_and_match_targets_from_another_snapshot_is_refused(
    repo: Repository, device: Device, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    """Snapshot names targets version N; the mirror serves targets version N-1 (validly
    signed, from an older snapshot) under N's name."""
    older = repo.load("targets")
    release(repo, bundles["2.0.0"])
    current = int(repo.load("targets").signed.version)
    assert current > older.signed.version
    mirror.set(f"/metadata/{current}.targets.json", Replace(older.to_bytes()))

    assert_refresh_rejected(
        device,
        "version mismatch (rollback or mix-and-match)",
        f"Expected targets v{current}, got v{older.signed.version}",
    )
    assert_still_serving(device)


# ---------------------------------------------------------------------------- 5


@pytest.mark.attack(5)
def test_5_endless_metadata_is_cut_at_its_maximum_length(
    device: Device, mirror: HostileMirror
) -> None:
    mirror.set("/metadata/timestamp.json", Endless())
    assert_refresh_rejected(device, "exceeding the maximum allowed length")
    assert_still_serving(device)


@pytest.mark.attack(5)
def test_5_endless_bundle_is_cut_at_its_signed_length(
    repo: Repository, device: Device, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    release_2_0_0_served_as(repo, mirror, bundles, Endless())
    assert_bundle_refused(device, "received more than the signed length")
    assert_still_serving(device)
    assert not list((device.config.state_dir / "staging").glob("*.part"))  # not kept


# ---------------------------------------------------------------------------- 6


@pytest.mark.attack(6)
def test_6_slow_retrieval_breaks_the_minimum_progress_rule(
    repo: Repository, make_serving_device: Any, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    """8 bytes every 0.2 s: never silent for a read timeout (2 s), far under 1 kB/s."""
    device = make_serving_device(min_bytes_per_s=1000.0, progress_window_s=1.0)
    release_2_0_0_served_as(repo, mirror, bundles, Drip(size=8, interval_s=0.2))
    assert_bundle_refused(device, "below the minimum progress of 1000 bytes/s")
    assert device.phase() == (Phase.IDLE, "1.0.0")  # put back: retried on the next check
    assert_still_serving(device)


@pytest.mark.attack(6)
def test_6_slow_retrieval_hits_the_overall_deadline(
    repo: Repository, make_serving_device: Any, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    device = make_serving_device(download_deadline_s=1.5)
    release_2_0_0_served_as(repo, mirror, bundles, Drip(size=64, interval_s=0.2))
    assert_bundle_refused(device, "exceeded its deadline of 1.5s")
    assert_still_serving(device)


# ---------------------------------------------------------------------------- 7


@pytest.mark.attack(7)
def test_7_mirror_altering_bundle_bytes_is_refused(
    repo: Repository, device: Device, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    data = bytearray(bundles["2.0.0"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    release_2_0_0_served_as(repo, mirror, bundles, Replace(bytes(data)))
    assert_bundle_refused(device, "length or hash mismatch")
    assert_still_serving(device)
    # The next check against an honest mirror installs the real bytes.
    mirror.clear()
    assert device.check().installed == {MODEL: "2.0.0"}


@pytest.mark.attack(7)
def test_7_mirror_altering_metadata_bytes_is_refused(
    repo: Repository, device: Device, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    release(repo, bundles["2.0.0"])
    version = int(repo.load("targets").signed.version)
    raw = (repo.metadata_dir / f"{version}.targets.json").read_bytes()
    sha = repo.load("targets").signed.targets[bundle_target_path(MODEL, "2.0.0")].hashes
    # The attacker's own bundle hash in place of the signed one.
    forged = raw.replace(sha["sha256"].encode(), b"0" * 64)
    assert forged != raw
    mirror.set(f"/metadata/{version}.targets.json", Replace(forged))
    assert_refresh_rejected(device, "signature threshold not met")
    assert_still_serving(device)


# ---------------------------------------------------------------------------- 8


@pytest.mark.attack(8)
def test_8_root_signed_below_the_threshold_is_refused(
    tmp_path: Path,
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    forger: Forger,
    bundles: dict[str, Path],
) -> None:
    """Root is 2-of-3. One holder turns (or one key leaks): a root that trusts the
    attacker's targets key, signed by that one key, is refused."""
    with repo_lock(repo.path):
        ceremony = rotate(repo, "root", count=3, threshold=2, key_out=tmp_path / "holders")
    assert device.check().error is None
    assert device.trusted_version("root") == 2
    leaked = load_key_file(ceremony.key_files[0])
    attacker = generate_key()

    def trust_attacker(root: Any) -> None:
        for keyid in list(root.roles["targets"].keyids):
            root.revoke_key(keyid, "targets")
        root.add_key(attacker.public_key, "targets")

    release(repo, bundles["2.0.0"])  # whatever else happens, this root must not pass
    evil_root = forger.make("root", trust_attacker, [leaked])
    mirror.set("/metadata/3.root.json", Replace(evil_root.to_bytes()))

    assert_refresh_rejected(device, "signature threshold not met", "root was signed by 1/2 keys")
    assert device.trusted_version("root") == 2
    assert_still_serving(device)


# ---------------------------------------------------------------------------- 9


@pytest.mark.attack(9)
def test_9_rollout_key_signing_a_bundle_is_ignored(
    repo: Repository, device: Device, forger: Forger, bundles: dict[str, Path]
) -> None:
    """The online rollout key lists an evil bundle itself, with its right hash, and points
    desired state at it: the delegation covers fleets/*/* only, so TUF never sees it."""
    evil_path = bundle_target_path(MODEL, "6.6.6")
    evil = repo.store_target(evil_path, bundles["6.6.6"].read_bytes())
    desired_path = desired_target_path(FLEET)
    desired = repo.store_target(desired_path, evil_desired_state(FLEET, MODEL, "6.6.6"))

    def sign_both(rollout: Any) -> None:
        rollout.targets[desired_path] = desired
        rollout.targets[evil_path] = evil

    md = forger.write(ROLLOUT_ROLE, sign_both, list(repo.signers(ROLLOUT_ROLE).values()))
    forger.publish(ROLLOUT_ROLE, int(md.signed.version))

    assert_bundle_refused(
        device, "desired state names bundles/lin/6.6.6.bundle, which no signed targets list"
    )
    assert device.phase() == (Phase.FAILED, "6.6.6")  # refused before any byte came
    assert_still_serving(device)


# ---------------------------------------------------------------------------- 10


@pytest.mark.attack(10)
def test_10_root_rotation_is_followed_and_a_root_from_the_old_key_is_refused(
    tmp_path: Path,
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    forger: Forger,
    bundles: dict[str, Path],
) -> None:
    """The operator rotates the root key (and the release key); the untouched device
    follows and installs a release signed after the rotation. The old root key, stolen,
    then signs a root v4 that the mirror serves: refused."""
    stolen = load_key_file(repo.keys_dir / "root.pem")
    shutil.copy(repo.keys_dir / "root.pem", tmp_path / "stolen-root.pem")
    with repo_lock(repo.path):
        rotate(repo, "root")
        rotate(repo, "targets")
    assert repo.root_version() == 3
    release(repo, bundles["2.0.0"])
    assert device.check().installed == {MODEL: "2.0.0"}
    assert device.trusted_version("root") == 3

    attacker = generate_key()
    evil_root = forger.make(
        "root", lambda root: root.add_key(attacker.public_key, "targets"), [stolen]
    )
    mirror.set("/metadata/4.root.json", Replace(evil_root.to_bytes()))
    assert_refresh_rejected(device, "root was signed by 0/1 keys")
    assert device.trusted_version("root") == 3
    assert_still_serving(device, "2.0.0")


# ---------------------------------------------------------------------------- resumption


def test_a_download_cut_at_half_is_resumed_with_range_and_verified(
    repo: Repository, device: Device, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    url = release_2_0_0_served_as(repo, mirror, bundles, Cut(0.5))
    length = bundles["2.0.0"].stat().st_size

    assert_bundle_refused(device, "transfer failed")
    assert device.phase() == (Phase.IDLE, "1.0.0")
    (part,) = (device.config.state_dir / "staging").glob("*.part")
    assert part.stat().st_size == int(length * 0.5)
    assert_still_serving(device)

    second = device.check()
    assert second.installed == {MODEL: "2.0.0"}
    assert mirror.fetched(url) == ["", f"bytes={int(length * 0.5)}-"]
    assert device.serving() == "2.0.0"
    assert not list((device.config.state_dir / "staging").glob("*.part"))


def test_a_resumed_part_of_other_bytes_fails_the_whole_file_hash(
    repo: Repository, device: Device, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    """What was kept from an interrupted download is not trusted: the hash covers it."""
    release_2_0_0_served_as(repo, mirror, bundles, Cut(0.5))
    device.check()
    (part,) = (device.config.state_dir / "staging").glob("*.part")
    part.write_bytes(b"\0" * part.stat().st_size)  # corrupted while the device was off
    assert_bundle_refused(device, "length or hash mismatch")
    assert not part.exists()  # dropped: the next check starts over
    assert device.check().installed == {MODEL: "2.0.0"}


# ---------------------------------------------------------------------------- 11


def sign_delta(repo: Repository, delta: bytes, version: str = "2.0.0", old: str = "1.0.0") -> str:
    """Sign ``delta`` into targets (release key) as the delta ``old`` → ``version``: what a
    buggy or compromised delta writer on the controller would publish. Its URL path."""
    path = delta_target_path(MODEL, version, old)
    with repo_lock(repo.path):
        stored = repo.store_target(path, delta)
        repo.update_targets("targets", {path: stored})
        repo.publish()
    return "/" + str(repo.target_file_path(path, stored).relative_to(repo.path))


def delta_url(repo: Repository, version: str = "2.0.0", old: str = "1.0.0") -> str:
    """The URL path of the published delta ``old`` → ``version``."""
    return target_url(repo, delta_target_path(MODEL, version, old))


def delta_length(repo: Repository, version: str = "2.0.0", old: str = "1.0.0") -> int:
    """The signed length of the published delta ``old`` → ``version``."""
    return int(repo.load("targets").signed.targets[delta_target_path(MODEL, version, old)].length)


def release_2_0_0_without_delta(repo: Repository, bundles: dict[str, Path]) -> None:
    """Release 2.0.0 with no delta published (the tests sign their own)."""
    release_bundle(
        bundles["2.0.0"], FLEET, repo.path, probation=NOW_SERVING, shadow=NO_SHADOW, delta_from=0
    )


def check_logged(
    device: Device, caplog: pytest.LogCaptureFixture, level: int = logging.WARNING
) -> CheckResult:
    """An update check, the updater's log from ``level`` kept in ``caplog``."""
    with caplog.at_level(level, logger="agent.update.updater"):
        return device.check()


def rewrite_delta(delta: bytes, change: Any) -> bytes:
    (length,) = struct.unpack(">I", delta[8:12])
    doc = json.loads(delta[12 : 12 + length])
    change(doc)
    return pack_delta(doc, delta[12 + length :])


@pytest.mark.attack(11)
def test_11_signed_delta_that_rebuilds_another_bundle_is_refused_and_the_full_one_used(
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    release_2_0_0_without_delta(repo, bundles)
    # A well-formed delta from the installed 1.0.0 that rebuilds 3.0.0's bundle, relabelled
    # as the delta to 2.0.0: every check of the delta itself passes, only the rebuilt
    # file's hash against the signed 2.0.0 target can tell.
    evil = make_delta(bundles["1.0.0"].read_bytes(), bundles["3.0.0"].read_bytes())
    url = sign_delta(repo, rewrite_delta(evil, lambda d: d.update(to="2.0.0")))
    result = check_logged(device, caplog)
    assert mirror.fetched(url) == [""]
    assert result.installed == {MODEL: "2.0.0"}, result
    assert device.serving() == "2.0.0"
    assert "length or hash mismatch" in caplog.text and "downloading the full bundle" in caplog.text
    assert mirror.fetched(bundle_url(repo, "2.0.0")) == [""]


@pytest.mark.attack(11)
def test_11_signed_delta_declaring_oversized_output_is_refused_before_work(
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    release_2_0_0_without_delta(repo, bundles)
    honest = make_delta(bundles["1.0.0"].read_bytes(), bundles["2.0.0"].read_bytes())

    def inflate(doc: dict[str, Any]) -> None:
        doc["members"][1]["size"] = 1 << 40  # a terabyte of "model"
        doc["members"][1]["body"]["size"] = 1 << 40

    sign_delta(repo, rewrite_delta(honest, inflate))
    result = check_logged(device, caplog)
    assert result.installed == {MODEL: "2.0.0"}, result
    assert "must be an integer in [0, " in caplog.text and "downloading the full" in caplog.text


def test_a_delta_compressed_by_another_libzstd_is_skipped_and_logged_once(
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The bundles here are format 2: a delta rebuilds them by compressing again, which
    # gives the signed frames only with the controller's libzstd release.
    release_2_0_0_without_delta(repo, bundles)
    honest = make_delta(bundles["1.0.0"].read_bytes(), bundles["2.0.0"].read_bytes())
    assert parse_delta_header(honest, 1 << 30).container == TAR_V2_ZSTD
    url = sign_delta(repo, rewrite_delta(honest, lambda d: d.update(libzstd="0.0.1")))
    result = check_logged(device, caplog)
    assert mirror.fetched(url) == [""]
    assert result.installed == {MODEL: "2.0.0"}, result
    assert caplog.text.count("compressed with libzstd 0.0.1") == 1, caplog.text
    assert mirror.fetched(bundle_url(repo, "2.0.0")) == [""]


def test_a_delta_is_used_when_listed_and_smaller(
    repo: Repository, device: Device, mirror: HostileMirror, bundles: dict[str, Path]
) -> None:
    release(repo, bundles["2.0.0"], delta_from=2)  # publishes the delta from 1.0.0
    bundle_length = repo.load("targets").signed.targets[bundle_target_path(MODEL, "2.0.0")].length
    assert delta_length(repo) < bundle_length
    assert device.check().installed == {MODEL: "2.0.0"}
    assert device.serving() == "2.0.0"
    url = delta_url(repo)
    assert mirror.fetched(url) == [""]
    assert mirror.fetched(bundle_url(repo, "2.0.0")) == []  # the full bundle never moved


def test_a_delta_altered_by_the_mirror_falls_back_to_the_full_bundle(
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    release(repo, bundles["2.0.0"], delta_from=2)
    url = delta_url(repo)
    mirror.set(url, Replace(b"\0" * delta_length(repo)))
    assert check_logged(device, caplog).installed == {MODEL: "2.0.0"}
    assert mirror.fetched(bundle_url(repo, "2.0.0")) == [""]
    assert caplog.text.count("not used") == 1


def test_a_cut_delta_is_resumed_on_the_next_check_and_logged_once(
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A transfer cut (not altered bytes) does not write the delta off: with the full
    bundle cut too, the install is put back, and the next check resumes the delta."""
    release(repo, bundles["2.0.0"], delta_from=2)
    url = delta_url(repo)
    mirror.set(url, Cut(0.5))
    mirror.set(bundle_url(repo, "2.0.0"), Cut(0.5))
    with caplog.at_level(logging.INFO, logger="agent.update.updater"):
        assert MODEL in device.check().refused
        assert device.serving() == "1.0.0"
        assert device.check().installed == {MODEL: "2.0.0"}
    ranges = mirror.fetched(url)
    assert ranges[0] == "" and ranges[1].startswith("bytes=") and len(ranges) == 2
    assert caplog.text.count("not used") == 1
    assert "rebuilt from" in caplog.text


def test_a_missing_base_falls_back_to_the_full_bundle(
    repo: Repository,
    device: Device,
    mirror: HostileMirror,
    bundles: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    release(repo, bundles["2.0.0"], delta_from=2)
    shutil.rmtree(device.config.state_dir / "models" / MODEL / "1.0.0")
    assert check_logged(device, caplog).installed == {MODEL: "2.0.0"}
    assert "are not on disk" in caplog.text
    assert mirror.fetched(bundle_url(repo, "2.0.0")) == [""]


def test_the_suite_knows_every_attack_class() -> None:
    """A guard for the tally: every class of issue 8 has a test above."""
    import inspect
    import sys

    module = sys.modules[__name__]
    classes = {
        marker.args[0]
        for _, fn in inspect.getmembers(module, inspect.isfunction)
        for marker in getattr(fn, "pytestmark", [])
        if marker.name == "attack"
    }
    assert classes == set(range(1, 12))
