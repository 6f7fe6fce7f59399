"""The signed TUF repository on disk: a thin layer over ``tuf.api.metadata``.

Layout of a repository directory::

    edgectl.json              settings (schema, expiry policy); marks an initialised repo
    .lock                     the exclusive lock every change holds (``fsio.repo_lock``)
    keys/<role>[-<id>].pem    private keys, 0600 in a 0700 directory (never served);
                              offline keys (root, and targets where possible) belong
                              elsewhere (``controller.repository.keys``, docs/security.md)
    root-pending.json         a new root version waiting for offline signatures
                              (``edgectl keys export-root`` / ``import-root``; never served)
    rotation-journal.json     a key rotation decided but maybe not finished
                              (``controller.repository.rotation``; never served)
    metadata/N.root.json      every root version; metadata/root.json is a copy of the
                              latest one, the trust anchor agents are enrolled with
    metadata/N.targets.json   top-level targets: bundles, signed by the release key
    metadata/N.rollout.json   delegated online role (``fleets/*/*``): desired states
    metadata/N.snapshot.json
    metadata/timestamp.json
    targets/<dir>/<sha256>.<basename>   target files under consistent-snapshot names

Invariants:
- Consistent snapshots: a published metadata or target file is never rewritten; a change
  writes a new version. Only ``timestamp.json`` and the ``root.json`` copy are replaced.
- The current version of a role is the one the chain names: timestamp → snapshot →
  targets / rollout; root is the highest ``N.root.json``.
- Writes go bottom-up (target files, then the role naming them, then snapshot, then
  timestamp), each atomic, so a client never sees a name for a file that is not there.
- Only sha256 hashes; no ``custom`` fields; expiries always set from ``ExpiryPolicy``.
- Metadata is signed by every available key the trusted metadata lists for the role
  (during a rotation's bridge, also by the next root's keys: ``Repository.bridging``) and
  written only when the role's threshold is met; a new root also needs the threshold of
  the previous root (``sign_root``), so clients can follow the chain N → N+1.
- Callers hold ``repo_lock`` around any change; they enter through
  ``rotation.locked_repository``, which also finishes an interrupted rotation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import RepositoryError as TufRepositoryError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from agent.contracts import ROLLOUT_PATHS, ROLLOUT_ROLE
from controller.base.errors import RepositoryError, UsageError
from controller.base.fsio import atomic_write, durable_unlink, make_dir
from controller.repository.keys import generate_key, load_signers, save_key, scan_signers

logger = logging.getLogger(__name__)

SETTINGS_FILE: Final = "edgectl.json"
PENDING_ROOT_FILE: Final = "root-pending.json"
SETTINGS_SCHEMA: Final = "edgefleet.repository/1"
TOP_ROLES: Final = ("root", "targets", "snapshot", "timestamp")
ALL_ROLES: Final = (*TOP_ROLES, ROLLOUT_ROLE)
HASH_ALGORITHMS: Final = ["sha256"]
_ROOT_FILE_RE: Final = re.compile(r"([1-9][0-9]*)\.root\.json")


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed, in days.

    Fractions are allowed (``timestamp_days = 0.25`` is six hours): a short timestamp
    lifetime bounds how long a frozen repository can go unnoticed.
    """

    root_days: float = 365
    targets_days: float = 365
    rollout_days: float = 30
    snapshot_days: float = 7
    timestamp_days: float = 1

    def lifetime(self, role: str) -> timedelta:
        return timedelta(days=getattr(self, f"{role}_days"))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"expiry {f.name} must be a number of days > 0, got {value!r}")
            if value * 86400 < 60:
                raise UsageError(f"expiry {f.name} must be at least a minute, got {value!r} days")


def _utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def next_version(current: int, now: datetime | None = None) -> int:
    """The version to sign after ``current`` for every role but root: one more, or the
    time ``now`` in whole seconds since the epoch when that is higher.

    TUF clients refuse a version lower than one they trusted (the rollback rule). A
    repository restored from an older backup would count on from the backup's versions,
    below what its devices saw, and every change it signed would be refused until the
    count passed theirs: the fleet would stop following. Floored by the clock, the next
    release after a restore is past anything devices saw, unless the repository signed
    faster than once a second on average since the backup. Root keeps counting by one:
    its versions are a chain a client walks step by step.
    """
    floor = int((now or _utc_now()).timestamp())
    return max(current + 1, floor)


