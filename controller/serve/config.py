"""Configuration of ``edgectl serve``: a frozen dataclass loaded once.

Precedence, highest first: command-line flags, environment (``EDGECTL_REPO``,
``EDGECTL_LISTEN``, ``EDGECTL_MQTT``, ``EDGECTL_STORE``), the ``[serve]`` table of
``controller.toml``, the defaults below. Every key is documented in ``docs/configuration.md``.

Invariants: a ``ServeConfig`` is valid once built (ports in range, intervals positive);
loading raises UsageError naming where the value came from (the file, the variable or
the flag), the key, what was expected and what was found. Keys outside ``[serve]`` are
errors, never ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import secrets
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from controller.base.errors import UsageError

ENV_KEYS: Final = {
    "repo": "EDGECTL_REPO",
    "listen": "EDGECTL_LISTEN",
    "mqtt": "EDGECTL_MQTT",
    "store": "EDGECTL_STORE",
}
# Keys `edgectl serve` also takes as flags without a variable (errors name the flag).
FLAG_KEYS: Final = ("lease_s", "instance_id")
# The telemetry store's file inside the repository folder when ``store`` is not set
# (beside metadata/ and targets/, never served over HTTP).
DEFAULT_STORE_NAME: Final = "telemetry.sqlite"
_KNOWN_KEYS: Final = (
    "repo",
    "listen",
    "mqtt",
    "mqtt_client_id",
    "mqtt_keepalive_s",
    "announce_interval_s",
    "resign_check_interval_s",
    "store",
    "mqtt_shared_group",
    "ingest_client_id",
    "ingest_session_expiry_s",
    "ingest_batch_size",
    "ingest_flush_s",
    "ingest_store_retry_max_s",
    "ingest_stop_timeout_s",
    "ingest_qos0_backlog_max",
    "heartbeat_interval_s",
    "stale_after_heartbeats",
    "heartbeat_retention_s",
    "event_retention_s",
    "event_max_per_device",
    "device_retention_s",
    "revoked_device_retention_s",
    "model_retention_s",
    "rollout_retention_s",
    "rollout_keep_per_model",
    "metadata_keep_versions",
    "metadata_min_age_s",
    "max_requests_per_s",
    "rollout_tick_interval_s",
    "mqtt_tls",
    "mqtt_ca_file",
    "mqtt_cert_file",
    "mqtt_key_file",
    "lease_s",
    "instance_id",
)
_TLS_FILE_KEYS: Final = {
    "mqtt_ca_file": "ca.crt",
    "mqtt_cert_file": "controller.crt",
    "mqtt_key_file": "controller.key",
}


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``edgectl serve`` needs. ``mqtt_host`` None disables announcements."""

    repo_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    mqtt_host: str | None = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_client_id: str = ""
    mqtt_keepalive_s: int = 30
    announce_interval_s: float = 0.5
    resign_check_interval_s: float = 60.0
    # Telemetry: a SQLite path or a postgresql:// DSN ("" = REPO_DIR/telemetry.sqlite).
    store: str = ""
    # MQTT 5 shared subscription group for several ingest workers ("" = a plain one).
    mqtt_shared_group: str = ""
    ingest_client_id: str = ""
    ingest_session_expiry_s: int = 3600
    ingest_batch_size: int = 2000
    ingest_flush_s: float = 0.2
    # A failing store: the longest wait between retries of a batch, and how long a stop
    # waits for the store before leaving unstored messages to the broker.
    ingest_store_retry_max_s: float = 10.0
    ingest_stop_timeout_s: float = 30.0
    # QoS 0 messages held while the store lags or fails (controller/fleet/backlog.py).
    ingest_qos0_backlog_max: int = 100_000
    # Devices that do not say their heartbeat interval are assumed to use this one.
    heartbeat_interval_s: float = 10.0
    stale_after_heartbeats: float = 3.0
    heartbeat_retention_s: float = 7 * 86400.0
    # Lifecycle events kept: this long, and at most this many of each device (its newest).
    event_retention_s: float = 90 * 86400.0
    event_max_per_device: int = 1000
    # Retention of the rest (docs/operations.md, "Retention"): devices silent this long are
    # forgotten by the store, revoked ones sooner; a model a device stopped reporting.
    device_retention_s: float = 90 * 86400.0
    revoked_device_retention_s: float = 86400.0
    model_retention_s: float = 7 * 86400.0
    # Finished rollout records: kept this long, and the newest few per fleet and model.
    rollout_retention_s: float = 90 * 86400.0
    rollout_keep_per_model: int = 10
    # Old snapshot/targets/rollout metadata versions and desired-state files: the newest
    # this many before the current one are kept, and nothing younger than the age.
    metadata_keep_versions: int = 20
    metadata_min_age_s: float = 86400.0
    # Heartbeats counting more requests per model than this a second are refused
    # (controller.fleet.payloads.check_plausible).
    max_requests_per_s: float = 50_000.0
    # How often staged rollouts are judged against their gates and advanced.
    rollout_tick_interval_s: float = 5.0
    # MQTT over TLS with the controller's client certificate; when ``mqtt_tls`` is true
    # the three files are set (defaults: the broker folder of `edgectl broker config`).
    mqtt_tls: bool = False
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    # Leadership among the serve processes sharing the store (controller.fleet.lease): the
    # lease's length, and this process's name in it ("" = HOSTNAME-PID).
    lease_s: float = 15.0
    instance_id: str = ""

    @property
    def store_location(self) -> str:
        return self.store or str(self.repo_dir / DEFAULT_STORE_NAME)


