"""Enrolled devices: ``edgectl device add``, ``device renew`` and ``device revoke``.

The registry (``REPO_DIR/ca/devices.json``, format in ``controller.identity.registry``)
records each device's fleet, its current certificate and its earlier ones that have not
expired, and what was revoked when. It is the source of the broker's per-device ACL
lines (``controller.identity.broker``) and of the CRL.

``add_device`` issues a client certificate from the device CA (``controller.identity.ca``) and
packs it with the CA certificate, the repository's TUF root and an agent config into the
archive ``edge-agent enroll`` installs (contract: ``agent.device.enroll``). Without a CSR the
key is made here and packed too: the archive holds the device's private key, hand it
over like a password. With a CSR (``edge-agent request`` on the device) the certificate
is issued for the request's public key and the archive holds no key: the key never
leaves the device. ``renew_device`` issues an enrolled device a new certificate the same
two ways and writes the same archive; the device's earlier certificate stays valid (so it
keeps connecting until it installs the new one) unless the renewal revokes it.

Invariants: a device id has at most one *current* certificate: adding an id that is
enrolled and not revoked raises UsageError naming ``edgectl device renew`` and ``edgectl
device revoke``; renewing needs an enrolled, unrevoked id. Revoking revokes every
unexpired certificate of the id, current and previous, and re-signs the CRL with every
revoked serial of every device. Registry writes are atomic and happen under
``REPO_DIR/ca/.lock``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.contracts import InvalidNameError, check_name
from agent.contracts.enrollment import (
    CA_CERT,
    CONFIG,
    DEVICE_CERT,
    DEVICE_KEY,
    ENROLL_SCHEMA,
    INFO,
    ROOT,
    pack_enrollment,
)
from controller.base.errors import RepositoryError, UsageError
from controller.identity.ca import ClientPublicKey, DeviceCA, public_key_from_csr
from controller.identity.gateways import check_site
from controller.identity.registry import (
    DEFAULT_CERT_DAYS,
    REGISTRY_FILE,
    REGISTRY_SCHEMA,
    DeviceRecord,
    EnrollOptions,
    IssuedCert,
    ca_dir,
    load_registry,
    registry_lock,
    revoke_all,
    revoked_cert,
    save_registry,
    unexpired,
    write_crl,
)

# Re-exported: callers (broker, expiry, tests) import the registry's names from here.
__all__ = [
    "DEFAULT_CERT_DAYS",
    "REGISTRY_FILE",
    "REGISTRY_SCHEMA",
    "DeviceRecord",
    "EnrollOptions",
    "IssuedCert",
    "add_device",
    "agent_config_toml",
    "ca_dir",
    "load_registry",
    "renew_device",
    "revoke_device",
    "write_crl",
]

logger = logging.getLogger(__name__)

# The broker's ACL gives this CN the controller's rights (controller.identity.broker).
RESERVED_IDS: Final = frozenset({"edgectl"})


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def agent_config_toml(device_id: str, fleet: str, options: EnrollOptions) -> str:
    """The agent.toml an enrolled device starts with (paths relative to /etc/edge-agent)."""
    lines = [
        "# Written by `edgectl device add` or `device renew`; installed by `edge-agent enroll`.",
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
    site: str | None = None,
) -> tuple[DeviceRecord, bytes]:
    """Enroll ``device_id`` in ``fleet``: issue its certificate, record it, return the
    record and the enrollment archive bytes. ``site``: the site gateway the device is
    behind (its bridge may then speak for the device at the central broker).

    With ``csr_pem`` (the device's PEM certificate signing request) the certificate is
    for the request's key and the archive has no ``device.key``; otherwise a key is made
    here and packed. Raises UsageError (bad names, already enrolled, a CSR that does not
    check out) and RepositoryError (no repository).
    """
    _check_options(device_id, fleet, options)
    if site is not None:
        check_site(site, "--site")
    # Checked before the registry is touched: a bad request enrolls nothing.
    device_key = public_key_from_csr(csr_pem, device_id) if csr_pem is not None else None
    root_bytes = _read_root(repo_dir)
    when = now or _now()
    folder = ca_dir(repo_dir)
    with registry_lock(folder):
        records = load_registry(repo_dir)
        previous = records.get(device_id)
        if previous is not None and not previous.is_revoked:
            raise UsageError(
                f"device {device_id!r} is already enrolled (fleet {previous.fleet}): renew its "
                f"certificate with `edgectl device renew {device_id} --repo {repo_dir}`, or "
                f"revoke it first: edgectl device revoke {device_id} --repo {repo_dir}"
            )
        ca = DeviceCA.open_or_create(folder, when)
        cert, key_pem = _issue(ca, device_id, fleet, options.cert_days, when, device_key)
        # A revoked id added again keeps its revoked serials until they expire: dropping
        # them would take them off the next CRL, and a stolen certificate would work again.
        kept = () if previous is None else unexpired((previous.current, *previous.previous), when)
        record = DeviceRecord(
            device_id=device_id,
            fleet=fleet,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc.isoformat(),
            enrolled_at=when.isoformat(),
            previous=kept,
            endpoints=dataclasses.replace(options, cert_days=DEFAULT_CERT_DAYS),
            site=site,
        )
        records[device_id] = record
        save_registry(repo_dir, records)
    archive = _enrollment_archive(record, options, root_bytes, ca, cert, key_pem)
    logger.info("enrolled %s in fleet %s (serial %x)", device_id, fleet, record.serial)
    return record, archive


def renew_device(
    repo_dir: Path,
    device_id: str,
    now: dt.datetime | None = None,
    *,
    cert_days: int = DEFAULT_CERT_DAYS,
    csr_pem: bytes | None = None,
    revoke_previous: bool = False,
    options: EnrollOptions | None = None,
) -> tuple[DeviceRecord, bytes]:
    """Issue enrolled ``device_id`` a new certificate; return the record and the archive.

    The archive is the one ``add_device`` writes (``edge-agent enroll`` installs it over
    the enrollment in place), with a new key, or none with ``csr_pem`` (checked exactly
    as ``add_device`` checks it). The config in it uses ``options`` when given, else the
    endpoints recorded at enrollment. The earlier certificate moves to ``previous``;
    ``revoke_previous`` revokes it (and any other previous one) and re-signs the CRL.
    Raises UsageError (unknown or revoked device, a CSR that does not check out, no
    endpoints known) and RepositoryError (no repository or CA).
    """
    root_bytes = _read_root(repo_dir)
    when = now or _now()
    folder = ca_dir(repo_dir)
    with registry_lock(folder):
        records = load_registry(repo_dir)
        record = _renewable(records, repo_dir, device_id)
        device_key = public_key_from_csr(csr_pem, device_id) if csr_pem is not None else None
        chosen = options or record.endpoints
        if chosen is None:
            raise UsageError(
                f"the registry does not say where {device_id!r} connects (enrolled before "
                "`device renew` existed): pass --repository-url URL and --broker HOST:PORT "
                "as given to `edgectl device add`"
            )
        _check_options(device_id, record.fleet, chosen)
        ca = DeviceCA.open(folder)
        cert, key_pem = _issue(ca, device_id, record.fleet, cert_days, when, device_key)
        earlier = unexpired((record.current, *record.previous), when)
        if revoke_previous:
            earlier = tuple(revoked_cert(c, when) for c in earlier)
        record = dataclasses.replace(
            record,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc.isoformat(),
            renewed_at=when.isoformat(),
            previous=earlier,
            endpoints=dataclasses.replace(chosen, cert_days=DEFAULT_CERT_DAYS),
        )
        records[device_id] = record
        save_registry(repo_dir, records)
        if revoke_previous:
            write_crl(repo_dir, records, when)
    archive = _enrollment_archive(
        record, dataclasses.replace(chosen, cert_days=cert_days), root_bytes, ca, cert, key_pem
    )
    logger.info("renewed %s's certificate (serial %x)", device_id, record.serial)
    return record, archive


def revoke_device(repo_dir: Path, device_id: str, now: dt.datetime | None = None) -> DeviceRecord:
    """Revoke every unexpired certificate of ``device_id`` (the current one and those a
    renewal kept) and re-sign the CRL (``REPO_DIR/ca/crl.pem``).

    Revoking a revoked device re-signs the CRL and changes nothing else. Raises
    UsageError for a device never enrolled.
    """
    when = now or _now()
    folder = ca_dir(repo_dir)
    with registry_lock(folder):
        records = load_registry(repo_dir)
        record = records.get(device_id)
        if record is None:
            known = ", ".join(sorted(records)) or "none"
            raise UsageError(f"no enrolled device {device_id!r} (enrolled: {known})")
        revoked = revoke_all(record, when)
        if revoked != record:
            record = revoked
            records[device_id] = record
            save_registry(repo_dir, records)
        write_crl(repo_dir, records, when)
    return record


# ------------------------------------------------------------------ shared steps


def _read_root(repo_dir: Path) -> bytes:
    root = repo_dir / "metadata" / "root.json"
    try:
        return root.read_bytes()
    except FileNotFoundError:
        raise RepositoryError(
            f"no TUF root at {root}: is {repo_dir} a repository (`edgectl init {repo_dir}`)?"
        ) from None


def _renewable(records: dict[str, DeviceRecord], repo_dir: Path, device_id: str) -> DeviceRecord:
    record = records.get(device_id)
    if record is None:
        known = ", ".join(sorted(records)) or "none"
        raise UsageError(
            f"no enrolled device {device_id!r} to renew (enrolled: {known}): enroll it "
            f"with `edgectl device add {device_id} --fleet FLEET --repo {repo_dir} ...`"
        )
    if record.is_revoked:
        raise UsageError(
            f"device {device_id!r} was revoked at {record.revoked_at}: a revoked device is "
            f"not renewed; enroll it again with `edgectl device add {device_id} --fleet "
            f"{record.fleet} --repo {repo_dir} ...`"
        )
    return record


def _issue(
    ca: DeviceCA,
    device_id: str,
    fleet: str,
    days: int,
    when: dt.datetime,
    device_key: ClientPublicKey | None,
) -> tuple[x509.Certificate, bytes | None]:
    """The device's certificate, and the key made for it (None: for ``device_key``)."""
    if device_key is None:
        identity = ca.issue_client(device_id, unit=fleet, days=days, now=when)
        return identity.certificate, identity.key_pem
    return ca.issue_client_for(device_key, device_id, unit=fleet, days=days, now=when), None


def _enrollment_archive(
    record: DeviceRecord,
    options: EnrollOptions,
    root_bytes: bytes,
    ca: DeviceCA,
    cert: x509.Certificate,
    key_pem: bytes | None,
) -> bytes:
    info = {"schema": ENROLL_SCHEMA, "device_id": record.device_id, "fleet": record.fleet}
    files = {
        INFO: json.dumps(info, indent=2).encode() + b"\n",
        CONFIG: agent_config_toml(record.device_id, record.fleet, options).encode(),
        ROOT: root_bytes,
        CA_CERT: ca.cert_pem,
        DEVICE_CERT: cert.public_bytes(serialization.Encoding.PEM),
    }
    if key_pem is not None:
        files[DEVICE_KEY] = key_pem
    return pack_enrollment(files)
