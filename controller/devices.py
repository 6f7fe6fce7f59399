"""Enrolled devices: the registry, ``edgectl device add`` and ``edgectl device revoke``.

The registry (``REPO_DIR/ca/devices.json``) records each device's fleet and the serial
of the certificate it was last issued, and when that was revoked. It is the source of
the broker's per-device ACL lines (``controller.broker``) and of the CRL.

``add_device`` issues a client certificate from the device CA (``controller.ca``) and
packs it with the CA certificate, the repository's TUF root and an agent config into the
archive ``edge-agent enroll`` installs (contract: ``agent.enroll``). Without a CSR the
key is made here and packed too: the archive holds the device's private key, hand it
over like a password. With a CSR (``edge-agent request`` on the device) the certificate
is issued for the request's public key and the archive holds no key: the key never
leaves the device.

Invariants: a device id has at most one valid certificate: adding an id that is
enrolled and not revoked raises UsageError naming ``edgectl device revoke``; revoking
re-signs the CRL with every revoked serial. Registry writes are atomic and happen under
``REPO_DIR/ca/.lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization

from agent.contracts import InvalidNameError, check_name
from agent.enroll import (
    CA_CERT,
    CONFIG,
    DEVICE_CERT,
    DEVICE_KEY,
    ENROLL_SCHEMA,
    INFO,
    ROOT,
    pack_enrollment,
)
from controller.ca import CA_DIR_NAME, DeviceCA, public_key_from_csr
from controller.errors import RepositoryError, UsageError
from controller.fsio import atomic_write

logger = logging.getLogger(__name__)

REGISTRY_FILE: Final = "devices.json"
REGISTRY_SCHEMA: Final = "edgefleet.devices/1"
DEFAULT_CERT_DAYS: Final = 825
# The broker's ACL gives this CN the controller's rights (controller.broker).
RESERVED_IDS: Final = frozenset({"edgectl"})


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    fleet: str
    serial: int
    not_after: str
    enrolled_at: str
    revoked_at: str | None = None

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def to_json(self) -> dict[str, Any]:
        # Serials are 159-bit: strings, so any JSON reader keeps them exact.
        return {
            "fleet": self.fleet,
            "serial": str(self.serial),
            "not_after": self.not_after,
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
        }

    @classmethod
    def from_json(cls, device_id: str, doc: dict[str, Any]) -> DeviceRecord:
        return cls(
            device_id=device_id,
            fleet=str(doc["fleet"]),
            serial=int(doc["serial"]),
            not_after=str(doc["not_after"]),
            enrolled_at=str(doc["enrolled_at"]),
            revoked_at=doc.get("revoked_at"),
        )


@dataclass(frozen=True)
class EnrollOptions:
    """Where the device will find its repository and broker."""

    repository_url: str
    mqtt_host: str
    mqtt_port: int = 8883
    tls: bool = True
    cert_days: int = DEFAULT_CERT_DAYS


def ca_dir(repo_dir: Path) -> Path:
    return repo_dir / CA_DIR_NAME


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@contextlib.contextmanager
def _registry_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_registry(repo_dir: Path) -> dict[str, DeviceRecord]:
    """Every device ever enrolled, by id; empty when none was. Raises RepositoryError."""
    path = ca_dir(repo_dir) / REGISTRY_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"cannot read the device registry {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != REGISTRY_SCHEMA:
        raise RepositoryError(f"{path}: expected schema {REGISTRY_SCHEMA!r}")
    try:
        return {
            device: DeviceRecord.from_json(device, entry)
            for device, entry in doc["devices"].items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise RepositoryError(f"{path}: malformed entry ({exc!r})") from None


def _save_registry(repo_dir: Path, records: dict[str, DeviceRecord]) -> None:
    doc = {
        "schema": REGISTRY_SCHEMA,
        "devices": {d: r.to_json() for d, r in sorted(records.items())},
    }
    atomic_write(
        ca_dir(repo_dir) / REGISTRY_FILE, json.dumps(doc, indent=2).encode() + b"\n", 0o600
    )


def agent_config_toml(device_id: str, fleet: str, options: EnrollOptions) -> str:
    """The agent.toml an enrolled device starts with (paths relative to /etc/edge-agent)."""
    lines = [
        "# Written by `edgectl device add`; installed by `edge-agent enroll`.",
        "# Every key: docs/configuration.md. Relative paths are relative to this folder.",
        f'device_id = "{device_id}"',
        f'fleet = "{fleet}"',
        f'trusted_root = "{ROOT}"',
        "",
        "[mqtt]",
        f'host = "{options.mqtt_host}"',
        f"port = {options.mqtt_port}",
        f"tls = {'true' if options.tls else 'false'}",
        f'ca_file = "{CA_CERT}"',
        f'cert_file = "{DEVICE_CERT}"',
        f'key_file = "{DEVICE_KEY}"',
        "",
        "[repository]",
        f'url = "{options.repository_url}"',
        "",
    ]
    return "\n".join(lines)


def _check_options(device_id: str, fleet: str, options: EnrollOptions) -> None:
    try:
        check_name("device", device_id)
        check_name("fleet", fleet)
    except InvalidNameError as exc:
        raise UsageError(str(exc)) from None
    if device_id in RESERVED_IDS:
        raise UsageError(f"device id {device_id!r} is reserved for the controller's identity")
    if not options.repository_url.startswith(("http://", "https://")):
        raise UsageError(
            f"--repository-url expected an http:// or https:// URL, got {options.repository_url!r}"
        )
    for text in (options.repository_url, options.mqtt_host):
        if any(c in text for c in '"\\\n'):
            raise UsageError(f"{text!r} contains a quote, backslash or newline")


def add_device(
    repo_dir: Path,
    device_id: str,
    fleet: str,
    options: EnrollOptions,
    now: dt.datetime | None = None,
    *,
    csr_pem: bytes | None = None,
) -> tuple[DeviceRecord, bytes]:
    """Enroll ``device_id`` in ``fleet``: issue its certificate, record it, return the
    record and the enrollment archive bytes.

    With ``csr_pem`` (the device's PEM certificate signing request) the certificate is
    for the request's key and the archive has no ``device.key``; otherwise a key is made
    here and packed. Raises UsageError (bad names, already enrolled, a CSR that does not
    check out) and RepositoryError (no repository).
    """
    _check_options(device_id, fleet, options)
    # Checked before the registry is touched: a bad request enrolls nothing.
    device_key = public_key_from_csr(csr_pem, device_id) if csr_pem is not None else None
    root = repo_dir / "metadata" / "root.json"
    try:
        root_bytes = root.read_bytes()
    except FileNotFoundError:
        raise RepositoryError(
            f"no TUF root at {root}: is {repo_dir} a repository (`edgectl init {repo_dir}`)?"
        ) from None
    when = now or _now()
    folder = ca_dir(repo_dir)
    with _registry_lock(folder):
        records = load_registry(repo_dir)
        previous = records.get(device_id)
        if previous is not None and not previous.is_revoked:
            raise UsageError(
                f"device {device_id!r} is already enrolled (fleet {previous.fleet}); "
                f"revoke it first: edgectl device revoke {device_id} --repo {repo_dir}"
            )
        ca = DeviceCA.open_or_create(folder, when)
        key_pem: bytes | None = None
        if device_key is None:
            identity = ca.issue_client(device_id, unit=fleet, days=options.cert_days, now=when)
            cert, key_pem = identity.certificate, identity.key_pem
        else:
            cert = ca.issue_client_for(
                device_key, device_id, unit=fleet, days=options.cert_days, now=when
            )
        record = DeviceRecord(
            device_id=device_id,
            fleet=fleet,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc.isoformat(),
            enrolled_at=when.isoformat(),
        )
        records[device_id] = record
        _save_registry(repo_dir, records)
    info = {"schema": ENROLL_SCHEMA, "device_id": device_id, "fleet": fleet}
    files = {
        INFO: json.dumps(info, indent=2).encode() + b"\n",
        CONFIG: agent_config_toml(device_id, fleet, options).encode(),
        ROOT: root_bytes,
        CA_CERT: ca.cert_pem,
        DEVICE_CERT: cert.public_bytes(serialization.Encoding.PEM),
    }
    if key_pem is not None:
        files[DEVICE_KEY] = key_pem
    archive = pack_enrollment(files)
    logger.info("enrolled %s in fleet %s (serial %x)", device_id, fleet, record.serial)
    return record, archive


def revoke_device(repo_dir: Path, device_id: str, now: dt.datetime | None = None) -> DeviceRecord:
    """Revoke ``device_id``'s certificate and re-sign the CRL (``REPO_DIR/ca/crl.pem``).

    Revoking a revoked device re-signs the CRL and changes nothing else. Raises
    UsageError for a device never enrolled.
    """
    when = now or _now()
    folder = ca_dir(repo_dir)
    with _registry_lock(folder):
        records = load_registry(repo_dir)
        record = records.get(device_id)
        if record is None:
            known = ", ".join(sorted(records)) or "none"
            raise UsageError(f"no enrolled device {device_id!r} (enrolled: {known})")
        if not record.is_revoked:
            record = dataclasses.replace(record, revoked_at=when.isoformat())
            records[device_id] = record
            _save_registry(repo_dir, records)
        write_crl(repo_dir, records, when)
    return record


def write_crl(
    repo_dir: Path, records: dict[str, DeviceRecord] | None = None, now: dt.datetime | None = None
) -> Path:
    """Re-sign the CRL from the registry; return its path. Raises RepositoryError."""
    entries = records if records is not None else load_registry(repo_dir)
    ca = DeviceCA.open(ca_dir(repo_dir))
    revoked = [
        (r.serial, dt.datetime.fromisoformat(r.revoked_at))
        for r in entries.values()
        if r.revoked_at is not None
    ]
    ca.write_crl(revoked, now)
    return ca.crl_path
