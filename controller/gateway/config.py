"""``edgectl gateway config``: the configs of a site gateway.

A site gateway stands between many devices on one site and the controller, over the
site's one uplink. It is made of two parts users already run, configured here:

- **nginx as a caching mirror** of the controller's repository (``proxy_cache``). Devices
  point their repository URL at it. What is content-addressed never changes under its
  name (targets under their sha256-prefixed consistent-snapshot names, metadata under
  ``N.role.json``) and is cached for long: the first device's request fetches it over
  the uplink, every other device's is answered from the cache. ``proxy_cache_lock`` makes
  simultaneous misses wait for that one fetch instead of each going upstream. The names
  that change in place (``timestamp.json``, unversioned metadata) are never cached: a
  device must see a new release as soon as the controller signs it. Only 200 answers are
  cached, so a probe for the next root version (a 404) is asked upstream each time.
  Range requests (a device resuming a bundle) are answered from the cached file; on a
  miss nginx fetches the whole file upstream (the cache drops ``Range`` from the upstream
  request) and cuts the range from it (``proxy_force_ranges``), so a resume never
  leaves a partial file in the cache. TUF makes the mirror untrusted: a device checks
  every byte against metadata signed by the controller's keys, so a stale or tampered
  cache costs a retry, never a wrong install.
- **mosquitto as the site broker**, bridged to the central broker (a ``connection``
  block): fleet announcements (retained) and repository answers come down, device
  status, heartbeats, events and repository requests go up. Devices connect to the site
  broker; the controller sees their telemetry as if they were connected centrally.

Invariants: rendering is pure (``render_nginx_conf``, ``render_mosquitto_conf``); every
value written into a config line is checked first (no whitespace, quotes, braces or
semicolons), so a bad option is a clear error here, not a config the server rejects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from agent.contracts import TOPIC_ROOT, InvalidNameError, check_name
from controller.base.errors import UsageError
from controller.base.fsio import atomic_write, make_dir

NGINX_CONF: Final = "nginx.conf"
MOSQUITTO_CONF: Final = "mosquitto.conf"
# Long enough for a large bundle over a slow uplink: the requests waiting on the first
# fetch of a file wait this long before going upstream themselves (uncached).
CACHE_FILL_TIMEOUT: Final = "15m"
# What a device publishes (up) and reads (down) under .../devices/<id>/.
UP_KINDS: Final = ("status", "telemetry", "events", "repo/request")
DOWN_KINDS: Final = ("repo/response",)
_SIZE = re.compile(r"[1-9][0-9]*[kKmMgG]?")
_UNSAFE = re.compile(r"[\s;{}'\"$\\#]")


@dataclass(frozen=True)
class GatewayOptions:
    site: str
    upstream: str
    central_broker: str
    listen: str = "8080"
    cache_dir: Path | None = None
    cache_size: str = "10g"
    site_broker_port: int = 1883
    site_broker_bind: str = ""
    fleets: tuple[str, ...] = ()
    central_cafile: str = ""
    central_certfile: str = ""
    central_keyfile: str = ""
    site_tls_dir: Path | None = None
    run_as: str = ""


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int
    prefix: str  # "" or "/path" (no trailing slash)

    @property
    def netloc(self) -> str:
        default = 80 if self.scheme == "http" else 443
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _safe(option: str, value: str) -> str:
    if not value or _UNSAFE.search(value) or not value.isprintable():
        raise UsageError(
            f"{option}: {value!r} cannot go into a config line "
            "(no spaces, quotes, braces, '#', '$' or ';')"
        )
    return value


def parse_upstream(url: str) -> Upstream:
    """The controller's repository URL (``edgectl serve``'s, or any static server's)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--upstream expected the repository's URL, like http://controller:8080, got {url!r}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UsageError(f"--upstream {url!r}: no query, fragment or user part, just the URL")
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
    except ValueError:
        raise UsageError(f"--upstream {url!r}: the port is not a number in 1-65535") from None
    prefix = parts.path.rstrip("/")
    _safe("--upstream", parts.hostname + prefix)
    return Upstream(parts.scheme, parts.hostname, port, prefix)


