"""``edgectl gateway config``: the nginx caching mirror and the bridged mosquitto of a site
gateway (``controller.gateway.config`` renders them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from controller.base.errors import UsageError
from controller.commands.common import RAW, print_json

if TYPE_CHECKING:
    from controller.commands.common import Subparsers

EXAMPLE = (
    "example:\n  edgectl gateway config --site plant-7 --upstream http://controller:8080 "
    "--central-broker broker.example.net:1883 -o /etc/edgefleet-gateway"
)


def _central_tls(args: argparse.Namespace) -> tuple[str, str, str]:
    """(cafile, certfile, keyfile) of the bridge: from --identity DIR (a folder `gateway
    enroll` wrote) or the three --central-* options, not both."""
    from controller.identity.gateways import GATEWAY_CA, GATEWAY_CERT, GATEWAY_KEY

    given = (args.central_cafile, args.central_certfile, args.central_keyfile)
    if not args.identity:
        return given
    if any(given):
        raise UsageError(
            "--identity DIR names the bridge's CA, certificate and key: drop --central-cafile, "
            "--central-certfile and --central-keyfile"
        )
    folder = Path(args.identity).resolve()
    files = [folder / name for name in (GATEWAY_CA, GATEWAY_CERT, GATEWAY_KEY)]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise UsageError(
            f"--identity {args.identity} lacks {', '.join(missing)}: give the folder "
            "`edgectl gateway enroll SITE -o DIR` wrote"
        )
    return str(files[0]), str(files[1]), str(files[2])


def _cmd_gateway_config(args: argparse.Namespace) -> int:
    from controller.gateway.config import GatewayOptions, write_gateway_config

    cafile, certfile, keyfile = _central_tls(args)
    options = GatewayOptions(
        site=args.site,
        upstream=args.upstream,
        central_broker=args.central_broker,
        listen=args.listen,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        cache_size=args.cache_size,
        site_broker_port=args.site_broker_port,
        site_broker_bind=args.site_broker_bind,
        fleets=tuple(args.fleet or ()),
        central_cafile=cafile,
        central_certfile=certfile,
        central_keyfile=keyfile,
        site_tls_dir=Path(args.site_tls_dir) if args.site_tls_dir else None,
        run_as=args.run_as,
    )
    output = Path(args.output)
    nginx, mosquitto = write_gateway_config(output, options)
    if args.json:
        print_json(
            {"folder": str(output.resolve()), "nginx": str(nginx), "mosquitto": str(mosquitto)}
        )
        return 0
    folder = output.resolve()
    print(f"wrote a site gateway's configs to {output}")
    print(f"  caching mirror: nginx -p {folder} -c {nginx}")
    print(f"  site broker:    mosquitto -c {mosquitto}")
    port = args.listen.rpartition(":")[2]
    print(
        f"  devices at the site: repository url http://<this host>:{port}/, "
        f"broker <this host>:{args.site_broker_port}"
    )
    return 0


def add_parser(sub: Subparsers) -> None:
    gateway = sub.add_parser(
        "gateway",
        help="site gateway configuration: a caching repository mirror and a bridged broker",
        description="Site gateways: many devices behind one uplink.",
        epilog=EXAMPLE,
        formatter_class=RAW,
    )
    gsub = gateway.add_subparsers(dest="gateway_command", required=True, metavar="COMMAND")
    gc = gsub.add_parser(
        "config",
        help="write nginx.conf (proxy_cache mirror) and mosquitto.conf (bridge) into DIR",
        description="Write DIR/nginx.conf, a caching mirror of the controller's repository "
        "(bundles and versioned metadata cached for long, timestamp.json never; simultaneous "
        "misses fetch once; resumes answered from the cache) and DIR/mosquitto.conf, the "
        "site broker with a bridge to the central broker (announcements down, telemetry up).",
        epilog=EXAMPLE,
        formatter_class=RAW,
    )
    gc.add_argument("--site", required=True, metavar="NAME", help="this site's name (bridge id)")
    gc.add_argument(
        "--upstream", required=True, metavar="URL", help="the controller's repository URL"
    )
    gc.add_argument(
        "--central-broker", required=True, metavar="HOST:PORT", help="the central MQTT broker"
    )
    gc.add_argument("-o", "--output", required=True, metavar="DIR")
    gc.add_argument(
        "--listen", default="8080", metavar="[HOST:]PORT", help="the mirror's address (8080)"
    )
    gc.add_argument("--cache-dir", metavar="DIR", help="the cache (default DIR/cache)")
    gc.add_argument("--cache-size", default="10g", help="the cache's maximum size (10g)")
    gc.add_argument(
        "--site-broker-port", type=int, default=1883, help="the site broker's port (1883)"
    )
    gc.add_argument("--site-broker-bind", default="", metavar="ADDRESS", help="(default: all)")
    gc.add_argument(
        "--fleet", action="append", metavar="NAME", help="bridge only this fleet (repeatable)"
    )
    gc.add_argument(
        "--central-cafile", default="", metavar="FILE", help="TLS to the central broker"
    )
    gc.add_argument(
        "--central-certfile", default="", metavar="FILE", help="the bridge's certificate"
    )
    gc.add_argument("--central-keyfile", default="", metavar="FILE", help="its key")
    gc.add_argument(
        "--identity",
        metavar="DIR",
        help="the folder `edgectl gateway enroll` wrote: the bridge dials the central broker "
        "over TLS as this site's gateway (instead of the three --central-* options)",
    )
    gc.add_argument(
        "--site-tls-dir",
        metavar="DIR",
        help="a folder from `edgectl broker config`: the site listener uses its TLS and ACL",
    )
    gc.add_argument("--run-as", default="", metavar="USER", help="user nginx and mosquitto run as")
    gc.add_argument("--json", action="store_true", help="print JSON for scripts")
    gc.set_defaults(func=_cmd_gateway_config)

    ge = gsub.add_parser(
        "enroll",
        help="issue a site's gateway the certificate its bridge dials the central broker with",
        description="Issue the gateway of SITE a client certificate from the device CA (CN "
        "gateway:SITE) and write DIR/gateway.crt, DIR/gateway.key (0600) and DIR/ca.crt for "
        "`edgectl gateway config --identity DIR`. The central broker's ACL (`edgectl broker "
        "config`, refreshed here) lets that identity relay only the topics of the devices "
        "enrolled with `device add --site SITE`. Enrolling a site again revokes its earlier "
        "certificates.",
        epilog="example:\n  edgectl gateway enroll plant-7 --repo ./repo -o plant-7-identity",
        formatter_class=RAW,
    )
    ge.add_argument("site", metavar="SITE")
    ge.add_argument("--repo", required=True, metavar="REPO_DIR")
    ge.add_argument("-o", "--output", required=True, metavar="DIR")
    ge.add_argument("--days", type=int, default=825, help="certificate lifetime (default 825)")
    ge.add_argument("--json", action="store_true", help="print JSON for scripts")
    ge.set_defaults(func=_cmd_gateway_enroll)

    gr = gsub.add_parser(
        "revoke",
        help="revoke a site gateway's certificates (CRL) and drop it from the broker's ACL",
        description="Put every unexpired certificate of SITE's gateway on the CRL and take its "
        "block out of the central broker's ACL (refreshed here; reload the broker). Its "
        "devices keep their own certificates: enroll a new gateway for the site to bridge "
        "them again.",
        epilog="example:\n  edgectl gateway revoke plant-7 --repo ./repo",
        formatter_class=RAW,
    )
    gr.add_argument("site", metavar="SITE")
    gr.add_argument("--repo", required=True, metavar="REPO_DIR")
    gr.add_argument("--json", action="store_true", help="print JSON for scripts")
    gr.set_defaults(func=_cmd_gateway_revoke)


def _cmd_gateway_enroll(args: argparse.Namespace) -> int:
    from controller.identity.broker import refresh_broker_files
    from controller.identity.devices import load_registry
    from controller.identity.gateways import enroll_gateway

    repo = Path(args.repo)
    record, files = enroll_gateway(repo, args.site, Path(args.output), days=args.days)
    refreshed = refresh_broker_files(repo)
    behind = sorted(d for d, r in load_registry(repo).items() if r.site == args.site)
    if args.json:
        print_json(
            {
                "site": record.site,
                **record.to_json(),
                "files": [str(p) for p in files],
                "devices": behind,
                "broker_files_refreshed": [str(p) for p in refreshed],
            }
        )
        return 0
    print(f"enrolled the gateway of site {record.site} -> {args.output}")
    print(
        f"  certificate serial {record.serial:x} (CN gateway:{record.site}), valid until "
        f"{record.not_after}"
    )
    print(f"  {files[1].name} is the bridge's private key: copy it over a trusted channel")
    if record.previous:
        print(f"  revoked {len(record.previous)} earlier certificate(s) of this site's gateway")
    print(
        f"  devices it may relay: {', '.join(behind) or 'none yet'} "
        f"(`edgectl device add ID --site {record.site} ...`)"
    )
    print(f"  at the site: edgectl gateway config --site {record.site} --identity DIR ...")
    if refreshed:
        print(f"  broker ACL updated in {refreshed[0].parent}: reload the broker (SIGHUP)")
    return 0


def _cmd_gateway_revoke(args: argparse.Namespace) -> int:
    from controller.identity.broker import refresh_broker_files
    from controller.identity.gateways import revoke_gateway

    repo = Path(args.repo)
    record = revoke_gateway(repo, args.site)
    refreshed = refresh_broker_files(repo)
    if args.json:
        print_json(
            {
                "site": record.site,
                **record.to_json(),
                "broker_files_refreshed": [str(p) for p in refreshed],
            }
        )
        return 0
    print(f"revoked the gateway of site {record.site} (since {record.revoked_at})")
    if refreshed:
        print(f"  broker ACL and CRL updated in {refreshed[0].parent}: reload the broker (SIGHUP)")
    return 0
