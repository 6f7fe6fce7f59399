"""The agent's configuration: frozen dataclasses loaded once from TOML.

Every key has a default except the device's identity (``device_id``, ``fleet``) and the
repository URL (``url``, or ``mirrors``). Environment variables override the file:
``EDGE_AGENT_<KEY>`` for top-level keys and ``EDGE_AGENT_<SECTION>_<KEY>`` for keys in a
section (for example ``EDGE_AGENT_MQTT_PORT=1884``); a list (``repository.mirrors``) is
comma-separated there. docs/configuration.md lists every key.

Invariants: a loaded ``AgentConfig`` has valid names, positive intervals and absolute
or config-relative paths resolved to absolute ones. Loading raises ``ConfigError``
naming the file (or the EDGE_AGENT_* variable that set the value), the key, what was
expected and what was found; an unknown key or variable names the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.base.errors import ConfigError
from agent.contracts import InvalidNameError, check_name
from agent.contracts.chunks import MAX_CHUNK_BYTES

ENV_PREFIX = "EDGE_AGENT_"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    username: str = ""
    password: str = ""
    # Seconds between reconnect attempts grow from min to max.
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    # TLS with a client certificate (what `edgectl device add` enrolls): the broker is
    # verified against ca_file (and its name against host); the device proves itself
    # with cert_file and its key. Under systemd the key comes as the credential
    # key_credential in $CREDENTIALS_DIRECTORY (LoadCredential=), so the file on disk
    # stays root-only; key_file is the fallback outside systemd.
    tls: bool = False
    ca_file: Path = Path("/etc/edge-agent/ca.crt")
    cert_file: Path = Path("/etc/edge-agent/device.crt")
    key_file: Path = Path("/etc/edge-agent/device.key")
    key_credential: str = "device.key"

    def tls_key_path(self, environ: Mapping[str, str]) -> Path:
        """The client key to use: the systemd credential when there is one, else key_file."""
        credentials = environ.get("CREDENTIALS_DIRECTORY", "")
        if credentials and self.key_credential:
            candidate = Path(credentials) / self.key_credential
            if candidate.exists():
                return candidate
        return self.key_file


@dataclass(frozen=True)
class RepositoryConfig:
    url: str = ""
    # Untrusted copies of the repository (site gateways, CDNs, static hosts), tried in
    # this order before ``url`` on every check; a mirror that cannot be reached, or whose
    # metadata or bytes fail TUF's verification, hands the check to the next one. With
    # mirrors, ``url`` may be empty. ``sources`` is the whole list, in order.
    mirrors: tuple[str, ...] = ()
    # The announcement over MQTT is the fast path; the poll catches lost messages.
    poll_interval_s: float = 300.0
    poll_jitter_s: float = 30.0
    # Per request: connect and read timeouts; per file: an overall deadline.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    download_deadline_s: float = 600.0
    # Minimum progress: a transfer averaging fewer bytes/s than this over any window of
    # progress_window_s is cut (0: off). An interrupted bundle resumes on the next check.
    min_bytes_per_s: float = 1024.0
    progress_window_s: float = 60.0
    max_bundle_bytes: int = 1024 * 1024 * 1024
    # "http": the URL above; "mqtt": chunks over the broker of [mqtt] (docs/protocol.md);
    # "auto": HTTP, falling back to MQTT while HTTP cannot be reached.
    transport: str = "http"
    # MQTT transport: bytes per chunk request, chunk requests in flight, and how long
    # "auto" stays on MQTT before trying HTTP again.
    mqtt_chunk_bytes: int = 64 * 1024
    mqtt_window: int = 4
    fallback_retry_s: float = 300.0

    @property
    def sources(self) -> tuple[str, ...]:
        """Every HTTP repository URL, in the order a check tries them: mirrors, then url."""
        return (*self.mirrors, self.url) if self.url else self.mirrors


@dataclass(frozen=True)
class InferenceConfig:
    socket_path: Path = Path("/run/edge-agent/infer.sock")
    socket_mode: int = 0o660
    # Group of the socket file (name or number); empty: the agent's own group.
    socket_group: str = ""
    max_body_bytes: int = 64 * 1024 * 1024
    # Large request bodies (64 KiB and up) held in memory at once, all clients together:
    # being received, or kept for reuse by a connection (503 with Retry-After beyond).
    max_body_buffer_bytes: int = 256 * 1024 * 1024
    # The JSON of an infer request (all of it, or its Inference-Header-Content-Length
    # part): parsing takes ~12 times its size in memory (413 beyond).
    max_json_bytes: int = 4 * 1024 * 1024
    # Requests running on ONNX Runtime at once, and how many more may wait (503 beyond).
    max_concurrency: int = 4
    max_queue: int = 32
    max_connections: int = 256
    # The share of max_connections and of max_body_buffer_bytes one client (a uid; every
    # TCP client together) may hold, so that no client can lock out the others.
    peer_share: float = 0.5
    intra_op_threads: int = 1
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # From a complete request to its answer; a request still waiting then never runs.
    request_deadline_s: float = 30.0
    idle_timeout_s: float = 60.0
    # After answering a client whose last request came within this long, poll for its
    # next one this long before blocking (0: never): saves a thread wake-up per request
    # for back-to-back clients, at most this much CPU each time.
    busy_poll_s: float = 0.0002
    # Comma-separated user/group names or ids allowed to connect (SO_PEERCRED); empty: any
    # peer the socket's mode lets in.
    allowed_users: str = ""
    allowed_groups: str = ""
    # Loopback TCP listener for clients that cannot open Unix sockets; 0: off.
    tcp_port: int = 0
    tcp_host: str = "127.0.0.1"
    shared_memory: bool = True


@dataclass(frozen=True)
class InstallConfig:
    # Deadlines per install phase; the download's is repository.download_deadline_s.
    unpack_deadline_s: float = 300.0
    smoke_test_deadline_s: float = 300.0
    activate_deadline_s: float = 60.0
    # Version directories kept per model: the one serving, the previous one for an
    # instant rollback, and older ones up to this count.
    keep_versions: int = 2
    # How often a version on probation is judged.
    probation_tick_s: float = 1.0


@dataclass(frozen=True)
class TelemetryConfig:
    # Heartbeats on .../telemetry: how often, and at which QoS (0 or 1). A heartbeat due
    # while the broker is unreachable is skipped: the next one carries fresh figures.
    heartbeat_interval_s: float = 10.0
    heartbeat_qos: int = 0
    # Lifecycle events wait in an on-disk outbox (state_dir/outbox.sqlite) until the
    # broker acknowledges them; past this many the oldest are dropped (and counted).
    outbox_max_events: int = 10000
    # How long one event may wait for the broker's PUBACK before it is sent again.
    event_ack_timeout_s: float = 10.0


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    fleet: str
    state_dir: Path = Path("/var/lib/edge-agent")
    trusted_root: Path = Path("/etc/edge-agent/root.json")
    log_level: str = "INFO"
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


_SECTIONS: Mapping[str, type[Any]] = {
    "mqtt": MqttConfig,
    "repository": RepositoryConfig,
    "inference": InferenceConfig,
    "install": InstallConfig,
    "telemetry": TelemetryConfig,
}


# Keys an older agent knew and this one ignores: why, for the warning.
_RETIRED: Mapping[str, str] = {
    "inference.inline_max_run_s": "every request now runs on its connection's thread, "
    "with no hop between threads; remove the key",
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# The one list type a key may have: a list of strings (a comma-separated string in the
# environment).
_STRINGS = tuple[str, ...]


def _coerce(raw: Any, kind: Any, base_dir: Path) -> Any:
    """Coerce a TOML value, or a string from the environment, to ``kind``."""
    if isinstance(raw, bool) and kind is not bool:
        raise TypeError(raw)
    if kind == _STRINGS:
        if isinstance(raw, str):  # from the environment: "a, b"
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return tuple(raw)
        raise TypeError(raw)
    if kind is Path:
        path = Path(str(raw))
        return path if path.is_absolute() else (base_dir / path).resolve()
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise TypeError(raw)
    if kind is int:
        return raw if isinstance(raw, int) else int(str(raw), 0)
    if kind is float:
        number = float(raw) if isinstance(raw, int | float) else float(str(raw))
        if not math.isfinite(number):
            raise ValueError(raw)
        return number
    if isinstance(raw, str):
        return raw
    raise TypeError(raw)


def _convert(key: str, raw: Any, kind: Any, base_dir: Path) -> Any:
    """Convert a value to the field's type, or raise ConfigError naming the key."""
    try:
        return _coerce(raw, kind, base_dir)
    except (TypeError, ValueError):
        name = "a list of strings" if kind == _STRINGS else getattr(kind, "__name__", str(kind))
        raise ConfigError(f"config key {key!r}: expected {name}, got {raw!r}") from None


