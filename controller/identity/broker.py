"""``edgectl broker config``: a mosquitto configuration for per-device identities.

The broker authenticates every client by its X.509 certificate from the device CA
(``controller.identity.ca``): ``require_certificate``, ``use_identity_as_username`` (the CN, the
device id, becomes the username) and ``crlfile`` (revoked devices cannot connect). The
ACL file then keeps each device on its own topics in its own fleet:

- one ``user`` block per enrolled, unrevoked device, naming its fleet from the device
  registry: it may publish only under ``.../fleets/<its fleet>/devices/<its id>/...``
  and read only its fleet's announcement and its own repository responses, whatever
  certificate-holding neighbour it shares the broker with. A ``pattern`` rule with
  ``%u`` cannot do this: mosquitto substitutes only ``%u`` and ``%c``, never the fleet,
  so a pattern would let a device publish under its own id in every fleet's tree;
- no line at all for a revoked device or an unknown certificate;
- one ``user`` block per unrevoked site gateway (CN ``gateway:<site>``, the identity its
  bridge dials with, ``controller.identity.gateways``): the devices enrolled with
  ``--site <site>`` and their lines again, so a site's bridge relays its own devices'
  topics and nothing of anyone else's;
- one ``user`` block for the controller's identity (CN ``edgectl`` by default): read
  every device topic, publish announcements and repository responses.

That is seven lines per device (about 500 bytes: 50 MB at 100,000 devices).
mosquitto 2.0's dynamic-security plugin substitutes neither, hence the ACL file.

The output folder is self-contained (it can be copied to the broker's machine)::

    mosquitto.conf   the whole config of a dedicated broker; paths point into this folder
    acl              the ACL above, rewritten on ``device add`` and ``device revoke``
    ca.crt crl.pem   copies of the CA certificate and CRL, refreshed the same way
    broker.crt/.key  the broker's server certificate (SANs: the hosts devices dial)
    controller.crt/.key  the controller's client certificate

Invariants: rendering is pure (``render_acl``, ``render_mosquitto_conf``); certificates
are issued only when missing, so re-running keeps the broker's identity; the folder
used last is recorded in ``REPO_DIR/ca/broker.json`` so ``refresh_broker_files`` keeps
its ACL and CRL current after every enrollment change. mosquitto reads them again on
SIGHUP (``systemctl reload mosquitto``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.contracts import TOPIC_ROOT, InvalidNameError, check_name
from controller.base.errors import UsageError
from controller.base.fsio import atomic_write, make_dir
from controller.identity.ca import DeviceCA
from controller.identity.devices import DeviceRecord, ca_dir, load_registry, write_crl
from controller.identity.gateways import GatewayRecord, gateway_identity, load_gateways
from controller.identity.registry import registry_lock

logger = logging.getLogger(__name__)

DEFAULT_CONTROLLER_IDENTITY: Final = "edgectl"
BROKER_RECORD: Final = "broker.json"
SERVER_CERT_DAYS: Final = 825
# What a device publishes and reads under its own topic tree (relative to .../devices/%u/).
DEVICE_WRITES: Final = ("status", "telemetry", "events", "repo/request")
DEVICE_READS: Final = ("repo/response",)


@dataclass(frozen=True)
class BrokerOptions:
    hosts: tuple[str, ...]
    port: int = 8883
    bind: str = ""
    controller_identity: str = DEFAULT_CONTROLLER_IDENTITY


def render_acl(
    devices: Iterable[DeviceRecord],
    controller_identity: str,
    gateways: Iterable[GatewayRecord] = (),
) -> str:
    """The mosquitto ACL file for ``devices``: each unrevoked device confined to its own
    topics in its own fleet; revoked ones get no line. Each unrevoked site gateway (its
    bridge's identity) gets the union of what its site's unrevoked devices may do."""
    devices = list(devices)
    fleets = f"{TOPIC_ROOT}/fleets"
    lines = [
        "# Written by `edgectl broker config`; rewritten on `edgectl device add/revoke`.",
        "# The username is the CN of the client certificate (use_identity_as_username).",
        "",
        "# Each device: its fleet's announcement, its own topics in its own fleet only.",
    ]
    for record in sorted(devices, key=lambda r: r.device_id):
        if record.is_revoked:
            continue
        if record.device_id == controller_identity:
            raise UsageError(
                f"device {record.device_id!r} has the controller's identity; choose another "
                "--controller-identity"
            )
        own = f"{fleets}/{record.fleet}/devices/{record.device_id}"
        lines += [f"user {record.device_id}", f"topic read {fleets}/{record.fleet}/announce"]
        lines += [f"topic write {own}/{kind}" for kind in DEVICE_WRITES]
        lines += [f"topic read {own}/{kind}" for kind in DEVICE_READS]
    for gateway in sorted(gateways, key=lambda g: g.site):
        if gateway.is_revoked:
            continue
        behind = [d for d in devices if d.site == gateway.site and not d.is_revoked]
        lines += [
            "",
            f"# Site {gateway.site}'s gateway (its bridge): the topics of its site's devices only.",
            f"user {gateway_identity(gateway.site)}",
        ]
        lines += [
            f"topic read {fleets}/{fleet}/announce" for fleet in sorted({d.fleet for d in behind})
        ]
        for record in sorted(behind, key=lambda r: r.device_id):
            own = f"{fleets}/{record.fleet}/devices/{record.device_id}"
            lines += [f"topic write {own}/{kind}" for kind in DEVICE_WRITES]
            lines += [f"topic read {own}/{kind}" for kind in DEVICE_READS]
    lines += [
        "",
        "# The controller: announcements out, device topics in, repository answers out.",
        f"user {controller_identity}",
        f"topic readwrite {fleets}/+/announce",
    ]
    lines += [f"topic read {fleets}/+/devices/+/{kind}" for kind in DEVICE_WRITES]
    lines += [f"topic write {fleets}/+/devices/+/{kind}" for kind in DEVICE_READS]
    return "\n".join(lines) + "\n"


def render_mosquitto_conf(folder: Path, options: BrokerOptions) -> str:
    """A complete mosquitto 2.x config for TLS with client certificates."""
    bind = f" {options.bind}" if options.bind else ""
    return "\n".join(
        [
            "# Written by `edgectl broker config`. TLS with client certificates from the",
            "# edgefleet device CA; the certificate's CN is the identity the ACL checks.",
            "per_listener_settings false",
            "allow_anonymous false",
            f"acl_file {folder / 'acl'}",
            "# Measured (docs/benchmarks.md): without it QoS 0 p99 latency is ~10x.",
            "set_tcp_nodelay true",
            "# Sized for a controller outage; past it even QoS 1 messages are dropped.",
            "max_queued_messages 100000",
            "max_connections -1",
            "",
            f"listener {options.port}{bind}",
            f"cafile {folder / 'ca.crt'}",
            f"certfile {folder / 'broker.crt'}",
            f"keyfile {folder / 'broker.key'}",
            f"crlfile {folder / 'crl.pem'}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            "",
        ]
    )


def write_broker_config(repo_dir: Path, folder: Path, options: BrokerOptions) -> list[Path]:
    """Write the broker's folder (see the module docstring); return the files written.

    Raises UsageError for bad options, RepositoryError without a repository.
    """
    if not options.hosts:
        raise UsageError("--host: give at least one name or address devices use for the broker")
    try:  # it is written into the ACL as a user line and is the certificate's CN
        check_name("controller identity", options.controller_identity)
    except InvalidNameError as exc:
        raise UsageError(f"--controller-identity: {exc}") from None
    for option, value in [*(("--host", h) for h in options.hosts), ("--bind", options.bind)]:
        if any(c.isspace() or not c.isprintable() for c in value):  # mosquitto.conf lines
            raise UsageError(f"{option} expected a name or address, got {value!r}")
    if not 1 <= options.port <= 65535:
        raise UsageError(f"--port expected 1-65535, got {options.port}")
    if not (repo_dir / "metadata" / "root.json").exists():
        raise UsageError(f"{repo_dir} is not a repository: run `edgectl init {repo_dir}` first")
    with registry_lock(ca_dir(repo_dir)):  # device add may be creating the CA too
        ca = DeviceCA.open_or_create(ca_dir(repo_dir))
    folder = folder.resolve()
    make_dir(folder, 0o755)
    written = []
    for name in ("broker", "controller"):
        if not (folder / f"{name}.crt").exists():
            identity = (
                ca.issue_server(options.hosts, days=SERVER_CERT_DAYS)
                if name == "broker"
                else ca.issue_client(options.controller_identity, days=SERVER_CERT_DAYS)
            )
            # 0640: mosquitto reads its key after dropping to its own user (chgrp it).
            atomic_write(folder / f"{name}.key", identity.key_pem, mode=0o640)
            atomic_write(folder / f"{name}.crt", identity.cert_pem, mode=0o644)
            written += [folder / f"{name}.key", folder / f"{name}.crt"]
    conf = folder / "mosquitto.conf"
    atomic_write(conf, render_mosquitto_conf(folder, options).encode(), mode=0o644)
    record = {"folder": str(folder), "controller_identity": options.controller_identity}
    atomic_write(ca_dir(repo_dir) / BROKER_RECORD, json.dumps(record).encode(), mode=0o600)
    written.append(conf)
    written += refresh_broker_files(repo_dir, resign_crl=True)
    return written


def broker_folder(repo_dir: Path) -> Path | None:
    """The folder ``edgectl broker config`` wrote last for ``repo_dir``, or None."""
    try:
        record = json.loads((ca_dir(repo_dir) / BROKER_RECORD).read_bytes())
        return Path(record["folder"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def refresh_broker_files(repo_dir: Path, resign_crl: bool = False) -> Sequence[Path]:
    """Rewrite the ACL and copy CA and CRL into the broker folder last configured
    (nothing when ``edgectl broker config`` never ran). Returns the files written."""
    try:
        record = json.loads((ca_dir(repo_dir) / BROKER_RECORD).read_bytes())
    except FileNotFoundError:
        return []
    folder = Path(record["folder"])
    if not folder.is_dir():
        logger.warning("the broker folder %s is gone; run `edgectl broker config` again", folder)
        return []
    devices = load_registry(repo_dir)
    if resign_crl:
        write_crl(repo_dir, devices)
    acl = folder / "acl"
    text = render_acl(
        devices.values(), record["controller_identity"], load_gateways(repo_dir).values()
    )
    atomic_write(acl, text.encode(), 0o644)
    written = [acl]
    for name in ("ca.crt", "crl.pem"):
        atomic_write(folder / name, (ca_dir(repo_dir) / name).read_bytes(), mode=0o644)
        written.append(folder / name)
    return written
