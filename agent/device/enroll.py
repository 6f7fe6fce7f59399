"""Enrollment, the device's side: checking an ``enroll.tar`` and installing it under
``/etc/edge-agent``, and the device's own key and certificate signing request (CSR) for
the flow without a key.

``edgectl device add`` (controller) writes the archive; ``edge-agent enroll`` (here)
installs it. The archive's format is a contract the agent owns:
``agent.contracts.enrollment`` (its members, their modes, how it is packed).

Two flows. Key made by the controller: the archive carries ``device.key``, which is
installed. Key made on the device: ``edge-agent request ID`` (:func:`request_enrollment`)
writes an EC P-256 ``device.key`` into the config folder and returns a PEM CSR (subject
CN = the device id, signed by that key); ``edgectl device add --csr`` issues the
certificate for the request's key and leaves ``device.key`` out of the archive, and
``enroll`` then requires the ``device.key`` already in the folder to be the key of
``device.crt``, and leaves it as it is.

Installed modes: the folder 0755, ``device.key`` 0600, everything else 0644, all owned
by root when enroll runs as root. The key stays root-only on disk; the systemd unit hands
it to the sandboxed agent with ``LoadCredential=device.key:...`` (see
``[mqtt] key_credential``).

Invariants: nothing of an archive is written unless it checks out (members, sizes,
the config parses, the certificate names this device and matches the key, from the
archive or already installed, the root is TUF root metadata). The files are replaced
as one set (``agent.device.enroll_install``): after an interruption the folder holds the old
set or the new one, or the next enroll completes the new one (the agent meanwhile uses
the certificate that matches its key). A config already there for another device is not
replaced without ``force``. ``request_enrollment`` never replaces a key without ``force``.

Enroll (its recovery, checks and install) and both requests hold the config folder's
install lock (``agent.device.enroll_install.install_lock``) for their whole run, waiting up to
``lock_wait_s`` (ENROLL_LOCK_WAIT_S) for another one to finish. A request refuses while
an interrupted install is pending: the key in place may be about to be replaced.
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.base.errors import AgentError, ConfigError, UntrustedInputError
from agent.base.fsutil import atomic_write
from agent.contracts import InvalidNameError, check_name
from agent.contracts.enrollment import (
    CA_CERT,
    CONFIG,
    DEVICE_CERT,
    DEVICE_KEY,
    ENROLL_SCHEMA,
    INFO,
    MAX_MEMBER_BYTES,
    MEMBERS,
    REQUIRED_MEMBERS,
    ROOT,
    member_mode,
)
from agent.device.config import AgentConfig, parse_config
from agent.device.enroll_install import (
    StepHook,
    install_files,
    install_lock,
    recover,
    refuse_pending,
)
from agent.device.tls_identity import is_key_of

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR: Final = Path("/etc/edge-agent")
INSTALL_ORDER: Final = (DEVICE_KEY, DEVICE_CERT, CA_CERT, ROOT, INFO, CONFIG)
# An enroll or request holds the lock well under a second (a few fsyncs): 30 s covers a
# slow card, and a script that runs two at once has them take turns instead of failing.
ENROLL_LOCK_WAIT_S: Final = 30.0


class EnrollmentError(UntrustedInputError):
    """An enrollment archive is malformed, inconsistent, or would overwrite another device."""


@dataclass(frozen=True)
class Enrollment:
    """A checked enrollment archive, ready to install.

    ``files`` lacks ``device.key`` when the archive had none: the key already in the
    config folder is the certificate's (checked) and stays.
    """

    device_id: str
    fleet: str
    files: dict[str, bytes]


def read_enrollment(data: bytes, config_dir: Path = DEFAULT_CONFIG_DIR) -> Enrollment:
    """Check an archive; raises EnrollmentError saying what is wrong.

    An archive without ``device.key`` is checked against ``config_dir/device.key`` (from
    ``edge-agent request``): EnrollmentError when it is missing or not the certificate's
    key, AgentError when it cannot be read.
    """
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
    key_pem = files[DEVICE_KEY] if DEVICE_KEY in files else _own_key(config_dir, config.device_id)
    _check_identity(files, key_pem, config.device_id)
    _check_root(files[ROOT])
    return Enrollment(config.device_id, config.fleet, files)


def install_enrollment(
    enrollment: Enrollment,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    *,
    force: bool = False,
    after_step: StepHook | None = None,
) -> list[Path]:
    """Write the archive's files into ``config_dir`` as one set (``agent.device.enroll_install``);
    return the paths written. ``after_step`` is for tests that interrupt the install.

    Raises EnrollmentError when ``config_dir`` already holds another device's config and
    ``force`` is not set; AgentError when an interrupted install is pending (call
    ``agent.device.enroll_install.recover`` before :func:`read_enrollment`, as
    :func:`enroll_from_file` does); OSError when the folder cannot be written.
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
    # The key first (after it every file still staged is one the agent may read) and the
    # config last. Without a key in the archive the one here (checked to match) stays.
    return install_files(
        config_dir, enrollment.files, INSTALL_ORDER, member_mode, after_step=after_step
    )


# ------------------------------------------------------------------ checks


def _read_members(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            _read_tar(tar, files)
    except tarfile.TarError as exc:
        raise EnrollmentError(f"not an enrollment archive (tar): {exc}") from None
    missing = [m for m in REQUIRED_MEMBERS if m not in files]
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


def _own_key(config_dir: Path, device_id: str) -> bytes:
    """The key ``edge-agent request`` left in ``config_dir``, for an archive without one."""
    path = config_dir / DEVICE_KEY
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise EnrollmentError(
            f"the archive holds no {DEVICE_KEY} (it was issued for a certificate signing "
            f"request) and {path} does not exist: run `edge-agent request {device_id}` "
            "first on this device, then `edgectl device add --csr` with its request"
        ) from None
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror or exc}") from None


