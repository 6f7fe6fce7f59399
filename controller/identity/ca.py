"""The controller's device CA: X.509 identities for devices, the controller and the broker.

One small CA (ECDSA P-256, ``cryptography``) issues three kinds of certificate:

- a device's client certificate, subject CN = the device id, EKU clientAuth: the broker
  takes the CN as the MQTT username (``use_identity_as_username``), so the ACL's
  ``%u`` is the device id the certificate proves;
- the controller's client certificate (CN ``edgectl`` by default), EKU clientAuth;
- the broker's server certificate, with the host names devices dial as SANs, EKU
  serverAuth, so agents verify the broker against the same CA file.

Layout (inside ``REPO_DIR/ca``, never served over HTTP; see ``controller.serve.http``)::

    ca.key      the CA's private key, 0600 in a 0700 directory
    ca.crt      the CA certificate (what the broker and the agents trust)
    crl.pem     the certificate revocation list, re-signed on every revocation
    .creating/  only while a new CA is made: its files, moved into place one by one

A device's certificate is issued either with a key made here (``issue_client``: the key
travels in the enrollment archive) or for the public key of a certificate signing request
the device made itself (``public_key_from_csr`` then ``issue_client_for``: the key never
leaves the device). Both build the same certificate; only the CSR's public key is used,
never its subject or extensions.

Invariants: serial numbers are random 159-bit integers (RFC 5280 allows 20 octets);
the CRL is always present once the CA exists (mosquitto refuses to start with a
``crlfile`` that does not exist) and carries every revoked serial; its next update is
``CRL_DAYS`` ahead, and re-signing it (``edgectl device revoke`` or ``edgectl broker
config``) must happen before then, or the broker refuses every client.

A new CA is crash-safe: its key, CRL and certificate are written into ``.creating/``
(certificate last), then moved into place in ``CA_FILES`` order (certificate last). A
command interrupted there leaves ``.creating/``; the next ``open_or_create`` finishes the
moves once the staged CA was complete, or else discards it and starts again. Without
``.creating/``, a key without its certificate is damage (never replaced by a new CA).
Callers hold the registry lock (``controller.identity.registry.registry_lock``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.base.fsutil import durable_rename, fsync_dir, remove_tree
from controller.base.errors import RepositoryError, UsageError
from controller.base.fsio import atomic_write, make_dir

T = TypeVar("T")

CA_DIR_NAME: Final = "ca"
# A new CA's folder while it is made, and its files in the order they move into place.
CREATING_DIR: Final = ".creating"
CA_FILES: Final = ("ca.key", "crl.pem", "ca.crt")
CA_DAYS: Final = 3650
CRL_DAYS: Final = 365
ORGANIZATION: Final = "edgefleet"
# What a device's own key (the CSR flow) may be: what mosquitto/OpenSSL and the agent's
# TLS stack take, at a strength no weaker than the CA's own P-256.
ACCEPTED_CURVES: Final = frozenset({"secp256r1", "secp384r1", "secp521r1"})
MIN_RSA_BITS: Final = 2048

ClientPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class Identity:
    """A private key and its certificate, both PEM."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def public_key_from_csr(pem: bytes, common_name: str) -> ClientPublicKey:
    """The public key of a device's PEM certificate signing request, once it checks out.

    The request must be signed by its own key (proof the device holds it), name
    ``common_name`` as its subject CN, and carry an EC key on an accepted curve or an
    RSA key of at least ``MIN_RSA_BITS``. Raises UsageError saying which check failed.
    """
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise UsageError(
            f"not a PEM certificate signing request ({exc}): on the device, "
            f"`edge-agent request {common_name}` writes one"
        ) from None
    if not csr.is_signature_valid:
        raise UsageError(
            "the certificate signing request's signature does not verify: it was altered "
            f"or damaged on the way; make a new one on the device (`edge-agent request "
            f"{common_name} --force`) and copy it again"
        )
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    requested = names[0].value if len(names) == 1 else None
    if requested != common_name:
        raise UsageError(
            f"the certificate signing request is for CN {requested!r}, expected the device "
            f"id {common_name!r}: pass the matching device id, or make the request on the "
            f"device with `edge-agent request {common_name}`"
        )
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ACCEPTED_CURVES:
            raise UsageError(
                f"the request's EC key is on {key.curve.name}, expected one of "
                f"{', '.join(sorted(ACCEPTED_CURVES))}"
            )
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise UsageError(
                f"the request's RSA key has {key.key_size} bits, expected at least {MIN_RSA_BITS}"
            )
        return key
    raise UsageError(
        f"the request's key is {type(key).__name__}, expected an EC (P-256, P-384, P-521) "
        f"or RSA (>= {MIN_RSA_BITS} bits) key"
    )


