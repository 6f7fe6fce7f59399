"""A repository restored from an older backup keeps its fleet following.

TUF clients refuse metadata versions lower than the ones they trusted. Before versions
were floored by the clock (``repo.next_version``), a repository restored from a backup
counted on from the backup's versions: every change it signed was below what devices had
seen, and python-tuf refused it (``BadVersionNumberError``) until the count passed
theirs. Here a real python-tuf client follows two releases, the repository folder is put
back as it was after the first (as docs/operations.md's `tar` backup would restore it),
and the next release, made later, reaches the client.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.contracts import desired_target_path, parse_desired_state
from controller.build.builder import BuildOptions, build_bundle
from controller.repository.release import release_bundle
from controller.repository.repo import Repository, next_version
from tests.controller.repository.test_keys import Client
from tests.helpers import make_linear_model

FLEET = "lab"
T0 = datetime.now(UTC).replace(microsecond=0)


def test_next_version_counts_by_one_or_by_the_clock() -> None:
    now = datetime(2026, 12, 4, tzinfo=UTC)
    assert next_version(1, now) == int(now.timestamp())  # far below the clock: the clock
    assert next_version(int(now.timestamp()), now) == int(now.timestamp()) + 1  # same second
    assert next_version(10**10, now) == 10**10 + 1  # ahead of the clock: one more
    assert next_version(5, datetime(1970, 1, 1, 0, 0, 3, tzinfo=UTC)) == 6


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("restore-bundles")
    built = {}
    for seed, version in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1):
        model = make_linear_model(out / f"m{seed}.onnx", seed=seed)
        built[version] = build_bundle(
            model, "lin", version, out / f"{version}.bundle", options=BuildOptions(latency_runs=0)
        ).path
    return built


def _desired_version(client: Client) -> str:
    updater = client.refresh()
    info = updater.get_targetinfo(desired_target_path(FLEET))
    assert info is not None
    downloads = client.dir.parent / "downloads"
    path = Path(updater.download_target(info, str(downloads / f"{len(list(downloads.iterdir()))}")))
    return parse_desired_state(path.read_bytes(), FLEET).models["lin"].version


def test_the_next_release_after_restoring_an_old_backup_reaches_devices(
    tmp_path: Path, repo: Repository, bundles: dict[str, Path]
) -> None:
    (tmp_path / "downloads").mkdir()
    client = Client(tmp_path, repo)
    release_bundle(bundles["1.0.0"], FLEET, repo.path, now=T0)
    backup = tmp_path / "backup"
    shutil.copytree(repo.path, backup)  # the nightly backup
    # More signing after the backup: a release and a day of timestamp re-signs.
    release_bundle(bundles["2.0.0"], FLEET, repo.path, now=T0 + timedelta(minutes=10))
    for hour in range(1, 25):
        Repository.open(repo.path).bump_timestamp(T0 + timedelta(minutes=10, hours=hour))
    assert _desired_version(client) == "2.0.0"
    seen = {role: client.trusted(role) for role in ("timestamp", "snapshot", "targets")}

    # The disk is lost; the backup is put back.
    shutil.rmtree(repo.path)
    shutil.copytree(backup, repo.path)
    restored = Repository.open(repo.path).versions()
    assert all(restored[role] < seen[role] for role in seen), (restored, seen)

    # The operator releases again, two days later: every role it signs is past what the
    # device saw, so the device takes it (counting on from the backup, it refused it).
    result = release_bundle(bundles["3.0.0"], FLEET, repo.path, now=T0 + timedelta(days=2))
    assert all(result.versions[role] > seen[role] for role in seen), (result.versions, seen)
    assert _desired_version(client) == "3.0.0"
