"""Site gateway identities: ``edgectl gateway enroll`` and ``gateway revoke``.

A site gateway's broker bridges its devices' topics to the central broker (see
``controller.gateway.config``). Over TLS the bridge connects with a client certificate
from the device CA whose CN is ``gateway:<site>``; a device id cannot contain ``:``, so
no device can hold a gateway's name and no gateway a device's. The central broker's ACL
(``controller.identity.broker.render_acl``) gives that identity exactly what its site's
devices may do, and no more: it may publish only under
``.../fleets/<fleet>/devices/<id>/...`` of the devices enrolled with ``--site <site>``,
and read their fleets' announcements and their own repository answers. A gateway (or
anyone on a plain site LAN) therefore cannot speak for a device of another site, nor for
a device enrolled without a site.

The gateway registry is ``REPO_DIR/ca/gateways.json`` (schema ``edgefleet.gateways/1``;
serials are decimal strings, times ISO 8601 UTC)::

    {"schema": "edgefleet.gateways/1",
     "gateways": {"plant-7": {"serial": "...", "not_after": "...",
                               "enrolled_at": "...", "revoked_at": null,
                               "previous": [{"serial": "...", "not_after": "...",
                                             "revoked_at": "..."}]}}}

Invariants: one current certificate per site; enrolling a site again revokes its earlier
certificates (a gateway re-enrolled after a loss must not leave the lost key working);
revoking puts every unexpired certificate of the site on the CRL, which
``controller.identity.devices.write_crl`` signs together with the devices' serials.
Writes are atomic (0600) and happen under ``REPO_DIR/ca/.lock``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.contracts import InvalidNameError, check_name
from controller.base.errors import RepositoryError, UsageError
from controller.base.fsio import atomic_write, make_dir
from controller.identity.ca import DeviceCA
from controller.identity.registry import (
    DEFAULT_CERT_DAYS,
    CertHolder,
    IssuedCert,
    ca_dir,
    read_registry_file,
    registry_lock,
    revoke_all,
    revoked_cert,
    unexpired,
    write_registry_file,
)

logger = logging.getLogger(__name__)

GATEWAYS_FILE: Final = "gateways.json"
GATEWAYS_SCHEMA: Final = "edgefleet.gateways/1"
GATEWAY_CN_PREFIX: Final = "gateway:"
# What `gateway enroll -o DIR` writes: the bridge's TLS files for `gateway config`.
GATEWAY_CERT: Final = "gateway.crt"
GATEWAY_KEY: Final = "gateway.key"
GATEWAY_CA: Final = "ca.crt"


def gateway_identity(site: str) -> str:
    """The CN of ``site``'s bridge certificate, and its username at the central broker."""
    return GATEWAY_CN_PREFIX + site


def check_site(site: str, option: str = "site") -> str:
    """``site`` if it is a valid site name; UsageError naming ``option`` otherwise."""
    try:
        return check_name("site", site)
    except InvalidNameError as exc:
        raise UsageError(f"{option}: {exc}") from None


@dataclass(frozen=True)
class GatewayRecord(CertHolder):
    """A site's gateway: its current certificate and earlier unexpired ones."""

    site: str
    serial: int
    not_after: str
    enrolled_at: str
    revoked_at: str | None = None
    previous: tuple[IssuedCert, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": str(self.serial),
            "not_after": self.not_after,
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
            "previous": [c.to_json() for c in self.previous],
        }

    @classmethod
    def from_json(cls, site: str, doc: dict[str, Any]) -> GatewayRecord:
        revoked_at = doc.get("revoked_at")
        return cls(
            site=site,
            serial=int(doc["serial"]),
            not_after=str(doc["not_after"]),
            enrolled_at=str(doc["enrolled_at"]),
            revoked_at=None if revoked_at is None else str(revoked_at),
            previous=tuple(IssuedCert.from_json(c) for c in doc.get("previous", [])),
        )