class DeviceCA:
    """An initialised CA directory. Build with ``DeviceCA.create`` or ``DeviceCA.open``."""

    def __init__(self, path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.path = path
        self._key = key
        self.certificate = cert

    @property
    def cert_path(self) -> Path:
        return self.path / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.path / "crl.pem"

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def open_or_create(cls, path: Path, now: dt.datetime | None = None) -> DeviceCA:
        """The CA at ``path``, created (key, certificate, empty CRL) on first use; a
        creation an interrupted command left unfinished is finished first, or made again."""
        finish_creation(path)
        if (path / "ca.key").exists() or (path / "ca.crt").exists():
            return cls.open(path)
        return cls.create(path, now)

    @classmethod
    def create(cls, path: Path, now: dt.datetime | None = None) -> DeviceCA:
        """A new CA in ``path``; raises UsageError when one is already there."""
        if (path / "ca.key").exists() or (path / "ca.crt").exists():
            raise UsageError(f"a device CA already exists in {path}")
        when = now or _now()
        key = _new_key()
        subject = _name("edgefleet device CA")
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - dt.timedelta(minutes=5))
            .not_valid_after(when + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        make_dir(path, 0o700)
        staging = path / CREATING_DIR
        remove_tree(staging)
        make_dir(staging, 0o700)
        staged = cls(staging, key, cert)
        atomic_write(staging / "ca.key", _key_pem(key), mode=0o600)
        staged.write_crl([], when)
        atomic_write(staged.cert_path, staged.cert_pem, mode=0o644)  # the staged CA is whole
        finish_creation(path)
        return cls(path, key, cert)

    @classmethod
    def open(cls, path: Path) -> DeviceCA:
        """Load the CA in ``path``; raises RepositoryError naming what is missing."""
        try:
            key = serialization.load_pem_private_key((path / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((path / "ca.crt").read_bytes())
        except FileNotFoundError as exc:
            raise RepositoryError(
                f"no device CA in {path} (missing {Path(exc.filename).name}): "
                "`edgectl device add` creates one"
            ) from None
        except ValueError as exc:
            raise RepositoryError(f"the device CA in {path} is unreadable: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise RepositoryError(f"{path / 'ca.key'}: expected an EC key, got {type(key)}")
        return cls(path, key, cert)

    # ------------------------------------------------------------------ issuing

    def issue_client(
        self,
        common_name: str,
        *,
        unit: str | None = None,
        days: int,
        now: dt.datetime | None = None,
    ) -> Identity:
        """A new key and a client certificate (CN = ``common_name``) valid for ``days``."""
        return self._issue(
            _name(common_name, unit),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            sans=[],
            days=days,
            now=now,
        )

    def issue_client_for(
        self,
        public_key: ClientPublicKey,
        common_name: str,
        *,
        unit: str | None = None,
        days: int,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate (CN = ``common_name``) for a key held elsewhere.

        The same certificate ``issue_client`` makes, for ``public_key`` (from
        :func:`public_key_from_csr`). Raises UsageError for ``days`` < 1.
        """
        return self._sign(
            _name(common_name, unit),
            public_key,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            sans=[],
            days=days,
            now=now,
        )

    def issue_server(
        self, hosts: Sequence[str], *, days: int, now: dt.datetime | None = None
    ) -> Identity:
        """A new key and a server certificate for the broker at ``hosts`` (names or IPs)."""
        if not hosts:
            raise UsageError("the broker's certificate needs at least one host name or address")
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue(
            _name(hosts[0], "broker"), ExtendedKeyUsageOID.SERVER_AUTH, sans, days, now
        )

    def _issue(
        self,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
        days: int,
        now: dt.datetime | None,
    ) -> Identity:
        key = _new_key()
        cert = self._sign(subject, key.public_key(), usage, sans, days, now)
        return Identity(_key_pem(key), cert.public_bytes(serialization.Encoding.PEM))

    def _sign(
        self,
        subject: x509.Name,
        public_key: ClientPublicKey,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
        days: int,
        now: dt.datetime | None,
    ) -> x509.Certificate:
        if days < 1:
            raise UsageError(f"certificate lifetime expected >= 1 day, got {days}")
        when = now or _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - dt.timedelta(minutes=5))
            .not_valid_after(when + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    # ECDH is an EC key's business only; an RSA key signs.
                    key_agreement=isinstance(public_key, ec.EllipticCurvePublicKey),
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    # ------------------------------------------------------------------ revocation

    def write_crl(
        self, revoked: Iterable[tuple[int, dt.datetime]], now: dt.datetime | None = None
    ) -> None:
        """Sign a CRL listing ``revoked`` (serial, when) and write it to ``crl.pem``."""
        when = now or _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(when - dt.timedelta(minutes=5))
            .next_update(when + dt.timedelta(days=CRL_DAYS))
        )
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def creation_pending(path: Path) -> bool:
    """True while a new CA in ``path`` is not in place yet (see the module docstring)."""
    return (path / CREATING_DIR).is_dir()


def finish_creation(path: Path) -> None:
    """Finish a CA creation an interrupted command left in ``path/.creating``: move the
    rest of a complete staged CA into place (certificate last), or discard an incomplete
    one (nothing of it was moved or used). Nothing to do without ``.creating``."""
    staging = path / CREATING_DIR
    if not staging.is_dir():
        return
    moving = (path / "ca.key").exists()  # the moves began: the staged CA was complete
    if moving or (staging / "ca.crt").exists():
        for name in CA_FILES:
            if (staging / name).exists():
                durable_rename(staging / name, path / name)
    remove_tree(staging)
    fsync_dir(path)


# ------------------------------------------------------------------ reading without the key


def read_ca_certificate(path: Path) -> x509.Certificate:
    """The CA certificate in ``path`` (``ca.crt``), read without the CA's private key.

    For watchers (``/metrics``) that must not touch the key. Raises FileNotFoundError
    when there is no ``ca.crt``, RepositoryError when it is unreadable.
    """
    return _read_pem(path / "ca.crt", x509.load_pem_x509_certificate, "the CA certificate")


def read_crl(path: Path) -> x509.CertificateRevocationList:
    """The CRL in ``path`` (``crl.pem``) as last written by ``DeviceCA.write_crl``.

    Read-only, no key needed. Raises FileNotFoundError when there is no ``crl.pem``,
    RepositoryError when it is unreadable.
    """
    return _read_pem(path / "crl.pem", x509.load_pem_x509_crl, "the CRL")


def _read_pem(file: Path, load: Callable[[bytes], T], what: str) -> T:
    """``load`` of ``file``'s bytes; FileNotFoundError as it is, RepositoryError naming
    ``what`` for anything else unreadable."""
    try:
        return load(file.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"cannot read {what} {file}: {exc}") from None