def _build(cls: type[Any], values: Mapping[str, Any], prefix: str, base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = _drop_retired(values, prefix)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(_unknown_key_message(prefix, unknown[0], known))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        kind = hints[f.name]
        if isinstance(kind, types.GenericAlias | types.UnionType) and kind != _STRINGS:
            raise ConfigError(f"config key {prefix}{f.name} has an unsupported type")
        kwargs[f.name] = _convert(prefix + f.name, values[f.name], kind, base_dir)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"config section {prefix or 'top level'}: {exc}") from None


def _unknown_key_message(prefix: str, key: str, known: set[str]) -> str:
    """Name the unknown key, the closest known one (or the section it belongs in)."""
    message = f"unknown config key '{prefix}{key}'"
    close = difflib.get_close_matches(key, sorted(known), n=1)
    homes = [name for name, cls in _SECTIONS.items() if key in _field_names(cls)]
    if not prefix and homes:
        message += f"; did you mean [{homes[0]}] {key}?"
    elif close:
        message += f"; did you mean '{prefix}{close[0]}'?"
    return f"{message} (known keys: {', '.join(sorted(known))})"


def _field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _env_variables() -> dict[str, str]:
    """Every EDGE_AGENT_* variable the agent reads → the config key it overrides."""
    out = {
        ENV_PREFIX + f.name.upper(): f.name
        for f in dataclasses.fields(AgentConfig)
        if f.name not in _SECTIONS
    }
    for section, cls in _SECTIONS.items():
        for name in _field_names(cls):
            out[f"{ENV_PREFIX}{section.upper()}_{name.upper()}"] = f"{section}.{name}"
    for retired in _RETIRED:
        out[ENV_PREFIX + retired.replace(".", "_").upper()] = retired
    return out


