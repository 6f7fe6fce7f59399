"""Certificate renewal: `edgectl device renew` → `edge-agent enroll` on an enrolled device,
the registry's previous certificates, and revocation covering all of them (real CLIs,
files and cryptography; the CRL is parsed and its signature checked).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from cryptography import x509

from agent.cli import main as agent_main
from agent.device.enroll import request_enrollment
from controller.base.errors import UsageError
from controller.cli import main as edgectl_main
from controller.fleet.stores import open_store
from controller.identity.devices import (
    EnrollOptions,
    add_device,
    load_registry,
    renew_device,
    revoke_device,
)
from controller.repository.expiry import ExpiryReader
from tests.controller.enroll_support import OPTIONS, archive_members, spki


def _edgectl(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()  # only this command's output
    code = edgectl_main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _crl_serials(repo: Path) -> set[int]:
    crl = x509.load_pem_x509_crl((repo / "ca" / "crl.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((repo / "ca" / "ca.crt").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    return {entry.serial_number for entry in crl}


def test_renewal_archive_installs_over_the_enrollment_with_a_new_key(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / "enroll.tar"
    _edgectl(
        capsys, "device", "add", "cam-7", "--fleet", "north", "--repo", str(repo), "-o",
        str(first), "--repository-url", "https://updates.example.net/",
        "--broker", "mq.example:8883",
    )  # fmt: skip
    etc = tmp_path / "etc-edge-agent"
    assert agent_main(["enroll", str(first), "--config-dir", str(etc)]) == 0
    old_cert = x509.load_pem_x509_certificate((etc / "device.crt").read_bytes())
    old_key = (etc / "device.key").read_bytes()
    config_before = (etc / "agent.toml").read_bytes()

    renewed = tmp_path / "renewed.tar"
    out = _edgectl(
        capsys, "device", "renew", "cam-7", "--repo", str(repo), "-o", str(renewed), "--json"
    )
    doc = json.loads(out)
    assert (doc["device_id"], doc["fleet"], doc["archive"]) == ("cam-7", "north", str(renewed))
    assert doc["key_in_archive"] is True and doc["previous_revoked"] is False
    assert doc["previous"] == [
        {"serial": str(old_cert.serial_number), "not_after": doc["previous"][0]["not_after"],
         "revoked_at": None}
    ]  # fmt: skip
    members = archive_members(renewed.read_bytes())
    assert "device.key" in members and members["device.key"] != old_key

    assert agent_main(["enroll", str(renewed), "--config-dir", str(etc)]) == 0
    new_cert = x509.load_pem_x509_certificate((etc / "device.crt").read_bytes())
    assert new_cert.serial_number == int(doc["serial"]) != old_cert.serial_number
    assert (etc / "device.key").read_bytes() == members["device.key"]
    assert spki(new_cert) == spki((etc / "device.key").read_bytes())
    new_cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate((repo / "ca" / "ca.crt").read_bytes())
    )
    assert new_cert.subject == old_cert.subject  # CN = the id, OU = the fleet
    assert (etc / "agent.toml").read_bytes() == config_before  # the endpoints it enrolled with
    record = load_registry(repo)["cam-7"]
    assert record.serial == new_cert.serial_number and record.renewed_at is not None
    assert [c.serial for c in record.previous] == [old_cert.serial_number]
    assert _crl_serials(repo) == set()  # the previous certificate still connects


def test_renewal_by_request_keeps_the_device_key(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = tmp_path / "etc"
    first = tmp_path / "enroll.tar"
    _, archive = add_device(
        repo, "cam-1", "north", OPTIONS, csr_pem=request_enrollment("cam-1", etc)
    )
    first.write_bytes(archive)
    assert agent_main(["enroll", str(first), "--config-dir", str(etc)]) == 0
    key = (etc / "device.key").read_bytes()
    old_cert = x509.load_pem_x509_certificate((etc / "device.crt").read_bytes())

    csr = tmp_path / "cam-1.csr"  # the device's request for the key it has
    assert agent_main(["request", "cam-1", "--reuse-key", "--config-dir", str(etc),
                       "-o", str(csr)]) == 0  # fmt: skip
    renewed = tmp_path / "renewed.tar"
    out = _edgectl(
        capsys, "device", "renew", "cam-1", "--csr", str(csr), "--repo", str(repo),
        "-o", str(renewed), "--days", "400",
    )  # fmt: skip
    assert "the archive holds no key" in out
    assert "device.key" not in archive_members(renewed.read_bytes())
    assert agent_main(["enroll", str(renewed), "--config-dir", str(etc)]) == 0
    assert (etc / "device.key").read_bytes() == key  # untouched
    new_cert = x509.load_pem_x509_certificate((etc / "device.crt").read_bytes())
    assert new_cert.serial_number != old_cert.serial_number
    assert spki(new_cert) == spki(old_cert)
    lifetime = new_cert.not_valid_after_utc - new_cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=400, minutes=5)


def test_revoke_after_renewals_puts_every_serial_on_the_crl(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = add_device(repo, "cam-1", "north", OPTIONS)
    other, _ = add_device(repo, "cam-2", "north", OPTIONS)
    second, _ = renew_device(repo, "cam-1")
    third, _ = renew_device(repo, "cam-1")
    serials = {first.serial, second.serial, third.serial}
    assert len(serials) == 3
    assert {c.serial for c in third.previous} == {first.serial, second.serial}

    out = _edgectl(capsys, "device", "revoke", "cam-1", "--repo", str(repo))
    assert out.count("previous certificate") == 2
    assert _crl_serials(repo) == serials  # not only the current one
    record = load_registry(repo)["cam-1"]
    assert record.is_revoked and all(c.revoked_at for c in record.previous)
    assert other.serial not in _crl_serials(repo)
    with pytest.raises(UsageError, match="was revoked"):
        renew_device(repo, "cam-1")


def test_revoke_previous_puts_only_the_earlier_certificate_on_the_crl(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = add_device(repo, "cam-1", "north", OPTIONS)
    out = _edgectl(
        capsys, "device", "renew", "cam-1", "--repo", str(repo), "--revoke-previous",
        "-o", str(tmp_path / "renewed.tar"),
    )  # fmt: skip
    assert "revoked at" in out
    record = load_registry(repo)["cam-1"]
    assert _crl_serials(repo) == {first.serial}
    assert not record.is_revoked and record.previous[0].revoked_at is not None
    # Renewing again keeps the revoked one listed until it expires.
    again, _ = renew_device(repo, "cam-1")
    assert _crl_serials(repo) == {first.serial}
    assert {c.serial for c in again.previous} == {first.serial, record.serial}


def test_renew_refuses_unknown_revoked_and_mismatched_requests(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_device(repo, "cam-1", "north", OPTIONS)
    add_device(repo, "cam-2", "north", OPTIONS)
    revoke_device(repo, "cam-2")
    registry = (repo / "ca" / "devices.json").read_bytes()
    wrong_cn = tmp_path / "wrong.csr"
    wrong_cn.write_bytes(request_enrollment("cam-9", tmp_path / "other"))
    cases = {
        "no enrolled device 'cam-404' to renew.*edgectl device add cam-404": ["cam-404"],
        "'cam-2' was revoked.*edgectl device add cam-2 --fleet north": ["cam-2"],
        "for CN 'cam-9', expected the device id 'cam-1'": ["cam-1", "--csr", str(wrong_cn)],
        "--json needs -o FILE": ["cam-1", "-o", "-", "--json"],
    }
    for expected, args in cases.items():
        argv = ["device", "renew", *args, "--repo", str(repo)]
        if "-o" not in args:
            argv += ["-o", str(tmp_path / "out.tar")]
        assert edgectl_main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(expected, err), (expected, err)
    assert (repo / "ca" / "devices.json").read_bytes() == registry  # nothing changed
    assert not (tmp_path / "out.tar").exists()
    with pytest.raises(UsageError, match=r"already enrolled.*edgectl device renew cam-1"):
        add_device(repo, "cam-1", "north", OPTIONS)


def test_a_registry_from_before_renewal_loads_and_renews(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, _ = add_device(repo, "cam-1", "north", OPTIONS)
    path = repo / "ca" / "devices.json"
    old_entry = {
        "fleet": "north", "serial": str(record.serial), "not_after": record.not_after,
        "enrolled_at": record.enrolled_at, "revoked_at": None,
    }  # fmt: skip
    path.write_text(json.dumps({"schema": "edgefleet.devices/1", "devices": {"cam-1": old_entry}}))
    loaded = load_registry(repo)["cam-1"]
    assert (loaded.serial, loaded.previous, loaded.endpoints) == (record.serial, (), None)

    out = tmp_path / "renewed.tar"
    argv = ["device", "renew", "cam-1", "--repo", str(repo), "-o", str(out)]
    assert edgectl_main(argv) == 2  # it cannot know the endpoints the device was given
    assert "--repository-url URL and --broker HOST:PORT" in capsys.readouterr().err
    _edgectl(capsys, *argv, "--repository-url", "https://u.example/", "--broker", "mq2:8884")
    config = archive_members(out.read_bytes())["agent.toml"].decode()
    assert 'url = "https://u.example/"' in config and "port = 8884" in config
    renewed = load_registry(repo)["cam-1"]
    assert [c.serial for c in renewed.previous] == [record.serial]
    assert renewed.endpoints == EnrollOptions("https://u.example/", "mq2", 8884)


def test_expiry_gauges_count_only_the_current_certificate(repo: Path, tmp_path: Path) -> None:
    short = EnrollOptions(repository_url="https://u.example/", mqtt_host="mq", cert_days=10)
    add_device(repo, "cam-1", "north", short)
    now = dt.datetime.now(dt.UTC).timestamp()
    before = ExpiryReader(repo).read(now).device_certs
    assert before is not None and before.expiring == 1
    record, _ = renew_device(repo, "cam-1", cert_days=825)
    after = ExpiryReader(repo).read(now).device_certs
    assert after is not None and after.expiring == 0  # the 10-day one is only "previous"
    assert after.earliest_not_after_s == int(
        dt.datetime.fromisoformat(record.not_after).timestamp()
    )


def test_expired_certificates_leave_the_registry_and_revoked_ids_keep_theirs(repo: Path) -> None:
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    short = EnrollOptions(repository_url="https://u.example/", mqtt_host="mq", cert_days=1)
    add_device(repo, "cam-1", "north", short, start)
    renewed, _ = renew_device(repo, "cam-1", start + dt.timedelta(days=2))
    assert renewed.previous == ()  # the first had expired: nothing to keep or revoke

    # Added again after a revocation: the revoked serial stays on the CRL until it expires.
    revoke_device(repo, "cam-1")
    again, _ = add_device(repo, "cam-1", "south", OPTIONS)
    assert [c.serial for c in again.previous] == [renewed.serial]
    add_device(repo, "cam-2", "north", OPTIONS)
    revoke_device(repo, "cam-2")  # re-signs the CRL from the whole registry
    assert renewed.serial in _crl_serials(repo)
    assert again.serial not in _crl_serials(repo)


def test_device_show_lists_current_and_previous_certificates(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = add_device(repo, "cam-1", "north", OPTIONS)
    renewed, _ = renew_device(repo, "cam-1", revoke_previous=True)
    open_store(str(repo / "telemetry.sqlite")).close()  # no telemetry from it yet
    text = _edgectl(capsys, "device", "show", "cam-1", "--repo", str(repo))
    assert f"current  serial {renewed.serial:x}" in text
    assert f"previous serial {first.serial:x}" in text and "revoked at" in text
    doc = json.loads(_edgectl(capsys, "device", "show", "cam-1", "--repo", str(repo), "--json"))
    certs = doc["certificates"]
    assert certs["current"]["serial"] == str(renewed.serial)
    assert [c["serial"] for c in certs["previous"]] == [str(first.serial)]
