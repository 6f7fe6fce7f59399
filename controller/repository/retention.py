"""Old metadata versions and desired-state files: what ``edgectl serve`` deletes, and what
it never may.

Every change signs new versions (``N.snapshot.json``, ``N.targets.json``,
``N.rollout.json``, and a fleet's desired state under a new consistent-snapshot name in
``targets/fleets/<fleet>/``); re-signing adds more twice a day. Nothing read them once
newer ones were published, yet they stayed forever. ``prune_metadata`` deletes them, under
the repository lock, by these rules:

- ``N.root.json`` and ``root.json`` are never deleted: a device walks the root chain
  version by version from the root it was enrolled with.
- Of snapshot, targets and rollout, the current version (the chain timestamp → snapshot
  → targets/rollout names) and the ``keep_versions`` before it are kept, and so is every
  version a kept snapshot names: a client that read a timestamp just before a change still
  finds what it names. So is any version newer than the current one.
- A desired-state file (``targets/fleets/<fleet>/<sha256>.desired.json``) is kept while a
  kept rollout version names it; the current one is always among them.
- Nothing younger than ``min_age_s`` (by its modification time) is deleted, whatever its
  version: a client that started an update that long ago has finished it.
- Bundles are never touched here: a bundle is deleted only once its release is retired
  and pruned (``edgectl releases retire/prune``, ``controller.repository.history``), which
  refuses while any fleet's desired state names it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.contracts import ROLLOUT_ROLE
from controller.base.errors import RepositoryError
from controller.base.fsio import repo_lock
from controller.repository.repo import Repository

logger = logging.getLogger(__name__)

PRUNED_ROLES: Final = ("snapshot", "targets", ROLLOUT_ROLE)
_VERSIONED_RE: Final = re.compile(r"([1-9][0-9]*)\.([a-z_]+)\.json")
_DESIRED_RE: Final = re.compile(r"[0-9a-f]{64}\.desired\.json")


@dataclass(frozen=True)
class MetadataRetention:
    """How many old versions of each role to keep, and the age under which nothing goes."""

    keep_versions: int = 20
    min_age_s: float = 86400.0


def _versions(metadata_dir: Path) -> dict[str, dict[int, Path]]:
    """The versioned metadata files of the pruned roles: role → version → path."""
    out: dict[str, dict[int, Path]] = {role: {} for role in PRUNED_ROLES}
    for path in metadata_dir.iterdir():
        match = _VERSIONED_RE.fullmatch(path.name)
        if match and match.group(2) in out:
            out[match.group(2)][int(match.group(1))] = path
    return out


def _signed(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_bytes())
    signed = doc["signed"] if isinstance(doc, dict) else None
    if not isinstance(signed, dict):
        raise ValueError("no signed part")
    return signed


def _kept_versions(
    files: dict[str, dict[int, Path]], current: dict[str, int], keep: int
) -> dict[str, set[int]]:
    # The current version and the ``keep`` versions before it, by rank: versions are not
    # consecutive (``repo.next_version`` floors them by the clock).
    kept = {
        role: set(sorted(v for v in files[role] if v <= current[role])[-(keep + 1) :])
        for role in PRUNED_ROLES
    }
    for version in sorted(kept["snapshot"]):
        try:
            meta = _signed(files["snapshot"][version]).get("meta", {})
        except (OSError, ValueError, KeyError) as exc:
            raise RepositoryError(f"cannot read {files['snapshot'][version]}: {exc}") from None
        for role in ("targets", ROLLOUT_ROLE):
            named = meta.get(f"{role}.json", {}).get("version")
            if isinstance(named, int):
                kept[role].add(named)
    return kept


def _named_desired_files(repo: Repository, rollout_files: list[Path]) -> set[Path]:
    """The desired-state files the given rollout metadata versions name."""
    named = set()
    for path in rollout_files:
        try:
            targets = _signed(path).get("targets", {})
        except (OSError, ValueError, KeyError) as exc:
            raise RepositoryError(f"cannot read {path}: {exc}") from None
        for target_path, info in targets.items():
            sha = info.get("hashes", {}).get("sha256") if isinstance(info, dict) else None
            directory, _, basename = target_path.rpartition("/")
            if isinstance(sha, str):
                named.add(repo.targets_dir / directory / f"{sha}.{basename}")
    return named


def prune_metadata_locked(repo: Repository, now: float, retention: MetadataRetention) -> list[Path]:
    """``prune_metadata`` with the repository lock already held."""
    current = {role: int(repo.load(role).signed.version) for role in PRUNED_ROLES}
    files = _versions(repo.metadata_dir)
    kept = _kept_versions(files, current, retention.keep_versions)
    old_enough = now - retention.min_age_s
    doomed: list[Path] = []
    for role in PRUNED_ROLES:
        for version, path in sorted(files[role].items()):
            if version in kept[role] or version > current[role]:
                continue
            if path.stat().st_mtime < old_enough:
                doomed.append(path)
    # Desired-state files: named by a kept rollout version, or kept. Read before deleting.
    rollout_files = [
        files[ROLLOUT_ROLE][v] for v in sorted(kept[ROLLOUT_ROLE]) if v in files[ROLLOUT_ROLE]
    ]
    named = _named_desired_files(repo, rollout_files)
    fleets_dir = repo.targets_dir / "fleets"
    for folder in sorted(fleets_dir.iterdir()) if fleets_dir.is_dir() else []:
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            unnamed = _DESIRED_RE.fullmatch(path.name) and path not in named
            if unnamed and path.stat().st_mtime < old_enough:
                doomed.append(path)
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def prune_metadata(repo_dir: Path, now: float, retention: MetadataRetention) -> list[Path]:
    """Delete old metadata versions and desired-state files by the module's rules, under
    the repository lock; return what was deleted. Raises RepositoryError."""
    with repo_lock(repo_dir):
        return prune_metadata_locked(Repository.open(repo_dir), now, retention)
