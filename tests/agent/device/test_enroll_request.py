"""`edge-agent request`: the device's own key (0600, never replaced without --force) and
a CSR for it. The controller's side of the CSR flow is
tests/controller/identity/test_devices_csr.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.base.errors import AgentError
from agent.cli import main as agent_main
from agent.device.enroll import make_request, request_enrollment, request_renewal
from tests.secret_writes import shared_dir, watching_fsyncs


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey)
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_request_writes_a_p256_key_0600_and_a_csr_signed_by_it(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    csr_pem = request_enrollment("cam-7", etc)
    key_path = etc / "device.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert [p.name for p in etc.iterdir()] == ["device.key"]  # no temporary file left
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    assert _spki(csr.public_key()) == _spki(key)


def test_request_does_not_replace_a_key_without_force(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    request_enrollment("cam-7", etc)
    before = (etc / "device.key").read_bytes()
    with pytest.raises(AgentError, match=r"already exists.*--force"):
        request_enrollment("cam-7", etc)
    assert (etc / "device.key").read_bytes() == before
    csr = x509.load_pem_x509_csr(request_enrollment("cam-7", etc, force=True))
    after = serialization.load_pem_private_key((etc / "device.key").read_bytes(), None)
    assert (etc / "device.key").read_bytes() != before
    assert _spki(csr.public_key()) == _spki(after)
    assert stat.S_IMODE((etc / "device.key").stat().st_mode) == 0o600


def test_request_checks_the_device_id_before_writing(tmp_path: Path) -> None:
    for bad in ("../cam", "", "cam/7", ".hidden"):
        with pytest.raises(AgentError, match="invalid device name"):
            request_enrollment(bad, tmp_path / "etc")
        with pytest.raises(AgentError, match="invalid device name"):
            make_request(bad)
    assert not (tmp_path / "etc").exists()


def test_cli_request_writes_id_csr_in_the_current_folder_or_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert agent_main(["request", "cam-7", "--config-dir", "etc"]) == 0
    out = capsys.readouterr().out
    assert "edgectl device add cam-7 --csr cam-7.csr" in out
    csr = x509.load_pem_x509_csr((tmp_path / "cam-7.csr").read_bytes())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"

    # A key is there: refused (exit 1), nothing replaced, the message names --force.
    key_before = (tmp_path / "etc" / "device.key").read_bytes()
    assert agent_main(["request", "cam-7", "--config-dir", "etc", "-o", "-"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "etc" / "device.key").read_bytes() == key_before

    assert agent_main(["request", "cam-8", "--config-dir", "etc8", "-o", "-"]) == 0
    captured = capsys.readouterr()
    csr = x509.load_pem_x509_csr(captured.out.encode())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-8"
    assert "etc8/device.key" in captured.err

    # An output folder that does not exist: refused before a key is made.
    assert agent_main(["request", "cam-9", "--config-dir", "etc9", "-o", "no/such.csr"]) == 1
    assert "folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "etc9").exists()


def test_a_request_for_the_key_already_there_leaves_it_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc"
    request_enrollment("cam-7", etc)
    key_before = (etc / "device.key").read_bytes()
    csr = x509.load_pem_x509_csr(request_renewal("cam-7", etc))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-7"
    assert _spki(csr.public_key()) == _spki(serialization.load_pem_private_key(key_before, None))
    assert (etc / "device.key").read_bytes() == key_before

    monkeypatch.chdir(tmp_path)
    assert agent_main(["request", "cam-7", "--reuse-key", "--config-dir", "etc"]) == 0
    assert "edgectl device renew cam-7 --csr cam-7.csr" in capsys.readouterr().out
    renewal = x509.load_pem_x509_csr((tmp_path / "cam-7.csr").read_bytes())
    assert _spki(renewal.public_key()) == _spki(csr.public_key())
    assert (etc / "device.key").read_bytes() == key_before

    # Contradictory flags, no key, a key that is not one: refused, nothing written.
    assert agent_main(["request", "cam-7", "--reuse-key", "--force", "--config-dir", "etc"]) == 1
    assert "pass one" in capsys.readouterr().err
    assert (etc / "device.key").read_bytes() == key_before
    with pytest.raises(AgentError, match="does not exist: without --reuse-key"):
        request_renewal("cam-7", tmp_path / "empty")
    assert not (tmp_path / "empty").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "device.key").write_bytes(b"not a key")
    with pytest.raises(AgentError, match="not an unencrypted PEM private key"):
        request_renewal("cam-7", tmp_path / "bad")
    with pytest.raises(AgentError, match="device"):
        request_renewal("../cam", etc)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership is set only when run as root")
def test_request_as_root_leaves_the_key_root_owned(tmp_path: Path) -> None:
    request_enrollment("cam-7", tmp_path / "etc")
    st = (tmp_path / "etc" / "device.key").stat()
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_no_other_local_user_can_open_the_key_while_request_writes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue #18, defect 4: the key's temporary file was 0644 (the umask's) until after
    its data was fsynced, in a 0755 folder; a local user could open it and keep it."""
    with shared_dir() as root, watching_fsyncs(monkeypatch, probe_under=root) as watch:
        etc, csr = root / "etc", root / "cam-7.csr"
        assert agent_main(["request", "cam-7", "--config-dir", str(etc), "-o", str(csr)]) == 0
        assert stat.S_IMODE(etc.stat().st_mode) & 0o005 == 0o005  # others may enter it
        key_writes = watch.temporaries_of(etc / "device.key")
        assert [(oct(s.mode), s.readable_by_nobody) for s in key_writes] == [(oct(0o600), False)]
        # The probe does see what others may read: the request itself, at the same instant.
        assert [s.readable_by_nobody for s in watch.temporaries_of(csr)] == [True]
        assert stat.S_IMODE((etc / "device.key").stat().st_mode) == 0o600
