"""The device registry, ``REPO_DIR/ca/devices.json``: who is enrolled, in which fleet,
with which certificates, and where each device was told to connect. Also the site
gateways' registry (``REPO_DIR/ca/gateways.json``, format in
``controller.identity.gateways``) and the CRL signed from both (``write_crl``).

Format (schema ``edgefleet.devices/1``; serials are decimal strings, times ISO 8601 UTC)::

    {"schema": "edgefleet.devices/1",
     "devices": {"cam-0042": {
        "fleet": "north",
        "serial": "...", "not_after": "...",    the current certificate
        "enrolled_at": "...", "revoked_at": null,
        "renewed_at": "...",                    optional: the last `edgectl device renew`
        "site": "plant-7",                      optional: the site gateway it is behind
        "previous": [                           optional: earlier certificates of this id
          {"serial": "...", "not_after": "...", "revoked_at": null}],
        "endpoints": {"repository_url": "...", "mqtt_host": "...",
                      "mqtt_port": 8883, "tls": true}}}}   optional, see below

``serial``/``not_after`` always describe the device's *current* certificate, so readers
that know only them (the ACL, the ``/metrics`` expiry gauges) see the certificate the
device should be using. ``previous`` lists the device's other certificates that have not
expired yet: kept by ``device renew`` so the device still connects until it installs the
new one (``revoked_at`` set when ``--revoke-previous`` or ``device revoke`` put it on the
CRL), and, after a revoked id is added again, the revoked ones so they stay on the CRL.
``endpoints`` are what ``device add`` wrote into the device's ``agent.toml``, so
``device renew`` writes the same config. Files written before renewal existed have
neither ``previous`` nor ``endpoints`` and load as records with none. ``site``
(``device add --site``) lets that site's gateway bridge the device's topics to the
central broker (``controller.identity.gateways``); a device without one is bridged by
no gateway.

Invariants: the current serial and every ``previous`` serial were issued to the device id
by the device CA; a revoked record's certificates are all revoked; expired entries are
dropped from ``previous`` whenever the record changes (an expired certificate no longer
passes the broker's TLS check, so the CRL does not need it). Writes are atomic and
happen under ``REPO_DIR/ca/.lock`` (:func:`registry_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from controller.base.errors import RepositoryError
from controller.base.fsio import atomic_write
from controller.identity.ca import CA_DIR_NAME, DeviceCA

REGISTRY_FILE: Final = "devices.json"
GATEWAYS_FILE: Final = "gateways.json"
GATEWAYS_SCHEMA: Final = "edgefleet.gateways/1"
REGISTRY_SCHEMA: Final = "edgefleet.devices/1"
DEFAULT_CERT_DAYS: Final = 825


@dataclass(frozen=True)
class EnrollOptions:
    """Where the device will find its repository and broker."""

    repository_url: str
    mqtt_host: str
    mqtt_port: int = 8883
    tls: bool = True
    cert_days: int = DEFAULT_CERT_DAYS

    def endpoints_json(self) -> dict[str, Any]:
        """What the registry keeps (the lifetime is chosen per issue, not per device)."""
        return {
            "repository_url": self.repository_url,
            "mqtt_host": self.mqtt_host,
            "mqtt_port": self.mqtt_port,
            "tls": self.tls,
        }

    @classmethod
    def from_endpoints_json(cls, doc: dict[str, Any]) -> EnrollOptions:
        return cls(
            repository_url=str(doc["repository_url"]),
            mqtt_host=str(doc["mqtt_host"]),
            mqtt_port=int(doc["mqtt_port"]),
            tls=bool(doc["tls"]),
        )


@dataclass(frozen=True)
class IssuedCert:
    """One certificate the CA issued to a device, other than its current one."""

    serial: int
    not_after: str
    revoked_at: str | None = None

    def has_expired(self, now: dt.datetime) -> bool:
        return dt.datetime.fromisoformat(self.not_after) <= now

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": str(self.serial),
            "not_after": self.not_after,
            "revoked_at": self.revoked_at,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> IssuedCert:
        revoked_at = doc.get("revoked_at")
        return cls(
            serial=int(doc["serial"]),
            not_after=str(doc["not_after"]),
            revoked_at=None if revoked_at is None else str(revoked_at),
        )


class CertHolder:
    """What a device's and a gateway's record share: a current certificate (``serial``,
    ``not_after``, ``revoked_at``) and earlier unexpired ones (``previous``)."""

    serial: int
    not_after: str
    revoked_at: str | None
    previous: tuple[IssuedCert, ...]

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def current(self) -> IssuedCert:
        return IssuedCert(self.serial, self.not_after, self.revoked_at)

    def revoked_serials(self) -> list[tuple[int, str]]:
        """(serial, revoked at) of every certificate of this record that is revoked."""
        return [(c.serial, c.revoked_at) for c in (self.current, *self.previous) if c.revoked_at]


@dataclass(frozen=True)
class DeviceRecord(CertHolder):
    """A device's registry entry; ``serial``/``not_after`` are its current certificate."""

    device_id: str
    fleet: str
    serial: int
    not_after: str
    enrolled_at: str
    revoked_at: str | None = None
    previous: tuple[IssuedCert, ...] = ()
    endpoints: EnrollOptions | None = None
    renewed_at: str | None = None
    site: str | None = None

    def to_json(self) -> dict[str, Any]:
        # Serials are 159-bit: strings, so any JSON reader keeps them exact.
        doc: dict[str, Any] = {
            "fleet": self.fleet,
            "serial": str(self.serial),
            "not_after": self.not_after,
            "enrolled_at": self.enrolled_at,
            "revoked_at": self.revoked_at,
            "previous": [c.to_json() for c in self.previous],
        }
        if self.renewed_at is not None:
            doc["renewed_at"] = self.renewed_at
        if self.endpoints is not None:
            doc["endpoints"] = self.endpoints.endpoints_json()
        if self.site is not None:
            doc["site"] = self.site
        return doc

    @classmethod
    def from_json(cls, device_id: str, doc: dict[str, Any]) -> DeviceRecord:
        endpoints = doc.get("endpoints")
        return cls(
            device_id=device_id,
            fleet=str(doc["fleet"]),
            serial=int(doc["serial"]),
            not_after=str(doc["not_after"]),
            enrolled_at=str(doc["enrolled_at"]),
            revoked_at=doc.get("revoked_at"),
            previous=tuple(IssuedCert.from_json(c) for c in doc.get("previous", [])),
            endpoints=None if endpoints is None else EnrollOptions.from_endpoints_json(endpoints),
            renewed_at=doc.get("renewed_at"),
            site=None if doc.get("site") is None else str(doc["site"]),
        )


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