def _check_identity(files: dict[str, bytes], key_pem: bytes, device_id: str) -> None:
    try:
        ca = x509.load_pem_x509_certificate(files[CA_CERT])
        cert = x509.load_pem_x509_certificate(files[DEVICE_CERT])
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise EnrollmentError(f"unreadable certificate or key: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = names[0].value if names else None
    if common_name != device_id:
        raise EnrollmentError(
            f"{DEVICE_CERT} is for {common_name!r}, expected the device id {device_id!r}"
        )
    if not is_key_of(key, cert):
        if DEVICE_KEY in files:
            raise EnrollmentError(f"{DEVICE_KEY} does not belong to {DEVICE_CERT}")
        raise EnrollmentError(
            f"this certificate was issued for another key: {DEVICE_CERT} does not match "
            f"the {DEVICE_KEY} already on this device (a request made elsewhere, or the "
            f"key replaced since): run `edge-agent request {device_id} --force` here, then "
            f"on the controller `edgectl device revoke {device_id}` and `edgectl device add "
            f"{device_id} --csr FILE` with the new request"
        )
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
    archive: Path,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    *,
    force: bool = False,
    lock_wait_s: float = ENROLL_LOCK_WAIT_S,
) -> Enrollment:
    """Under the install lock, complete or discard an interrupted install, then read,
    check and install ``archive``; raises EnrollmentError, InstallLockedError when
    another enroll or request holds the lock for longer than ``lock_wait_s``, or
    AgentError."""
    try:
        data = archive.read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read {archive}: {exc.strerror}") from None
    try:
        if not config_dir.is_dir():
            # The lock needs the folder: make it only for an archive that checks out.
            read_enrollment(data, config_dir)
            config_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        with install_lock(config_dir, lock_wait_s):
            # First: the archive is checked against the folder, which an interrupted
            # install may be about to change (the key, the config).
            recover(config_dir)
            enrollment = read_enrollment(data, config_dir)
            install_enrollment(enrollment, config_dir, force=force)
    except OSError as exc:
        raise AgentError(
            f"cannot write {config_dir}: {exc.strerror or exc} (an install stopped after "
            "it replaced a file is completed by the next `edge-agent enroll`)"
        ) from None
    logger.info(
        "enrolled %s in fleet %s under %s", enrollment.device_id, enrollment.fleet, config_dir
    )
    return enrollment


# ------------------------------------------------------------------ the device's own key


def make_request(device_id: str) -> tuple[bytes, bytes]:
    """A new EC P-256 key (PEM, PKCS#8) and a PEM CSR for it, subject CN = ``device_id``.

    The same kind of key ``edgectl device add`` makes without a request. Raises AgentError
    for an invalid device id.
    """
    try:
        check_name("device", device_id)
    except InvalidNameError as exc:
        raise AgentError(str(exc)) from None
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, _csr(key, device_id)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, device_id: str) -> bytes:
    """A PEM CSR for ``key``, subject CN = ``device_id``, signed with SHA-256."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def request_renewal(
    device_id: str,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    *,
    lock_wait_s: float = ENROLL_LOCK_WAIT_S,
) -> bytes:
    """A PEM CSR (CN = ``device_id``) for the ``device.key`` already in ``config_dir``,
    which is left as it is: what ``edgectl device renew ID --csr FILE`` takes to renew
    the certificate of a key that never leaves the device.

    Raises AgentError for an invalid id, a missing or unreadable key, or one that is not
    an unencrypted EC or RSA private key in PEM; InstallPendingError while an interrupted
    install is pending (the key in place may be about to be replaced); InstallLockedError
    when an enroll holds the install lock for longer than ``lock_wait_s``.
    """
    try:
        check_name("device", device_id)
    except InvalidNameError as exc:
        raise AgentError(str(exc)) from None
    path = config_dir / DEVICE_KEY
    try:
        with install_lock(config_dir, lock_wait_s):
            refuse_pending(config_dir, f"`edge-agent request {device_id} --reuse-key`")
            pem = path.read_bytes()
    except FileNotFoundError:
        raise AgentError(
            f"{path} does not exist: without --reuse-key, `edge-agent request` makes a key"
        ) from None
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise AgentError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise AgentError(f"{path} holds a {type(key).__name__}; expected an EC or RSA key")
    return _csr(key, device_id)


def request_enrollment(
    device_id: str,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    *,
    force: bool = False,
    lock_wait_s: float = ENROLL_LOCK_WAIT_S,
) -> bytes:
    """Write a new ``device.key`` (0600) into ``config_dir``; return the PEM CSR for it.

    Raises AgentError for an invalid id, when ``config_dir`` already holds a key and
    ``force`` is not set (replacing it orphans the certificate issued for it), or when
    the folder cannot be written; InstallPendingError while an interrupted install is
    pending (it would replace or orphan the new key); InstallLockedError when an enroll
    holds the install lock for longer than ``lock_wait_s``.
    """
    key_pem, csr_pem = make_request(device_id)
    path = config_dir / DEVICE_KEY
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        with install_lock(config_dir, lock_wait_s):
            refuse_pending(config_dir, f"`edge-agent request {device_id}`")
            if path.exists() and not force:
                raise AgentError(
                    f"{path} already exists; its certificate would stop matching if it were "
                    "replaced: pass --force to make a new key (then enroll again with a new "
                    "request)"
                )
            atomic_write(path, key_pem, mode=member_mode(DEVICE_KEY))
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
    except OSError as exc:
        raise AgentError(f"cannot write {path}: {exc.strerror or exc}") from None
    logger.info("made a key for %s in %s", device_id, path)
    return csr_pem
