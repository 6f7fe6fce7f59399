"""Names, versions, TUF target paths and roles, and the MQTT topics built from them.

Invariants:
- Fleet, model and device names are ASCII, start with a letter or digit, and hold no
  ``/`` and no MQTT wildcard, so they are safe in topics, TUF target paths and file names.
- Versions are semantic versions (semver 2.0, ASCII digits) and order as semver says.
- A name or version is the whole string: no character before or after it, not even a
  final newline (every pattern is applied with ``fullmatch``).
- ``check_name``, ``check_version`` and ``version_key`` raise ``InvalidNameError``.
"""

from __future__ import annotations

import re
from typing import Any, Final

# ---------------------------------------------------------------------------- names

# Applied with ``fullmatch`` only: ``match`` with a ``$`` anchor also accepts a final
# newline ("dev1\n"), which would then reach ACL lines, topics and file names. Digits are
# spelled ``[0-9]``: ``\d`` matches every Unicode digit.
# The form of a name, for a larger pattern to embed (a device topic).
NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_NAME_RE: Final = re.compile(NAME_PATTERN)
_NUM: Final = r"(?:0|[1-9][0-9]*)"
_PRE_ID: Final = rf"(?:{_NUM}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER_RE: Final = re.compile(
    rf"({_NUM})\.({_NUM})\.({_NUM})"
    rf"(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)


def is_name(value: object) -> bool:
    """Whether ``value`` is a string of a name's form (see ``check_name``)."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None


class InvalidNameError(ValueError):
    """A fleet, model or device name, or a version, is not acceptable."""


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid ``kind`` name (fleet, model, device).

    Raises InvalidNameError naming the rule that was broken.
    """
    if not is_name(value):
        raise InvalidNameError(
            f"invalid {kind} name {value!r}: expected 1-64 ASCII letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (no '/', no leading '.')"
        )
    return value


def check_version(value: str) -> str:
    """Return ``value`` if it is a semantic version; raise InvalidNameError otherwise."""
    if not isinstance(value, str) or not _SEMVER_RE.fullmatch(value):
        raise InvalidNameError(
            f"invalid version {value!r}: expected a semantic version such as 1.4.0 or 2.0.0-rc.1"
        )
    return value


def version_key(value: str) -> tuple[Any, ...]:
    """A sort key that orders versions as semver 2.0 does (build metadata ignored)."""
    match = _SEMVER_RE.fullmatch(value)
    if match is None:
        raise InvalidNameError(f"invalid version {value!r}")
    major, minor, patch, pre, _build = match.groups()
    release = (int(major), int(minor), int(patch))
    if pre is None:
        return (*release, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (*release, 0, parts)


# ---------------------------------------------------------------------------- TUF target paths


def bundle_target_path(model: str, version: str) -> str:
    """The TUF target path of a model's release: ``bundles/<model>/<version>.bundle``."""
    return f"bundles/{check_name('model', model)}/{check_version(version)}.bundle"


def desired_target_path(fleet: str) -> str:
    """The TUF target path of a fleet's desired state: ``fleets/<fleet>/desired.json``."""
    return f"fleets/{check_name('fleet', fleet)}/desired.json"


# Delegation pattern of the online rollout role: one ``*`` matches one path segment.
ROLLOUT_ROLE: Final = "rollout"
ROLLOUT_PATHS: Final = ("fleets/*/*",)
BUNDLE_PATHS: Final = ("bundles/*/*",)

# ---------------------------------------------------------------------------- MQTT topics

TOPIC_ROOT: Final = "edgefleet/v1"


def announce_topic(fleet: str) -> str:
    """Retained, controller → agents: new metadata exists for this fleet (a hint only)."""
    return f"{TOPIC_ROOT}/fleets/{check_name('fleet', fleet)}/announce"


def device_topic(fleet: str, device: str, kind: str) -> str:
    """A device's own topic: ``kind`` is ``status``, ``telemetry`` or ``events``."""
    if kind not in ("status", "telemetry", "events"):
        raise ValueError(f"unknown device topic kind {kind!r}")
    return (
        f"{TOPIC_ROOT}/fleets/{check_name('fleet', fleet)}"
        f"/devices/{check_name('device', device)}/{kind}"
    )
