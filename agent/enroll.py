"""Enrollment: the ``enroll.tar`` contract and installing one under ``/etc/edge-agent``.

``edgectl device add`` (controller) writes the archive; ``edge-agent enroll`` (here)
installs it. The agent owns the contract, so both sides use the names below.

The archive is a plain tar with exactly these regular-file members, at the top level:

    enroll.json   {"schema": "edgefleet.enroll/1", "device_id", "fleet"}
    agent.toml    the agent's config (paths relative to its folder)
    root.json     the fleet repository's TUF root: the agent's trust anchor
    ca.crt        the device CA: verifies the broker (and issued device.crt)
    device.crt    this device's client certificate, CN = device id
    device.key    its private key (the only secret)

Installed modes: the folder 0755, ``device.key`` 0600, everything else 0644, all owned
by root when enroll runs as root. The key stays root-only on disk; the systemd unit hands
it to the sandboxed agent with ``LoadCredential=device.key:...`` (see
``[mqtt] key_credential``).

Invariants: nothing is written unless the whole archive checks out (members, sizes,
the config parses, the certificate names this device and matches the key, the root is
TUF root metadata). Each file is replaced atomically; a config already there for
another device is not replaced without ``force``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent.config import AgentConfig, parse_config
from agent.errors import AgentError, ConfigError, UntrustedInputError
from agent.fsutil import atomic_write

logger = logging.getLogger(__name__)

ENROLL_SCHEMA: Final = "edgefleet.enroll/1"
INFO: Final = "enroll.json"
CONFIG: Final = "agent.toml"
ROOT: Final = "root.json"
CA_CERT: Final = "ca.crt"
DEVICE_CERT: Final = "device.crt"
DEVICE_KEY: Final = "device.key"
MEMBERS: Final = (INFO, CONFIG, ROOT, CA_CERT, DEVICE_CERT, DEVICE_KEY)
SECRET_MEMBERS: Final = frozenset({DEVICE_KEY})
MAX_MEMBER_BYTES: Final = 1024 * 1024
DEFAULT_CONFIG_DIR: Final = Path("/etc/edge-agent")


class EnrollmentError(UntrustedInputError):
    """An enrollment archive is malformed, inconsistent, or would overwrite another device."""


@dataclass(frozen=True)
class Enrollment:
    """A checked enrollment archive, ready to install."""

    device_id: str
    fleet: str
    files: dict[str, bytes]


def member_mode(name: str) -> int:
    return 0o600 if name in SECRET_MEMBERS else 0o644


def pack_enrollment(files: dict[str, bytes]) -> bytes:
    """The archive bytes for ``files`` (every name in MEMBERS), deterministic order."""
    missing = [m for m in MEMBERS if m not in files]
    if missing or set(files) - set(MEMBERS):
        raise ValueError(f"enrollment members expected {MEMBERS}, got {sorted(files)}")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = member_mode(name)
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


def read_enrollment(data: bytes, config_dir: Path = DEFAULT_CONFIG_DIR) -> Enrollment:
    """Check an archive; raises EnrollmentError saying what is wrong."""
    files = _read_members(data)
    try:
        info = json.loads(files[INFO])
    except ValueError as exc:
        raise EnrollmentError(f"{INFO} is not JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("schema") != ENROLL_SCHEMA:
        raise EnrollmentError(f"{INFO}: expected schema {ENROLL_SCHEMA!r}")
    config = _check_config(files[CONFIG], config_dir)
    if (config.device_id, config.fleet) != (info.get("device_id"), info.get("fleet")):
        raise EnrollmentError(
            f"{CONFIG} names device {config.device_id!r} in fleet {config.fleet!r}, "
            f"{INFO} names {info.get('device_id')!r} in {info.get('fleet')!r}"
        )
    _check_identity(files, config.device_id)
    _check_root(files[ROOT])
    return Enrollment(config.device_id, config.fleet, files)


def install_enrollment(
    enrollment: Enrollment, config_dir: Path = DEFAULT_CONFIG_DIR, *, force: bool = False
) -> list[Path]:
    """Write the archive's files into ``config_dir``; return the paths written.

    Raises EnrollmentError when ``config_dir`` already holds another device's config and
    ``force`` is not set; OSError when the folder cannot be written.
    """
    existing = config_dir / CONFIG
    if existing.exists() and not force:
        try:
            doc = tomllib.loads(existing.read_text())
        except (OSError, ValueError):
            doc = {}
        if doc.get("device_id") not in (None, enrollment.device_id):
            raise EnrollmentError(
                f"{existing} belongs to device {doc.get('device_id')!r}, not "
                f"{enrollment.device_id!r}: pass --force to replace it"
            )
    config_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config_dir, 0o755)
    as_root = os.geteuid() == 0
    written = []
    # The key first and the config last: a config is never there without its files.
    for name in (DEVICE_KEY, DEVICE_CERT, CA_CERT, ROOT, INFO, CONFIG):
        path = config_dir / name
        atomic_write(path, enrollment.files[name], mode=member_mode(name))
        if as_root:
            os.chown(path, 0, 0)
        written.append(path)
    return written


# ------------------------------------------------------------------ checks


def _read_members(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            _read_tar(tar, files)
    except tarfile.TarError as exc:
        raise EnrollmentError(f"not an enrollment archive (tar): {exc}") from None
    missing = [m for m in MEMBERS if m not in files]
    if missing:
        raise EnrollmentError(f"the archive lacks {', '.join(missing)}")
    return files


def _read_tar(tar: tarfile.TarFile, files: dict[str, bytes]) -> None:
    for member in tar:
        if member.name not in MEMBERS:
            raise EnrollmentError(
                f"unexpected member {member.name!r}; expected only {', '.join(MEMBERS)}"
            )
        if not member.isreg():
            raise EnrollmentError(f"member {member.name!r} is not a regular file")
        if member.size > MAX_MEMBER_BYTES:
            raise EnrollmentError(
                f"member {member.name!r} is {member.size} bytes; at most {MAX_MEMBER_BYTES}"
            )
        if member.name in files:
            raise EnrollmentError(f"member {member.name!r} appears twice")
        extracted = tar.extractfile(member)
        assert extracted is not None  # a regular file always has content
        files[member.name] = extracted.read()


def _check_config(raw: bytes, config_dir: Path) -> AgentConfig:
    try:
        doc = tomllib.loads(raw.decode())
        return parse_config(doc, config_dir, environ={})
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EnrollmentError(f"{CONFIG} is not valid TOML: {exc}") from None
    except ConfigError as exc:
        raise EnrollmentError(f"{CONFIG}: {exc}") from None


def _check_identity(files: dict[str, bytes], device_id: str) -> None:
    try:
        ca = x509.load_pem_x509_certificate(files[CA_CERT])
        cert = x509.load_pem_x509_certificate(files[DEVICE_CERT])
        key = serialization.load_pem_private_key(files[DEVICE_KEY], password=None)
    except (ValueError, TypeError) as exc:
        raise EnrollmentError(f"unreadable certificate or key: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = names[0].value if names else None
    if common_name != device_id:
        raise EnrollmentError(
            f"{DEVICE_CERT} is for {common_name!r}, expected the device id {device_id!r}"
        )
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, public):
        raise EnrollmentError(f"{DEVICE_KEY} does not belong to {DEVICE_CERT}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise EnrollmentError(f"{DEVICE_CERT} was not issued by {CA_CERT} ({exc!r})") from None


def _check_root(raw: bytes) -> None:
    try:
        doc = json.loads(raw)
        kind = doc["signed"]["_type"]
    except (ValueError, KeyError, TypeError):
        kind = None
    if kind != "root":
        raise EnrollmentError(f"{ROOT} is not TUF root metadata")


def enroll_from_file(
    archive: Path, config_dir: Path = DEFAULT_CONFIG_DIR, *, force: bool = False
) -> Enrollment:
    """Read, check and install ``archive``; raises EnrollmentError or AgentError."""
    try:
        data = archive.read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read {archive}: {exc.strerror}") from None
    enrollment = read_enrollment(data, config_dir)
    try:
        install_enrollment(enrollment, config_dir, force=force)
    except OSError as exc:
        raise AgentError(f"cannot write {config_dir}: {exc.strerror or exc}") from None
    logger.info(
        "enrolled %s in fleet %s under %s", enrollment.device_id, enrollment.fleet, config_dir
    )
    return enrollment
