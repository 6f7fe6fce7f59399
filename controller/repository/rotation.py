"""A key rotation as one step that only ever rolls forward, and the way into a change.

A rotation publishes a new delegator version (root N+1, or a higher targets version for
``rollout``) that lists the new key, then re-signs the role with it (``finish_rotation``). Metadata
signed by the old key alone fails for a device that fetched root N+1, metadata signed by
the new key alone for one still at root N; so, the standard TUF way, a rotation of a
top-level role first publishes the role signed by the old *and* the new keys
(``bridge``): root N verifies it by the old signature, root N+1 by the new one, and a
device sees no gap whichever root it holds. Like the agent's enrollment install
(``agent.device.enroll_install``), the rotation goes through a journal:

1. the new key files are written (fsynced);
2. **journal**: ``rotation-journal.json`` is written atomically with the signed new
   delegator version in it. From here on the rotation is decided;
3. ``bridge``: each top-level role the new root would not verify is re-signed by its
   old and new keys (targets, then snapshot, then timestamp: bottom-up);
4. the new delegator version is published;
5. ``finish_rotation`` re-signs what no longer verifies or still carries a revoked key's
   signature (with the new keys alone) and deletes revoked key files;
6. the journal is removed.

Every change to the repository goes through ``locked_repository``: it takes the lock and
first rolls a journaled rotation forward (``roll_forward``): bridges and publishes the
journaled version if step 4 did not happen, repairs the ``root.json`` copy, runs steps 5
and 6. A new key that is not here (an offline targets key) stops the roll-forward before
the new root is published: the fleet keeps verifying under root N meanwhile.
``edgectl serve``'s re-sign check does the same, so an interrupted rotation is finished
within one check interval even when nobody runs a command.

Invariants:
- The journal exists only while the lock is held by the rotation, or after it was
  interrupted; it holds public metadata only (mode 0644).
- Every state on disk verifies for a device at root N and for one at root N+1, except
  when the old key is not here to sign the bridge (a rotation because it was lost):
  then the role is re-signed right after root N+1, as before bridges.
- ``finish_rotation`` is idempotent and works from the published metadata alone: a
  damaged journal still finishes the rotation (without republishing anything).
- A journaled version that no longer fits (not above the published one for targets, not
  the next one for root, signatures missing) is never published: the rotation is
  abandoned, the repository stays as it was before it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from agent.contracts import ROLLOUT_ROLE
from controller.base.errors import RepositoryError
from controller.base.fsio import atomic_write, repo_lock
from controller.repository.access import check_lock, serving_user
from controller.repository.keys import check_key_access, remove_revoked, scan_signers
from controller.repository.repo import ALL_ROLES, Repository, check_root_signatures

logger = logging.getLogger(__name__)

JOURNAL_FILE: Final = "rotation-journal.json"
JOURNAL_SCHEMA: Final = "edgefleet.rotation/1"


@dataclass
class CeremonyResult:
    """What a key operation did, for the CLI to print."""

    role: str
    new_keyids: list[str] = field(default_factory=list)
    key_files: list[Path] = field(default_factory=list)
    root_version: int | None = None  # a root version published now
    pending: Path | None = None  # a root version waiting for signatures
    missing: str = ""  # which signatures the pending root lacks
    resigned: dict[str, int] = field(default_factory=dict)
    revoked: list[str] = field(default_factory=list)
    rolled_forward: bool = False  # an interrupted rotation was finished first


@dataclass(frozen=True)
class Journal:
    """A rotation decided but maybe not finished: the delegator version carrying it."""

    roles: tuple[str, ...]  # the roles whose keys change (for messages)
    delegator: str  # "root" or "targets"
    version: int
    metadata: bytes  # that version, signed, byte for byte as it is published


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC).replace(microsecond=0)


def journal_path(repo_dir: Path) -> Path:
    return repo_dir / JOURNAL_FILE


def begin(repo: Repository, roles: list[str], delegator: str, md: Metadata[Any]) -> None:
    """Step 2: journal the signed delegator version ``md`` before it is published."""
    doc = {
        "schema": JOURNAL_SCHEMA,
        "roles": roles,
        "delegator": delegator,
        "version": int(md.signed.version),
        "metadata": md.to_bytes(JSONSerializer(compact=False)).decode(),
    }
    atomic_write(journal_path(repo.path), json.dumps(doc, indent=2).encode() + b"\n", mode=0o644)


def end(repo: Repository) -> None:
    """Step 5: the rotation is complete."""
    journal_path(repo.path).unlink(missing_ok=True)


def read_journal(repo_dir: Path) -> Journal | None:
    """The journaled rotation, or None. Raises RepositoryError when it is damaged."""
    path = journal_path(repo_dir)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"cannot read the rotation journal {path}: {exc}") from None
    try:
        if doc["schema"] != JOURNAL_SCHEMA or doc["delegator"] not in ("root", "targets"):
            raise ValueError(f"schema or delegator unknown: {doc['schema']!r}")
        return Journal(
            tuple(str(r) for r in doc["roles"]),
            str(doc["delegator"]),
            int(doc["version"]),
            str(doc["metadata"]).encode(),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RepositoryError(f"the rotation journal {path} is damaged: {exc!r}") from None


def _is_signed(delegator: Any, role: str, md: Metadata[Any]) -> bool:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError:
        return False
    return True


# The top-level roles a bridge re-signs, bottom-up: a new targets version needs a new
# snapshot, which needs a new timestamp.
_BRIDGED: Final = ("targets", "snapshot", "timestamp")


def bridge_signers(repo: Repository, new_root: Root) -> dict[str, list[Signer]]:
    """The new keys that must sign each top-level role ``new_root`` would not verify, so
    that it verifies under the current root (its old keys) and under ``new_root``.

    A role whose old keys are not here (below their threshold) is left out with a
    warning: it is re-signed after ``new_root`` is published, as before bridges. Raises
    RepositoryError when a role's new keys are not here (below ``new_root``'s threshold):
    publishing ``new_root`` then would leave that role unverifiable.
    """
    current = repo.load("root").signed
    bridging: dict[str, list[Signer]] = {}
    for role in _BRIDGED:
        if _is_signed(new_root, role, repo.load(role)):
            continue
        new_ids, old_ids = new_root.roles[role].keyids, current.roles[role].keyids
        new, _ = scan_signers(repo.key_dirs, role, new_ids, quiet=set(old_ids))
        if len(new) < new_root.roles[role].threshold:
            raise RepositoryError(
                f"the {role} role's new key(s) must sign before root version "
                f"{new_root.version} is published, but {len(new)} of the "
                f"{new_root.roles[role].threshold} needed are in "
                f"{', '.join(map(str, repo.key_dirs))}"
            )
        old, _ = scan_signers(repo.key_dirs, role, old_ids, quiet=set(new_ids))
        if len(old) < current.roles[role].threshold:
            logger.warning(
                "the old %s key is not here: devices that take root version %d fail to "
                "verify %s until it is re-signed with the new key, right after",
                role,
                new_root.version,
                role,
            )
            continue
        bridging[role] = list(new.values())
    return bridging


def bridge(repo: Repository, new_root: Root, now: datetime | None = None) -> dict[str, int]:
    """Step 3: re-sign each top-level role ``new_root`` would not verify with its current
    keys and its new ones (``bridge_signers``), bottom-up; returns what was re-signed.
    Call before ``new_root`` is published; raises as ``bridge_signers``."""
    now = _now(now)
    repo.bridging = bridge_signers(repo, new_root)
    resigned: dict[str, int] = {}
    try:
        if "targets" in repo.bridging:
            resigned["targets"] = repo.sign_next_version("targets", repo.load("targets"), now)
        if resigned or "snapshot" in repo.bridging:
            resigned["snapshot"], resigned["timestamp"] = repo.publish(now)
        elif "timestamp" in repo.bridging:
            resigned["timestamp"] = repo.bump_timestamp(now)
    finally:
        repo.bridging = {}
    return resigned


def _stale(repo: Repository, delegator: Any, role: str, md: Metadata[Any]) -> bool:
    """True when ``md`` must be re-signed: ``delegator`` does not verify it, or it still
    carries a signature of a key the role no longer has (a bridge's old key) and the
    role's keys are here to sign it again (else that harmless signature stays until the
    role's next version)."""
    if not _is_signed(delegator, role, md):
        return True
    keyids, threshold = repo.role_keys(role)
    if set(md.signatures) <= set(keyids):
        return False
    found, _ = scan_signers(repo.key_dirs, role, keyids, quiet=repo.revoking)
    return len(found) >= threshold


def finish_rotation(repo: Repository, now: datetime | None = None) -> CeremonyResult:
    """Step 5: re-sign every role whose current metadata the trusted keys no longer
    verify or that still carries a revoked key's signature, then delete the key files the
    metadata no longer lists. Idempotent."""
    now = _now(now)
    result = CeremonyResult("*")
    repo.repair_root_copy()
    root = repo.load("root").signed
    if _stale(repo, root, "targets", repo.load("targets")):
        result.resigned["targets"] = repo.sign_next_version("targets", repo.load("targets"))
    if _stale(repo, repo.load("targets").signed, ROLLOUT_ROLE, repo.load(ROLLOUT_ROLE)):
        result.resigned[ROLLOUT_ROLE] = repo.update_targets(ROLLOUT_ROLE, {}, now)
    if result.resigned or _stale(repo, root, "snapshot", repo.load("snapshot")):
        result.resigned["snapshot"], result.resigned["timestamp"] = repo.publish(now)
    elif _stale(repo, root, "timestamp", repo.load("timestamp")):
        result.resigned["timestamp"] = repo.bump_timestamp(now)
    for role in ALL_ROLES:
        keep, _ = repo.role_keys(role)
        result.revoked += remove_revoked(repo.keys_dir, role, keep)
    return result


def _publish_journaled(repo: Repository, journal: Journal, now: datetime | None) -> None:
    """Steps 3 and 4 again when they did not happen; nothing when they did. Raises
    RepositoryError when the new keys are not here to sign the bridge."""
    try:
        md: Metadata[Any] = Metadata.from_bytes(journal.metadata)
    except (DeserializationError, ValueError) as exc:
        logger.error("the rotation journal holds no metadata (%s): not republishing", exc)
        return
    if journal.delegator == "root":
        if repo.root_version() == journal.version - 1:
            try:
                if not isinstance(md.signed, Root):
                    raise RepositoryError(f"it is {md.signed.type} metadata")
                check_root_signatures(md, repo.load("root").signed)
            except RepositoryError as exc:
                _root_abandoned(journal, exc)
                return
            bridge(repo, md.signed, now)
            try:
                repo.publish_root(md)
            except RepositoryError as exc:
                _root_abandoned(journal, exc)
        return
    # Published already (or something newer was): nothing to do. Targets versions are
    # not consecutive (``repo.next_version``), so "the next one" is any higher version.
    if int(repo.load("targets").signed.version) >= journal.version:
        return
    if not _is_signed(repo.load("root").signed, "targets", md):
        logger.error(
            "the journaled targets version %d is not signed by the targets keys: the "
            "rotation of %s is abandoned",
            journal.version,
            ", ".join(journal.roles),
        )
        return
    repo.write_signed("targets", md)
    repo.adopt_unpublished("targets", journal.version)


def _root_abandoned(journal: Journal, exc: Exception) -> None:
    logger.error(
        "the journaled root version %d cannot be published (%s): the rotation of "
        "%s is abandoned, the repository stays as it was before it",
        journal.version,
        exc,
        ", ".join(journal.roles),
    )


def roll_forward(repo: Repository, now: datetime | None = None) -> CeremonyResult | None:
    """Finish a rotation that was interrupted (steps 3 to 5); None when none was. Hold the
    lock. Raises RepositoryError when a role's new key is not here (an offline key: pass
    ``--key-dir`` to ``edgectl keys finish``)."""
    path = journal_path(repo.path)
    if not path.exists():
        return None
    try:
        journal = read_journal(repo.path)
    except RepositoryError as exc:
        logger.warning("%s; finishing the rotation from the published metadata", exc)
        journal = None
    roles = ", ".join(journal.roles) if journal else "a role"
    try:
        if journal is not None:
            _publish_journaled(repo, journal, now)
        result = finish_rotation(repo, now)
    except RepositoryError as exc:
        raise RepositoryError(
            f"the rotation of the {roles} key was interrupted and cannot be finished here: "
            f"{exc}. Finish it with `edgectl keys finish --repo {repo.path} --key-dir DIR` "
            "(DIR: where the new key is)"
        ) from None
    end(repo)
    result.rolled_forward = True
    logger.warning(
        "finished the interrupted rotation of the %s key (re-signed: %s)",
        roles,
        ", ".join(f"{r} v{v}" for r, v in result.resigned.items()) or "nothing",
    )
    return result


def check_serving_access(repo: Repository) -> None:
    """Raise RepositoryError (with the ``chown``) when the user who runs ``edgectl serve``
    could not read a current key in ``keys/``."""
    keyids = {role: repo.role_keys(role)[0] for role in ALL_ROLES}
    check_key_access(repo.keys_dir, keyids, serving_user(repo.path))


@contextlib.contextmanager
def locked_repository(
    repo_dir: Path,
    extra_key_dirs: tuple[Path, ...] = (),
    now: datetime | None = None,
    *,
    finish: bool = True,
) -> Iterator[Repository]:
    """The repository, for a change: its lock held, the lock and the current keys usable
    by the serving user, an interrupted rotation finished (unless ``finish`` is False:
    the caller rolls forward itself).

    Raises RepositoryError (no repository, a lock or key the serving user could not use,
    a rotation that cannot be finished here).
    """
    Repository.open(repo_dir, extra_key_dirs)  # "not a repository" before any lock file
    check_lock(repo_dir)
    with repo_lock(repo_dir):
        repo = Repository.open(repo_dir, extra_key_dirs)
        check_serving_access(repo)
        if finish:
            roll_forward(repo, now)
        yield repo
