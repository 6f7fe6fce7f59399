"""``/metrics`` expiry gauges against a real repository, CA and device registry.

The expected values are read independently of ``controller.repository.expiry``: role expiries from
``key_status`` (what ``edgectl keys list`` prints), the CA certificate and CRL with
``cryptography`` directly, device not-afters from the records ``add_device`` returns.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from controller.fleet.status import StalePolicy
from controller.identity.devices import EnrollOptions, add_device, ca_dir, revoke_device
from controller.repository.ceremony import key_status
from controller.repository.expiry import DeviceCertSummary, ExpiryReader, summarize_device_certs
from controller.repository.repo import ALL_ROLES, Repository
from controller.serve.metrics import render_metrics
from tests.controller.conftest import Served

SAMPLE = re.compile(r"^([a-z_][a-z0-9_]*)(\{[^}]*\})? (\S+)$")
TUF = "edgefleet_tuf_metadata_expires_timestamp_seconds"
CA_CERT = "edgefleet_device_ca_cert_expires_timestamp_seconds"
CRL = "edgefleet_device_crl_next_update_timestamp_seconds"
EARLIEST = "edgefleet_device_certs_earliest_expires_timestamp_seconds"
EXPIRING = "edgefleet_device_certs_expiring_within_30d"
CA_SERIES = (CA_CERT, CRL, EARLIEST, EXPIRING)


def options(days: int = 825) -> EnrollOptions:
    return EnrollOptions(
        repository_url="https://updates.example.net/", mqtt_host="mq.example", cert_days=days
    )


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` → value, for every sample line of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def render(repo_dir: Path, reader: ExpiryReader | None = None) -> dict[str, float]:
    reader = reader or ExpiryReader(repo_dir)
    now = dt.datetime.now(dt.UTC).timestamp()
    return samples(render_metrics([], [], {}, now, StalePolicy(), reader.read(now)))


def epoch(when: dt.datetime | str) -> int:
    moment = dt.datetime.fromisoformat(when) if isinstance(when, str) else when
    return int(moment.timestamp())


def test_serve_metrics_give_the_expiries_the_repository_ca_and_registry_report(
    repo: Repository, start_serve: Callable[..., Served]
) -> None:
    long_lived, _ = add_device(repo.path, "cam-long", "north", options())
    short_lived, _ = add_device(repo.path, "cam-short", "north", options(days=10))
    add_device(repo.path, "cam-gone", "north", options(days=5))
    revoke_device(repo.path, "cam-gone")
    served = start_serve(repo.path, "127.0.0.1:1")

    response = httpx.get(f"{served.url}/metrics")
    assert response.status_code == 200
    got = samples(response.text)

    for row in key_status(repo):
        assert got[f'{TUF}{{role="{row.role}"}}'] == epoch(row.expires), row.role
    assert {k for k in got if k.startswith(TUF)} == {f'{TUF}{{role="{r}"}}' for r in ALL_ROLES}
    folder = ca_dir(repo.path)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    assert got[CA_CERT] == epoch(ca_cert.not_valid_after_utc)
    crl = x509.load_pem_x509_crl((folder / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None
    assert got[CRL] == epoch(crl.next_update_utc)
    # cam-gone's certificate ends first, but it is revoked: neither earliest nor counted.
    assert got[EARLIEST] == epoch(short_lived.not_after)
    assert epoch(short_lived.not_after) < epoch(long_lived.not_after)
    assert got[EXPIRING] == 1
    # The fleet gauges are still there.
    assert 'edgefleet_ingest_messages_total{kind="heartbeats"}' in got

    # A damaged CRL drops its series, not the page.
    (folder / "crl.pem").write_text("not a CRL\n")
    response = httpx.get(f"{served.url}/metrics")
    assert response.status_code == 200
    got = samples(response.text)
    assert CRL not in got
    assert got[CA_CERT] == epoch(ca_cert.not_valid_after_utc)
    assert got[EXPIRING] == 1


def test_a_repository_without_a_ca_has_the_tuf_gauges_only(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="controller.repository.expiry"):
        got = render(repo.path)
    assert {k for k in got if k.startswith(TUF)} == {f'{TUF}{{role="{r}"}}' for r in ALL_ROLES}
    assert got[f'{TUF}{{role="timestamp"}}'] == epoch(repo.load("timestamp").signed.expires)
    assert not [k for k in got if k in CA_SERIES]
    assert caplog.records == []  # no CA yet is normal, not a warning


def test_a_ca_without_devices_counts_none_expiring(repo: Repository) -> None:
    add_device(repo.path, "cam-1", "north", options(days=3))
    revoke_device(repo.path, "cam-1")
    got = render(repo.path)
    assert got[EXPIRING] == 0
    assert EARLIEST not in got  # no unrevoked device: no earliest expiry
    assert CA_CERT in got and CRL in got


def test_unreadable_sources_are_left_out_and_warned_at_most_once_per_interval(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    add_device(repo.path, "cam-1", "north", options())
    folder = ca_dir(repo.path)
    (folder / "devices.json").write_text("{ broken")
    (folder / "crl.pem").unlink()
    (repo.metadata_dir / "timestamp.json").unlink()
    clock = [1000.0]
    reader = ExpiryReader(repo.path, warn_interval_s=60, clock=lambda: clock[0])

    with caplog.at_level(logging.WARNING, logger="controller.repository.expiry"):
        got = render(repo.path, reader)
        render(repo.path, reader)
    # Every role but root is found through timestamp.json; root stands on its own.
    assert {k for k in got if k.startswith(TUF)} == {f'{TUF}{{role="root"}}'}
    assert CA_CERT in got
    assert not [k for k in got if k in (CRL, EARLIEST, EXPIRING)]
    warned = sorted(r.getMessage().split(" expiry:")[0] for r in caplog.records)
    assert len(warned) == 6, warned  # 4 roles, the CRL, the registry: once each
    assert any("the crl" in w for w in warned) and any("the devices" in w for w in warned)

    caplog.clear()
    clock[0] += 61
    with caplog.at_level(logging.WARNING, logger="controller.repository.expiry"):
        render(repo.path, reader)
    assert len(caplog.records) == 6


def test_the_device_summary_counts_unrevoked_certificates_ending_within_the_window(
    repo: Repository,
) -> None:
    soon, _ = add_device(repo.path, "cam-soon", "north", options(days=29))
    later, _ = add_device(repo.path, "cam-later", "north", options(days=31))
    gone, _ = add_device(repo.path, "cam-gone", "north", options(days=1))
    gone = revoke_device(repo.path, "cam-gone")
    now = dt.datetime.now(dt.UTC).timestamp()
    assert summarize_device_certs([soon, later, gone], now) == DeviceCertSummary(
        epoch(soon.not_after), 1
    )
    # Already expired and not revoked: still counted (it cannot connect until renewed).
    assert summarize_device_certs([soon, later], now + 40 * 86400).expiring == 2
    assert summarize_device_certs([gone], now) == DeviceCertSummary(None, 0)