def parse_host_port(option: str, value: str, default_host: str = "") -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with ``default_host``) a bare port."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = default_host, value
    host = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or not 1 <= int(port) <= 65535 or (not host and not default_host):
        raise UsageError(f"{option} expected HOST:PORT (port 1-65535), got {value!r}")
    if host:
        _safe(option, host)
    return host, int(port)


def validate(options: GatewayOptions) -> tuple[Upstream, tuple[str, int]]:
    """Check every option; return the parsed upstream and central broker.

    Raises UsageError naming the option and what to give instead.
    """
    try:
        check_name("site", options.site)
        for fleet in options.fleets:
            check_name("fleet", fleet)
    except InvalidNameError as exc:
        raise UsageError(f"--site/--fleet: {exc}") from None
    upstream = parse_upstream(options.upstream)
    central = parse_host_port("--central-broker", options.central_broker)
    parse_host_port("--listen", options.listen, default_host="*")
    if not _SIZE.fullmatch(options.cache_size):
        raise UsageError(
            f"--cache-size expected a size like 500m or 20g, got {options.cache_size!r}"
        )
    if not 1 <= options.site_broker_port <= 65535:
        raise UsageError(f"--site-broker-port expected 1-65535, got {options.site_broker_port}")
    if options.site_broker_bind:
        _safe("--site-broker-bind", options.site_broker_bind)
    if options.run_as:
        _safe("--run-as", options.run_as)
    if bool(options.central_certfile) != bool(options.central_keyfile):
        raise UsageError("--central-certfile and --central-keyfile go together: give both")
    if options.central_certfile and not options.central_cafile:
        raise UsageError("--central-certfile needs --central-cafile (TLS to the central broker)")
    for option, value in (
        ("--central-cafile", options.central_cafile),
        ("--central-certfile", options.central_certfile),
        ("--central-keyfile", options.central_keyfile),
    ):
        if value:
            _safe(option, value)
            if not Path(value).is_file():
                raise UsageError(f"{option}: no file at {value}")
    if options.site_tls_dir is not None:
        missing = [
            name
            for name in ("ca.crt", "broker.crt", "broker.key", "crl.pem", "acl")
            if not (options.site_tls_dir / name).is_file()
        ]
        if missing:
            raise UsageError(
                f"--site-tls-dir {options.site_tls_dir} lacks {', '.join(missing)}: give a "
                "folder written by `edgectl broker config`"
            )
        _safe("--site-tls-dir", str(options.site_tls_dir.resolve()))
    return upstream, central


def _cached_location(match: str, proxy: list[str]) -> list[str]:
    return [
        f"        location {match} {{",
        *proxy,
        "            proxy_cache edgefleet;",
        "            proxy_cache_key $uri;",
        "            proxy_cache_valid 200 90d;",
        "            proxy_ignore_headers Cache-Control Expires Set-Cookie;",
        "            proxy_cache_lock on;",
        f"            proxy_cache_lock_timeout {CACHE_FILL_TIMEOUT};",
        f"            proxy_cache_lock_age {CACHE_FILL_TIMEOUT};",
        "            proxy_cache_use_stale error timeout;",
        "            proxy_force_ranges on;",
        "            proxy_hide_header Cache-Control;",
        '            add_header Cache-Control "public, max-age=31536000, immutable";',
        "            add_header X-Cache-Status $upstream_cache_status always;",
        "        }",
    ]


