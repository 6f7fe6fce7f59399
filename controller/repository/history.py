"""Release history: what the repository has shipped, who is told to run it, going back.

Reading and changing the history behind ``edgectl release list|show|diff|retire|prune``
(docs/releases.md); its text and ``--json`` views are ``controller.repository.history_view``.
The pure core (``fleet_references``, ``device_counts``, ``diff_manifests``,
``due_for_pruning``) takes data; the orchestrators (``load_releases``, ``retire_release``,
``prune_retired``) read the repository through ``controller.repository.repo``'s public
methods and write under ``rotation.locked_repository`` (the lock).

Invariants:
- A release is a ``bundles/<model>/<version>.bundle`` entry of the current top-level
  targets; its facts come from the manifest inside the stored bundle.
- A release is retired only while no fleet's desired state names it, as ``version`` or
  as ``previous`` (the version an abort or a device rollback goes back to).
- Retiring removes the target from targets metadata (release key) and records the time
  in ``REPO_DIR/retired.json`` (not served); the bundle file stays on disk until the
  grace period has passed, then ``prune_retired`` deletes it unless the targets name it
  again (a re-release of the same bytes shares its consistent-snapshot file name).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from agent.base.errors import BundleError
from agent.contracts import (
    DesiredState,
    InvalidNameError,
    Manifest,
    bundle_target_path,
    check_name,
    check_version,
    parse_manifest,
    version_key,
)
from agent.contracts.bundle_container import read_manifest_member
from agent.contracts.delta import parse_delta_target
from controller.base.errors import RepositoryError, UsageError
from controller.base.fsio import atomic_write, durable_unlink
from controller.fleet.records import DeviceRow
from controller.repository.release import current_desired_state
from controller.repository.repo import Repository
from controller.repository.rotation import locked_repository

logger = logging.getLogger(__name__)

RETIRED_FILE: Final = "retired.json"
RETIRED_SCHEMA: Final = "edgefleet.retired/1"
# Long enough for a device that fetched targets metadata just before the retirement to
# finish downloading, and for an operator to notice a mistake; the agent drops staged
# parts untouched for the same 7 days.
DEFAULT_GRACE: Final = timedelta(days=7)
_BUNDLE_PREFIX: Final = "bundles/"
_BUNDLE_SUFFIX: Final = ".bundle"


class RetireRefusedError(UsageError):
    """A retirement would strand a fleet: its desired state still names the release."""


@dataclass(frozen=True)
class FleetReference:
    """A fleet whose desired state names a release, as ``version`` or ``previous``."""

    fleet: str
    role: str  # "desired" or "previous"
    percent: float


@dataclass(frozen=True)
class Release:
    """One published release: its manifest, bundle facts and where it is deployed.

    ``devices`` is None when the telemetry store was not reachable.
    """

    model: str
    version: str
    target_path: str
    sha256: str
    length: int
    manifest: Manifest
    fleets: tuple[FleetReference, ...] = ()
    devices: int | None = None
    # (from version, bytes) of each delta published to this version, oldest first.
    deltas: tuple[tuple[str, int], ...] = ()

    @property
    def recipe(self) -> str:
        return str(self.manifest.build.get("recipe") or "-")

    @property
    def quality(self) -> Mapping[str, Any]:
        summary = self.manifest.quality.get("summary")
        return summary if isinstance(summary, Mapping) else {}


@dataclass(frozen=True)
class Change:
    """One field that differs between two releases."""

    field: str
    before: Any
    after: Any


@dataclass(frozen=True)
class ReleaseDiff:
    """What changed from ``old`` to ``new``; ``signature_changed`` means clients break."""

    model: str
    old: str
    new: str
    changes: tuple[Change, ...]
    signature_changed: bool
    warnings: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------- pure core


def fleet_references(
    desired: Mapping[str, DesiredState], model: str, version: str
) -> list[FleetReference]:
    """The fleets whose desired state names ``model`` ``version``, sorted by fleet."""
    found = []
    for fleet, state in sorted(desired.items()):
        entry = state.models.get(model)
        if entry is None:
            continue
        if entry.version == version:
            found.append(FleetReference(fleet, "desired", entry.percent))
        elif entry.previous == version and entry.percent < 100.0:
            found.append(FleetReference(fleet, "previous", 100.0 - entry.percent))
        elif entry.previous == version:
            # At 100 % no device is told to run it, but an abort or a device's
            # rollback goes back to it: still a reference.
            found.append(FleetReference(fleet, "previous", 0.0))
    return found


def device_counts(rows: Iterable[DeviceRow]) -> dict[tuple[str, str], int]:
    """How many devices report running each (model, version)."""
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        for m in row.models:
            if m.version:
                key = (m.model, m.version)
                counts[key] = counts.get(key, 0) + 1
    return counts


def signature(manifest: Manifest) -> dict[str, list[str]]:
    """Inputs and outputs as ``name:DATATYPE[shape]`` strings (-1: dynamic axis)."""

    def text(specs: Iterable[Any]) -> list[str]:
        return [f"{t.name}:{t.datatype}{list(t.shape)}" for t in specs]

    return {"inputs": text(manifest.inputs), "outputs": text(manifest.outputs)}


def diff_manifests(old: Manifest, new: Manifest, old_length: int, new_length: int) -> ReleaseDiff:
    """Compare two releases of one model: signature, opset, recipe, sizes, quality, and
    each key of their ``source`` (where the model came from)."""
    if old.name != new.name:
        raise UsageError(f"diff compares releases of one model, got {old.name} and {new.name}")
    sig_old, sig_new = signature(old), signature(new)
    pairs: list[tuple[str, Any, Any]] = [
        ("inputs", sig_old["inputs"], sig_new["inputs"]),
        ("outputs", sig_old["outputs"], sig_new["outputs"]),
        ("opset", old.opset, new.opset),
        ("min_ort_version", old.min_ort_version, new.min_ort_version),
        ("recipe", old.build.get("recipe"), new.build.get("recipe")),
        ("bundle_bytes", old_length, new_length),
    ]
    for key in sorted(set(old.sizes) | set(new.sizes)):
        pairs.append((f"sizes.{key}", old.sizes.get(key), new.sizes.get(key)))
    q_old, q_new = _summary(old), _summary(new)
    for key in sorted(set(q_old) | set(q_new)):
        pairs.append((f"quality.{key}", q_old.get(key), q_new.get(key)))
    pairs.append(
        ("golden", golden_text(old), golden_text(new)),
    )
    s_old, s_new = old.source or {}, new.source or {}
    for key in sorted(set(s_old) | set(s_new)):
        pairs.append((f"source.{key}", s_old.get(key), s_new.get(key)))
    changes = tuple(Change(f, a, b) for f, a, b in pairs if a != b)
    changed = sig_old != sig_new
    warnings: tuple[str, ...] = ()
    if changed:
        warnings = (
            f"the input/output signature of {old.name} differs between {old.version} and "
            f"{new.version}: clients on the device that call it would break",
        )
    return ReleaseDiff(old.name, old.version, new.version, changes, changed, warnings)


def _summary(m: Manifest) -> Mapping[str, Any]:
    summary = m.quality.get("summary")
    return summary if isinstance(summary, Mapping) else {}


def golden_text(m: Manifest) -> str:
    """The golden vectors' case count and tolerances, as diff and ``release show`` print them."""
    return f"{m.golden.cases} cases, rtol {m.golden.rtol:g}, atol {m.golden.atol:g}"