def is_repository(path: Path) -> bool:
    """True when ``path`` already holds a repository (or the remains of one)."""
    return (path / SETTINGS_FILE).exists() or any(
        (path / sub).is_dir() and any((path / sub).iterdir()) for sub in ("metadata", "keys")
    )


class Repository:
    """An initialised repository directory. Construct with ``Repository.open``."""

    def __init__(
        self, path: Path, policy: ExpiryPolicy, extra_key_dirs: tuple[Path, ...] = ()
    ) -> None:
        self.path = path
        self.policy = policy
        self.metadata_dir = path / "metadata"
        self.targets_dir = path / "targets"
        self.keys_dir = path / "keys"
        # Where else keys may be (an offline key on a mounted medium, ``--key-dir``).
        self.key_dirs = (self.keys_dir, *extra_key_dirs)
        self._serializer = JSONSerializer(compact=False)
        # Targets roles signed since the last snapshot: role → version (see ``publish``).
        self._unpublished: dict[str, int] = {}
        # Key ids a rotation in progress revokes: their files are expected until it
        # deletes them, so signing passes over them without a warning.
        self.revoking: set[str] = set()
        # Keys of the next root version that also sign a role while a rotation publishes
        # metadata both the current and the next root verify (``rotation.bridge``).
        self.bridging: dict[str, list[Signer]] = {}

    @classmethod
    def open(cls, path: Path, extra_key_dirs: tuple[Path, ...] = ()) -> Repository:
        """Open an initialised repository; raise RepositoryError naming ``edgectl init``.

        ``extra_key_dirs``: more folders to look for private keys in (besides keys/)."""
        settings = path / SETTINGS_FILE
        try:
            doc = json.loads(settings.read_bytes())
        except FileNotFoundError:
            raise RepositoryError(
                f"{path} is not an edgectl repository (no {SETTINGS_FILE}); "
                f"create one with `edgectl init {path}`"
            ) from None
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot read {settings}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("schema") != SETTINGS_SCHEMA:
            raise RepositoryError(f"{settings}: schema expected {SETTINGS_SCHEMA!r}")
        try:
            policy = ExpiryPolicy(**doc.get("expiry_days", {}))
        except (TypeError, UsageError) as exc:
            raise RepositoryError(f"{settings}: bad expiry_days: {exc}") from None
        return cls(path, policy, extra_key_dirs)

    # ------------------------------------------------------------------ reading

    def _read(self, filename: str) -> Metadata[Any]:
        path = self.metadata_dir / filename
        try:
            # Read here, not with Metadata.from_file: its storage layer turns a missing
            # file into a StorageError that says less than this.
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise RepositoryError(f"metadata file missing: {path}") from None
        except (OSError, DeserializationError, ValueError) as exc:
            raise RepositoryError(f"cannot load {path}: {exc}") from None

    def root_version(self) -> int:
        versions = [
            int(m.group(1))
            for p in self.metadata_dir.glob("*.root.json")
            if (m := _ROOT_FILE_RE.fullmatch(p.name))
        ]
        if not versions:
            raise RepositoryError(f"no N.root.json in {self.metadata_dir}")
        return max(versions)

    def load(self, role: str) -> Metadata[Any]:
        """The current metadata of ``role``, following timestamp → snapshot → targets."""
        if role == "root":
            return self._read(f"{self.root_version()}.root.json")
        timestamp = self._read("timestamp.json")
        if role == "timestamp":
            return timestamp
        snapshot = self._read(f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        if role == "snapshot":
            return snapshot
        if role in self._unpublished:
            return self._read(f"{self._unpublished[role]}.{role}.json")
        meta = snapshot.signed.meta.get(f"{role}.json")
        if meta is None:
            raise RepositoryError(f"snapshot names no {role}.json")
        return self._read(f"{meta.version}.{role}.json")

    def versions(self) -> dict[str, int]:
        """The current version of every role."""
        return {role: int(self.load(role).signed.version) for role in ALL_ROLES}

    def target_file_path(self, target_path: str, target: TargetFile) -> Path:
        """Where a target's bytes live on disk (its consistent-snapshot name)."""
        directory, _, basename = target_path.rpartition("/")
        return self.targets_dir / directory / f"{target.hashes['sha256']}.{basename}"

    def read_target(self, role: str, target_path: str) -> bytes | None:
        """The bytes of a target ``role`` currently signs, or None when it names none."""
        target = self.load(role).signed.targets.get(target_path)
        if target is None:
            return None
        path = self.target_file_path(target_path, target)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RepositoryError(f"target file of {target_path} unreadable: {exc}") from None
        try:
            target.verify_length_and_hashes(data)
        except TufRepositoryError as exc:
            raise RepositoryError(f"target file {path} is damaged: {exc}") from None
        return data

    def role_keys(self, role: str) -> tuple[list[str], int]:
        """(key ids, threshold) the trusted metadata gives ``role``: root for the top-level
        roles, the current targets delegation for ``rollout``."""
        delegator = self.load("targets" if role == ROLLOUT_ROLE else "root").signed
        delegated = delegator.get_delegated_role(role)
        return list(delegated.keyids), int(delegated.threshold)

    def signers(self, role: str) -> dict[str, CryptoSigner]:
        """The available private keys of ``role``, by key id."""
        keyids, _ = self.role_keys(role)
        return load_signers(self.key_dirs, role, keyids)

    # ------------------------------------------------------------------ writing

    def write(
        self,
        role: str,
        md: Metadata[Any],
        now: datetime | None = None,
        signers: list[Signer] | None = None,
    ) -> None:
        """Set expiry, sign with the role's keys and write the file under its public name.

        ``signers`` defaults to every available key the trusted metadata lists for the
        role. Raises RepositoryError when fewer than its threshold are available (root:
        see ``sign_root``).
        """
        self.sign(role, md, now, signers)
        if role == "root":
            self._publish_root(md)
        else:
            self.write_signed(role, md)

    def sign(
        self,
        role: str,
        md: Metadata[Any],
        now: datetime | None = None,
        signers: list[Signer] | None = None,
    ) -> None:
        """The first half of ``write``: set expiry and sign, writing nothing."""
        md.signed.expires = (now or _utc_now()) + self.policy.lifetime(role)
        md.signatures.clear()
        if role == "root":
            self.sign_root(md, signers)
            return
        if signers is None:
            keyids, threshold = self.role_keys(role)
            bridging = self.bridging.get(role, [])
            quiet = self.revoking | {s.public_key.keyid for s in bridging}
            found, ignored = scan_signers(self.key_dirs, role, keyids, quiet=quiet)
            if len(found) < threshold:
                why = f" (ignored: {'; '.join(ignored)})" if ignored else ""
                raise RepositoryError(
                    f"the {role} role needs {threshold} signature(s), but only {len(found)} of "
                    f"its keys are in {', '.join(map(str, self.key_dirs))}{why}; pass "
                    "--key-dir where the others are, or finish an interrupted rotation with "
                    f"`edgectl keys finish --repo {self.path}`"
                )
            signers = [*found.values(), *bridging]
        for signer in signers:
            if signer.public_key.keyid not in md.signatures:
                md.sign(signer, append=True)

    def write_signed(self, role: str, md: Metadata[Any]) -> None:
        """The second half of ``write`` for a role other than root: write ``md`` as it is
        signed (timestamp.json, or N.<role>.json)."""
        data = md.to_bytes(self._serializer)
        if role == "timestamp":
            atomic_write(self.metadata_dir / "timestamp.json", data)
            return
        atomic_write(self.metadata_dir / f"{md.signed.version}.{role}.json", data)

    def adopt_unpublished(self, role: str, version: int) -> None:
        """Make the written ``N.<role>.json`` (targets or rollout) what ``load`` returns and
        ``publish`` names, as ``sign_next_version`` does (rolling a rotation forward)."""
        self._unpublished[role] = version

    def sign_root(self, md: Metadata[Root], signers: list[Signer] | None = None) -> None:
        """Add signatures to a new root from ``signers`` (default: every available key of
        the previous and the new root) and check both thresholds.

        Raises RootSignaturesMissingError (with the signatures added so far kept on
        ``md``) when the previous root's threshold or its own is not met.
        """
        previous = self._previous_root(md)
        if signers is None:
            keyids = set(md.signed.roles["root"].keyids)
            if previous is not None:
                keyids |= set(previous.roles["root"].keyids)
            signers = list(load_signers(self.key_dirs, "root", keyids).values())
        for signer in signers:
            if signer.public_key.keyid not in md.signatures:
                md.sign(signer, append=True)
        check_root_signatures(md, previous)

    def _previous_root(self, md: Metadata[Root]) -> Root | None:
        version = int(md.signed.version)
        if version == 1:
            return None
        previous: Root = self._read(f"{version - 1}.root.json").signed
        return previous

    def _publish_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(self._serializer)
        atomic_write(self.metadata_dir / f"{md.signed.version}.root.json", data)
        atomic_write(self.metadata_dir / "root.json", data)

    def repair_root_copy(self) -> bool:
        """Make ``metadata/root.json`` a copy of the newest ``N.root.json`` again (an
        interruption between the two writes); True when it had to be rewritten."""
        data = (self.metadata_dir / f"{self.root_version()}.root.json").read_bytes()
        copy = self.metadata_dir / "root.json"
        if copy.exists() and copy.read_bytes() == data:
            return False
        atomic_write(copy, data)
        return True

    def publish_root(self, md: Metadata[Root]) -> None:
        """Publish an already signed next root version (``import-root``).

        Raises RepositoryError when it is not the next version, RootSignaturesMissingError
        when either threshold is not met.
        """
        expected = self.root_version() + 1
        if md.signed.version != expected:
            raise RepositoryError(
                f"root version expected {expected} (the next one), got {md.signed.version}"
            )
        check_root_signatures(md, self._previous_root(md))
        self._publish_root(md)
        durable_unlink(self.path / PENDING_ROOT_FILE)

    def store_target(self, target_path: str, data: bytes) -> TargetFile:
        """Write a target file under its consistent-snapshot name; return its TargetFile."""
        target = TargetFile.from_data(target_path, data, HASH_ALGORITHMS)
        path = self.target_file_path(target_path, target)
        make_dir(path.parent)
        if not path.exists():
            atomic_write(path, data)
        return target

    def update_targets(
        self, role: str, changes: dict[str, TargetFile], now: datetime | None = None
    ) -> int:
        """Add or replace targets in ``role`` (targets or rollout); return its new version.

        The new version is what ``load`` returns from now on; ``publish`` names it in a
        new snapshot.
        """
        md = self.load(role)
        md.signed.targets.update(changes)
        return self.sign_next_version(role, md, now)

    def sign_next_version(self, role: str, md: Metadata[Any], now: datetime | None = None) -> int:
        """Bump ``md``'s version, sign and write it; a targets role becomes what ``load``
        returns and ``publish`` names. Returns the new version."""
        md.signed.version = next_version(int(md.signed.version), now)
        self.write(role, md, now)
        if role in ("targets", ROLLOUT_ROLE):
            self._unpublished[role] = int(md.signed.version)
        return int(md.signed.version)

    def publish(self, now: datetime | None = None) -> tuple[int, int]:
        """Sign a new snapshot naming the current targets roles, then a new timestamp.

        Returns (snapshot version, timestamp version).
        """
        snapshot = self.load("snapshot")
        for role in ("targets", ROLLOUT_ROLE):
            snapshot.signed.meta[f"{role}.json"] = MetaFile(
                version=int(self.load(role).signed.version)
            )
        snapshot.signed.version = next_version(int(snapshot.signed.version), now)
        self.write("snapshot", snapshot, now)
        self._unpublished.clear()
        snapshot_version = int(snapshot.signed.version)
        return snapshot_version, self.bump_timestamp(now, snapshot_version)

    def bump_timestamp(self, now: datetime | None = None, snapshot_version: int = 0) -> int:
        """Sign a new timestamp naming ``snapshot_version`` (default: the current one)."""
        timestamp = self.load("timestamp")
        if not snapshot_version:
            snapshot_version = int(timestamp.signed.snapshot_meta.version)
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot_version)
        timestamp.signed.version = next_version(int(timestamp.signed.version), now)
        self.write("timestamp", timestamp, now)
        return int(timestamp.signed.version)

    def fleets(self) -> list[str]:
        """The fleets that have a desired state in the rollout role, sorted."""
        names = set()
        for path in self.load(ROLLOUT_ROLE).signed.targets:
            parts = path.split("/")
            if len(parts) == 3 and parts[0] == "fleets" and parts[2] == "desired.json":
                names.add(parts[1])
        return sorted(names)


