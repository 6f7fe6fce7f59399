"""What the expiry part of a controller ``/metrics`` scrape costs at fleet scale.

A real repository (``init_repository``) with a real device CA (one ``add_device``), then
a device registry of ``--devices`` records written straight in the registry's JSON format
(issuing 100,000 real certificates would take an hour and give the same file: the scrape
reads only the records), ``--revoked-percent`` of them revoked and on a real signed CRL.
It times, median of ``--repeat`` runs each:

- before the cache: what every scrape did until then for the device gauges
  (``load_registry`` + ``summarize_device_certs``);
- ``ExpiryReader.read`` cold: a new reader, the registry and CRL parsed (the first
  scrape, and the first after a write);
- ``ExpiryReader.read`` cached: the same reader again, the files unchanged (every
  other scrape): a stat per file, the TUF roles, the CA certificate.

    python bench/metrics_scrape.py [--devices 100000] [--repeat 5] [--record]
"""

from __future__ import annotations

import datetime as dt
import json
import random
import tempfile
import time
from pathlib import Path

from _common import (
    arguments,
    command_line,
    markdown_table,
    median_ms,
    parse_arguments,
    record_section,
    run_heading,
)

from controller.base.filememo import SETTLE_S
from controller.identity.ca import DeviceCA
from controller.identity.devices import EnrollOptions, add_device, ca_dir, load_registry
from controller.repository.expiry import ExpiryReader, summarize_device_certs
from controller.repository.repo import init_repository

REGISTRY_SCHEMA = "edgefleet.devices/1"


def build_repository(folder: Path, devices: int, revoked_percent: float) -> Path:
    """A repository with a device CA, ``devices`` registry records and their CRL."""
    repo = init_repository(folder / "repo").path
    add_device(
        repo, "seed", "bench", EnrollOptions(repository_url="https://x.example/", mqtt_host="mq")
    )
    rng = random.Random(7)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    entries = {}
    revoked: list[tuple[int, dt.datetime]] = []
    for i in range(devices):
        enrolled = now - dt.timedelta(seconds=rng.randrange(0, 800 * 86400))
        serial = rng.getrandbits(159)
        revoked_at = None
        if rng.random() * 100 < revoked_percent:
            revoked_at = now - dt.timedelta(seconds=rng.randrange(0, 86400))
            revoked.append((serial, revoked_at))
        # The format DeviceRecord.to_json writes (controller/identity/devices.py).
        entries[f"dev-{i:06d}"] = {
            "fleet": f"fleet-{i % 20:02d}",
            "serial": str(serial),
            "not_after": (enrolled + dt.timedelta(days=825)).isoformat(),
            "enrolled_at": enrolled.isoformat(),
            "revoked_at": None if revoked_at is None else revoked_at.isoformat(),
        }
    doc = {"schema": REGISTRY_SCHEMA, "devices": dict(sorted(entries.items()))}
    registry = ca_dir(repo) / "devices.json"
    registry.write_bytes(json.dumps(doc, indent=2).encode() + b"\n")
    DeviceCA.open(ca_dir(repo)).write_crl(revoked, now)
    # Let the files settle, as a registry written at least a scrape interval ago has:
    # a file changed within SETTLE_S is read again at the next scrape (filememo.py).
    time.sleep(SETTLE_S + 0.5)
    assert len(load_registry(repo)) == devices
    return repo


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--revoked-percent", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=5)
    args = parse_arguments(parser)

    with tempfile.TemporaryDirectory(prefix="metrics-scrape-") as tmp:
        repo = build_repository(Path(tmp), args.devices, args.revoked_percent)
        registry = ca_dir(repo) / "devices.json"
        crl = ca_dir(repo) / "crl.pem"
        now = time.time()

        before = summarize_device_certs(load_registry(repo).values(), now)
        warm = ExpiryReader(repo)
        cached_value = warm.read(now)
        assert cached_value.device_certs == before, (cached_value.device_certs, before)
        assert ExpiryReader(repo).read(now) == cached_value

        def cold() -> object:
            return ExpiryReader(repo).read(now)

        def cached() -> object:
            return warm.read(now)

        rows = []
        for label, run, repeat in (
            (
                "before the cache: load_registry + summarize_device_certs",
                lambda: summarize_device_certs(load_registry(repo).values(), now),
                args.repeat,
            ),
            (
                "ExpiryReader.read, cold (new reader)",
                lambda: ExpiryReader(repo).read(now),
                args.repeat,
            ),
            (
                "ExpiryReader.read, cached (files unchanged)",
                lambda: warm.read(now),
                args.repeat * 20,
            ),
        ):
            median, best = median_ms(run, repeat)
            rows.append((label, f"{median:.2f}", f"{best:.2f}", repeat))
        table = markdown_table(("expiry part of a scrape", "median ms", "min ms", "runs"), rows)
        sizes = (
            f"registry {registry.stat().st_size / 2**20:.1f} MiB ({args.devices} devices, "
            f"{args.revoked_percent:g}% revoked), CRL {crl.stat().st_size / 2**10:.0f} KiB; "
            f"{before.expiring} expiring within 30 days"
        )

    print(sizes)
    print(table)
    if args.record:
        run_text = "\n".join(
            [
                run_heading(command_line()),
                sizes + ".",
                "",
                table,
            ]
        )
        intro = (
            "`bench/metrics_scrape.py`: the expiry gauges' part of a controller `GET /metrics` "
            "scrape (`controller/repository/expiry.py`) against a real repository, device CA "
            "and CRL and a device registry written in its real format. Cold is the first "
            "scrape and the first after the registry or CRL changed; cached is every other scrape "
            "(`controller/base/filememo.py`)."
        )
        record_section("Controller metrics scrape", intro, run_text)


if __name__ == "__main__":
    main()
