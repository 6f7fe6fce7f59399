"""``edgectl device add|renew|revoke`` and ``edgectl broker config``: who the devices are
and the broker that admits them.

Each command writes through ``controller.identity`` (the device CA, its registry and
CRL) and refreshes the broker files ``broker config`` wrote, so the broker's ACL and CRL
follow every enrollment, renewal and revocation; the operator reloads the broker.

This module owns the ``device`` group; its read-only ``show`` command is
``controller.commands.fleet``'s (``add_device_show_parser``), as it reads telemetry.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from controller.base.errors import UsageError
from controller.commands import fleet
from controller.commands.common import RAW, print_json

if TYPE_CHECKING:
    from controller.commands.common import Subparsers
    from controller.identity.devices import DeviceRecord, EnrollOptions


def _cmd_device_add(args: argparse.Namespace) -> int:
    from controller.base.fsio import atomic_write
    from controller.identity.broker import refresh_broker_files
    from controller.identity.devices import EnrollOptions, add_device
    from controller.serve.config import parse_endpoint

    host, port = parse_endpoint(args.broker, "--broker")
    options = EnrollOptions(
        repository_url=args.repository_url,
        mqtt_host=host,
        mqtt_port=port,
        tls=not args.no_tls,
        cert_days=args.days,
    )
    output = Path(args.output)
    if output.exists() and not args.force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    csr_pem = _read_csr(args.csr)
    repo = Path(args.repo)
    record, archive = add_device(
        repo, args.device_id, args.fleet, options, csr_pem=csr_pem, site=args.site
    )
    atomic_write(output, archive, mode=0o600)
    refreshed = refresh_broker_files(repo)
    if args.json:
        _print_archive_json(record, output, csr_pem, refreshed)
        return 0
    print(f"enrolled {record.device_id} in fleet {record.fleet} -> {output}")
    if record.site is not None:
        print(f"  behind site {record.site}'s gateway: its bridge may relay this device's topics")
    print(f"  certificate serial {record.serial:x}, valid until {record.not_after}")
    if csr_pem is None:
        print("  the archive holds the device's private key: copy it over a trusted channel")
    else:
        print("  issued for the device's request: the archive holds no key, the device keeps it")
    print(f"  on the device: edge-agent enroll {output.name} && systemctl restart edge-agent")
    if refreshed:
        print(f"  broker ACL updated in {refreshed[0].parent}: reload the broker (SIGHUP)")
    return 0


def _read_csr(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the request {path}: {exc.strerror}") from None


def _renew_options(args: argparse.Namespace, repo: Path) -> EnrollOptions | None:
    """The endpoints given on the command line, over those recorded at enrollment."""
    import dataclasses

    from controller.identity.devices import EnrollOptions, load_registry
    from controller.serve.config import parse_endpoint

    if args.repository_url is None and args.broker is None:
        return None  # the recorded ones (renew_device refuses when there are none)
    record = load_registry(repo).get(args.device_id)
    recorded = record.endpoints if record is not None else None
    if recorded is None:
        if args.repository_url is None or args.broker is None:
            raise UsageError(
                f"the registry does not say where {args.device_id!r} connects: pass both "
                "--repository-url URL and --broker HOST:PORT"
            )
        host, port = parse_endpoint(args.broker, "--broker")
        return EnrollOptions(repository_url=args.repository_url, mqtt_host=host, mqtt_port=port)
    if args.broker is not None:
        host, port = parse_endpoint(args.broker, "--broker")
        recorded = dataclasses.replace(recorded, mqtt_host=host, mqtt_port=port)
    if args.repository_url is not None:
        recorded = dataclasses.replace(recorded, repository_url=args.repository_url)
    return recorded


def _print_archive_json(
    record: DeviceRecord,
    output: Path,
    csr_pem: bytes | None,
    refreshed: Sequence[Path],
    **extra: object,
) -> None:
    """The ``--json`` report of ``device add`` and ``device renew``."""
    print_json(
        {
            "device_id": record.device_id,
            **record.to_json(),
            "archive": str(output),
            "key_in_archive": csr_pem is None,
            **extra,
            "broker_files_refreshed": [str(p) for p in refreshed],
        }
    )


def _cmd_device_renew(args: argparse.Namespace) -> int:
    import sys

    from controller.base.fsio import atomic_write
    from controller.identity.broker import refresh_broker_files
    from controller.identity.devices import renew_device

    to_stdout = args.output == "-"
    if to_stdout and args.json:
        raise UsageError("-o - writes the archive to stdout: --json needs -o FILE")
    output = Path(args.output or f"{args.device_id}-renewed.tar")
    if not to_stdout and output.exists() and not args.force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    csr_pem = _read_csr(args.csr)
    repo = Path(args.repo)
    record, archive = renew_device(
        repo,
        args.device_id,
        cert_days=args.days,
        csr_pem=csr_pem,
        revoke_previous=args.revoke_previous,
        options=_renew_options(args, repo),
    )
    if to_stdout:
        sys.stdout.buffer.write(archive)
        sys.stdout.flush()
    else:
        atomic_write(output, archive, mode=0o600)
    refreshed = refresh_broker_files(repo)
    if args.json:
        _print_archive_json(
            record, output, csr_pem, refreshed, previous_revoked=args.revoke_previous
        )
        return 0
    print(
        "\n".join(_renewal_summary(record, args, refreshed)),
        file=sys.stderr if to_stdout else sys.stdout,
    )
    return 0


def _renewal_summary(
    record: DeviceRecord, args: argparse.Namespace, refreshed: Sequence[Path]
) -> list[str]:
    to_stdout = args.output == "-"
    output = "stdout" if to_stdout else args.output or f"{args.device_id}-renewed.tar"
    lines = [
        f"renewed {record.device_id} (fleet {record.fleet}) -> {output}",
        f"  new certificate serial {record.serial:x}, valid until {record.not_after}",
    ]
    for cert in record.previous:
        state = f"revoked at {cert.revoked_at}" if cert.revoked_at else "still valid"
        lines.append(f"  previous serial {cert.serial:x}, until {cert.not_after}: {state}")
    if args.csr is None:
        lines.append(
            "  the archive holds the device's new private key: copy it over a trusted channel"
        )
    else:
        lines.append(
            "  issued for the device's request: the archive holds no key, the device keeps it"
        )
    name = "FILE" if to_stdout else Path(output).name
    lines.append(f"  on the device: edge-agent enroll {name} && systemctl restart edge-agent")
    if refreshed:
        lines.append(
            f"  broker CRL and ACL updated in {refreshed[0].parent}: reload the broker (SIGHUP)"
        )
    return lines


def _cmd_device_revoke(args: argparse.Namespace) -> int:
    from controller.identity.broker import refresh_broker_files
    from controller.identity.devices import ca_dir, revoke_device

    repo = Path(args.repo)
    record = revoke_device(repo, args.device_id)
    refreshed = refresh_broker_files(repo)
    crl = ca_dir(repo) / "crl.pem"
    if args.json:
        doc = {"device_id": record.device_id, **record.to_json(), "crl": str(crl)}
        print_json({**doc, "broker_files_refreshed": [str(p) for p in refreshed]})
        return 0
    print(f"revoked {record.device_id} (serial {record.serial:x}) at {record.revoked_at}")
    for cert in record.previous:
        print(f"  and its previous certificate, serial {cert.serial:x} (until {cert.not_after})")
    print(f"  CRL: {crl}")
    if refreshed:
        print(f"  broker CRL and ACL updated in {refreshed[0].parent}: reload the broker (SIGHUP)")
    else:
        print("  copy the CRL to the broker's crlfile and reload it (SIGHUP)")
    return 0


def _cmd_broker_config(args: argparse.Namespace) -> int:
    from controller.identity.broker import BrokerOptions, write_broker_config

    options = BrokerOptions(
        hosts=tuple(args.host),
        port=args.port,
        bind=args.bind,
        controller_identity=args.controller_identity,
    )
    output = Path(args.output)
    written = write_broker_config(Path(args.repo), output, options)
    if args.json:
        folder = output.resolve()
        doc = {
            "folder": str(folder),
            "config": str(folder / "mosquitto.conf"),
            "controller_certificate": str(folder / "controller.crt"),
            "files_written": [str(p) for p in written],
        }
        print_json(doc)
        return 0
    print(f"wrote a mosquitto config for TLS with client certificates to {output}")
    print(f"  run: mosquitto -c {output.resolve() / 'mosquitto.conf'}")
    print(f"  the controller's client certificate: {output / 'controller.crt'} (+ .key)")
    print("  keys are 0640: chgrp them to the broker's group (Debian: mosquitto)")
    return 0


def _add_device_enrollment(dsub: Subparsers) -> None:
    da = dsub.add_parser(
        "add",
        help="enroll a device: a client certificate, the TUF root and an agent config",
        description="Issue the device a client certificate from the controller's device CA "
        "(REPO_DIR/ca, created on first use) and write an archive with it, its key, the CA "
        "certificate, the repository's TUF root and an agent config. Install it on the "
        "device with `edge-agent enroll FILE`. The archive holds a private key, unless "
        "--csr names the device's certificate request (`edge-agent request ID` on the "
        "device): then the certificate is for the device's own key and the archive has none.",
        epilog="examples:\n  edgectl device add cam-0042 --fleet north --repo ./repo "
        "--repository-url https://updates.example.net/ --broker broker.example.net:8883 "
        "-o enroll.tar\n  edgectl device add cam-0042 --csr cam-0042.csr --fleet north "
        "--repo ./repo --repository-url https://updates.example.net/ "
        "--broker broker.example.net:8883 -o enroll.tar",
        formatter_class=RAW,
    )
    da.add_argument("device_id", metavar="ID")
    da.add_argument("--fleet", required=True)
    da.add_argument("--repo", required=True, metavar="REPO_DIR")
    da.add_argument("-o", "--output", required=True, metavar="FILE", help="archive to write")
    da.add_argument(
        "--repository-url", required=True, metavar="URL", help="where the device reads the repo"
    )
    da.add_argument(
        "--broker", required=True, metavar="HOST:PORT", help="the MQTT broker the device dials"
    )
    da.add_argument(
        "--csr",
        metavar="FILE",
        help="the device's certificate request (from `edge-agent request`): no key is made here",
    )
    da.add_argument(
        "--site",
        metavar="NAME",
        help="the site gateway the device is behind (`edgectl gateway enroll NAME`): only "
        "that gateway's bridge may relay the device's topics",
    )
    da.add_argument("--no-tls", action="store_true", help="plain MQTT (tests only)")
    da.add_argument("--days", type=int, default=825, help="certificate lifetime (default 825)")
    da.add_argument("--force", action="store_true", help="overwrite FILE")
    da.add_argument("--json", action="store_true", help="print JSON for scripts")
    da.set_defaults(func=_cmd_device_add)

    dn = dsub.add_parser(
        "renew",
        help="issue an enrolled device a new certificate (before the old one expires)",
        description="Issue an enrolled, unrevoked device a new client certificate and write "
        "an enrollment archive for it, like `device add` (a new key in the archive, or none "
        "with --csr). The device installs it with `edge-agent enroll FILE` and a restart. The "
        "previous certificate stays valid until it expires, so the device keeps connecting "
        "until then, unless --revoke-previous puts it on the CRL now. The agent config in "
        "the archive uses the repository URL and broker recorded at enrollment "
        "(--repository-url / --broker replace them, and are needed for devices enrolled "
        "before renewal existed).",
        epilog="examples:\n  edgectl device renew cam-0042 --repo ./repo -o cam-0042-renewed.tar"
        "\n  edgectl device renew cam-0042 --csr cam-0042.csr --repo ./repo "
        "--revoke-previous -o cam-0042-renewed.tar",
        formatter_class=RAW,
    )
    dn.add_argument("device_id", metavar="ID")
    dn.add_argument("--repo", required=True, metavar="REPO_DIR")
    dn.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="archive to write, - for stdout (default ID-renewed.tar)",
    )
    dn.add_argument(
        "--csr",
        metavar="FILE",
        help="the device's certificate request (from `edge-agent request`): no key is made here",
    )
    dn.add_argument("--days", type=int, default=825, help="certificate lifetime (default 825)")
    dn.add_argument(
        "--revoke-previous",
        action="store_true",
        help="put the device's previous certificates on the CRL now (default: valid until expiry)",
    )
    dn.add_argument(
        "--repository-url",
        metavar="URL",
        help="where the device reads the repo (default: as enrolled)",
    )
    dn.add_argument(
        "--broker", metavar="HOST:PORT", help="the MQTT broker it dials (default: as enrolled)"
    )
    dn.add_argument("--force", action="store_true", help="overwrite FILE")
    dn.add_argument("--json", action="store_true", help="print JSON for scripts")
    dn.set_defaults(func=_cmd_device_renew)

    dr = dsub.add_parser(
        "revoke",
        help="revoke a device's certificates and publish a new CRL",
        description="Mark the device revoked with every certificate it holds that has not "
        "expired (the current one and those `device renew` kept valid), re-sign the CRL "
        "(REPO_DIR/ca/crl.pem) and, "
        "when `edgectl broker config` wrote a broker folder, refresh its CRL and ACL. "
        "Reload the broker afterwards.",
        epilog="example:\n  edgectl device revoke cam-0042 --repo ./repo",
        formatter_class=RAW,
    )
    dr.add_argument("device_id", metavar="ID")
    dr.add_argument("--repo", required=True, metavar="REPO_DIR")
    dr.add_argument("--json", action="store_true", help="print JSON for scripts")
    dr.set_defaults(func=_cmd_device_revoke)


def _add_broker_parser(sub: Subparsers) -> None:
    broker = sub.add_parser(
        "broker",
        help="broker configuration for per-device identities",
        description="Broker configuration.",
        epilog="example:\n  edgectl broker config --repo ./repo --host broker.example.net "
        "-o /etc/mosquitto/edgefleet",
        formatter_class=RAW,
    )
    bsub = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    bc = bsub.add_parser(
        "config",
        help="write a mosquitto config: TLS, client certificates, CRL and a per-device ACL",
        description="Write mosquitto.conf, an ACL file with pattern rules (a device publishes "
        "only under its own topics and reads only its fleet's announcement), the broker's "
        "server certificate and the controller's client certificate into DIR.",
        epilog="example:\n  edgectl broker config --repo ./repo --host broker.example.net "
        "-o /etc/mosquitto/edgefleet",
        formatter_class=RAW,
    )
    bc.add_argument("--repo", required=True, metavar="REPO_DIR")
    bc.add_argument("-o", "--output", required=True, metavar="DIR")
    bc.add_argument(
        "--host",
        action="append",
        required=True,
        help="a name or address devices dial (repeatable; the certificate's SANs)",
    )
    bc.add_argument("--port", type=int, default=8883, help="TLS listener (default 8883)")
    bc.add_argument("--bind", default="", metavar="ADDRESS", help="listen address (default: all)")
    bc.add_argument(
        "--controller-identity",
        default="edgectl",
        metavar="CN",
        help="CN of the controller's client certificate (default edgectl)",
    )
    bc.add_argument("--json", action="store_true", help="print JSON for scripts")
    bc.set_defaults(func=_cmd_broker_config)


def add_parser(sub: Subparsers) -> None:
    device = sub.add_parser(
        "device",
        help="enroll, renew, revoke and inspect devices",
        description="Enroll a device (add), renew its certificate, revoke it, or read its "
        "telemetry and certificates (show).",
        epilog="examples:\n  edgectl device show cam-0042 --repo ./repo\n"
        "  edgectl device revoke cam-0042 --repo ./repo",
        formatter_class=RAW,
    )
    dsub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    fleet.add_device_show_parser(dsub)
    _add_device_enrollment(dsub)
    _add_broker_parser(sub)