def render_nginx_conf(folder: Path, options: GatewayOptions, cache_dir: Path) -> str:
    """A complete nginx config (``nginx -p DIR -c DIR/nginx.conf``): the caching mirror."""
    upstream, _ = validate(options)
    host, port = parse_host_port("--listen", options.listen, default_host="*")
    listen = f"{port}" if host == "*" else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    proxy = []
    if upstream.prefix:  # the repository lives below a path on the upstream server
        proxy.append(f"            rewrite ^(.*)$ {upstream.prefix}$1 break;")
    proxy.append(f"            proxy_pass {upstream.scheme}://edgefleet_repository;")
    tls = (
        ["        proxy_ssl_server_name on;", f"        proxy_ssl_name {upstream.host};"]
        if upstream.scheme == "https"
        else []
    )
    lines = [
        "# Written by `edgectl gateway config`: a caching mirror of the edgefleet repository",
        f"# at {options.upstream}. Run: nginx -p {folder} -c {folder / NGINX_CONF}",
        "# Content-addressed files (targets, N.role.json) are cached for long; timestamp.json",
        "# and other names that change in place are never cached. TUF makes this mirror",
        "# untrusted: devices verify every byte against the controller's signatures.",
        *([f"user {options.run_as};"] if options.run_as else []),
        "worker_processes auto;",
        f"pid {folder / 'nginx.pid'};",
        f"error_log {folder / 'logs' / 'error.log'} warn;",
        "",
        "events {",
        "    worker_connections 4096;",
        "}",
        "",
        "http {",
        '    log_format edgefleet \'$remote_addr [$time_local] "$request" $status '
        '$body_bytes_sent cache=$upstream_cache_status range="$http_range" '
        "$request_time';",
        f"    access_log {folder / 'logs' / 'access.log'} edgefleet;",
        f"    client_body_temp_path {folder / 'tmp' / 'client_body'};",
        f"    proxy_temp_path {folder / 'tmp' / 'proxy'};",
        f"    fastcgi_temp_path {folder / 'tmp' / 'fastcgi'};",
        f"    uwsgi_temp_path {folder / 'tmp' / 'uwsgi'};",
        f"    scgi_temp_path {folder / 'tmp' / 'scgi'};",
        "    types {",
        "        application/json json;",
        "    }",
        "    default_type application/octet-stream;",
        "    sendfile on;",
        "    tcp_nopush on;",
        "    server_tokens off;",
        f"    proxy_cache_path {cache_dir} levels=1:2 keys_zone=edgefleet:16m "
        f"max_size={options.cache_size} inactive=90d use_temp_path=off;",
        "",
        "    upstream edgefleet_repository {",
        f"        server {upstream.server};",
        "        keepalive 16;",
        "    }",
        "",
        "    server {",
        f"        listen {listen};",
        "        server_name _;",
        "        proxy_http_version 1.1;",
        '        proxy_set_header Connection "";',
        f"        proxy_set_header Host {upstream.netloc};",
        "        proxy_connect_timeout 10s;",
        "        proxy_read_timeout 60s;",
        *tls,
        "",
        "        # Bundles, deltas and desired state: under their sha256-prefixed names.",
        *_cached_location("/targets/", proxy),
        "",
        "        # Metadata under a version number (N.snapshot.json, N.targets.json, ...).",
        *_cached_location('~ "^/metadata/[0-9]+\\.[^/]+\\.json$"', proxy),
        "",
        "        # timestamp.json and the names that change in place: always asked upstream.",
        "        location /metadata/ {",
        *proxy,
        "            proxy_cache off;",
        "            proxy_hide_header Cache-Control;",
        '            add_header Cache-Control "no-cache" always;',
        "        }",
        "",
        "        location / {",
        "            return 404;",
        "        }",
        "    }",
        "}",
        "",
    ]
    return "\n".join(lines)


def bridge_topics(fleets: tuple[str, ...]) -> list[str]:
    """The bridge's ``topic`` lines: announcements and repository answers in, each device's
    status, heartbeats, events and repository requests out (every fleet when none given)."""
    lines = []
    for fleet in fleets or ("+",):
        base = f"{TOPIC_ROOT}/fleets/{fleet}"
        lines.append(f"topic {base}/announce in 1")
        lines += [f"topic {base}/devices/+/{kind} out 1" for kind in UP_KINDS]
        lines += [f"topic {base}/devices/+/{kind} in 1" for kind in DOWN_KINDS]
    return lines


