"""The repository's signing keys on disk.

Invariants:
- One Ed25519 key per role, stored as unencrypted PKCS8 PEM in ``keys/<role>.pem``,
  file mode 0600 in a 0700 directory. The HTTP server never serves this directory.
- A key loads back into a ``CryptoSigner`` whose public key (and key id) equals the one
  written into root (or, for the delegated role, into targets).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

from controller.errors import RepositoryError
from controller.fsio import atomic_write, make_dir


def generate_key() -> CryptoSigner:
    """A fresh Ed25519 signer."""
    return CryptoSigner.generate_ed25519()


def save_key(keys_dir: Path, role: str, signer: CryptoSigner) -> Path:
    """Write ``signer``'s private key to ``keys_dir/<role>.pem`` (0600, dir 0700)."""
    make_dir(keys_dir, 0o700)
    path = keys_dir / f"{role}.pem"
    atomic_write(path, signer.private_bytes, mode=0o600)
    return path


def load_key(keys_dir: Path, role: str) -> CryptoSigner:
    """Load the signer of ``role``; raise RepositoryError when it is missing or unreadable."""
    path = keys_dir / f"{role}.pem"
    try:
        private_key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise RepositoryError(f"the {role} key is missing: expected {path}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise RepositoryError(f"cannot load the {role} key from {path}: {exc}") from None
    public_key = SSlibKey.from_crypto(private_key.public_key())
    return CryptoSigner(private_key, public_key)
