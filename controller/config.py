"""Configuration of ``edgectl serve``: a frozen dataclass loaded once.

Precedence, highest first: command-line flags, environment (``EDGECTL_REPO``,
``EDGECTL_LISTEN``, ``EDGECTL_MQTT``), the ``[serve]`` table of ``controller.toml``,
the defaults below. Every key is documented in ``docs/configuration.md``.

Invariants: a ``ServeConfig`` is valid once built (ports in range, intervals positive);
loading raises UsageError naming the key, what was expected and what was found.
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from controller.errors import UsageError

ENV_KEYS: Final = {"repo": "EDGECTL_REPO", "listen": "EDGECTL_LISTEN", "mqtt": "EDGECTL_MQTT"}
_KNOWN_KEYS: Final = (
    "repo",
    "listen",
    "mqtt",
    "mqtt_client_id",
    "mqtt_keepalive_s",
    "announce_interval_s",
    "resign_check_interval_s",
)


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


def _number(doc: Mapping[str, Any], key: str, default: float, integer: bool = False) -> Any:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise UsageError(f"[serve] {key} expected {kind}, got {value!r}")
    if value <= 0:
        raise UsageError(f"[serve] {key} expected > 0, got {value!r}")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    """The ``[serve]`` table of a controller.toml; raises UsageError."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    table = doc.get("serve", {})
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [serve] expected a table")
    unknown = sorted(set(table) - set(_KNOWN_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown keys in [serve]: {', '.join(unknown)}")
    return table


def load_serve_config(
    path: Path | None, env: Mapping[str, str], flags: Mapping[str, str | None]
) -> ServeConfig:
    """Merge file, environment and flags (``repo``, ``listen``, ``mqtt``) into a config."""
    doc: dict[str, Any] = read_toml(path) if path else {}
    for key, var in ENV_KEYS.items():
        if env.get(var):
            doc[key] = env[var]
    for key, flag_value in flags.items():
        if flag_value is not None:
            doc[key] = flag_value
    repo = doc.get("repo")
    if not isinstance(repo, str) or not repo:
        raise UsageError("no repository given: pass --repo REPO_DIR or set [serve] repo")
    listen_host, listen_port = parse_endpoint(
        str(doc.get("listen", "127.0.0.1:8080")), "listen", allow_zero=True
    )
    mqtt = str(doc.get("mqtt", "127.0.0.1:1883"))
    mqtt_host, mqtt_port = parse_endpoint(mqtt, "mqtt") if mqtt else (None, 1883)
    client_id = doc.get("mqtt_client_id", "")
    if not isinstance(client_id, str):
        raise UsageError(f"[serve] mqtt_client_id expected a string, got {client_id!r}")
    return ServeConfig(
        repo_dir=Path(repo),
        listen_host=listen_host,
        listen_port=listen_port,
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        mqtt_client_id=client_id or f"edgectl-serve-{secrets.token_hex(4)}",
        mqtt_keepalive_s=_number(doc, "mqtt_keepalive_s", 30, integer=True),
        announce_interval_s=float(_number(doc, "announce_interval_s", 0.5)),
        resign_check_interval_s=float(_number(doc, "resign_check_interval_s", 60.0)),
    )