def due_for_pruning(
    retired: Mapping[str, Mapping[str, Any]],
    live_targets: Iterable[str],
    now: datetime,
    grace: timedelta,
) -> list[str]:
    """Retired target paths whose grace period has passed and the targets do not name again."""
    live = set(live_targets)
    due = []
    for path, info in sorted(retired.items()):
        at = _parse_time(str(info.get("retired_at", "")))
        if path not in live and at is not None and now - at >= grace:
            due.append(path)
    return due


def is_going_back(version: str, previous: str | None) -> bool:
    """True when a rollout moves a fleet to an older release than the one it runs."""
    return previous is not None and version_key(version) < version_key(previous)


# ---------------------------------------------------------------------------- reading


def _check(model: str | None, version: str | None = None) -> None:
    try:
        if model is not None:
            check_name("model", model)
        if version is not None:
            check_version(version)
    except InvalidNameError as exc:
        raise UsageError(str(exc)) from None


def _split_target(path: str) -> tuple[str, str] | None:
    if not (path.startswith(_BUNDLE_PREFIX) and path.endswith(_BUNDLE_SUFFIX)):
        return None
    parts = path.removeprefix(_BUNDLE_PREFIX).removesuffix(_BUNDLE_SUFFIX).split("/")
    return (parts[0], parts[1]) if len(parts) == 2 else None


