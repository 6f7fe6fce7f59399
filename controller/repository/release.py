"""``edgectl release``: publish a bundle and point a fleet's desired state at it.

The orchestrator (``release_bundle``) validates the bundle, then, under the repository
lock: adds it to top-level targets (release key), writes the fleet's desired state into
the delegated rollout role (online key), and signs a new snapshot and timestamp.

Invariants:
- A released (model, version) never changes bytes: the same bytes again only re-point
  the fleet; different bytes raise ConflictError.
- A fleet's desired state keeps other models' entries; ``previous`` names the version
  the fleet was told to run before, when it differs.
- Nothing is signed when nothing changes (releasing what a fleet already runs).
- ``require_clean`` (``--require-clean``) judges the bundle's manifest before anything is
  prepared or written: no Git record, a dirty tree or an uncommitted model file refuse it.
- ``next_desired_state`` is pure: data in, data out, no clock or randomness.
- A new version is published with its deltas from the ``delta_from`` highest earlier
  versions of the model the targets list (``bundles/<model>/<version>.from-<old>.delta``,
  ``controller.build.delta``), in the same signing as the bundle; a delta is kept only
  when it is at most ``DELTA_MAX_SHARE`` of the bundle's length. Deltas are made before
  the repository lock is taken (``prepare_deltas``); under it, a delta whose old bundle
  is still the same bytes is used, any other is made then.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.base.errors import BundleError, DesiredStateError
from agent.contracts import (
    ROLLOUT_ROLE,
    DesiredState,
    InvalidNameError,
    Manifest,
    ModelRelease,
    ProbationPolicy,
    ShadowPolicy,
    bundle_target_path,
    check_name,
    desired_target_path,
    parse_desired_state,
    version_key,
)
from agent.contracts.delta import delta_target_path
from controller.base.errors import ConflictError, RepositoryError, UsageError
from controller.build.bundle_file import read_bundle
from controller.build.delta import make_delta
from controller.build.provenance import unclean_reason
from controller.repository.repo import Repository
from controller.repository.rotation import locked_repository, roll_forward

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile

logger = logging.getLogger(__name__)

# Deltas from this many earlier versions by default (``--delta-from``).
DEFAULT_DELTA_FROM = 2
# A delta is published only when it is at most this share of the full bundle: below
# that, the saving on the wire is worth the device's work of rebuilding.
DELTA_MAX_SHARE = 0.8


@dataclass(frozen=True)
class ReleaseResult:
    """What ``release_bundle`` did, for the CLI to print."""

    model: str
    version: str
    fleet: str
    target_path: str
    sha256: str
    length: int
    bundle_added: bool
    fleet_changed: bool
    rollout_id: str
    versions: dict[str, int]
    # (from version, delta length) of each delta published with the bundle; deltas
    # made and not kept (not small enough) are in ``deltas_skipped`` (from, reason).
    deltas: tuple[tuple[str, int], ...] = ()
    deltas_skipped: tuple[tuple[str, str], ...] = ()


def next_desired_state(
    current: DesiredState | None,
    fleet: str,
    model: str,
    version: str,
    rollout_id: str,
    issued_at: str,
    probation: ProbationPolicy | None = None,
    shadow: ShadowPolicy | None = None,
) -> DesiredState | None:
    """The fleet's desired state after releasing ``model`` ``version`` to all its devices.

    Returns None when the fleet already runs exactly that release (nothing to sign).
    """
    models = dict(current.models) if current else {}
    before = models.get(model)
    if before is not None and before.version == version and before.percent == 100.0:
        return None
    previous = before.version if before is not None and before.version != version else None
    if before is not None and before.version == version:
        previous = before.previous  # re-pointing a partial rollout keeps its fallback
    models[model] = ModelRelease(
        version=version,
        target=bundle_target_path(model, version),
        rollout_id=rollout_id,
        percent=100.0,
        previous=previous,
        previous_target=bundle_target_path(model, previous) if previous else None,
        canaries=(),
        probation=probation or ProbationPolicy(),
        shadow=shadow or ShadowPolicy(),
    )
    return DesiredState(fleet=fleet, models=models, issued_at=issued_at)


def new_rollout_id(model: str, version: str) -> str:
    """A rollout id unique per release: ``<model>-<version>-<8 hex>``."""
    return f"{model}-{version}-{secrets.token_hex(4)}"


def release_bundle(
    bundle: Path,
    fleet: str,
    repo_dir: Path,
    now: datetime | None = None,
    probation: ProbationPolicy | None = None,
    delta_from: int = DEFAULT_DELTA_FROM,
    shadow: ShadowPolicy | None = None,
    require_clean: bool = False,
) -> ReleaseResult:
    """Publish ``bundle`` and make it the desired release of ``fleet``.

    ``probation`` is the policy devices apply after activating it, ``shadow`` the one
    they apply before (default: the contract's defaults). ``delta_from`` earlier
    versions get a delta to this one (0: none). ``require_clean`` refuses, before anything
    is written, a bundle whose manifest does not show a clean Git work tree
    (``controller.build.provenance.unclean_reason``).

    Raises UsageError (bad fleet name, missing file), BundleFileError (malformed bundle),
    RepositoryError (no repository, damaged metadata), ConflictError (the version is
    already released with different bytes).
    """
    try:
        check_name("fleet", fleet)
    except InvalidNameError as exc:
        raise UsageError(str(exc)) from None
    info = read_bundle(bundle)
    manifest = info.manifest
    if require_clean:
        check_clean(manifest, bundle)
    now = now or datetime.now(UTC).replace(microsecond=0)
    target_path = bundle_target_path(manifest.name, manifest.version)
    prepared = prepare_deltas(repo_dir, target_path, bundle.read_bytes(), delta_from)
    with locked_repository(repo_dir, now=now) as repo:
        bundle_added, deltas = _add_bundle(
            repo, target_path, bundle, info.sha256, info.length, now, delta_from, prepared
        )
        current = _current_desired(repo, fleet)
        rollout_id = new_rollout_id(manifest.name, manifest.version)
        desired = next_desired_state(
            current,
            fleet,
            manifest.name,
            manifest.version,
            rollout_id,
            now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            probation,
            shadow,
        )
        if desired is not None:
            path = desired_target_path(fleet)
            stored = repo.store_target(path, desired.to_json_bytes())
            repo.update_targets(ROLLOUT_ROLE, {path: stored}, now)
        else:
            rollout_id = current.models[manifest.name].rollout_id if current else rollout_id
        if bundle_added or desired is not None:
            repo.publish(now)
        versions = repo.versions()
    logger.info("released %s to fleet %s", target_path, fleet)
    return ReleaseResult(
        model=manifest.name,
        version=manifest.version,
        fleet=fleet,
        target_path=target_path,
        sha256=info.sha256,
        length=info.length,
        bundle_added=bundle_added,
        fleet_changed=desired is not None,
        rollout_id=rollout_id,
        versions=versions,
        deltas=deltas.kept,
        deltas_skipped=deltas.skipped,
    )


def check_clean(manifest: Manifest, bundle: Path) -> None:
    """``--require-clean``: raise UsageError unless ``manifest`` records a clean Git tree."""
    why = unclean_reason(manifest.source)
    if why is not None:
        raise UsageError(
            f"--require-clean refuses {bundle} ({manifest.name} {manifest.version}): {why}. "
            "Commit the changes and rebuild it from the clean work tree (edgectl bundle "
            "build), or release it without --require-clean; nothing was published"
        )


@dataclass(frozen=True)
class _Deltas:
    kept: tuple[tuple[str, int], ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()


def _add_bundle(
    repo: Repository,
    target_path: str,
    bundle: Path,
    sha256: str,
    length: int,
    now: datetime,
    delta_from: int = 0,
    prepared: Mapping[tuple[str, str], bytes] | None = None,
) -> tuple[bool, _Deltas]:
    """Add the bundle (and its deltas) to top-level targets, in one signing; False when
    those exact bytes are already there (no delta is made then)."""
    existing = repo.load("targets").signed.targets.get(target_path)
    if existing is not None:
        if existing.hashes.get("sha256") == sha256 and existing.length == length:
            return False, _Deltas()
        model, version = target_path.split("/")[1], target_path.rsplit("/", 1)[1]
        raise ConflictError(
            f"version {version.removesuffix('.bundle')} of {model} is already released with "
            f"different content (sha256 {existing.hashes.get('sha256')}, this bundle "
            f"{sha256}); bump the version"
        )
    data = bundle.read_bytes()
    stored = repo.store_target(target_path, data)
    if stored.hashes["sha256"] != sha256:
        raise RepositoryError(f"{bundle} changed while it was being released; try again")
    changes, deltas = _make_deltas(repo, target_path, data, delta_from, prepared or {})
    repo.update_targets("targets", {target_path: stored, **changes}, now)
    return True, deltas


def earlier_versions(repo: Repository, model: str, version: str, count: int) -> list[str]:
    """The ``count`` highest versions of ``model`` below ``version`` in the signed targets."""
    if count <= 0:
        return []
    prefix = f"bundles/{model}/"
    found = []
    for path in repo.load("targets").signed.targets:
        name = path.removeprefix(prefix)
        if path.startswith(prefix) and name.endswith(".bundle") and "/" not in name:
            old = name.removesuffix(".bundle")
            if version_key(old) < version_key(version):
                found.append(old)
    return sorted(found, key=version_key)[-count:]


def prepare_deltas(
    repo_dir: Path, target_path: str, data: bytes, delta_from: int
) -> dict[tuple[str, str], bytes]:
    """The deltas to the bundle ``data`` from the earlier versions, made before the
    repository lock is taken (making them takes seconds on a large model, and the rollout
    job waits on the lock): (old version, its bundle's sha256) → delta or b"" (none
    possible). Nothing when the bundle is already published or the repository cannot be
    read now; under the lock, ``_make_deltas`` makes what is missing."""
    if delta_from <= 0:
        return {}
    try:
        repo = Repository.open(repo_dir)
        targets = repo.load("targets").signed.targets
    except (OSError, RepositoryError):
        return {}
    if target_path in targets:
        return {}
    model, version = _model_version(target_path)
    out: dict[tuple[str, str], bytes] = {}
    for old in earlier_versions(repo, model, version, delta_from):
        target = targets[bundle_target_path(model, old)]
        try:
            old_data = repo.target_file_path(target.path, target).read_bytes()
            out[(old, target.hashes["sha256"])] = make_delta(old_data, data)
        except (OSError, BundleError):
            continue  # made (and its failure reported) under the lock
    return out


def _model_version(target_path: str) -> tuple[str, str]:
    model, version = target_path.split("/")[1], target_path.rsplit("/", 1)[1]
    return model, version.removesuffix(".bundle")


def _make_deltas(
    repo: Repository,
    target_path: str,
    data: bytes,
    delta_from: int,
    prepared: Mapping[tuple[str, str], bytes],
) -> tuple[dict[str, TargetFile], _Deltas]:
    """Store the deltas to the bundle ``data`` worth publishing; return their targets.
    A delta in ``prepared`` for the same old bundle bytes is used as it is."""
    model, version = _model_version(target_path)
    targets = repo.load("targets").signed.targets
    changes: dict[str, TargetFile] = {}
    kept: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    for old in earlier_versions(repo, model, version, delta_from):
        old_path = bundle_target_path(model, old)
        sha = targets[old_path].hashes["sha256"]
        try:
            delta = prepared.get((old, sha)) or make_delta(
                repo.target_file_path(old_path, targets[old_path]).read_bytes(), data
            )
        except (OSError, BundleError) as exc:
            logger.warning("no delta %s → %s of %s: %s", old, version, model, exc)
            skipped.append((old, str(exc)))
            continue
        if len(delta) > DELTA_MAX_SHARE * len(data):
            share = len(delta) / len(data)
            skipped.append((old, f"{len(delta)} bytes, {share:.0%} of the bundle: not kept"))
            continue
        path = delta_target_path(model, version, old)
        changes[path] = repo.store_target(path, delta)
        kept.append((old, len(delta)))
    return changes, _Deltas(tuple(kept), tuple(skipped))


def _current_desired(repo: Repository, fleet: str) -> DesiredState | None:
    return current_desired_state(repo, fleet)


def current_desired_state(repo: Repository, fleet: str) -> DesiredState | None:
    """The fleet's desired state as the rollout role signs it now, or None.

    Raises RepositoryError when it is damaged.
    """
    raw = repo.read_target(ROLLOUT_ROLE, desired_target_path(fleet))
    if raw is None:
        return None
    try:
        return parse_desired_state(raw, fleet)
    except DesiredStateError as exc:
        raise RepositoryError(
            f"the current desired state of fleet {fleet} is damaged: {exc}"
        ) from None


def publish_bundle(
    bundle: Path,
    repo_dir: Path,
    now: datetime | None = None,
    delta_from: int = DEFAULT_DELTA_FROM,
    require_clean: bool = False,
) -> ReleaseResult:
    """Add ``bundle`` to top-level targets (release key) without pointing any fleet at it.

    ``edgectl rollout start --bundle`` uses it; the rollout then moves the fleet.
    Raises what ``release_bundle`` raises.
    """
    info = read_bundle(bundle)
    manifest = info.manifest
    if require_clean:
        check_clean(manifest, bundle)
    now = now or datetime.now(UTC).replace(microsecond=0)
    target_path = bundle_target_path(manifest.name, manifest.version)
    prepared = prepare_deltas(repo_dir, target_path, bundle.read_bytes(), delta_from)
    with locked_repository(repo_dir, now=now) as repo:
        added, deltas = _add_bundle(
            repo, target_path, bundle, info.sha256, info.length, now, delta_from, prepared
        )
        if added:
            repo.publish(now)
        versions = repo.versions()
    logger.info("published %s (no fleet changed)", target_path)
    return ReleaseResult(
        model=manifest.name,
        version=manifest.version,
        fleet="",
        target_path=target_path,
        sha256=info.sha256,
        length=info.length,
        bundle_added=added,
        fleet_changed=False,
        rollout_id="",
        versions=versions,
        deltas=deltas.kept,
        deltas_skipped=deltas.skipped,
    )


def write_model_release(
    repo: Repository, fleet: str, model: str, release: ModelRelease, now: datetime
) -> bool:
    """Make ``release`` the fleet's entry for ``model``, keeping the other models' entries.

    Signs the rollout role, then a new snapshot and timestamp. Returns False (and signs
    nothing) when the entry is already exactly that. Hold ``repo_lock``; raises
    RepositoryError.
    """
    roll_forward(repo, now)  # the rollout job's way in: an interrupted rotation first
    current = current_desired_state(repo, fleet)
    if current is not None and current.models.get(model) == release:
        return False
    models = dict(current.models) if current else {}
    models[model] = release
    desired = DesiredState(fleet=fleet, models=models, issued_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"))
    path = desired_target_path(fleet)
    stored = repo.store_target(path, desired.to_json_bytes())
    repo.update_targets(ROLLOUT_ROLE, {path: stored}, now)
    repo.publish(now)
    return True