def _drop_retired(values: Mapping[str, Any], prefix: str) -> Mapping[str, Any]:
    """Drop keys older agents knew, with a warning (an upgrade must not stop a device)."""
    retired = [key for key in values if prefix + key in _RETIRED]
    for key in retired:
        logger.warning("config key %r is no longer used: %s", prefix + key, _RETIRED[prefix + key])
    return {k: v for k, v in values.items() if k not in retired} if retired else values


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Collect EDGE_AGENT_* variables into the same nested shape as the TOML file, and
    which variable set each key (``"mqtt.port"`` → ``"EDGE_AGENT_MQTT_PORT=1884"``).

    A variable that names no key is an error naming the closest known variable."""
    known = _env_variables()
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for var, value in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX):
            continue
        key = known.get(var)
        if key is None:
            close = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(
                f"environment variable {var}={value}: no such config key{hint} "
                f"(EDGE_AGENT_<KEY> or EDGE_AGENT_<SECTION>_<KEY>, docs/configuration.md)"
            )
        sources[key] = f"{var}={value}"
        section, dot, name = key.partition(".")
        if dot:
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out, sources


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def parse_config(
    doc: Mapping[str, Any],
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
    source: str = "",
) -> AgentConfig:
    """Build an AgentConfig from a parsed TOML document plus environment overrides.

    ``source`` (the file's path) prefixes errors about the file's keys; an error about a
    key an environment variable set names that variable instead."""
    overrides, env_sources = _env_overrides(environ if environ is not None else {})
    try:
        return _parse(dict(doc), overrides, base_dir)
    except ConfigError as exc:
        message = str(exc)
        for key, var in env_sources.items():
            if f"'{key}'" in message:
                raise ConfigError(f"environment variable {var}: {message}") from None
        raise ConfigError(f"{source}: {message}" if source else message) from None


def _parse(doc: dict[str, Any], overrides: Mapping[str, Any], base_dir: Path) -> AgentConfig:
    values = _merge(doc, overrides)
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        raw = values.pop(name, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config section [{name}] must be a table, got {raw!r}")
        sections[name] = _build(cls, raw, f"{name}.", base_dir)
    for required in ("device_id", "fleet"):
        if required not in values:
            raise ConfigError(f"config key {required!r} is required")
    top = _build(AgentConfig, values, "", base_dir)
    config: AgentConfig = dataclasses.replace(top, **sections)
    _validate(config)
    return config


def _validate(config: AgentConfig) -> None:
    for name_key, kind, name in (
        ("device_id", "device", config.device_id),
        ("fleet", "fleet", config.fleet),
    ):
        try:
            check_name(kind, name)
        except InvalidNameError as exc:
            raise ConfigError(f"config key {name_key!r}: {exc}") from None
    _validate_repository(config.repository)
    _validate_mqtt(config.mqtt)
    positive = {
        "repository.poll_interval_s": config.repository.poll_interval_s,
        "repository.connect_timeout_s": config.repository.connect_timeout_s,
        "repository.read_timeout_s": config.repository.read_timeout_s,
        "repository.download_deadline_s": config.repository.download_deadline_s,
        "repository.max_bundle_bytes": config.repository.max_bundle_bytes,
        "repository.progress_window_s": config.repository.progress_window_s,
        "repository.mqtt_chunk_bytes": config.repository.mqtt_chunk_bytes,
        "repository.mqtt_window": config.repository.mqtt_window,
        "repository.fallback_retry_s": config.repository.fallback_retry_s,
        "inference.max_concurrency": config.inference.max_concurrency,
        "inference.intra_op_threads": config.inference.intra_op_threads,
        "install.unpack_deadline_s": config.install.unpack_deadline_s,
        "install.smoke_test_deadline_s": config.install.smoke_test_deadline_s,
        "install.activate_deadline_s": config.install.activate_deadline_s,
        "install.probation_tick_s": config.install.probation_tick_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r}: expected a positive number, got {value}")
    if config.install.keep_versions < 2:
        raise ConfigError(
            "config key 'install.keep_versions': expected at least 2 (the version serving "
            f"and the previous one, for rollback), got {config.install.keep_versions}"
        )
    if config.mqtt.key_credential and "/" in config.mqtt.key_credential:
        raise ConfigError(
            "config key 'mqtt.key_credential': expected a credential name (no '/'), "
            f"got {config.mqtt.key_credential!r}"
        )
    if config.repository.poll_jitter_s < 0:
        raise ConfigError("config key 'repository.poll_jitter_s' must not be negative")
    _validate_inference(config.inference)
    _validate_telemetry(config.telemetry)


TRANSPORTS = ("http", "mqtt", "auto")


def _validate_mqtt(mqtt: MqttConfig) -> None:
    # MQTT's keep-alive is a 16-bit count of seconds; 0 would turn it off.
    for key, value in (("mqtt.port", mqtt.port), ("mqtt.keepalive_s", mqtt.keepalive_s)):
        if not 1 <= value <= 65535:
            raise ConfigError(f"config key {key!r}: expected 1..65535, got {value}")
    if mqtt.reconnect_min_s <= 0:
        raise ConfigError(
            f"config key 'mqtt.reconnect_min_s': expected a positive number, "
            f"got {mqtt.reconnect_min_s}"
        )
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        raise ConfigError(
            f"config key 'mqtt.reconnect_max_s': expected at least reconnect_min_s "
            f"({mqtt.reconnect_min_s}), got {mqtt.reconnect_max_s}"
        )


def _validate_repository(repository: RepositoryConfig) -> None:
    if repository.transport not in TRANSPORTS:
        raise ConfigError(
            f"config key 'repository.transport': expected one of {', '.join(TRANSPORTS)}, "
            f"got {repository.transport!r}"
        )
    if repository.transport == "mqtt" and repository.mirrors:
        raise ConfigError(
            "config key 'repository.mirrors': transport mqtt fetches through the broker "
            "only; remove the mirrors, or set transport to http or auto (mirrors first, "
            "then url, then MQTT)"
        )
    url_needed = repository.url or not repository.mirrors
    if repository.transport != "mqtt" and url_needed and not _is_http_url(repository.url):
        raise ConfigError(
            f"config key 'repository.url': expected an http:// or https:// URL "
            f"(transport {repository.transport}), got {repository.url!r}"
        )
    for number, mirror in enumerate(repository.mirrors, 1):
        if not _is_http_url(mirror):
            raise ConfigError(
                f"config key 'repository.mirrors': entry {number} is not an http:// or "
                f"https:// URL with a host: {mirror!r}"
            )
    seen = [source.rstrip("/") for source in repository.sources]
    for source in seen:
        if seen.count(source) > 1:
            raise ConfigError(
                f"config key 'repository.mirrors': {source!r} is listed twice (mirrors "
                "and url together): list each repository once"
            )
    if repository.min_bytes_per_s < 0:
        raise ConfigError("config key 'repository.min_bytes_per_s' must not be negative")
    if repository.mqtt_chunk_bytes > MAX_CHUNK_BYTES:
        raise ConfigError(
            f"config key 'repository.mqtt_chunk_bytes': expected at most "
            f"{MAX_CHUNK_BYTES}, got {repository.mqtt_chunk_bytes}"
        )


def _is_http_url(url: str) -> bool:
    scheme, _, rest = url.partition("://")
    return scheme in ("http", "https") and bool(rest.split("/", 1)[0])


def _validate_telemetry(telemetry: TelemetryConfig) -> None:
    for key, value in (
        ("telemetry.heartbeat_interval_s", telemetry.heartbeat_interval_s),
        ("telemetry.outbox_max_events", telemetry.outbox_max_events),
        ("telemetry.event_ack_timeout_s", telemetry.event_ack_timeout_s),
    ):
        if value <= 0:
            raise ConfigError(f"config key {key!r}: expected a positive number, got {value}")
    if telemetry.heartbeat_qos not in (0, 1):
        raise ConfigError(
            f"config key 'telemetry.heartbeat_qos': expected 0 or 1, got {telemetry.heartbeat_qos}"
        )


# What the memory bound counts besides request data (measured, docs/operations.md): the
# interpreter, ONNX Runtime and the agent's other tasks (~114 MiB RSS with every module
# loaded and a tiny model); per connection its thread's stack, its 128 KiB head buffer,
# a body that came with its head and one under 64 KiB; JSON parsed, per byte.
AGENT_BASE_BYTES = 128 * 1024 * 1024
CONNECTION_BYTES = 384 * 1024
JSON_PARSE_FACTOR = 12


def memory_without_models_bytes(inference: InferenceConfig) -> int:
    """The most the agent takes under any local load, its models aside: the base, every
    connection, the large request bodies in memory and the JSON of the runs in flight.
    ``MemoryMax=`` in the unit must exceed this by what the models take (sessions and
    the activations of ``max_concurrency`` runs; twice the sessions during a swap)."""
    return (
        AGENT_BASE_BYTES
        + inference.max_connections * CONNECTION_BYTES
        + inference.max_body_buffer_bytes
        + inference.max_concurrency * JSON_PARSE_FACTOR * inference.max_json_bytes
    )


def check_body_limits(max_body_bytes: int, max_body_buffer_bytes: int, peer_share: float) -> None:
    """Raise ConfigError unless one client may hold a largest body: ``max_body_bytes``
    within its share (``peer_share``, 0 < share <= 1) of ``max_body_buffer_bytes``."""
    if not 0 < peer_share <= 1:
        raise ConfigError(
            "config key 'inference.peer_share': expected 0 < share <= 1 (what one client "
            f"may hold of max_connections and max_body_buffer_bytes), got {peer_share}"
        )
    if max_body_bytes > max_body_buffer_bytes * peer_share:
        raise ConfigError(
            f"config key 'inference.max_body_bytes' ({max_body_bytes}) is more than one "
            f"client may hold of 'inference.max_body_buffer_bytes' ({max_body_buffer_bytes}) "
            f"× 'inference.peer_share' ({peer_share}), so no body that large would ever be "
            "accepted: raise max_body_buffer_bytes or lower max_body_bytes"
        )


def _validate_inference(inference: InferenceConfig) -> None:
    positive = {
        "inference.max_body_bytes": inference.max_body_bytes,
        "inference.max_body_buffer_bytes": inference.max_body_buffer_bytes,
        "inference.max_json_bytes": inference.max_json_bytes,
        "inference.max_connections": inference.max_connections,
        "inference.header_timeout_s": inference.header_timeout_s,
        "inference.body_timeout_s": inference.body_timeout_s,
        "inference.request_deadline_s": inference.request_deadline_s,
        "inference.idle_timeout_s": inference.idle_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r}: expected a positive number, got {value}")
    check_body_limits(
        inference.max_body_bytes, inference.max_body_buffer_bytes, inference.peer_share
    )
    if not 0 <= inference.busy_poll_s <= 0.01:
        raise ConfigError(
            f"config key 'inference.busy_poll_s': expected 0 (off) to 0.01 s, "
            f"got {inference.busy_poll_s}"
        )
    if not 0 <= inference.socket_mode <= 0o7777:
        raise ConfigError(
            f"config key 'inference.socket_mode': expected a file mode 0..0o7777, "
            f"got {inference.socket_mode:#o}"
        )
    if inference.max_queue < 0:
        raise ConfigError(
            f"config key 'inference.max_queue': expected a number >= 0, got {inference.max_queue}"
        )
    if not 0 <= inference.tcp_port <= 65535:
        raise ConfigError(
            f"config key 'inference.tcp_port': expected 0 (off) or 1..65535, "
            f"got {inference.tcp_port}"
        )
    if inference.tcp_port and inference.tcp_host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(
            f"config key 'inference.tcp_host': the TCP listener is loopback only "
            f"(127.0.0.1, ::1 or localhost), got {inference.tcp_host!r}"
        )
    if inference.tcp_port and (inference.allowed_users or inference.allowed_groups):
        raise ConfigError(
            "config keys 'inference.allowed_users'/'inference.allowed_groups' restrict the "
            "Unix socket, but TCP has no peer credentials: set 'inference.tcp_port = 0' "
            "or remove the allow-list"
        )
    for key, names_text in (
        ("inference.allowed_users", inference.allowed_users),
        ("inference.allowed_groups", inference.allowed_groups),
    ):
        names = [n.strip() for n in names_text.split(",")]
        if names_text and not all(names):
            raise ConfigError(
                f"config key {key!r}: expected comma-separated names or ids, got {names_text!r}"
            )


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Load the agent's TOML config; relative paths are relative to the file's folder."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    env = os.environ if environ is None else environ
    return parse_config(doc, path.parent.resolve(), env, source=str(path))