def delta_targets(targets: Mapping[str, Any]) -> dict[tuple[str, str], list[tuple[str, str, int]]]:
    """(model, version) → [(target path, from version, length)] of the deltas to it."""
    out: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
    for path, target in targets.items():
        parsed = parse_delta_target(path)
        if parsed is not None:
            model, version, old = parsed
            out.setdefault((model, version), []).append((path, old, int(target.length)))
    return out


def read_stored_manifest(bundle_file: Path) -> Manifest:
    """The manifest inside a stored bundle, without reading the model. Raises RepositoryError."""
    try:
        # The manifest is the first member, stored as it is, in every bundle format.
        return parse_manifest(read_manifest_member(bundle_file))
    except (OSError, BundleError) as exc:
        raise RepositoryError(f"stored bundle {bundle_file} is unreadable: {exc}") from None


def desired_states(repo: Repository) -> dict[str, DesiredState]:
    """Every fleet's current desired state."""
    out = {}
    for fleet in repo.fleets():
        state = current_desired_state(repo, fleet)
        if state is not None:
            out[fleet] = state
    return out


def load_releases(
    repo_dir: Path,
    model: str | None = None,
    devices: Sequence[DeviceRow] | None = None,
) -> list[Release]:
    """Every release (of ``model``) in the signed targets, oldest version first.

    ``devices`` are the telemetry store's rows (None: the store was not reachable).
    Raises UsageError (bad or unknown model name), RepositoryError.
    """
    _check(model)
    repo = Repository.open(repo_dir)
    targets = repo.load("targets").signed.targets
    desired = desired_states(repo)
    counts = device_counts(devices) if devices is not None else None
    deltas = delta_targets(targets)
    releases = []
    for path, target in targets.items():
        split = _split_target(path)
        if split is None or (model is not None and split[0] != model):
            continue
        name, version = split
        releases.append(
            Release(
                model=name,
                version=version,
                target_path=path,
                sha256=str(target.hashes.get("sha256", "")),
                length=int(target.length),
                manifest=read_stored_manifest(repo.target_file_path(path, target)),
                fleets=tuple(fleet_references(desired, name, version)),
                devices=None if counts is None else counts.get((name, version), 0),
                deltas=tuple(
                    sorted(
                        ((old, length) for (_p, old, length) in deltas.get((name, version), [])),
                        key=lambda d: version_key(d[0]),
                    )
                ),
            )
        )
    if model is not None and not releases:
        known = sorted({s[0] for p in targets if (s := _split_target(p))})
        raise UsageError(
            f"no release of model {model!r} in {repo_dir}; models: {', '.join(known) or 'none'}"
        )
    return sorted(releases, key=lambda r: (r.model, version_key(r.version)))


def find_release(
    repo_dir: Path, model: str, version: str, devices: Sequence[DeviceRow] | None = None
) -> Release:
    """One release. Raises UsageError naming the versions there are when it is unknown."""
    _check(model, version)
    releases = load_releases(repo_dir, model, devices)
    for r in releases:
        if r.version == version:
            return r
    raise UsageError(
        f"no release {model} {version}; released versions: "
        + ", ".join(r.version for r in releases)
    )


def diff_releases(repo_dir: Path, model: str, old: str, new: str) -> ReleaseDiff:
    """Compare two releases of ``model``. Raises UsageError for an unknown one."""
    a = find_release(repo_dir, model, old)
    b = find_release(repo_dir, model, new)
    return diff_manifests(a.manifest, b.manifest, a.length, b.length)


# ---------------------------------------------------------------------------- retiring


def read_retired(repo_dir: Path) -> dict[str, dict[str, Any]]:
    """``retired.json``: target path → {retired_at, sha256}. Raises RepositoryError."""
    path = repo_dir / RETIRED_FILE
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path} is unreadable: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != RETIRED_SCHEMA:
        raise RepositoryError(f"{path}: schema expected {RETIRED_SCHEMA!r}")
    entries = doc.get("targets", {})
    return {str(k): dict(v) for k, v in entries.items() if isinstance(v, dict)}


