"""A fleet's desired state (``desired.json``) and how a rollout picks each device's release.

``parse_desired_state`` raises ``DesiredStateError`` naming the field, what was expected
and what was found. ``device_bucket`` is stable per (rollout, device), so a device stays
on the same side of a rollout while its percentage grows.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final

from agent.base.errors import BundleError, DesiredStateError
from agent.contracts._fields import _require
from agent.contracts.names import (
    InvalidNameError,
    bundle_target_path,
    check_name,
    check_version,
)

# ---------------------------------------------------------------------------- desired state

DESIRED_SCHEMA: Final = "edgefleet.desired/1"


@dataclass(frozen=True)
class ProbationPolicy:
    """What a new version must show after activation before the device commits it."""

    duration_s: float = 60.0
    min_requests: int = 0
    max_error_rate: float = 0.05
    max_p99_ratio: float = 2.0


# ---- shadow policy (what a candidate must show in shadow before it answers a client)


@dataclass(frozen=True)
class ShadowPolicy:
    """What a candidate must show in shadow, beside the serving version, before it goes live.

    In shadow the device copies a sampled share (``sample_rate``) of its live requests to
    the candidate, at most one candidate run at a time (a request arriving while one runs
    is not copied: counted as dropped), and compares the answers; the serving version
    alone answers clients. The verdict comes when ``samples`` requests were compared, or
    at ``max_duration_s``:

    - more than ``max_errors`` candidate runs that failed fail it at once;
    - once ``samples`` requests were compared: it fails on top-1 agreement below
      ``min_agreement`` (class-score outputs), a cosine below ``min_cosine``, a
      difference above ``max_abs_diff``, a median run-time ratio above
      ``max_latency_ratio``; it passes otherwise;
    - at ``max_duration_s`` with fewer than ``samples`` compared: the rules are applied to
      what was compared, if anything was; with nothing compared (no traffic for this
      model at all) the candidate passes on its golden vectors alone, as it would
      without a shadow, and its probation judges it on live traffic.

    ``min_cosine`` and ``max_abs_diff`` of None: not checked. A desired state without a
    ``shadow`` object (written before shadows existed) gets these defaults.
    """

    enabled: bool = True
    samples: int = 20
    max_duration_s: float = 120.0
    sample_rate: float = 1.0
    min_agreement: float = 0.98
    min_cosine: float | None = None
    max_abs_diff: float | None = None
    max_latency_ratio: float = 3.0
    max_errors: int = 0


def check_shadow_policy(policy: ShadowPolicy) -> ShadowPolicy:
    """``policy`` if every field is in range; ValueError naming the field otherwise."""
    if type(policy.enabled) is not bool:
        raise ValueError(f"enabled expected true or false, got {policy.enabled!r}")
    for key in ("samples", "max_errors"):
        value = getattr(policy, key)
        if type(value) is not int or value < 0:
            raise ValueError(f"{key} expected an integer >= 0, got {value!r}")
    if policy.samples < 1:
        raise ValueError(f"samples expected at least 1, got {policy.samples}")
    numbers = {
        "max_duration_s": (policy.max_duration_s, 0.0, None),
        "sample_rate": (policy.sample_rate, 0.0, 1.0),
        "min_agreement": (policy.min_agreement, 0.0, 1.0),
        "min_cosine": (policy.min_cosine, -1.0, 1.0),
        "max_abs_diff": (policy.max_abs_diff, 0.0, None),
        "max_latency_ratio": (policy.max_latency_ratio, 0.0, None),
    }
    for key, (value, low, high) in numbers.items():
        if value is None:
            if key in ("min_cosine", "max_abs_diff"):
                continue
            raise ValueError(f"{key} expected a finite number, got None")
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"{key} expected a finite number, got {value!r}")
        if value < low or (high is not None and value > high):
            span = f"{low:g}..{high:g}" if high is not None else f">= {low:g}"
            raise ValueError(f"{key} expected {span}, got {value!r}")
    if policy.sample_rate <= 0.0:
        raise ValueError(f"sample_rate expected more than 0 (up to 1), got {policy.sample_rate!r}")
    if policy.max_latency_ratio <= 0.0:
        raise ValueError(
            f"max_latency_ratio expected more than 0, got {policy.max_latency_ratio!r}"
        )
    return policy


def parse_shadow_policy(doc: Any, where: str) -> ShadowPolicy:
    """A ``shadow`` object as desired state (or a journal record) carries it: absent
    (None) is the defaults; DesiredStateError naming the field for anything else wrong."""
    if doc is None:
        return ShadowPolicy()
    if not isinstance(doc, dict):
        raise DesiredStateError(f"{where}: shadow expected an object, got {type(doc).__name__}")
    known = {f.name for f in fields(ShadowPolicy)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise DesiredStateError(f"{where}: shadow fields this agent does not know: {unknown}")
    try:
        return check_shadow_policy(ShadowPolicy(**doc))
    except ValueError as exc:
        raise DesiredStateError(f"{where}: shadow: {exc}") from None


@dataclass(frozen=True)
class ModelRelease:
    """One model's entry in a fleet's desired state.

    ``version`` is the new release; devices outside the rollout keep ``previous``
    (or nothing, when there is none). ``percent`` of devices (by bucket) plus every
    device in ``canaries`` take ``version``.
    """

    version: str
    target: str
    rollout_id: str
    percent: float = 100.0
    previous: str | None = None
    previous_target: str | None = None
    canaries: tuple[str, ...] = ()
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)
    shadow: ShadowPolicy = field(default_factory=ShadowPolicy)


@dataclass(frozen=True)
class DesiredState:
    """A fleet's ``desired.json``: per model, which release its devices should run."""

    fleet: str
    models: Mapping[str, ModelRelease]
    issued_at: str = ""
    schema: str = DESIRED_SCHEMA

    def to_json_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "schema": self.schema,
            "fleet": self.fleet,
            "issued_at": self.issued_at,
            "models": {},
        }
        for name, rel in sorted(self.models.items()):
            entry = asdict(rel)
            entry["canaries"] = list(rel.canaries)
            doc["models"][name] = entry
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True).encode()


