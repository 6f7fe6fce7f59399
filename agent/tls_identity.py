"""The device's identity on the broker: which certificate (and CA) go with its key.

Checked at start, before anything connects: a key that is not its certificate's would
fail only in the TLS handshake, on every reconnect, with an OpenSSL message. Here it is
a ConfigError that names both files and what to run.

Invariant: the files returned are a key and a certificate of the same public key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent.config import MqttConfig
from agent.errors import ConfigError

logger = logging.getLogger(__name__)

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class TlsFiles:
    """The client TLS files to load: a certificate, its key, and the CA of the broker."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def is_key_of(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether ``cert`` certifies the public half of ``key``."""
    return key.public_key().public_bytes(*_SPKI) == cert.public_key().public_bytes(*_SPKI)


def resolve_tls_files(mqtt: MqttConfig, environ: Mapping[str, str]) -> TlsFiles:
    """The certificate and CA to use with the client key; raises ConfigError when the key
    or certificate cannot be read, or when the certificate is not the key's.
    """
    key_file = mqtt.tls_key_path(environ)
    key = _load_key(key_file, mqtt.cert_file)
    if not is_key_of(key, _load_cert(mqtt.cert_file, key_file)):
        raise ConfigError(
            f"config keys 'mqtt.cert_file'/'mqtt.key_file': the key {key_file} is not the "
            f"key of the certificate {mqtt.cert_file} (it was issued for another key): "
            "install the enrollment or renewal archive issued for this key with "
            "`sudo edge-agent enroll ARCHIVE`, or, if the key was replaced since (`edge-agent "
            "request --force`), make a request for it here (`edge-agent request ID "
            "--reuse-key`), renew with `edgectl device renew ID --csr FILE` and enroll that"
        )
    return TlsFiles(mqtt.cert_file, key_file, mqtt.ca_file)


def _load_key(path: Path, cert_file: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"config keys 'mqtt.cert_file'/'mqtt.key_file': cannot load the key {path} of "
            f"{cert_file}: {exc} (enroll with `edge-agent enroll enroll.tar`)"
        ) from None


def _load_cert(path: Path, key_file: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"config keys 'mqtt.cert_file'/'mqtt.key_file': cannot load {path} with key "
            f"{key_file}: {exc} (enroll with `edge-agent enroll enroll.tar`)"
        ) from None
