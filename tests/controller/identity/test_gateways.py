"""Site gateway identities: `edgectl gateway enroll/revoke`, the gateway's ACL block (pure),
the CRL, and the options that are refused. The real brokers run in
tests/security/test_site_gateway.py."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from controller.base.errors import UsageError
from controller.cli import main as edgectl_main
from controller.identity.broker import render_acl
from controller.identity.devices import add_device, load_registry, revoke_device
from controller.identity.gateways import (
    GatewayRecord,
    enroll_gateway,
    load_gateways,
    revoke_gateway,
)
from controller.identity.registry import DeviceRecord
from tests.controller.enroll_support import OPTIONS

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def _device(device_id: str, fleet: str, site: str | None, revoked: bool = False) -> DeviceRecord:
    return DeviceRecord(
        device_id, fleet, 1, "2030-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00",
        revoked_at="2026-06-01T00:00:00+00:00" if revoked else None, site=site,
    )  # fmt: skip


def _gateway(site: str, revoked: bool = False) -> GatewayRecord:
    return GatewayRecord(
        site, 7, "2030-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00",
        revoked_at="2026-06-01T00:00:00+00:00" if revoked else None,
    )  # fmt: skip


def _block(acl: str, user: str) -> list[str]:
    """The lines of ``user``'s block: up to the next blank line."""
    lines = acl.split(f"user {user}\n", 1)[1].splitlines()
    return lines[: lines.index("")] if "" in lines else lines


def test_a_gateway_gets_exactly_its_sites_unrevoked_devices() -> None:
    devices = [
        _device("a1", "north", "plant-7"),
        _device("a2", "south", "plant-7"),
        _device("a3", "north", "plant-7", revoked=True),
        _device("b1", "north", "plant-9"),
        _device("c1", "east", None),
    ]
    acl = render_acl(devices, "edgectl", [_gateway("plant-7"), _gateway("plant-9", revoked=True)])
    root = "edgefleet/v1/fleets"
    assert _block(acl, "gateway:plant-7") == [
        f"topic read {root}/north/announce",
        f"topic read {root}/south/announce",
        *(f"topic write {root}/north/devices/a1/{k}" for k in
          ("status", "telemetry", "events", "repo/request")),
        f"topic read {root}/north/devices/a1/repo/response",
        *(f"topic write {root}/south/devices/a2/{k}" for k in
          ("status", "telemetry", "events", "repo/request")),
        f"topic read {root}/south/devices/a2/repo/response",
    ]  # fmt: skip
    assert "user gateway:plant-9" not in acl  # revoked: no line at all
    # The devices' own blocks are unchanged by the gateways.
    assert _block(acl, "c1")[0] == f"topic read {root}/east/announce"


def test_a_gateway_with_no_device_yet_may_do_nothing() -> None:
    acl = render_acl([_device("c1", "east", None)], "edgectl", [_gateway("plant-7")])
    assert _block(acl, "gateway:plant-7") == []


def test_enroll_writes_the_bridge_files_and_again_revokes_the_earlier(
    repo: Path, tmp_path: Path
) -> None:
    first, files = enroll_gateway(repo, "plant-7", tmp_path / "id", now=T0)
    assert [p.name for p in files] == ["gateway.crt", "gateway.key", "ca.crt"]
    assert stat.S_IMODE((tmp_path / "id" / "gateway.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((tmp_path / "id" / "gateway.crt").read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "gateway:plant-7" and cert.serial_number == first.serial
    assert (tmp_path / "id" / "ca.crt").read_bytes() == (repo / "ca" / "ca.crt").read_bytes()

    second, _ = enroll_gateway(repo, "plant-7", tmp_path / "id", now=T0 + dt.timedelta(days=1))
    assert second.serial != first.serial and not second.is_revoked
    assert [c.serial for c in second.previous] == [first.serial]
    crl = x509.load_pem_x509_crl((repo / "ca" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(second.serial) is None
    assert load_gateways(repo) == {"plant-7": second}


def test_revoking_a_gateway_and_a_device_keeps_both_on_the_crl(repo: Path, tmp_path: Path) -> None:
    gateway, _ = enroll_gateway(repo, "plant-7", tmp_path / "id", now=T0)
    device, _ = add_device(repo, "a1", "north", OPTIONS, now=T0, site="plant-7")
    revoke_gateway(repo, "plant-7", now=T0)
    revoke_device(repo, "a1", now=T0)  # re-signs the CRL from both registries
    crl = x509.load_pem_x509_crl((repo / "ca" / "crl.pem").read_bytes())
    for serial in (gateway.serial, device.serial):
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert load_gateways(repo)["plant-7"].is_revoked


def test_the_site_is_recorded_and_old_registries_still_load(repo: Path) -> None:
    add_device(repo, "a1", "north", OPTIONS, now=T0, site="plant-7")
    add_device(repo, "c1", "east", OPTIONS, now=T0)
    doc = json.loads((repo / "ca" / "devices.json").read_text())
    assert doc["devices"]["a1"]["site"] == "plant-7" and "site" not in doc["devices"]["c1"]
    records = load_registry(repo)
    assert records["a1"].site == "plant-7" and records["c1"].site is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r, t: enroll_gateway(r, "bad/site", t), "site: invalid site name 'bad/site'"),
        (lambda r, t: enroll_gateway(r, "plant-7", t, days=0), "--days expected a positive"),
        (lambda r, t: enroll_gateway(t / "nowhere", "plant-7", t), "is not a repository"),
        (lambda r, t: revoke_gateway(r, "plant-7"), "no gateway enrolled for site 'plant-7'"),
        (
            lambda r, t: add_device(r, "a1", "north", OPTIONS, site="no site"),
            "--site: invalid site name 'no site'",
        ),
    ],
)
def test_bad_requests_are_refused_naming_the_problem(
    repo: Path, tmp_path: Path, call: object, message: str
) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        call(repo, tmp_path)  # type: ignore[operator]
    assert load_gateways(repo) == {} and "a1" not in load_registry(repo)


def test_gateway_config_identity_options(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["gateway", "config", "--site", "plant-7", "--upstream", "http://127.0.0.1:1/",
            "--central-broker", "broker.example:8883", "-o", str(tmp_path / "gw")]  # fmt: skip
    assert edgectl_main([*base, "--identity", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "lacks ca.crt, gateway.crt, gateway.key" in err and "gateway enroll" in err

    assert edgectl_main(["gateway", "enroll", "plant-7", "--repo", str(repo),
                         "-o", str(tmp_path / "id")]) == 0  # fmt: skip
    assert "devices it may relay: none yet" in capsys.readouterr().out
    both = [*base, "--identity", str(tmp_path / "id"), "--central-cafile", "/etc/ca.crt"]
    assert edgectl_main(both) == 2
    assert "drop --central-cafile" in capsys.readouterr().err

    assert edgectl_main([*base, "--identity", str(tmp_path / "id")]) == 0
    conf = (tmp_path / "gw" / "mosquitto.conf").read_text()
    for line in (
        f"bridge_cafile {tmp_path / 'id' / 'ca.crt'}",
        f"bridge_certfile {tmp_path / 'id' / 'gateway.crt'}",
        f"bridge_keyfile {tmp_path / 'id' / 'gateway.key'}",
    ):
        assert line in conf