def parse_endpoint(value: str, what: str, allow_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); ``[::1]:80`` for IPv6. Raises UsageError."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise UsageError(f"{what} expected HOST:PORT (e.g. 127.0.0.1:8080), got {value!r}")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise UsageError(f"{what} port expected 1-65535, got {port}")
    return host, port


class _Values(dict[str, Any]):
    """The merged keys, and where each came from (the file, a variable or a flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.origins: dict[str, str] = {}

    def set(self, key: str, value: Any, origin: str) -> None:
        self[key] = value
        self.origins[key] = origin

    def where(self, key: str) -> str:
        """How an error names the key: ``FILE: [serve] key``, the variable or the flag."""
        return self.origins.get(key, f"[serve] {key}")


def _number(doc: _Values, key: str, default: float, integer: bool = False) -> Any:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise UsageError(f"{doc.where(key)} expected {kind}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{doc.where(key)} expected > 0, got {value!r}")
    return value


def _keepalive(doc: _Values) -> int:
    value: int = _number(doc, "mqtt_keepalive_s", 30, integer=True)
    if value > 65535:  # MQTT's keep-alive is a 16-bit count of seconds
        raise UsageError(f"{doc.where('mqtt_keepalive_s')} expected 1..65535, got {value}")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    """The ``[serve]`` table of a controller.toml; raises UsageError naming the file and
    the key for an unknown key, in ``[serve]`` or outside it."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    for key in sorted(set(doc) - {"serve"}):
        if key in _KNOWN_KEYS:
            raise UsageError(
                f"{path}: key {key!r} is outside the [serve] table, where it would be "
                f"ignored; did you mean [serve] {key}?"
            )
        raise UsageError(f"{path}: unknown top-level key {key!r}: only a [serve] table is read")
    table = doc.get("serve", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [serve] expected a table")
    for key in sorted(set(table) - set(_KNOWN_KEYS)):
        close = difflib.get_close_matches(key, _KNOWN_KEYS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{path}: unknown key [serve] {key}{hint}")
    return table


def _gather(
    path: Path | None, env: Mapping[str, str], flags: Mapping[str, str | float | None]
) -> _Values:
    """File, then environment, then flags: each key with where it came from."""
    doc = _Values()
    for key, value in (read_toml(path) if path else {}).items():
        doc.set(key, value, f"{path}: [serve] {key}")
    known_vars = sorted(ENV_KEYS.values())
    for var in sorted(env):
        if var.startswith("EDGECTL_") and var not in known_vars:
            close = difflib.get_close_matches(var, known_vars, n=1)
            if close:
                raise UsageError(
                    f"environment variable {var}={env[var]}: no such setting; "
                    f"did you mean {close[0]}?"
                )
    for key, var in ENV_KEYS.items():
        if env.get(var):
            doc.set(key, env[var], f"environment variable {var}={env[var]}")
    for key, flag_value in flags.items():
        if flag_value is not None:
            named = key in ENV_KEYS or key in FLAG_KEYS
            doc.set(key, flag_value, f"--{key.replace('_', '-')}" if named else f"[serve] {key}")
    return doc


def load_serve_config(
    path: Path | None, env: Mapping[str, str], flags: Mapping[str, str | float | None]
) -> ServeConfig:
    """Merge file, environment and flags (``repo``, ``listen``, ``mqtt``) into a config."""
    doc = _gather(path, env, flags)
    repo = doc.get("repo")
    if repo is not None and not isinstance(repo, str):
        raise UsageError(f"{doc.where('repo')} expected a string, got {repo!r}")
    if not isinstance(repo, str) or not repo:
        raise UsageError("no repository given: pass --repo REPO_DIR or set [serve] repo")
    listen = doc.get("listen", "127.0.0.1:8080")
    mqtt = doc.get("mqtt", "127.0.0.1:1883")
    for key, value in (("listen", listen), ("mqtt", mqtt)):
        if not isinstance(value, str):
            raise UsageError(f"{doc.where(key)} expected a HOST:PORT string, got {value!r}")
    listen_host, listen_port = parse_endpoint(listen, doc.where("listen") + ":", allow_zero=True)
    mqtt_host, mqtt_port = parse_endpoint(mqtt, doc.where("mqtt") + ":") if mqtt else (None, 1883)
    client_id = _string(doc, "mqtt_client_id")
    group = _string(doc, "mqtt_shared_group")
    if any(c in group for c in "/+#"):
        raise UsageError(
            f"{doc.where('mqtt_shared_group')} must not contain '/', '+' or '#': {group!r}"
        )
    ingest_id = _string(doc, "ingest_client_id") or default_ingest_client_id(repo, group)
    mqtt_tls = doc.get("mqtt_tls", False)
    if not isinstance(mqtt_tls, bool):
        raise UsageError(f"{doc.where('mqtt_tls')} expected true or false, got {mqtt_tls!r}")
    tls_files = _tls_files(doc, Path(repo), mqtt_tls)
    return ServeConfig(
        repo_dir=Path(repo),
        listen_host=listen_host,
        listen_port=listen_port,
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        mqtt_client_id=client_id or f"edgectl-serve-{secrets.token_hex(4)}",
        mqtt_keepalive_s=_keepalive(doc),
        announce_interval_s=float(_number(doc, "announce_interval_s", 0.5)),
        resign_check_interval_s=float(_number(doc, "resign_check_interval_s", 60.0)),
        store=_string(doc, "store"),
        mqtt_shared_group=group,
        ingest_client_id=ingest_id,
        ingest_session_expiry_s=_number(doc, "ingest_session_expiry_s", 3600, integer=True),
        ingest_batch_size=_number(doc, "ingest_batch_size", 2000, integer=True),
        ingest_flush_s=float(_number(doc, "ingest_flush_s", 0.2)),
        ingest_store_retry_max_s=float(_number(doc, "ingest_store_retry_max_s", 10.0)),
        ingest_stop_timeout_s=float(_number(doc, "ingest_stop_timeout_s", 30.0)),
        ingest_qos0_backlog_max=_number(doc, "ingest_qos0_backlog_max", 100_000, integer=True),
        heartbeat_interval_s=float(_number(doc, "heartbeat_interval_s", 10.0)),
        stale_after_heartbeats=float(_number(doc, "stale_after_heartbeats", 3.0)),
        heartbeat_retention_s=float(_number(doc, "heartbeat_retention_s", 7 * 86400.0)),
        event_retention_s=float(_number(doc, "event_retention_s", 90 * 86400.0)),
        event_max_per_device=_number(doc, "event_max_per_device", 1000, integer=True),
        device_retention_s=float(_number(doc, "device_retention_s", 90 * 86400.0)),
        revoked_device_retention_s=float(_number(doc, "revoked_device_retention_s", 86400.0)),
        model_retention_s=float(_number(doc, "model_retention_s", 7 * 86400.0)),
        rollout_retention_s=float(_number(doc, "rollout_retention_s", 90 * 86400.0)),
        rollout_keep_per_model=_number(doc, "rollout_keep_per_model", 10, integer=True),
        metadata_keep_versions=_number(doc, "metadata_keep_versions", 20, integer=True),
        metadata_min_age_s=float(_number(doc, "metadata_min_age_s", 86400.0)),
        max_requests_per_s=float(_number(doc, "max_requests_per_s", 50_000.0)),
        rollout_tick_interval_s=float(_number(doc, "rollout_tick_interval_s", 5.0)),
        mqtt_tls=mqtt_tls,
        mqtt_ca_file=tls_files.get("mqtt_ca_file"),
        mqtt_cert_file=tls_files.get("mqtt_cert_file"),
        mqtt_key_file=tls_files.get("mqtt_key_file"),
        lease_s=_lease_s(doc),
        instance_id=_string(doc, "instance_id") or default_instance_id(),
    )


def default_instance_id() -> str:
    """``HOSTNAME-PID``: unique among the serve processes sharing a store."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _lease_s(doc: _Values) -> float:
    value = float(_number(doc, "lease_s", 15.0))
    if value < 1.0:
        raise UsageError(
            f"{doc.where('lease_s')} expected at least 1 second, got {value:g} (a lease "
            "shorter than the store's round trips would change hands all the time)"
        )
    return value


def _tls_files(doc: _Values, repo_dir: Path, mqtt_tls: bool) -> dict[str, Path]:
    """The CA, certificate and key paths; unset ones default to the files `edgectl broker
    config` wrote for the controller. Raises UsageError."""
    given = {key: _string(doc, key) for key in _TLS_FILE_KEYS}
    if not mqtt_tls:
        named = [key for key, value in given.items() if value]
        if named:
            raise UsageError(
                f"{doc.where(named[0])} is set but mqtt_tls is false: set mqtt_tls = true"
            )
        return {}
    folder: Path | None = None
    if not all(given.values()):
        from controller.identity.broker import broker_folder  # the CA's modules: only when needed

        folder = broker_folder(repo_dir)
    files: dict[str, Path] = {}
    for key, name in _TLS_FILE_KEYS.items():
        if given[key]:
            files[key] = Path(given[key])
        elif folder is not None:
            files[key] = folder / name
        else:
            raise UsageError(
                f"[serve] {key} not set and `edgectl broker config` never ran for {repo_dir}: "
                f"set {key} or run `edgectl broker config --repo {repo_dir} ...`"
            )
    return files


def _string(doc: _Values, key: str) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise UsageError(f"{doc.where(key)} expected a string, got {value!r}")
    return value


def default_ingest_client_id(repo: str, group: str) -> str:
    """Stable across restarts (the broker keeps the session), distinct per host and repo.

    Workers of one shared group on one host need their own ``ingest_client_id``.
    """
    digest = hashlib.sha256(f"{Path(repo).resolve()}\x00{group}".encode()).hexdigest()[:8]
    return f"edgectl-ingest-{socket.gethostname()}-{digest}"


@dataclass(frozen=True)
class ViewConfig:
    """What ``edgectl fleet``/``device`` need: where the store is, when a device is stale."""

    store: str
    heartbeat_interval_s: float = 10.0
    stale_after_heartbeats: float = 3.0
    # The repository (--repo, EDGECTL_REPO, [serve] repo), for its device registry.
    repo: str | None = None


def load_view_config(
    path: Path | None, env: Mapping[str, str], flags: Mapping[str, str | None]
) -> ViewConfig:
    """Find the store: ``--store``, ``EDGECTL_STORE``, ``[serve] store``, or the repository's
    ``telemetry.sqlite`` (``--repo``, ``EDGECTL_REPO``, ``[serve] repo``). Raises UsageError."""
    doc = _gather(path, env, flags)
    store = _string(doc, "store")
    if not store:
        repo = _string(doc, "repo")
        if not repo:
            raise UsageError(
                "no telemetry store given: pass --store PATH|DSN or --repo REPO_DIR "
                "(or set EDGECTL_STORE, or [serve] store in --config controller.toml)"
            )
        store = str(Path(repo) / DEFAULT_STORE_NAME)
    return ViewConfig(
        store=store,
        heartbeat_interval_s=float(_number(doc, "heartbeat_interval_s", 10.0)),
        stale_after_heartbeats=float(_number(doc, "stale_after_heartbeats", 3.0)),
        repo=_string(doc, "repo") or None,
    )