def unexpired(certs: tuple[IssuedCert, ...], now: dt.datetime) -> tuple[IssuedCert, ...]:
    return tuple(c for c in certs if not c.has_expired(now))


def ca_dir(repo_dir: Path) -> Path:
    return repo_dir / CA_DIR_NAME


@contextlib.contextmanager
def registry_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(folder / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_registry_file(path: Path, schema: str, section: str, what: str) -> dict[str, Any]:
    """The ``section`` object of the registry file at ``path`` (JSON with ``schema``), by
    name; empty when the file does not exist. Raises RepositoryError naming ``what``."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"cannot read the {what} {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise RepositoryError(f"{path}: expected schema {schema!r}")
    entries = doc.get(section)
    if not isinstance(entries, dict):
        raise RepositoryError(f"{path}: malformed ({section!r} is not an object)")
    return entries


def write_registry_file(
    path: Path, schema: str, section: str, entries: dict[str, dict[str, Any]]
) -> None:
    """Write a registry file atomically (0600); call it under :func:`registry_lock`."""
    doc = {"schema": schema, section: dict(sorted(entries.items()))}
    atomic_write(path, json.dumps(doc, indent=2).encode() + b"\n", 0o600)


def load_registry(repo_dir: Path) -> dict[str, DeviceRecord]:
    """Every device ever enrolled, by id; empty when none was. Raises RepositoryError."""
    path = ca_dir(repo_dir) / REGISTRY_FILE
    entries = read_registry_file(path, REGISTRY_SCHEMA, "devices", "device registry")
    try:
        return {device: DeviceRecord.from_json(device, entry) for device, entry in entries.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RepositoryError(f"{path}: malformed entry ({exc!r})") from None


def save_registry(repo_dir: Path, records: dict[str, DeviceRecord]) -> None:
    """Write the registry atomically (0600); call it under :func:`registry_lock`."""
    entries = {d: r.to_json() for d, r in records.items()}
    write_registry_file(ca_dir(repo_dir) / REGISTRY_FILE, REGISTRY_SCHEMA, "devices", entries)


def load_gateways(repo_dir: Path) -> dict[str, GatewayRecord]:
    """Every gateway ever enrolled, by site; empty when none was. Raises RepositoryError."""
    path = ca_dir(repo_dir) / GATEWAYS_FILE
    entries = read_registry_file(path, GATEWAYS_SCHEMA, "gateways", "gateway registry")
    try:
        return {site: GatewayRecord.from_json(site, entry) for site, entry in entries.items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RepositoryError(f"{path}: malformed entry ({exc!r})") from None


def save_gateways(repo_dir: Path, records: dict[str, GatewayRecord]) -> None:
    entries = {s: r.to_json() for s, r in records.items()}
    write_registry_file(ca_dir(repo_dir) / GATEWAYS_FILE, GATEWAYS_SCHEMA, "gateways", entries)


def revoked_cert(cert: IssuedCert, when: dt.datetime) -> IssuedCert:
    """``cert`` revoked at ``when``, unless it was revoked before."""
    return cert if cert.revoked_at else dataclasses.replace(cert, revoked_at=when.isoformat())


R = TypeVar("R", bound=CertHolder)


def revoke_all(record: R, when: dt.datetime) -> R:
    """``record`` (a device's or a gateway's) with its current certificate and every
    unexpired previous one revoked; the same record when they already were."""
    return dataclasses.replace(  # type: ignore[type-var]  # R is a dataclass
        record,
        revoked_at=record.revoked_at or when.isoformat(),
        previous=tuple(revoked_cert(c, when) for c in unexpired(record.previous, when)),
    )


def write_crl(
    repo_dir: Path, records: dict[str, DeviceRecord] | None = None, now: dt.datetime | None = None
) -> Path:
    """Re-sign the CRL from the registries (every revoked serial, current or previous, of
    devices and of site gateways); return its path. Raises RepositoryError."""
    entries = records if records is not None else load_registry(repo_dir)
    ca = DeviceCA.open(ca_dir(repo_dir))
    holders: list[CertHolder] = [
        *entries.values(),
        *load_gateways(repo_dir).values(),
    ]
    revoked = [
        (serial, dt.datetime.fromisoformat(at))
        for r in holders
        for serial, at in r.revoked_serials()
    ]
    ca.write_crl(revoked, now)
    return ca.crl_path
