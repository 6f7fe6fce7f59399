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

The gateway registry (read and written by ``controller.identity.registry``) is
``REPO_DIR/ca/gateways.json`` (schema ``edgefleet.gateways/1``;
serials are decimal strings, times ISO 8601 UTC)::

    {"schema": "edgefleet.gateways/1",
     "gateways": {"plant-7": {"serial": "...", "not_after": "...",
                               "enrolled_at": "...", "revoked_at": null,
                               "previous": [{"serial": "...", "not_after": "...",
                                             "revoked_at": "..."}]}}}

Invariants: one current certificate per site; enrolling a site again revokes its earlier
certificates (a gateway re-enrolled after a loss must not leave the lost key working);
revoking puts every unexpired certificate of the site on the CRL, which
``controller.identity.registry.write_crl`` signs together with the devices' serials.
Writes are atomic (0600) and happen under ``REPO_DIR/ca/.lock``.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Final

from agent.contracts import InvalidNameError, check_name
from controller.base.errors import UsageError
from controller.base.fsio import atomic_write, make_dir
from controller.identity.ca import DeviceCA
from controller.identity.registry import (
    DEFAULT_CERT_DAYS,
    GATEWAYS_FILE,
    GATEWAYS_SCHEMA,
    GatewayRecord,
    IssuedCert,
    ca_dir,
    load_gateways,
    registry_lock,
    revoke_all,
    revoked_cert,
    save_gateways,
    unexpired,
    write_crl,
)

# Re-exported: the gateway registry's names, where its commands are.
__all__ = [
    "GATEWAYS_FILE",
    "GATEWAYS_SCHEMA",
    "GatewayRecord",
    "check_site",
    "enroll_gateway",
    "gateway_identity",
    "load_gateways",
    "revoke_gateway",
]

logger = logging.getLogger(__name__)

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
        save_gateways(repo_dir, records)
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
            save_gateways(repo_dir, records)
        write_crl(repo_dir, now=when)
    return record
