"""``edgectl gateway config``: the nginx caching mirror and the bridged mosquitto of a site
gateway (``controller.gateway.config`` renders them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from controller.commands.common import RAW, print_json

if TYPE_CHECKING:
    from controller.commands.common import Subparsers

EXAMPLE = (
    "example:\n  edgectl gateway config --site plant-7 --upstream http://controller:8080 "
    "--central-broker broker.example.net:1883 -o /etc/edgefleet-gateway"
)


def _cmd_gateway_config(args: argparse.Namespace) -> int:
    from controller.gateway.config import GatewayOptions, write_gateway_config

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
        central_cafile=args.central_cafile,
        central_certfile=args.central_certfile,
        central_keyfile=args.central_keyfile,
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
        "--site-tls-dir",
        metavar="DIR",
        help="a folder from `edgectl broker config`: the site listener uses its TLS and ACL",
    )
    gc.add_argument("--run-as", default="", metavar="USER", help="user nginx and mosquitto run as")
    gc.add_argument("--json", action="store_true", help="print JSON for scripts")
    gc.set_defaults(func=_cmd_gateway_config)