class RootSignaturesMissingError(RepositoryError):
    """A new root lacks signatures of the previous root's or its own threshold."""


def check_root_signatures(md: Metadata[Root], previous: Root | None) -> None:
    """Raise RootSignaturesMissingError unless ``md`` is signed by a threshold of
    ``previous``'s root keys and of its own."""
    result = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
    if result.verified:
        return
    parts = []
    for label, part in (("previous root", result.first), ("new root", result.second)):
        if previous is None and label == "previous root":
            continue
        if part.missing:
            parts.append(f"{label}: {len(part.signed)}/{part.threshold}")
    raise RootSignaturesMissingError(
        f"root version {md.signed.version} lacks signatures ({'; '.join(parts)} signed)"
    )


def save_policy(path: Path, policy: ExpiryPolicy) -> None:
    """Write ``policy`` into the repository's settings file (hold the lock)."""
    settings = {"schema": SETTINGS_SCHEMA, "expiry_days": asdict(policy)}
    atomic_write(path / SETTINGS_FILE, json.dumps(settings, indent=2).encode() + b"\n")


def init_repository(
    path: Path, policy: ExpiryPolicy | None = None, now: datetime | None = None
) -> Repository:
    """Create keys and an empty, signed repository in ``path``.

    Raises UsageError when ``path`` already holds a repository or is not a directory,
    RepositoryError when it cannot be written.
    """
    policy = policy or ExpiryPolicy()
    now = now or _utc_now()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory")
    if path.exists() and is_repository(path):
        raise UsageError(f"{path} already holds a repository; refusing to overwrite it")
    try:
        make_dir(path)
        repo = Repository(path, policy)
        _write_initial_metadata(repo, now)
        save_policy(path, policy)
    except OSError as exc:
        raise RepositoryError(f"cannot create a repository in {path}: {exc}") from None
    logger.info("initialised repository %s", path)
    return repo