def render_mosquitto_conf(folder: Path, options: GatewayOptions) -> str:
    """A complete mosquitto 2.x config: the site broker with its bridge to the central one."""
    _, (central_host, central_port) = validate(options)
    bind = f" {options.site_broker_bind}" if options.site_broker_bind else ""
    if options.site_tls_dir is not None:
        tls_dir = options.site_tls_dir.resolve()
        listener = [
            "allow_anonymous false",
            f"acl_file {tls_dir / 'acl'}",
            f"listener {options.site_broker_port}{bind}",
            f"cafile {tls_dir / 'ca.crt'}",
            f"certfile {tls_dir / 'broker.crt'}",
            f"keyfile {tls_dir / 'broker.key'}",
            f"crlfile {tls_dir / 'crl.pem'}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
        ]
    else:
        listener = [
            "# No --site-tls-dir: devices connect without TLS or identity (a closed site LAN).",
            "allow_anonymous true",
            f"listener {options.site_broker_port}{bind}",
        ]
    central = central_host if ":" not in central_host else f"[{central_host}]"
    tls = []
    if options.central_cafile:
        tls = [f"bridge_cafile {options.central_cafile}", "bridge_insecure false"]
        tls.append("bridge_tls_version tlsv1.2")
        if options.central_certfile:
            tls += [
                f"bridge_certfile {options.central_certfile}",
                f"bridge_keyfile {options.central_keyfile}",
            ]
    lines = [
        "# Written by `edgectl gateway config`: the site broker, bridged to the central one.",
        f"# Run: mosquitto -c {folder / MOSQUITTO_CONF}",
        *([f"user {options.run_as}"] if options.run_as else []),
        "per_listener_settings false",
        "persistence true",
        f"persistence_location {folder / 'mosquitto'}/",
        "set_tcp_nodelay true",
        "# Telemetry queued for the bridge while the uplink is down, and for slow devices.",
        "max_queued_messages 100000",
        "max_connections -1",
        *listener,
        "",
        f"connection edgefleet-{options.site}",
        f"address {central}:{central_port}",
        f"remote_clientid edgefleet-gateway-{options.site}",
        f"local_clientid edgefleet-gateway-{options.site}-local",
        "# A persistent session: what is published while the uplink is down is delivered",
        "# once it is back (queued centrally for the site, locally for the controller).",
        "cleansession false",
        "bridge_protocol_version mqttv311",
        "# A mosquitto bridge keeps each message's retain flag (retained announcements).",
        "try_private true",
        "notifications true",
        "notifications_local_only true",
        "keepalive_interval 30",
        "restart_timeout 2 30",
        *tls,
        *bridge_topics(options.fleets),
        "",
    ]
    return "\n".join(lines)


def write_gateway_config(folder: Path, options: GatewayOptions) -> list[Path]:
    """Write ``nginx.conf`` and ``mosquitto.conf`` into ``folder`` with the folders they use
    (logs, temp files, the cache unless --cache-dir, mosquitto's persistence); return the
    files written. Raises UsageError for bad options."""
    validate(options)
    folder = folder.resolve()
    cache_dir = (options.cache_dir or folder / "cache").resolve()
    _safe("--output", str(folder))
    _safe("--cache-dir", str(cache_dir))
    for sub in (folder, folder / "logs", folder / "tmp", folder / "mosquitto", cache_dir):
        make_dir(sub, 0o755)
    nginx = folder / NGINX_CONF
    mosquitto = folder / MOSQUITTO_CONF
    atomic_write(nginx, render_nginx_conf(folder, options, cache_dir).encode(), mode=0o644)
    atomic_write(mosquitto, render_mosquitto_conf(folder, options).encode(), mode=0o644)
    return [nginx, mosquitto]
