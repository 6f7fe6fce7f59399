"""The CSR flow: `edge-agent request` → `edgectl device add --csr` → `edge-agent enroll`,
with the key made on the device and never in the archive; and what each side refuses.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from agent.cli import main as agent_main
from agent.device.enroll import (
    EnrollmentError,
    enroll_from_file,
    read_enrollment,
    request_enrollment,
)
from controller.base.errors import UsageError
from controller.cli import main as edgectl_main
from controller.identity.devices import add_device, load_registry
from tests.controller.enroll_support import OPTIONS, archive_members, spki


def _csr(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
         cn: str) -> bytes:  # fmt: skip
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_cli_round_trip_keeps_the_key_on_the_device(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc-edge-agent"
    csr = tmp_path / "cam-7.csr"
    assert agent_main(["request", "cam-7", "--config-dir", str(etc), "-o", str(csr)]) == 0
    key_before = (etc / "device.key").read_bytes()
    archive = tmp_path / "enroll.tar"
    code = edgectl_main(
        ["device", "add", "cam-7", "--fleet", "north", "--repo", str(repo), "-o", str(archive),
         "--csr", str(csr), "--repository-url", "https://updates.example.net/",
         "--broker", "mq.example:8883"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "the archive holds no key" in capsys.readouterr().out
    members = archive_members(archive.read_bytes())
    assert sorted(members) == ["agent.toml", "ca.crt", "device.crt", "enroll.json", "root.json"]

    assert agent_main(["enroll", str(archive), "--config-dir", str(etc)]) == 0
    assert (etc / "device.key").read_bytes() == key_before  # untouched
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in etc.iterdir()}
    assert modes == {
        "device.key": 0o600, "device.crt": 0o644, "ca.crt": 0o644, "root.json": 0o644,
        "enroll.json": 0o644, "agent.toml": 0o644,
    }  # fmt: skip
    cert = x509.load_pem_x509_certificate((etc / "device.crt").read_bytes())
    assert spki(cert) == spki(key_before)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
        "north"
    )
    ca = x509.load_pem_x509_certificate((etc / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert load_registry(repo)["cam-7"].serial == cert.serial_number


def test_csr_and_key_certificates_are_the_same_but_for_the_key(repo: Path, tmp_path: Path) -> None:
    csr_pem = request_enrollment("cam-1", tmp_path / "etc")
    _, by_csr = add_device(repo, "cam-1", "north", OPTIONS, csr_pem=csr_pem)
    _, by_key = add_device(repo, "cam-2", "north", OPTIONS)
    csr_cert = x509.load_pem_x509_certificate(archive_members(by_csr)["device.crt"])
    key_cert = x509.load_pem_x509_certificate(archive_members(by_key)["device.crt"])
    assert [e.value for e in csr_cert.extensions] == [e.value for e in key_cert.extensions]
    assert "device.key" in archive_members(by_key)


def test_device_add_refuses_a_csr_that_does_not_check_out(repo: Path, tmp_path: Path) -> None:
    good = request_enrollment("cam-1", tmp_path / "etc")
    # Renamed in transit: same length, so it still parses, but the signature breaks.
    der = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    renamed = x509.load_der_x509_csr(der.replace(b"cam-1", b"cam-2"))
    tampered = renamed.public_bytes(serialization.Encoding.PEM)
    cases = {
        "for CN 'cam-1', expected the device id 'cam-2'": ("cam-2", good),
        "signature does not verify": ("cam-2", tampered),
        "not a PEM certificate signing request": ("cam-1", b"hello"),
        "RSA key has 1024 bits": ("cam-1", _csr(rsa.generate_private_key(65537, 1024), "cam-1")),
        "EC key is on secp192r1": ("cam-1", _csr(ec.generate_private_key(ec.SECP192R1()), "cam-1")),
        "expected an EC": ("cam-1", _csr(ed25519.Ed25519PrivateKey.generate(), "cam-1")),
    }
    for expected, (device, pem) in cases.items():
        with pytest.raises(UsageError, match=expected):
            add_device(repo, device, "north", OPTIONS, csr_pem=pem)
    assert load_registry(repo) == {}  # nothing was enrolled
    assert not (repo / "ca" / "ca.key").exists()  # refused before the CA was made


def test_device_add_accepts_an_rsa_2048_request(repo: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    _, archive = add_device(repo, "cam-1", "north", OPTIONS, csr_pem=_csr(key, "cam-1"))
    cert = x509.load_pem_x509_certificate(archive_members(archive)["device.crt"])
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_agreement  # an RSA key signs


def test_enroll_without_a_key_needs_this_devices_key(repo: Path, tmp_path: Path) -> None:
    device = tmp_path / "device"
    _, archive = add_device(
        repo, "cam-1", "north", OPTIONS, csr_pem=request_enrollment("cam-1", device)
    )
    path = tmp_path / "enroll.tar"
    path.write_bytes(archive)

    empty = tmp_path / "other-device"
    with pytest.raises(EnrollmentError, match="run `edge-agent request cam-1` first"):
        read_enrollment(archive, empty)
    assert not empty.exists()
    assert agent_main(["enroll", str(path), "--config-dir", str(empty)]) == 1

    # A device whose key is not the one the certificate was issued for.
    elsewhere = tmp_path / "elsewhere"
    request_enrollment("cam-1", elsewhere)
    key = (elsewhere / "device.key").read_bytes()
    with pytest.raises(EnrollmentError, match="this certificate was issued for another key"):
        enroll_from_file(path, elsewhere)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["device.key"]  # nothing written
    assert (elsewhere / "device.key").read_bytes() == key

    enroll_from_file(path, device)  # the device that made the request: fine
    assert (device / "device.crt").exists()


def test_an_archive_with_a_key_replaces_a_requested_key(repo: Path, tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    requested = request_enrollment("cam-1", etc)
    assert requested  # a key is there now
    _, archive = add_device(repo, "cam-1", "north", OPTIONS)  # the key-in-archive flow
    path = tmp_path / "enroll.tar"
    path.write_bytes(archive)
    enroll_from_file(path, etc)
    assert (etc / "device.key").read_bytes() == archive_members(archive)["device.key"]
    assert stat.S_IMODE((etc / "device.key").stat().st_mode) == 0o600
