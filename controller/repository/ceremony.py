"""Key lifecycle: rotate a role's key, k-of-n root, the offline root flow, expiry per role.

Orchestrators over ``controller.repository.repo`` (signing, thresholds) and
``controller.repository.keys`` (files). Every change keeps devices able to follow it without being
touched:

- A top-level role's key (targets, snapshot, timestamp) changes in a new root version
  signed by the current root keys. Before that root is published, the role is re-signed
  by its old and its new key (``rotation.bridge``; a new snapshot and timestamp follow),
  so a device verifies the repository whether it holds root N or N+1; after it, the role
  is re-signed with its new key alone. Clients fetch ``N+1.root.json`` on their next
  refresh.
- A root rotation writes a root version whose root role lists the new key(s) and
  threshold, signed by a threshold of the previous root keys and of the new ones.
- ``rollout`` is delegated by targets: its key changes in a new targets version (the
  release key signs it), then rollout is re-signed.
- When root signatures are missing here (the root keys are offline, or k-of-n held by
  several people), the new root waits in ``root-pending.json``: ``export-root`` hands
  it out, ``sign-root`` adds signatures on the offline machine, ``import-root`` checks
  both thresholds, publishes it and finishes the rotation.
- The revoked key's file is deleted only after the metadata that revokes it is out.
- A new key of an online role (snapshot, timestamp, rollout) always goes to the
  repository's ``keys/``, where ``edgectl serve`` signs with it; only an offline role's
  (root, targets) goes to ``key_out`` (``--key-dir``).
- Publishing the new delegator version and re-signing go through the rotation journal
  (``controller.repository.rotation``): an interrupted rotation is rolled forward by the
  next change or ``serve``'s next check.

Every function here expects the caller to hold ``repo_lock``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from agent.contracts import ROLLOUT_ROLE
from controller.base.errors import RepositoryError, UsageError
from controller.base.fsio import atomic_write
from controller.repository.keys import generate_key, key_id, load_key_file, save_key
from controller.repository.repo import (
    ALL_ROLES,
    PENDING_ROOT_FILE,
    TOP_ROLES,
    ExpiryPolicy,
    Repository,
    RootSignaturesMissingError,
    check_root_signatures,
    next_version,
    save_policy,
)
from controller.repository.rotation import (
    CeremonyResult,
    begin,
    bridge,
    bridge_signers,
    end,
    finish_rotation,
)

__all__ = ["CeremonyResult", "finish_rotation"]  # where they lived before rotation.py

logger = logging.getLogger(__name__)

# Roles whose keys may live away from the controller (``--key-dir``): docs/security.md.
OFFLINE_ROLES: Final = ("root", "targets")


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC).replace(microsecond=0)


def _check_role(role: str) -> None:
    if role not in ALL_ROLES:
        raise UsageError(f"role expected one of {', '.join(ALL_ROLES)}, got {role!r}")


def _refuse_if_pending(repo: Repository) -> None:
    pending = repo.path / PENDING_ROOT_FILE
    if pending.exists():
        raise UsageError(
            f"a root version already waits for signatures in {pending}: finish it with "
            f"`edgectl keys import-root FILE --repo {repo.path}` or delete it"
        )


def rotate(
    repo: Repository,
    role: str,
    *,
    count: int = 1,
    threshold: int = 1,
    key_out: Path | None = None,
    now: datetime | None = None,
) -> CeremonyResult:
    """Replace ``role``'s key(s) with new ones; revoke the old ones.

    ``count`` and ``threshold`` apply to root only (k-of-n); ``key_out`` is where a new
    private key of an offline role (root, targets) goes (default: the repository's
    keys/); an online role's always goes to keys/. Raises UsageError, RepositoryError.
    """
    _check_role(role)
    if role != "root" and (count, threshold) != (1, 1):
        raise UsageError("--keys and --threshold apply to the root role only")
    if not 1 <= threshold <= count:
        raise UsageError(f"threshold expected 1..{count} (the number of keys), got {threshold}")
    _refuse_if_pending(repo)
    now = _now(now)
    if role not in OFFLINE_ROLES:
        key_out = None  # serve signs with it: never onto the offline medium
    if key_out is not None and key_out not in repo.key_dirs:
        repo.key_dirs = (*repo.key_dirs, key_out)  # the new keys sign too
    if role == ROLLOUT_ROLE:
        return _rotate_rollout(repo, now)
    result = CeremonyResult(role)
    signers = [generate_key() for _ in range(count)]
    out_dir = key_out or repo.keys_dir
    for signer in signers:
        result.key_files.append(save_key(out_dir, role, signer, keyed_name=True))
        result.new_keyids.append(key_id(signer))
    root: Metadata[Root] = repo.load("root")
    repo.revoking.update(root.signed.roles[role].keyids)
    for old in list(root.signed.roles[role].keyids):
        root.signed.revoke_key(old, role)
    for signer in signers:
        root.signed.add_key(signer.public_key, role)
    root.signed.roles[role].threshold = threshold
    root.signed.version += 1
    _publish_or_park(repo, root, now, result)
    return result


def _publish_or_park(
    repo: Repository, root: Metadata[Root], now: datetime, result: CeremonyResult
) -> None:
    try:
        repo.sign("root", root, now)
    except RootSignaturesMissingError as exc:
        pending = repo.path / PENDING_ROOT_FILE
        atomic_write(pending, root.to_bytes(JSONSerializer(compact=False)), mode=0o600)
        result.pending, result.missing = pending, str(exc)
        logger.warning("root version %d waits for signatures: %s", root.signed.version, exc)
        return
    begin(repo, [result.role], "root", root)
    result.resigned.update(bridge(repo, root.signed, now))  # both roots verify it
    repo.publish_root(root)
    result.root_version = int(root.signed.version)
    finished = finish_rotation(repo, now)
    end(repo)
    result.resigned.update(finished.resigned)
    result.revoked = finished.revoked


def _rotate_rollout(repo: Repository, now: datetime) -> CeremonyResult:
    result = CeremonyResult(ROLLOUT_ROLE)
    signer = generate_key()
    result.key_files.append(save_key(repo.keys_dir, ROLLOUT_ROLE, signer, keyed_name=True))
    result.new_keyids.append(key_id(signer))
    targets = repo.load("targets")
    repo.revoking.update(targets.signed.delegations.roles[ROLLOUT_ROLE].keyids)
    for old in list(targets.signed.delegations.roles[ROLLOUT_ROLE].keyids):
        targets.signed.revoke_key(old, ROLLOUT_ROLE)
    targets.signed.add_key(signer.public_key, ROLLOUT_ROLE)
    targets.signed.version = next_version(int(targets.signed.version), now)
    repo.sign("targets", targets, now)
    begin(repo, [ROLLOUT_ROLE], "targets", targets)
    repo.write_signed("targets", targets)
    repo.adopt_unpublished("targets", int(targets.signed.version))
    result.resigned["targets"] = int(targets.signed.version)
    finished = finish_rotation(repo, now)
    end(repo)
    result.resigned.update(finished.resigned)
    result.revoked = finished.revoked
    return result


# ---------------------------------------------------------------------------- offline root


def export_root(repo: Repository, out: Path, now: datetime | None = None) -> CeremonyResult:
    """Write the root version waiting for signatures to ``out``.

    With none waiting, make one: the current root as the next version with a renewed
    expiry (the yearly root renewal), signed with whatever root keys are here.
    """
    result = CeremonyResult("root")
    pending = repo.path / PENDING_ROOT_FILE
    if pending.exists():
        md = _read_root(pending)
    else:
        md = repo.load("root")
        md.signed.version += 1
        md.signed.expires = _now(now) + repo.policy.lifetime("root")
        md.signatures.clear()
        with contextlib.suppress(RootSignaturesMissingError):
            repo.sign_root(md)  # what is missing is reported below
        atomic_write(pending, md.to_bytes(JSONSerializer(compact=False)), mode=0o600)
    result.missing = _missing(repo, md)
    atomic_write(out, md.to_bytes(JSONSerializer(compact=False)))
    result.pending = out
    return result


def _missing(repo: Repository, md: Metadata[Root]) -> str:
    previous = repo.load("root").signed if md.signed.version > 1 else None
    try:
        check_root_signatures(md, previous)
    except RootSignaturesMissingError as exc:
        return str(exc)
    return ""


def _read_root(path: Path) -> Metadata[Root]:
    try:
        md = Metadata[Root].from_file(str(path))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, DeserializationError, ValueError) as exc:
        raise UsageError(f"{path} is not root metadata: {exc}") from None
    if not isinstance(md.signed, Root):
        raise UsageError(f"{path} is {md.signed.type} metadata, not root")
    return md


def sign_root_file(path: Path, key_files: list[Path]) -> list[str]:
    """Add a signature with each key to the root metadata in ``path`` (on the offline
    machine: no repository needed). Returns the key ids that signed."""
    md = _read_root(path)
    signed = []
    for key_file in key_files:
        signer = load_key_file(key_file)
        md.sign(signer, append=True)
        signed.append(key_id(signer))
    atomic_write(path, md.to_bytes(JSONSerializer(compact=False)))
    return signed


def import_root(repo: Repository, path: Path, now: datetime | None = None) -> CeremonyResult:
    """Check and publish a signed root version, then finish the rotation it carries.

    Raises RootSignaturesMissingError (naming the counts) when a threshold is not met.
    """
    md = _read_root(path)
    result = CeremonyResult("root", root_version=int(md.signed.version))
    if md.signed.version == repo.root_version() + 1:
        current = repo.load("root").signed
        check_root_signatures(md, current)  # before the journal
        try:
            bridge_signers(repo, md.signed)  # the new keys are here: before the journal
        except RepositoryError as exc:
            raise UsageError(f"{exc}; pass --key-dir where they are") from None
        begin(repo, _changed_roles(current, md.signed), "root", md)
        repo.revoking.update(_revoked_keyids(current, md.signed))
        result.resigned.update(bridge(repo, md.signed, now))  # both roots verify it
    repo.publish_root(md)
    finished = finish_rotation(repo, now)
    end(repo)
    result.resigned.update(finished.resigned)
    result.revoked = finished.revoked
    return result


def _revoked_keyids(old: Root, new: Root) -> set[str]:
    """The key ids ``old`` gives a top-level role and ``new`` no longer does."""
    return {k for r in TOP_ROLES for k in old.roles[r].keyids if k not in new.roles[r].keyids}


def _changed_roles(old: Root, new: Root) -> list[str]:
    """The roles whose keys or threshold differ between two root versions."""
    return [
        role
        for role in TOP_ROLES
        if (set(old.roles[role].keyids), old.roles[role].threshold)
        != (set(new.roles[role].keyids), new.roles[role].threshold)
    ] or ["root"]


# ---------------------------------------------------------------------------- expiry


def set_expiry(
    repo: Repository, role: str, days: float, now: datetime | None = None
) -> tuple[ExpiryPolicy, dict[str, int]]:
    """Set ``role``'s metadata lifetime in the repository settings.

    An online role (rollout, snapshot, timestamp) whose current expiry lies beyond the
    new lifetime is re-signed now; root and targets take it the next time they are
    signed. Returns the new policy and what was re-signed.
    """
    _check_role(role)
    policy = replace(repo.policy, **{f"{role}_days": days})  # validates: UsageError
    save_policy(repo.path, policy)
    repo.policy = policy
    now = _now(now)
    resigned: dict[str, int] = {}
    if role in TOP_ROLES[:2]:
        return policy, resigned
    if repo.load(role).signed.expires > now + policy.lifetime(role):
        if role == ROLLOUT_ROLE:
            resigned[ROLLOUT_ROLE] = repo.update_targets(ROLLOUT_ROLE, {}, now)
            resigned["snapshot"], resigned["timestamp"] = repo.publish(now)
        elif role == "snapshot":
            resigned["snapshot"], resigned["timestamp"] = repo.publish(now)
        else:
            resigned["timestamp"] = repo.bump_timestamp(now)
    return policy, resigned


@dataclass(frozen=True)
class RoleKeys:
    role: str
    keyids: list[str]
    threshold: int
    present: list[str]  # key ids whose private key is in the key folders
    expires: datetime
    version: int


def key_status(repo: Repository) -> list[RoleKeys]:
    """Every role's key ids, threshold, which private keys are here, expiry, version."""
    rows = []
    for role in ALL_ROLES:
        keyids, threshold = repo.role_keys(role)
        present = sorted(repo.signers(role))
        md = repo.load(role)
        rows.append(
            RoleKeys(role, keyids, threshold, present, md.signed.expires, int(md.signed.version))
        )
    return rows