def _desired_field(
    doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str
) -> Any:
    try:
        return _require(doc, key, kind, where)
    except BundleError as exc:
        raise DesiredStateError(str(exc)) from None


def parse_desired_state(raw: bytes, expected_fleet: str) -> DesiredState:
    """Parse ``desired.json``; raise DesiredStateError naming what is wrong."""
    where = f"fleets/{expected_fleet}/desired.json"
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DesiredStateError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DesiredStateError(f"{where}: expected a JSON object")
    schema = _desired_field(doc, "schema", str, where)
    if schema != DESIRED_SCHEMA:
        raise DesiredStateError(f"{where}: schema expected {DESIRED_SCHEMA!r}, got {schema!r}")
    fleet = _desired_field(doc, "fleet", str, where)
    if fleet != expected_fleet:
        raise DesiredStateError(f"{where}: fleet expected {expected_fleet!r}, got {fleet!r}")
    models: dict[str, ModelRelease] = {}
    for name, entry in _desired_field(doc, "models", dict, where).items():
        w = f"{where} models[{name!r}]"
        try:
            check_name("model", name)
            version = check_version(_desired_field(entry, "version", str, w))
            previous = entry.get("previous")
            if previous is not None:
                check_version(previous)
        except InvalidNameError as exc:
            raise DesiredStateError(f"{w}: {exc}") from None
        target = _desired_field(entry, "target", str, w)
        if target != bundle_target_path(name, version):
            raise DesiredStateError(
                f"{w}: target expected {bundle_target_path(name, version)!r}, got {target!r}"
            )
        percent = float(_desired_field(entry, "percent", (int, float), w))
        if not 0.0 <= percent <= 100.0:
            raise DesiredStateError(f"{w}: percent expected 0..100, got {percent}")
        canaries = _desired_field(entry, "canaries", list, w)
        prob = entry.get("probation", {})
        if not isinstance(prob, dict):
            raise DesiredStateError(f"{w}: probation expected an object")
        try:
            policy = ProbationPolicy(**prob)
        except TypeError as exc:
            raise DesiredStateError(f"{w}: probation: {exc}") from None
        models[name] = ModelRelease(
            version=version,
            target=target,
            rollout_id=str(_desired_field(entry, "rollout_id", str, w)),
            percent=percent,
            previous=previous,
            previous_target=bundle_target_path(name, previous) if previous else None,
            canaries=tuple(str(c) for c in canaries),
            probation=policy,
            shadow=parse_shadow_policy(entry.get("shadow"), w),
        )
    return DesiredState(fleet=fleet, models=models, issued_at=str(doc.get("issued_at", "")))


def device_bucket(rollout_id: str, device_id: str) -> float:
    """The device's place in a rollout, in [0, 100): stable per (rollout, device).

    The first 8 bytes of sha256(``rollout_id`` NUL ``device_id``), big-endian, over 2**64,
    times 100. The agent decides by it; the controller counts by it (``device_buckets``
    computes the same for many devices at once).
    """
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100.0


# 100 / 2**64 is a power of two times 100: exact in a double, so x * _SCALE rounds as
# x / 2**64 * 100.0 does (both are the one rounding of x * 100 * 2**-64).
_SCALE: Final = 100.0 / 2**64
_FIRST_8: Final = struct.Struct(">Q").unpack_from


def device_buckets(rollout_id: str, device_ids: Iterable[str]) -> list[float]:
    """``device_bucket(rollout_id, d)`` for each of ``device_ids``, in order: the same
    numbers (tests/agent/contracts compares them), about twice as fast: the hash of the
    rollout's prefix is computed once and copied for each device."""
    prefix = hashlib.sha256(f"{rollout_id}\x00".encode())
    out = []
    for device_id in device_ids:
        h = prefix.copy()
        h.update(device_id.encode())
        out.append(_FIRST_8(h.digest())[0] * _SCALE)
    return out


def resolve_release(release: ModelRelease, device_id: str) -> tuple[str, str] | None:
    """Which (version, target) this device should run for one model, or None for nothing.

    A canary or a device whose bucket falls below ``percent`` takes the new release;
    every other device keeps the previous release, if there is one.
    """
    if (
        device_id in release.canaries
        or device_bucket(release.rollout_id, device_id) < release.percent
    ):
        return release.version, release.target
    if release.previous is not None and release.previous_target is not None:
        return release.previous, release.previous_target
    return None