def _write_retired(repo_dir: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    doc = {"schema": RETIRED_SCHEMA, "targets": dict(sorted(entries.items()))}
    atomic_write(repo_dir / RETIRED_FILE, json.dumps(doc, indent=2).encode() + b"\n")


@dataclass(frozen=True)
class RetireResult:
    model: str
    version: str
    target_path: str
    targets_version: int
    prune_after: datetime
    pruned: tuple[str, ...]


def retire_release(
    repo_dir: Path,
    model: str,
    version: str,
    now: datetime | None = None,
    grace: timedelta = DEFAULT_GRACE,
) -> RetireResult:
    """Remove ``model`` ``version`` from the signed targets so no fleet can be pointed at it.

    Also prunes the files of earlier retirements past ``grace``. Raises UsageError (unknown
    release), RetireRefusedError (a fleet's desired state names it), RepositoryError.

    ``retired.json`` records the retirement before the targets drop it, so a retirement
    interrupted anywhere leaves its bundle file known (pruned after the grace period)
    rather than orphaned; while the targets still name it, pruning forgets the record.
    Retiring a retired release raises UsageError saying when it was retired (after an
    interruption too: ``releases prune`` then does what is left).
    """
    _check(model, version)
    now = now or datetime.now(UTC).replace(microsecond=0)
    with locked_repository(repo_dir, now=now) as repo:
        return retire_locked(repo, model, version, now, grace)


def retire_locked(
    repo: Repository, model: str, version: str, now: datetime, grace: timedelta
) -> RetireResult:
    """``retire_release`` for a caller that holds the repository lock (the rollout layer
    checks its records under the same lock first: ``controller.rollout.service``)."""
    _check(model, version)
    repo_dir = repo.path
    target_path = bundle_target_path(model, version)
    md = repo.load("targets")
    target = md.signed.targets.get(target_path)
    retired = read_retired(repo_dir)
    if target is None and target_path in retired:
        raise UsageError(
            f"no release {model} {version}: it was retired at "
            f"{retired[target_path].get('retired_at')}; `edgectl releases prune` deletes "
            "its bundle file once the grace period is over"
        )
    if target is None:
        find_release(repo_dir, model, version)  # raises naming what there is
        raise UsageError(f"no release {model} {version}")
    refs = fleet_references(desired_states(repo), model, version)
    if refs:
        named = ", ".join(f"{r.fleet} ({role_text(r)})" for r in refs)
        raise RetireRefusedError(
            f"{model} {version} is still named by fleet(s) {named}; retiring it would "
            f"strand them. Move them first: edgectl rollout start {model} VERSION "
            "--fleet FLEET --repo REPO (and let it complete)"
        )
    # Deltas retire with their versions: those to it and those from it.
    going = [target_path] + [
        path
        for path in md.signed.targets
        if (d := parse_delta_target(path)) is not None and d[0] == model and version in (d[1], d[2])
    ]
    for path in going:
        retired[path] = {
            "retired_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sha256": md.signed.targets[path].hashes["sha256"],
        }
    _write_retired(repo_dir, retired)  # first: an interruption cannot orphan the file
    for path in going:
        del md.signed.targets[path]
    targets_version = repo.sign_next_version("targets", md, now)
    repo.publish(now)
    pruned = _prune_locked(repo, now, grace)
    logger.info("retired %s (targets v%d)", target_path, targets_version)
    return RetireResult(model, version, target_path, targets_version, now + grace, tuple(pruned))


def role_text(ref: FleetReference) -> str:
    """How a fleet names a release, in words (retire's refusal, ``release show``)."""
    if ref.role == "desired":
        return f"desired at {ref.percent:g}%"
    return "previous, the version an abort goes back to"


def prune_retired(
    repo_dir: Path, now: datetime | None = None, grace: timedelta = DEFAULT_GRACE
) -> list[str]:
    """Delete the bundle files of releases retired at least ``grace`` ago; return their
    target paths. Raises RepositoryError."""
    now = now or datetime.now(UTC).replace(microsecond=0)
    with locked_repository(repo_dir, now=now) as repo:
        return _prune_locked(repo, now, grace)


def _prune_locked(repo: Repository, now: datetime, grace: timedelta) -> list[str]:
    retired = read_retired(repo.path)
    live = repo.load("targets").signed.targets
    due = due_for_pruning(retired, live, now, grace)
    for path in due:
        directory, _, basename = path.rpartition("/")
        sha = retired[path].get("sha256", "")
        durable_unlink(repo.targets_dir / directory / f"{sha}.{basename}")
        del retired[path]
    # A retired path released again is live: forget its retirement.
    for path in [p for p in retired if p in live]:
        del retired[path]
    if retired != read_retired(repo.path):
        _write_retired(repo.path, retired)
    return due


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None
