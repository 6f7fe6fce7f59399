"""What the enrollment tests share: the options every test device is added with,
reading an enrollment archive's members, and comparing public keys."""

from __future__ import annotations

import io
import tarfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.identity.devices import EnrollOptions

OPTIONS = EnrollOptions(repository_url="https://updates.example.net/", mqtt_host="mq.example")


def archive_members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        out = {}
        for m in tar:
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def spki(key: x509.Certificate | bytes) -> bytes:
    """The public key of a certificate or of a PEM private key, as DER
    SubjectPublicKeyInfo: equal for a certificate and the key it was issued for."""
    public = (
        key.public_key()
        if isinstance(key, x509.Certificate)
        else serialization.load_pem_private_key(key, None).public_key()
    )
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
