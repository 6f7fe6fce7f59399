"""The repository's signing keys on disk, and which of them may sign what.

Invariants:
- Ed25519 keys, stored as unencrypted PKCS8 PEM, file mode 0600 in a 0700 directory.
  ``edgectl init`` writes ``keys/<role>.pem``; a key made later (rotation, extra root
  keys) is ``<role>-<key id prefix>.pem``. The HTTP and MQTT sides never serve keys.
- Files are only candidates: a role is signed with the loaded keys whose key id the
  trusted metadata lists for it (root for the top-level roles, the targets delegation
  for ``rollout``), so a stale or stray file can never sign anything.
- A revoked key's file is deleted once the metadata that revokes it is published.
- One bad file never blocks a role: a file that is not a key, or not a key of the
  role's current key ids, is ignored with a warning naming it. A file that may hold a
  current key (``<role>.pem``, or ``<role>-<prefix>.pem`` whose prefix is a current key
  id's) and cannot be read is refused, naming its owner and the ``chown`` that fixes it
  (``controller.repository.access``); so is such a file in ``keys/`` that the user who
  runs ``edgectl serve`` could not read (``check_key_access``).
- Key files readable by their group or other users are warned about (never refused).
- Running as root, a key written into a folder another user owns is handed to that
  user (``sudo edgectl keys rotate`` on a service's repository).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from controller.base.errors import RepositoryError
from controller.base.fsio import atomic_write, make_dir
from controller.repository.access import (
    LIST,
    READ,
    User,
    access_problem,
    give_to_folder_owner,
    user_for_uid,
    warn_if_exposed,
    warn_once,
)

logger = logging.getLogger(__name__)


def generate_key() -> CryptoSigner:
    """A fresh Ed25519 signer."""
    return CryptoSigner.generate_ed25519()


def key_id(signer: CryptoSigner) -> str:
    return str(signer.public_key.keyid)


def save_key(keys_dir: Path, role: str, signer: CryptoSigner, *, keyed_name: bool = False) -> Path:
    """Write ``signer``'s private key to ``keys_dir/<role>.pem`` (or, with
    ``keyed_name``, ``<role>-<key id prefix>.pem``); 0600 in a 0700 directory."""
    make_dir(keys_dir, 0o700)
    name = f"{role}-{key_id(signer)[:16]}.pem" if keyed_name else f"{role}.pem"
    path = keys_dir / name
    atomic_write(path, signer.private_bytes, mode=0o600)
    give_to_folder_owner(path)
    return path


def load_key_file(path: Path) -> CryptoSigner:
    """Load one private key file; RepositoryError when missing or unreadable."""
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise RepositoryError(f"key file {path} does not exist") from None
    except PermissionError:
        raise KeyUnreadableError(_unreadable(path)) from None
    except (OSError, ValueError, TypeError) as exc:
        raise RepositoryError(f"cannot load the key {path}: {exc}") from None
    public_key = SSlibKey.from_crypto(private_key.public_key())
    return CryptoSigner(private_key, public_key)


class KeyUnreadableError(RepositoryError):
    """This process may not read a key file (its owner or mode)."""


def _unreadable(path: Path) -> str:
    me = user_for_uid(os.geteuid())
    try:
        problem = access_problem(path, path.stat(), me, READ, "who runs this command")
    except OSError as exc:
        return f"cannot read the key {path}: {exc}"
    return f"cannot read the key {problem or path}"


_KEYED_NAME: Final = re.compile(r"[0-9a-f]{16}")


def may_be_current(path: Path, role: str, keyids: Collection[str]) -> bool:
    """True when ``path``'s name may hold one of ``keyids``: ``<role>.pem`` (``edgectl
    init``'s name), or ``<role>-<prefix>.pem`` with a prefix of one of them."""
    if path.name == f"{role}.pem":
        return True
    prefix = path.name.removeprefix(f"{role}-").removesuffix(".pem")
    return bool(_KEYED_NAME.fullmatch(prefix)) and any(k.startswith(prefix) for k in keyids)