def load_gateways(repo_dir: Path) -> dict[str, GatewayRecord]:
    """Every gateway ever enrolled, by site; empty when none was. Raises RepositoryError."""
    path = ca_dir(repo_dir) / GATEWAYS_FILE
    entries = read_registry_file(path, GATEWAYS_SCHEMA, "gateways", "gateway registry")
    try:
        return {site: GatewayRecord.from_json(site, entry) for site, entry in entries.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RepositoryError(f"{path}: malformed entry ({exc!r})") from None


def _save_gateways(repo_dir: Path, records: dict[str, GatewayRecord]) -> None:
    entries = {s: r.to_json() for s, r in records.items()}
    write_registry_file(ca_dir(repo_dir) / GATEWAYS_FILE, GATEWAYS_SCHEMA, "gateways", entries)


def enroll_gateway(
    repo_dir: Path,
    site: str,
    output: Path,
    *,
    days: int = DEFAULT_CERT_DAYS,
    now: dt.datetime | None = None,
) -> tuple[GatewayRecord, list[Path]]:
    """Issue ``site``'s gateway a bridge certificate; write ``gateway.crt``, ``gateway.key``
    (0600) and ``ca.crt`` into ``output``; return the record and the files written.

    Enrolling a site again issues a new certificate and revokes the earlier ones (the
    caller re-signs the CRL: ``refresh_broker_files(..., resign_crl=True)``). Raises
    UsageError (bad site name or lifetime) and RepositoryError (no repository).
    """
    from controller.identity.devices import write_crl

    check_site(site)
    if days < 1:
        raise UsageError(f"--days expected a positive number of days, got {days}")
    if not (repo_dir / "metadata" / "root.json").exists():
        raise UsageError(f"{repo_dir} is not a repository: run `edgectl init {repo_dir}` first")
    when = now or dt.datetime.now(dt.UTC)
    folder = ca_dir(repo_dir)
    with registry_lock(folder):
        records = load_gateways(repo_dir)
        earlier = records.get(site)
        ca = DeviceCA.open_or_create(folder, when)
        identity = ca.issue_client(gateway_identity(site), unit="gateways", days=days, now=when)
        cert = identity.certificate
        kept: tuple[IssuedCert, ...] = ()
        if earlier is not None:
            everything = (earlier.current, *earlier.previous)
            kept = tuple(revoked_cert(c, when) for c in unexpired(everything, when))
        record = GatewayRecord(
            site=site,
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc.isoformat(),
            enrolled_at=when.isoformat(),
            previous=kept,
        )
        records[site] = record
        _save_gateways(repo_dir, records)
        if kept:
            write_crl(repo_dir, now=when)
    make_dir(output, 0o755)
    atomic_write(output / GATEWAY_KEY, identity.key_pem, mode=0o600)
    atomic_write(output / GATEWAY_CERT, identity.cert_pem, mode=0o644)
    atomic_write(output / GATEWAY_CA, (folder / GATEWAY_CA).read_bytes(), mode=0o644)
    logger.info("enrolled the gateway of site %s (serial %x)", site, record.serial)
    return record, [output / GATEWAY_CERT, output / GATEWAY_KEY, output / GATEWAY_CA]


def revoke_gateway(repo_dir: Path, site: str, now: dt.datetime | None = None) -> GatewayRecord:
    """Revoke every unexpired certificate of ``site``'s gateway and re-sign the CRL.

    Raises UsageError for a site that never had a gateway enrolled.
    """
    from controller.identity.devices import write_crl

    when = now or dt.datetime.now(dt.UTC)
    with registry_lock(ca_dir(repo_dir)):
        records = load_gateways(repo_dir)
        record = records.get(site)
        if record is None:
            known = ", ".join(sorted(records)) or "none"
            raise UsageError(f"no gateway enrolled for site {site!r} (enrolled: {known})")
        revoked = revoke_all(record, when)
        if revoked != record:
            records[site] = record = revoked
            _save_gateways(repo_dir, records)
        write_crl(repo_dir, now=when)
    return record
