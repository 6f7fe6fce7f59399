"""Enrollment: `edgectl device add` → `edge-agent enroll`, revocation and the CRL, the ACL."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.cli import main as agent_main
from agent.device.config import load_config
from agent.device.enroll import EnrollmentError, install_enrollment, read_enrollment
from controller.base.errors import UsageError
from controller.cli import main as edgectl_main
from controller.identity.broker import render_acl
from controller.identity.devices import add_device, load_registry, revoke_device
from tests.controller.enroll_support import OPTIONS, archive_members


def _repack(members: dict[str, bytes], extra: tuple[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [*members.items(), *([extra] if extra else [])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_cli_enrolls_a_device_that_edge_agent_installs(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "enroll.tar"
    code = edgectl_main(
        ["device", "add", "cam-7", "--fleet", "north", "--repo", str(repo), "-o", str(archive),
         "--repository-url", "https://updates.example.net/", "--broker", "mq.example:8883"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # it holds a private key
    etc = tmp_path / "etc-edge-agent"
    assert agent_main(["enroll", str(archive), "--config-dir", str(etc)]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in etc.iterdir()}
    assert modes == {
        "device.key": 0o600, "device.crt": 0o644, "ca.crt": 0o644, "root.json": 0o644,
        "enroll.json": 0o644, "agent.toml": 0o644,
    }  # fmt: skip
    assert stat.S_IMODE(etc.stat().st_mode) == 0o755
    assert (etc / "root.json").read_bytes() == (repo / "metadata" / "root.json").read_bytes()
    config = load_config(etc / "agent.toml", environ={})
    assert (config.device_id, config.fleet) == ("cam-7", "north")
    assert config.mqtt.tls and (config.mqtt.host, config.mqtt.port) == ("mq.example", 8883)
    assert config.mqtt.cert_file == etc / "device.crt"
    assert config.trusted_root == etc / "root.json"
    cert = x509.load_pem_x509_certificate((etc / "device.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_device_is_enrolled_once_until_revoked(repo: Path) -> None:
    first, _ = add_device(repo, "cam-1", "north", OPTIONS)
    with pytest.raises(UsageError, match="edgectl device revoke cam-1"):
        add_device(repo, "cam-1", "north", OPTIONS)
    revoked = revoke_device(repo, "cam-1")
    assert revoked.is_revoked
    second, _ = add_device(repo, "cam-1", "south", OPTIONS)
    assert second.serial != first.serial and not second.is_revoked
    with pytest.raises(UsageError, match="reserved"):
        add_device(repo, "edgectl", "north", OPTIONS)
    with pytest.raises(UsageError, match="no enrolled device"):
        revoke_device(repo, "cam-404")


def test_revocation_publishes_a_crl_with_the_serial(repo: Path) -> None:
    record, _ = add_device(repo, "cam-1", "north", OPTIONS)
    other, _ = add_device(repo, "cam-2", "north", OPTIONS)
    crl_path = repo / "ca" / "crl.pem"
    assert list(x509.load_pem_x509_crl(crl_path.read_bytes())) == []
    revoke_device(repo, "cam-1")
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    ca = x509.load_pem_x509_certificate((repo / "ca" / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(record.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(other.serial) is None
    assert stat.S_IMODE((repo / "ca" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((repo / "ca").stat().st_mode) == 0o700


def test_the_acl_confines_each_device_to_its_own_topics_in_its_own_fleet(repo: Path) -> None:
    add_device(repo, "cam-1", "north", OPTIONS)
    add_device(repo, "cam-2", "south", OPTIONS)
    revoke_device(repo, "cam-2")
    acl = render_acl(load_registry(repo).values(), "edgectl")
    lines = acl.splitlines()
    own = "edgefleet/v1/fleets/north/devices/cam-1"
    block = lines[lines.index("user cam-1") + 1 : lines.index("user cam-1") + 7]
    assert block == [
        "topic read edgefleet/v1/fleets/north/announce",
        f"topic write {own}/status",
        f"topic write {own}/telemetry",
        f"topic write {own}/events",
        f"topic write {own}/repo/request",
        f"topic read {own}/repo/response",
    ]
    # No rule names a fleet by wildcard for a device (a pattern cannot bind the fleet).
    assert not any(line.startswith("pattern") for line in lines)
    assert "user cam-2" not in lines and "cam-2" not in acl  # revoked: nothing left
    assert "topic readwrite edgefleet/v1/fleets/+/announce" in lines


def test_enroll_rejects_archives_that_do_not_add_up(repo: Path, tmp_path: Path) -> None:
    _, archive = add_device(repo, "cam-1", "north", OPTIONS)
    _, other = add_device(repo, "cam-2", "north", OPTIONS)
    members = archive_members(archive)
    etc = tmp_path / "etc"
    cases = {
        "unexpected member": _repack(members, ("../evil", b"x")),
        "lacks device.crt": _repack({k: v for k, v in members.items() if k != "device.crt"}),
        # Without the key it must be this device's own (CSR flow), and there is none here.
        "holds no device.key": _repack({k: v for k, v in members.items() if k != "device.key"}),
        "is for 'cam-2'": _repack({**members, "device.crt": archive_members(other)["device.crt"]}),
        "does not belong": _repack({**members, "device.key": archive_members(other)["device.key"]}),
        "not TUF root": _repack({**members, "root.json": b'{"signed": {"_type": "targets"}}'}),
        "not an enrollment archive": b"not a tar at all" * 100,
    }
    for expected, data in cases.items():
        with pytest.raises(EnrollmentError, match=expected):
            read_enrollment(data, etc)
    assert not etc.exists()  # nothing was written


def test_enroll_does_not_replace_another_device_without_force(repo: Path, tmp_path: Path) -> None:
    _, first = add_device(repo, "cam-1", "north", OPTIONS)
    _, second = add_device(repo, "cam-2", "north", OPTIONS)
    etc = tmp_path / "etc"
    install_enrollment(read_enrollment(first, etc), etc)
    install_enrollment(read_enrollment(first, etc), etc)  # the same device again: fine
    with pytest.raises(EnrollmentError, match="--force"):
        install_enrollment(read_enrollment(second, etc), etc)
    install_enrollment(read_enrollment(second, etc), etc, force=True)
    assert load_config(etc / "agent.toml", environ={}).device_id == "cam-2"