def key_files(keys_dir: Path, role: str) -> list[Path]:
    """The files in ``keys_dir`` that may hold keys of ``role``, sorted."""
    if not keys_dir.is_dir():
        return []
    return sorted({*keys_dir.glob(f"{role}.pem"), *keys_dir.glob(f"{role}-*.pem")})


def load_signers(
    key_dirs: Iterable[Path], role: str, keyids: Collection[str]
) -> dict[str, CryptoSigner]:
    """The keys of ``role`` found in ``key_dirs`` whose id is in ``keyids``, by key id."""
    return scan_signers(key_dirs, role, keyids)[0]


def scan_signers(
    key_dirs: Iterable[Path],
    role: str,
    keyids: Collection[str],
    quiet: Collection[str] = (),
) -> tuple[dict[str, CryptoSigner], list[str]]:
    """``load_signers``, and why each ignored file was ignored (for an error that says
    why a threshold is not met), each also logged as a warning once, except for a key
    whose id is in ``quiet`` (being revoked right now). Raises KeyUnreadableError for a
    file that may hold a current key and that this process may not read."""
    found: dict[str, CryptoSigner] = {}
    ignored: list[str] = []
    for directory in key_dirs:
        for path in key_files(directory, role):
            signer, reason = _load_one(path, role, keyids)
            if signer is not None and not reason:
                found.setdefault(key_id(signer), signer)
                continue
            ignored.append(reason)
            if signer is not None and key_id(signer) in quiet:
                logger.debug("passing over %s", reason)
                continue
            try:
                mtime = str(path.stat().st_mtime_ns)
            except OSError:
                mtime = ""
            warn_once(
                ("ignored", str(path), mtime, reason),
                "ignoring a file among the %s keys: %s",
                role,
                reason,
            )
    return found, ignored


def _load_one(path: Path, role: str, keyids: Collection[str]) -> tuple[CryptoSigner | None, str]:
    """The key in ``path`` and, when it is not one of ``keyids`` or unusable, why."""
    try:
        signer = load_key_file(path)  # its errors name the path
        warn_if_exposed(path, path.stat())
    except KeyUnreadableError as exc:
        if may_be_current(path, role, keyids):
            raise
        return None, str(exc)
    except RepositoryError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"{path}: {exc}"
    if key_id(signer) not in keyids:
        return signer, (
            f"{path}: its key {key_id(signer)[:16]}… is not one of the {role} role's current "
            "keys (a revoked key, one waiting for a new root version, or a stray file)"
        )
    return signer, ""


def check_key_access(keys_dir: Path, keyids: Mapping[str, Collection[str]], user: User) -> None:
    """Raise RepositoryError naming each fix when ``user`` (who runs ``edgectl serve``)
    could not list ``keys_dir`` or read a file in it that may hold a current key of a
    role (``keyids``: role → its current key ids)."""
    try:
        problems = [access_problem(keys_dir, keys_dir.stat(), user, LIST)]
    except FileNotFoundError:
        return
    for role, ids in keyids.items():
        for path in key_files(keys_dir, role):
            if may_be_current(path, role, ids):
                try:
                    problems.append(access_problem(path, path.stat(), user, READ))
                except FileNotFoundError:
                    continue
    problems = [p for p in problems if p]
    if problems:
        raise RepositoryError("refusing to use the repository: " + "; ".join(problems))


def load_key(keys_dir: Path, role: str) -> CryptoSigner:
    """The signer in ``keys_dir/<role>.pem``; RepositoryError when missing or unreadable."""
    path = keys_dir / f"{role}.pem"
    if not path.exists():
        raise RepositoryError(f"the {role} key is missing: expected {path}")
    return load_key_file(path)


def remove_revoked(keys_dir: Path, role: str, keep: Collection[str]) -> list[str]:
    """Delete the key files of ``role`` whose key id is not in ``keep``; return their ids."""
    removed = []
    for path in key_files(keys_dir, role):
        try:
            signer = load_key_file(path)
        except RepositoryError:
            continue  # not ours to judge: leave unreadable files alone
        if key_id(signer) not in keep:
            path.unlink()
            removed.append(key_id(signer))
            logger.info("deleted revoked %s key %s (%s)", role, key_id(signer), path)
    return removed