def _write_initial_metadata(repo: Repository, now: datetime) -> None:
    signers = {role: generate_key() for role in ALL_ROLES}
    for role, signer in signers.items():
        save_key(repo.keys_dir, role, signer)
    make_dir(repo.metadata_dir)
    make_dir(repo.targets_dir)

    root = Root(expires=now, consistent_snapshot=True)
    for role in TOP_ROLES:
        root.add_key(signers[role].public_key, role)
    rollout_key = signers[ROLLOUT_ROLE].public_key
    delegated = DelegatedRole(
        name=ROLLOUT_ROLE,
        keyids=[rollout_key.keyid],
        threshold=1,
        terminating=True,
        paths=list(ROLLOUT_PATHS),
    )
    targets = Targets(
        expires=now,
        delegations=Delegations(
            keys={rollout_key.keyid: rollout_key}, roles={ROLLOUT_ROLE: delegated}
        ),
    )
    snapshot = Snapshot(
        expires=now,
        meta={"targets.json": MetaFile(version=1), f"{ROLLOUT_ROLE}.json": MetaFile(version=1)},
    )
    timestamp = Timestamp(expires=now, snapshot_meta=MetaFile(version=1))
    # Bottom-up, so every file a reader can reach names only files that exist.
    repo.write(ROLLOUT_ROLE, Metadata(Targets(expires=now)), now, [signers[ROLLOUT_ROLE]])
    repo.write("targets", Metadata(targets), now, [signers["targets"]])
    repo.write("snapshot", Metadata(snapshot), now, [signers["snapshot"]])
    repo.write("root", Metadata(root), now, [signers["root"]])
    repo.write("timestamp", Metadata(timestamp), now, [signers["timestamp"]])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def needs_resign(expires: datetime, lifetime: timedelta, now: datetime) -> bool:
    """True when less than half of a role's lifetime is left (or it has expired)."""
    return expires - now < lifetime / 2


def resign_expiring(repo: Repository, now: datetime | None = None) -> dict[str, int]:
    """Re-sign the online roles (rollout, snapshot, timestamp) that are due.

    A re-signed rollout needs a new snapshot, a new snapshot a new timestamp. Returns the
    new versions of what was re-signed (empty when nothing was due). Hold the lock.
    """
    now = now or _utc_now()

    def due(role: str) -> bool:
        return needs_resign(repo.load(role).signed.expires, repo.policy.lifetime(role), now)

    changed: dict[str, int] = {}
    if due(ROLLOUT_ROLE):
        changed[ROLLOUT_ROLE] = repo.update_targets(ROLLOUT_ROLE, {}, now)
    if changed or due("snapshot"):
        changed["snapshot"], changed["timestamp"] = repo.publish(now)
    elif due("timestamp"):
        changed["timestamp"] = repo.bump_timestamp(now)
    return changed
