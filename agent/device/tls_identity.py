"""The device's identity on the broker: which certificate (and CA) go with its key, and the
client TLS context built from them (the MQTT link and the MQTT fetcher both use it).

Checked at start, before anything connects: a key that is not its certificate's would
fail only in the TLS handshake, on every reconnect, with an OpenSSL message. Here it is
a ConfigError that names both files and what to run.

An enrollment install interrupted between its renames (``agent.device.enroll_install``) leaves
``device.key`` new and ``device.crt`` old. The agent cannot finish it (under systemd
the config folder is read-only to it), but it can read the journal: the new set's
certificate, still staged, matches the new key, and is used until the next
``edge-agent enroll`` completes the install. Invariant: the files returned are a key
and a certificate of the same public key.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent.base.errors import AgentError, ConfigError
from agent.device.config import AgentConfig, MqttConfig
from agent.device.enroll_install import PendingInstall, read_pending

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
    or certificate cannot be read, or when no certificate at hand is the key's.
    """
    key_file = mqtt.tls_key_path(environ)
    key = _load_key(key_file, mqtt.cert_file)
    pending = _pending(mqtt.cert_file.parent)
    if pending is not None:
        new = TlsFiles(_source(pending, mqtt.cert_file), key_file, _source(pending, mqtt.ca_file))
        if is_key_of(key, _load_cert(new.cert_file, key_file)):
            logger.warning(
                "an enrollment install into %s was interrupted: using its new certificate "
                "%s; `sudo edge-agent enroll ARCHIVE` completes it",
                pending.config_dir,
                new.cert_file,
            )
            return new
    if not is_key_of(key, _load_cert(mqtt.cert_file, key_file)):
        raise ConfigError(
            f"config keys 'mqtt.cert_file'/'mqtt.key_file': the key {key_file} is not the "
            f"key of the certificate {mqtt.cert_file} (it was issued for another key): "
            "install the enrollment or renewal archive issued for this key with "
            "`sudo edge-agent enroll ARCHIVE`, or, if the key was replaced since (`edge-agent "
            "request --force`), make a request for it here (`edge-agent request ID "
            "--reuse-key`), renew with `edgectl device renew ID --csr FILE` and enroll that"
        )
    if pending is not None:
        logger.warning(
            "an enrollment install into %s was interrupted before its key was replaced: "
            "using the previous certificate %s; `sudo edge-agent enroll ARCHIVE` completes it",
            pending.config_dir,
            mqtt.cert_file,
        )
    return TlsFiles(mqtt.cert_file, key_file, mqtt.ca_file)


def _pending(config_dir: Path) -> PendingInstall | None:
    try:
        return read_pending(config_dir)
    except AgentError as exc:
        raise ConfigError(str(exc)) from None


def _source(pending: PendingInstall, path: Path) -> Path:
    """Where the pending install's new ``path`` is: staged or in place."""
    if path.parent == pending.config_dir and path.name in pending.names:
        return pending.source(path.name)
    return path


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


def tls_context(config: AgentConfig, environ: Mapping[str, str]) -> ssl.SSLContext:
    """The client TLS context of ``[mqtt]``; raises ConfigError naming the file at fault."""
    files = resolve_tls_files(config.mqtt, environ)  # the key is its certificate's
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(files.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"config key 'mqtt.ca_file': cannot load {files.ca_file}: {exc}"
        ) from None
    try:
        context.load_cert_chain(certfile=str(files.cert_file), keyfile=str(files.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"config keys 'mqtt.cert_file'/'mqtt.key_file': cannot load {files.cert_file} "
            f"with key {files.key_file}: {exc} (enroll with `edge-agent enroll enroll.tar`)"
        ) from None
    return context
