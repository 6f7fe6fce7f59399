"""The repository's signing keys on disk, and which of them may sign what.

Invariants:
- Ed25519 keys, stored as unencrypted PKCS8 PEM, file mode 0600 in a 0700 directory.
  ``edgectl init`` writes ``keys/<role>.pem``; a key made later (rotation, extra root
  keys) is ``<role>-<key id prefix>.pem``. The HTTP and MQTT sides never serve keys.
- Files are only candidates: a role is signed with the loaded keys whose key id the
  trusted metadata lists for it (root for the top-level roles, the targets delegation
  for ``rollout``), so a stale or stray file can never sign anything.
- A revoked key's file is deleted once the metadata that revokes it is published.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from controller.base.errors import RepositoryError
from controller.base.fsio import atomic_write, durable_unlink, make_dir

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
    return path


def load_key_file(path: Path) -> CryptoSigner:
    """Load one private key file; RepositoryError when missing or unreadable."""
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise RepositoryError(f"key file {path} does not exist") from None
    except (OSError, ValueError, TypeError) as exc:
        raise RepositoryError(f"cannot load the key {path}: {exc}") from None
    public_key = SSlibKey.from_crypto(private_key.public_key())
    return CryptoSigner(private_key, public_key)


def key_files(keys_dir: Path, role: str) -> list[Path]:
    """The files in ``keys_dir`` that may hold keys of ``role``, sorted."""
    if not keys_dir.is_dir():
        return []
    return sorted({*keys_dir.glob(f"{role}.pem"), *keys_dir.glob(f"{role}-*.pem")})


def load_signers(
    key_dirs: Iterable[Path], role: str, keyids: Collection[str]
) -> dict[str, CryptoSigner]:
    """The keys of ``role`` found in ``key_dirs`` whose id is in ``keyids``, by key id."""
    found: dict[str, CryptoSigner] = {}
    for directory in key_dirs:
        for path in key_files(directory, role):
            signer = load_key_file(path)
            if key_id(signer) in keyids:
                found.setdefault(key_id(signer), signer)
    return found


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
            durable_unlink(path)
            removed.append(key_id(signer))
            logger.info("deleted revoked %s key %s (%s)", role, key_id(signer), path)
    return removed
